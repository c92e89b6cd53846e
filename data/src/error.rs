//! The data crate's error type: every variant names the file (or source) and the problem.

use std::path::PathBuf;

/// Errors raised while reading, decoding or assembling training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory could not be created or written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what the reader expected.
    #[error("{path}: {message}")]
    Invalid {
        /// The file (or a `tar-member` style name for archive members).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A data-source specification or configuration value is wrong.
    #[error("bad data specification `{spec}`: {message}")]
    Spec {
        /// The specification as the user wrote it.
        spec: String,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer is missing something the model needs, or does not match a checkpoint.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Packed rows cannot form one batch (mixed latent shapes, rows of different lengths).
    #[error("batch: {0}")]
    Batch(String),
}

impl DataError {
    /// Shorthand for [`DataError::Invalid`].
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`DataError::Write`].
    pub fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Write {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`DataError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
