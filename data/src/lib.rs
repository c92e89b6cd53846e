//! Everything between files on disk and the model's input tensors: the tokenizer, image
//! decoding and preprocessing, dataset readers for the formats users already have, the
//! synthetic shapes and digits sets of the demos, mixed-modal sequence building, packing, batching and
//! the latent cache.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod batcher;
pub mod bench;
pub mod datasets;
pub mod encoder;
pub mod error;
pub mod files;
pub mod image;
pub mod inspect;
pub mod latent_cache;
pub mod mixture;
pub mod packing;
pub mod pipeline;
pub mod prefetch;
pub mod rng;
pub mod sequence;
pub mod source;
pub mod synthetic;
pub mod tokenizer;

pub use error::DataError;
