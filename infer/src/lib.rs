//! Generation with a trained Transfusion checkpoint: KV-cached text decoding, DDPM/DDIM
//! sampling with classifier-free guidance, captioning and interleaved documents.
//!
//! The `transfusion` binary and the training crate's previews and demo use this API.

pub mod checkpoint;
pub mod device;

pub use device::{dispatch, BackendTask, DeviceChoice};
