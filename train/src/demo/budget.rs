//! How many optimizer steps a demo plans: as many as fit its time budget on this machine.
//!
//! The learning-rate schedule (warm-up, then cosine decay) is laid out over the planned
//! steps, so a plan the machine cannot finish stops with the rate still high. Before
//! training, a few steps of the demo's own model and batch shape are timed
//! ([`crate::bench::run_bench`]) and the plan is what fits [`BUDGET_SHARE`] of the budget.
//! That plan sets the warm-up and the evaluation cadence; while training, the loop
//! re-plans the schedule's end from the pace it keeps ([`crate::engine::budget`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::backend::AutodiffBackend;
use transfusion_data::tokenizer::TextTokenizer;

use super::{demo_config, DemoOptions};
use crate::bench::{run_bench, BenchConfig};
use crate::error::{Result, TrainError};
use crate::ExperimentConfig;

/// The share of the training budget the plan fills: the rest covers what the timed steps
/// leave out (making batches, the evaluations and checkpoints during training).
pub const BUDGET_SHARE: f64 = 0.9;

/// Plans are rounded down to a multiple of this (and are at least this).
pub const STEP_QUANTUM: u64 = 100;

/// Timed steps of the measurement (after [`WARMUP_STEPS`] untimed ones).
const TIMED_STEPS: usize = 6;

/// Untimed steps before the measurement.
const WARMUP_STEPS: usize = 2;

/// The steps that fit `budget` at `step_time` each, rounded down to [`STEP_QUANTUM`]
/// and kept within `[STEP_QUANTUM, max]` (`max` rounded down too, but not below
/// `STEP_QUANTUM`).
pub fn steps_for_budget(budget: Duration, step_time: Duration, max: u64) -> u64 {
    let fit = (BUDGET_SHARE * budget.as_secs_f64() / step_time.as_secs_f64().max(1e-9)) as u64;
    let round = |n: u64| (n / STEP_QUANTUM * STEP_QUANTUM).max(STEP_QUANTUM);
    round(fit).min(round(max))
}

/// Times a few optimizer steps of `cfg`'s model on batches of its shape on `device`.
fn measure_step_time<B: AutodiffBackend>(
    cfg: &ExperimentConfig,
    tokenizer: &Arc<TextTokenizer>,
    device: &B::Device,
    label: &str,
) -> Result<Duration> {
    let bench = BenchConfig {
        model: cfg.model_config(tokenizer.vocab_size())?,
        batch_size: cfg.training.batch_size,
        seq_len: cfg.training.seq_len,
        steps: TIMED_STEPS,
        warmup: WARMUP_STEPS,
        peak_tflops: None,
        precision: cfg.training.precision,
        blockwise_from: transfusion_model::ops::blockwise::MIN_KEYS,
        recompute: cfg.training.recompute,
    };
    let report = run_bench::<B>(&bench, tokenizer, device, label)?;
    Ok(Duration::from_secs_f64(report.step_ms_median / 1e3))
}

/// The steps that fit `opts.train_budget` on `device` (at most `opts.steps`), from a few
/// timed steps of the demo's model.
pub(crate) fn planned_steps<B: AutodiffBackend>(
    opts: &DemoOptions,
    tokenizer: &Path,
    device: &B::Device,
) -> Result<u64> {
    let cfg = demo_config(opts, tokenizer)?;
    let tokenizer = Arc::new(
        TextTokenizer::from_file(tokenizer)
            .map_err(|e| TrainError::from(e).within("demo tokenizer"))?,
    );
    let step = measure_step_time::<B>(&cfg, &tokenizer, device, "demo")?;
    let steps = steps_for_budget(opts.train_budget, step, opts.steps);
    eprintln!(
        "demo: one training step takes {:.0} ms here: planning {steps} steps for the \
         {:.1}-minute budget (--steps N fixes the plan)",
        step.as_secs_f64() * 1e3,
        opts.train_budget.as_secs_f64() / 60.0
    );
    Ok(steps)
}
