//! What a training task supplies to the engine: [`TrainTask`].

use std::path::Path;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::step::{MicroStep, Objective};
use crate::config::{ExperimentConfig, OptimizerSection, ScheduleSection};
use crate::engine::metrics::{Line, Record, StepLine};
use crate::error::Result;

/// The loop's settings, taken from the task's own config.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Optimizer steps of the schedule.
    pub steps: u64,
    /// Micro-batches per optimizer step on each replica.
    pub grad_accum: usize,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// AdamW betas, epsilon, weight decay.
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule.
    pub schedule: ScheduleSection,
    /// Log a train line every this many steps.
    pub log_every: u64,
    /// Evaluate every this many steps (0: never during the run).
    pub eval_every: u64,
    /// Evaluate at the end of the run.
    pub eval_at_end: bool,
    /// Checkpoint every this many steps (0: at the end only).
    pub checkpoint_every: u64,
    /// Step checkpoints kept.
    pub keep_last: usize,
    /// Also keep `checkpoints/best/`, the checkpoint of the lowest evaluation loss.
    pub keep_best: bool,
    /// Stop the run after this many consecutive steps with a non-finite loss or gradient.
    pub max_consecutive_nonfinite: u32,
    /// The run's seed (recorded in the training state).
    pub seed: u64,
    /// Cap of the EMA decay (see [`super::ema`]); 0: no EMA, the checkpoints hold the
    /// trained weights.
    pub ema_decay: f64,
}

impl EngineSettings {
    /// The engine's settings of an experiment config (steps, accumulation, clipping,
    /// optimizer, schedule, cadences, checkpoint policy, non-finite limit, seed, EMA).
    pub fn from_config(c: &ExperimentConfig) -> Self {
        Self {
            steps: c.training.steps,
            grad_accum: c.training.grad_accum,
            grad_clip: c.training.grad_clip,
            optimizer: c.optimizer.clone(),
            schedule: c.schedule.clone(),
            log_every: c.training.log_every,
            eval_every: c.eval.every,
            eval_at_end: c.eval.at_end,
            checkpoint_every: c.checkpoint.every,
            keep_last: c.checkpoint.keep_last,
            keep_best: c.checkpoint.keep_best,
            max_consecutive_nonfinite: c.training.max_consecutive_nonfinite,
            seed: c.seed,
            ema_decay: c.training.ema_decay,
        }
    }
}

/// One micro-batch's loss as two named parts (e.g. LM and diffusion loss, or
/// reconstruction and KL), each **summed** over the units it averages over (text targets,
/// images), with the weight of its mean in the objective.
///
/// The engine divides each part by its unit count over the whole optimizer step, every
/// micro-batch of every replica ([`Work::units`]): the step's objective is
/// `sum_k weight_k * (sum of part k) / (units of part k)`, the mean over all text targets
/// and all images of the global batch. A micro-batch with few text targets or no image
/// then weighs what it holds, exactly as in one big batch.
pub struct TaskLoss<B: Backend> {
    /// Each part summed over this micro-batch's units, `[1]` each.
    pub sums: [Tensor<B, 1>; 2],
    /// The weight of each part's mean in the objective (e.g. `1` and `lambda`).
    pub weights: [f64; 2],
}

/// The figures of one logged optimizer step, from which a task builds its step record:
/// `losses` is `[total, part 0, part 1]`, each part's sum over every micro-batch of every
/// replica divided by its unit count, and the weighted total.
pub type StepFigures = StepLine<[f64; 3]>;

/// How much one micro-batch holds: the throughput figures and the loss denominators.
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    /// Non-padding positions (text tokens and image patches; pixels' images count 0).
    pub tokens: u64,
    /// Images.
    pub images: u64,
    /// The units each loss part of [`TaskLoss::sums`] sums over in this micro-batch (e.g.
    /// text targets and images); known before the forward pass.
    pub units: [u64; 2],
}

/// A kind of training run: what the engine's loop does not own. Reads like burn-train's
/// `TrainStep` (a batch in, a loss out) plus what our loop needs for exact resume.
pub trait TrainTask<B: AutodiffBackend> {
    /// The trained module.
    type Model: AutodiffModule<B>;
    /// One micro-batch, on the device.
    type Batch;
    /// The data stream's position, saved in every checkpoint.
    type DataState: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned + Default;
    /// A logged training step.
    type Step: Record;
    /// An evaluation.
    type Eval: Record;

    /// The loop's settings.
    fn settings(&self) -> EngineSettings;
    /// Files that make one of this task's checkpoint directories complete (its own files
    /// and the engine's `optimizer.mpk` and `training_state.json`).
    fn checkpoint_files(&self) -> &'static [&'static str];
    /// Writes the run's own files into the fresh or resumed run directory (its config).
    fn write_run_files(&self, out: &Path) -> Result<()>;
    /// The model a fresh run starts from: drawn from the seed (see
    /// [`super::seeded_module`]), or the weights the task is told to start from.
    fn init_model(&self, device: &B::Device) -> Result<Self::Model>;
    /// The model of checkpoint `dir`; errors when it does not fit this run's config.
    fn load_model(&mut self, dir: &Path, device: &B::Device) -> Result<Self::Model>;
    /// Writes the model's inference weights (and whatever inference needs beside them)
    /// into checkpoint `dir`: the EMA of the weights when the run keeps one, else the
    /// trained weights ([`TrainTask::load_model`] reads them back).
    fn save_model(
        &self,
        dir: &Path,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
        step: u64,
    ) -> Result<()>;
    /// Opens the data stream, at `resume` when continuing a run.
    fn start_data(&mut self, resume: Option<&Self::DataState>) -> Result<()>;
    /// Where the data stream stands after the last micro-batch taken.
    fn data_state(&self) -> Self::DataState;
    /// The next micro-batch of the stream. Replicas read the same stream; with `keep`
    /// false the micro-batch belongs to another replica and only the stream advances.
    fn next_batch(&mut self, keep: bool, device: &B::Device)
        -> Result<Option<(Self::Batch, Work)>>;
    /// The loss of one micro-batch at optimizer step `step` (0-based).
    fn loss(&self, model: &Self::Model, batch: Self::Batch, step: u64) -> TaskLoss<B>;
    /// The gradients of one micro-batch's share of the step's `objective` at optimizer step
    /// `step`: by default one backward pass through [`TrainTask::loss`]'s graph; a task may
    /// compute them otherwise (layer by layer, recomputing activations).
    fn gradients(
        &self,
        model: &Self::Model,
        batch: Self::Batch,
        step: u64,
        objective: &Objective,
    ) -> MicroStep {
        objective.backward(model, self.loss(model, batch, step))
    }
    /// The record of one logged step.
    fn step_record(&self, f: &StepFigures) -> Self::Step;
    /// Evaluates the current weights (no autodiff graph) after `step` steps; may write
    /// previews into the run directory.
    fn evaluate(
        &mut self,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
        step: u64,
    ) -> Result<Self::Eval>;
    /// The evaluation's loss for keep-best (lower is better; `None`: not comparable).
    fn eval_loss(&self, eval: &Self::Eval) -> Option<f64>;
    /// Draws the run's loss plot from every metrics line so far.
    fn plot(&self, lines: &[Line<Self::Step, Self::Eval>], path: &Path) -> Result<()>;
}
