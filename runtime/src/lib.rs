//! What training and generation share at run time: choosing the device and running a
//! task on its backend ([`device`]), model checkpoints on disk ([`checkpoint`]), the
//! compute pool and the binaries' start ([`threads`], [`allocator`]), the image
//! autoencoder ([`autoencoder`], with [`image_tensor`] converting its pixels), the
//! benchmarks' op counts ([`op_count`]), and the error type with the binaries' error
//! report ([`error`]).
//!
//! `transfusion-train` and `transfusion-infer` both build on this crate; the training
//! crate uses the inference crate for generation only.

#![warn(missing_docs)]

pub mod allocator;
pub mod autoencoder;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod image_tensor;
pub mod op_count;
pub mod threads;

pub use device::{dispatch, BackendTask, DeviceChoice};
pub use error::{report, Result, RuntimeError};
