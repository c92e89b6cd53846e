//! Training: the experiment config, AdamW with the paper's values and global gradient
//! clipping, the warmup + cosine schedule, and one training engine ([`engine`]) that owns
//! the loop (accumulation, the replicas' sync, the non-finite policy, atomic and exactly
//! resumable checkpoints, evaluation cadence, metrics and loss plots) for every task:
//! Transfusion pretraining ([`transfusion`]), VAE training ([`vae`]) and consistency
//! distillation ([`distill`]). [`llm_import`] turns a Hugging Face Llama-family model into
//! a checkpoint to start from (`model.init`).
//!
//! The entry points are [`run_training`] and [`vae::run_vae_training`] (generic over
//! `B: AutodiffBackend`; the binary picks the backend with
//! `transfusion_runtime::device::dispatch`). A run directory holds the run config,
//! `metrics.jsonl`, `loss.png` and `checkpoints/step-N/` (see [`checkpoint`]).
//! Errors are [`TrainError`] (naming the file, key or setting at fault).
//!
//! Loop, per optimizer step: `grad_accum` micro-batches (loss scaled by `1/grad_accum`,
//! gradients summed with Burn's `GradientsAccumulator`), global-norm clipping, a
//! non-finite check (loss of any micro-batch or gradient norm: the update is skipped and
//! counted; `max_consecutive_nonfinite` in a row stop the run), AdamW with the scheduled
//! learning rate. A skipped step still advances the step counter, the schedule and the
//! data. Checkpoints are never written from non-finite weights.
//!
//! Several devices (feature `collective`): `ddp::run_training_ddp` runs the same loop
//! once per device, on one thread each, with the gradients all-reduced by Burn's collective
//! between the backward passes and clipping ([`engine::StepSync`]).
//!
//! Precision: weights, gradients and AdamW state are f32 on every backend;
//! `training.precision = "bf16"` (or `"f16"`) computes the decoder's matrix products and
//! attention in that type (`transfusion_model::precision`), checked against the backend
//! before any work (CUDA and `flex`: yes; `ndarray`: no).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
#[cfg(feature = "collective")]
pub mod ddp;
pub mod demo;
pub mod distill;
pub mod engine;
pub mod error;
pub mod held_out;
pub mod llm_import;
pub mod lr_schedule;
pub mod memory_plan;
pub mod optim;
pub mod transfusion;
pub mod vae;

pub use config::{ConfigError, ExperimentConfig};
pub use engine::{LocalStep, RunOptions, SingleDevice, StepSync};
pub use error::{Result, TrainError};
pub use held_out::evaluate;
pub use transfusion::{accumulate_grads, run_training, PreviewHook, RunSummary, TrainHooks};
