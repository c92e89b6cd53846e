//! The runtime's error type (devices, checkpoints, autoencoders), and [`report`], which
//! prints any error with its causes once each (the binaries' last line on failure).

use std::error::Error as StdError;
use std::path::PathBuf;

use transfusion_data::DataError;

/// Errors of loading checkpoints and VAEs and of choosing devices.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Metadata and model disagree.
    #[error("checkpoint metadata: {0}")]
    Meta(String),
    /// A file or directory exists but is not what the reader expected, or is missing a part.
    #[error("{path}: {message}")]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Options that cannot work (the message names the option).
    #[error("{0}")]
    Options(String),
    /// The requested device cannot be used (not compiled in, no adapter, listed twice).
    #[error("{0}")]
    Device(String),
    /// Reading or writing data files (tokenizer, images, directories).
    #[error(transparent)]
    Data(#[from] DataError),
    /// An error met while doing `context` (e.g. loading a checkpoint's VAE).
    #[error("{context}: {source}")]
    Within {
        /// What was being done, and on what.
        context: String,
        /// What went wrong.
        source: Box<RuntimeError>,
    },
}

/// The runtime's result type.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    /// Shorthand for [`RuntimeError::Invalid`].
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    /// This error as the cause of a failure while doing `context`.
    pub fn within(self, context: impl Into<String>) -> Self {
        Self::Within {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

/// `error` and each cause in its chain that its message does not already say, joined by
/// `": "`: what a binary prints when it fails.
pub fn report(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}
