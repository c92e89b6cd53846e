//! Generation with a trained Transfusion checkpoint: KV-cached text decoding, DDPM/DDIM
//! sampling with classifier-free guidance, captioning and interleaved documents.
//!
//! Start at [`Pipeline`]: `Pipeline::load(dir, &device)` then `.text(..)`, `.image(..)`,
//! `.caption(..)`, `.generate(..)`. The `transfusion` binary and the training crate's
//! previews and demo use this API. On the CPU backends, call it from a thread of a rayon
//! pool, as the binaries do (`transfusion_runtime::threads::on_compute_pool`): from any
//! other thread each parallel kernel puts the caller to sleep and wakes it again.
//!
//! Files: [`context`] (the batch of sequences over a KV cache or recomputed: the only place
//! the transformer runs), [`sampler`] (DDPM/DDIM, seeded noise), [`guidance`] (CFG),
//! [`text`] (token sampling, streaming), [`pipeline`] (the API; its text and caption
//! decoding in `decode.rs`), [`interleave`]
//! (mixed-modal documents), [`bench`] (throughput figures), [`error`] (the crate's error
//! type). Devices, checkpoints, the compute pool and the autoencoder come from
//! `transfusion-runtime`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod context;
mod decode;
pub mod error;
pub mod guidance;
pub mod interleave;
pub mod pipeline;
pub mod sampler;
pub mod text;

pub use context::{CachePolicy, ForwardKind, ForwardRecord};
pub use error::{InferError, Result};
pub use interleave::{write_transcript, GenerateOptions, Segment};
pub use pipeline::{ImageOptions, Pipeline};
pub use sampler::SamplerKind;
pub use text::TextOptions;
