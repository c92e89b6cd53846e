//! The training crate's error type.

use std::path::{Path, PathBuf};

use transfusion_data::DataError;
use transfusion_infer::InferError;
use transfusion_runtime::RuntimeError;

use crate::config::ConfigError;

/// Errors of configuring, running, checkpointing and resuming training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file or directory could not be read, written, listed, removed or renamed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done: `read`, `write`, `remove`, ...
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file exists but its content is not what was expected.
    #[error("{path}: {message}")]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A config key with a wrong value.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A model configuration that cannot be built.
    #[error(transparent)]
    ModelConfig(#[from] transfusion_model::config::ConfigError),
    /// A setting or option that cannot work (the message names it).
    #[error("{0}")]
    Setting(String),
    /// The run cannot start or go on: an earlier run in the way, a checkpoint that does
    /// not fit the model, a loss that stayed non-finite.
    #[error("{0}")]
    Run(String),
    /// Communication between data-parallel replicas failed.
    #[error("{0}")]
    Collective(String),
    /// Drawing a plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The image being drawn.
        path: PathBuf,
        /// What the plotting library said.
        message: String,
    },
    /// Reading, decoding or assembling training data.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Loading or saving a model or an autoencoder, choosing a device.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Generating previews and samples.
    #[error(transparent)]
    Infer(#[from] InferError),
    /// An error met while doing `context` (e.g. writing a checkpoint).
    #[error("{context}: {source}")]
    Within {
        /// What was being done, and on what.
        context: String,
        /// What went wrong.
        source: Box<TrainError>,
    },
}

/// The training crate's result type.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    /// Shorthand for [`TrainError::Io`].
    pub fn io(action: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Shorthand for [`TrainError::Invalid`].
    pub fn invalid(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.as_ref().to_path_buf(),
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
