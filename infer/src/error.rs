//! The inference crate's error type, and [`report`], which prints any error with its causes
//! once each (the binaries' last line on failure).

use std::error::Error as StdError;
use std::path::PathBuf;

use transfusion_data::DataError;

/// Errors of loading checkpoints and VAEs, choosing devices and generating.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The requested image size is not what the model's patching represents.
    #[error(
        "--size {requested}: this model generates {size}x{size} images only (latent \
         {latent}x{latent}, patch {patch}: {n} patches per image); use --size {size}"
    )]
    ImageSize {
        /// Requested side in pixels.
        requested: u32,
        /// The model's image side.
        size: u32,
        /// Latent side.
        latent: usize,
        /// Patch side.
        patch: usize,
        /// Patches per image.
        n: usize,
    },
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
    /// Generation or sampling options that cannot work (the message names the option).
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
        source: Box<InferError>,
    },
}

/// The inference crate's result type.
pub type Result<T, E = InferError> = std::result::Result<T, E>;

impl InferError {
    /// Shorthand for [`InferError::Invalid`].
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
