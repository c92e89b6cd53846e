//! The Transfusion network: one Llama-style transformer that predicts the next text token
//! and the noise of diffused image latents in a single mixed-modal sequence.
//!
//! Everything here is generic over `B: Backend`; nothing does I/O. Start at
//! [`TransfusionConfig`] (presets: [`TransfusionConfig::tiny`], `paper_160m` ...), build a
//! [`Transfusion`] with `config.init(&device)`, and train with
//! [`Transfusion::forward_loss`] on a [`TransfusionBatch`].

#![warn(missing_docs)]

pub mod attention;
pub mod batch;
pub mod block;
pub mod config;
pub mod consistency;
pub mod image_adapter;
pub mod kv_cache;
pub mod loss;
pub mod mask;
pub mod mlp;
pub mod modality;
pub mod model;
pub mod ops;
pub mod params;
pub mod pass;
pub mod patch;
pub mod patch_position;
pub mod precision;
pub mod prediction;
pub mod recompute;
pub mod resnet;
pub mod rope;
pub mod schedule;
pub mod timestep;
pub mod trigflow;
pub mod unet;
pub mod vae;

pub use batch::TransfusionBatch;
pub use config::{ImageIoConfig, ModalityWeights, TransfusionConfig, UNetConfig};
pub use kv_cache::KvCache;
pub use loss::TransfusionLoss;
pub use model::Transfusion;
pub use params::ParamCount;
pub use precision::Precision;
pub use prediction::Prediction;
pub use schedule::NoiseSchedule;
