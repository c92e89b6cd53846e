//! Transfusion training: the experiment config, AdamW with the paper's values and global
//! gradient clipping, the warmup + cosine schedule, the loop with held-out evaluation,
//! metrics and loss plots, and atomic, exactly resumable checkpoints.
//!
//! The entry point is [`run_training`] (generic over `B: AutodiffBackend`; the binary picks
//! the backend with `transfusion_infer::device::dispatch`). A run directory holds
//! `config.json`, `metrics.jsonl`, `loss.png` and `checkpoints/step-N/` (see
//! [`checkpoint`]).
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
//! between the backward passes and clipping ([`trainer::StepSync`]).
//!
//! Precision: weights, gradients and AdamW state are f32 on every backend;
//! `training.precision = "bf16"` (or `"f16"`) computes the decoder's matrix products and
//! attention in that type (`transfusion_model::precision`), checked against the backend
//! before any work (CUDA and `flex`: yes; `ndarray`: no).

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
#[cfg(feature = "collective")]
pub mod ddp;
pub mod demo;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;
pub mod vae;

pub use config::{ConfigError, ExperimentConfig};
pub use trainer::{
    accumulate_grads, evaluate, run_training, train_step, LocalStep, PreviewHook, RunOptions,
    RunSummary, SingleDevice, StepSync, TrainHooks,
};
