//! The inference crate's error type: what generation adds to the runtime's errors
//! ([`RuntimeError`]: devices, checkpoints, autoencoders).

use std::path::PathBuf;

use transfusion_data::DataError;
use transfusion_runtime::RuntimeError;

/// Errors of generating, and of loading what generation needs.
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
    /// Generation or sampling options that cannot work (the message names the option).
    #[error("{0}")]
    Options(String),
    /// Loading a checkpoint or an autoencoder, or choosing the device.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Reading or writing data files (tokenizer, images, directories).
    #[error(transparent)]
    Data(#[from] DataError),
    /// An error met while doing `context` (e.g. loading a checkpoint's tokenizer).
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
    /// A file or directory that exists but is not what the reader expected
    /// ([`RuntimeError::Invalid`]).
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Runtime(RuntimeError::invalid(path, message))
    }

    /// This error as the cause of a failure while doing `context`.
    pub fn within(self, context: impl Into<String>) -> Self {
        Self::Within {
            context: context.into(),
            source: Box::new(self),
        }
    }
}
