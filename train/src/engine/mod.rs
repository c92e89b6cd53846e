//! The training engine: one loop for every kind of training run.
//!
//! The loop ([`run_task`], [`train_loop`]) is written once: micro-batch gradients with
//! accumulation and the replicas' sync ([`step`]), global-norm clipping, AdamW with the
//! warmup + cosine schedule, the non-finite-loss policy, atomic checkpoints with
//! keep-last/keep-best and exact resume ([`prepare`], [`crate::checkpoint`]), the evaluation
//! cadence, `metrics.jsonl`, the loss plot and the progress bar.
//!
//! A [`TrainTask`] supplies what differs between runs: the model and its init, the batch
//! stream, the loss with its named parts, the evaluation, the checkpoint's own files and
//! the plot. An exponential moving average of the weights ([`ema`]) is the engine's too.
//! Transfusion pretraining ([`crate::transfusion::TransfusionTask`]), VAE training
//! ([`crate::vae::VaeTask`]) and consistency distillation
//! ([`crate::distill::DistillTask`]) are the tasks today.

pub mod budget;
pub mod ema;
pub mod feed;
pub mod init;
mod lead;
pub mod metrics;
pub mod options;
pub mod plot;
pub mod prepare;
pub mod run;
pub mod run_lock;
pub mod step;
pub mod task;

pub use ema::{ema_decay_at, Ema, RAW_WEIGHTS_FILE};
pub use init::seeded_module;
pub use options::RunOptions;
pub use prepare::{prepare, Prepared};
pub use run::{run_task, step_progress_bar, train_loop, EngineHooks, RunOutcome};
pub use step::{
    accumulate, accumulate_with, optimizer_step, Accumulated, LocalStep, LossSums, MicroStep,
    Objective, SingleDevice, StepSync,
};
pub use task::{EngineSettings, StepFigures, TaskLoss, TrainTask, Work};
