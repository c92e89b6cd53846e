//! Continuous-time consistency distillation (sCD, Lu & Song 2024) of a Transfusion
//! checkpoint as a task of the training engine: [`DistillTask`], and the entry point
//! [`run_distill`].
//!
//! The student starts as a copy of the teacher (a v-prediction checkpoint). Each
//! micro-batch is a packed batch of the teacher's training data ([`batch`]): the student
//! keeps the LM loss on its text (so it still captions and writes), and on every
//! generation image learns sCD's consistency target from the teacher's guided velocity
//! ([`loss`]). The run directory is a normal run's (`config.json`, `metrics.jsonl`,
//! `loss.png`, `checkpoints/step-N/`) plus `distill.json` (the [`DistillSettings`]); its
//! checkpoints are inference checkpoints whose `model.json` marks the model as a
//! consistency model (the consistency sampler becomes its default), with the adaptive
//! loss weight beside them for resuming ([`ADAPTIVE_WEIGHT_FILE`]).

pub mod batch;
pub mod loss;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use transfusion_data::files::write_file;
use transfusion_data::pipeline::PipelineState;
use transfusion_data::source::SourceSpec;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_infer::checkpoint::{
    load_meta, load_model, load_weights, save_model, save_weights, ConsistencyMeta, ModelMeta,
    META_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
};
use transfusion_model::consistency::AdaptiveWeight;
use transfusion_model::{Prediction, Transfusion, TransfusionConfig};

pub use batch::{distill_batch, generation_images, DistillBatch};
pub use loss::{distill_loss, ConsistencyStudent, DistillLossInputs};

use crate::checkpoint::{read_config, CONFIG_FILE, STATE_FILE};
use crate::config::{ExperimentConfig, ModelSection};
use crate::data::load_tokenizer;
use crate::engine::{
    run_task, EngineHooks, EngineSettings, RunOptions, RunOutcome, StepFigures, TaskLoss,
    TrainTask, Work,
};
use crate::metrics::{EvalMetrics, Line, Record};
use crate::plot::plot_distill;
use crate::transfusion::{evaluate_held_out, Feed};

/// The distillation's own settings, written to `distill.json` in the run directory and
/// every checkpoint.
pub const DISTILL_FILE: &str = "distill.json";
/// The adaptive loss weight's parameters in a distillation checkpoint (for resuming).
pub const ADAPTIVE_WEIGHT_FILE: &str = "adaptive_weight.safetensors";
/// Files of a complete distillation checkpoint.
pub const DISTILL_CHECKPOINT_FILES: &[&str] = &[
    WEIGHTS_FILE,
    META_FILE,
    TOKENIZER_FILE,
    CONFIG_FILE,
    DISTILL_FILE,
    ADAPTIVE_WEIGHT_FILE,
    STATE_FILE,
    "optimizer.mpk",
];
/// Default of [`DistillSettings::consistency_weight`].
pub const DEFAULT_CONSISTENCY_WEIGHT: f64 = 0.02;
/// Default of [`DistillSettings::derivative_span`].
pub const DEFAULT_DERIVATIVE_SPAN: usize = 16;
/// Width of the adaptive weight's sinusoidal timestep features.
const ADAPTIVE_WEIGHT_FEATURES: usize = 64;

/// What a distillation run did.
pub type DistillSummary = RunOutcome<DistillStepMetrics, EvalMetrics>;

/// How to distil (beside the experiment config, which holds the data and the optimizer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSettings {
    /// The teacher checkpoint.
    pub teacher: PathBuf,
    /// Classifier-free guidance scale baked into the student (the teacher's velocity is
    /// guided at it; the student samples without guidance).
    pub guidance: f64,
    /// Steps over which the tangent's second term ramps in (`r` from 0 to 1; 0: no ramp).
    pub tangent_warmup_steps: u64,
    /// Sampling steps recorded as the student's default (1 or 2).
    pub sampling_steps: usize,
    /// Weight of the consistency loss against the LM loss (weight 1). The adaptive weight
    /// scales the consistency loss's gradient to about that of a unit-size error per
    /// sample, a few hundred times the gradient of the teacher's `lambda * MSE` at the end
    /// of its training; at weight `lambda` the LM loss drowned in it (captioning collapsed
    /// within 200 steps on the demo checkpoint).
    pub consistency_weight: f64,
    /// Grid steps either side of the central difference of the student's derivative
    /// (`k`; the cosine schedule's steps are 1.56e-3 rad apart).
    pub derivative_span: usize,
}

impl DistillSettings {
    /// Defaults for a run of `steps` steps: guidance 3 (the demo's), the tangent ramped in
    /// over the first fifth of the run, 2 sampling steps.
    pub fn new(teacher: impl Into<PathBuf>, steps: u64) -> Self {
        Self {
            teacher: teacher.into(),
            guidance: 3.0,
            tangent_warmup_steps: steps / 5,
            sampling_steps: 2,
            consistency_weight: DEFAULT_CONSISTENCY_WEIGHT,
            derivative_span: DEFAULT_DERIVATIVE_SPAN,
        }
    }

    /// The tangent warm-up factor `r` at optimizer step `step` (0-based).
    pub fn warmup_at(&self, step: u64) -> f64 {
        if self.tangent_warmup_steps == 0 {
            1.0
        } else {
            (step as f64 / self.tangent_warmup_steps as f64).min(1.0)
        }
    }
}

/// The experiment config of a distillation of `teacher`: its own run's config when the
/// checkpoint holds one (`config.json`), else the `tiny` recipe's loop on `data`; the model
/// is always the teacher's and the tokenizer the checkpoint's. The optimizer runs at a
/// tenth of pretraining's peak (2e-4, decaying to 2e-5 after a 5% warm-up), without EMA;
/// checkpoints and evaluations three times per run.
pub fn distill_config(
    teacher: &Path,
    data: Vec<SourceSpec>,
    steps: u64,
) -> anyhow::Result<ExperimentConfig> {
    let meta = load_meta(teacher)?;
    if meta.model.prediction.unwrap_or_default() != Prediction::V {
        bail!(
            "{}: the teacher predicts eps; consistency distillation needs a v-prediction \
             teacher (model.prediction = \"v\"), whose output is TrigFlow's velocity",
            teacher.display()
        );
    }
    let mut cfg = if teacher.join(CONFIG_FILE).is_file() {
        read_config(teacher)?
    } else {
        anyhow::ensure!(
            !data.is_empty(),
            "{} holds no training config (config.json): give the data to distil on with \
             --data KIND:LOCATION (e.g. --data shapes:100000)",
            teacher.display()
        );
        ExperimentConfig::quick("tiny", data.clone(), steps)
    };
    if !data.is_empty() {
        cfg.data.train = data;
    }
    cfg.model = ModelSection {
        preset: None,
        config: Some(meta.model.clone()),
        lambda: None,
        prediction: None,
    };
    cfg.data.tokenizer = teacher.join(TOKENIZER_FILE);
    cfg.data.image_size = meta.image_size;
    cfg.training.steps = steps;
    cfg.training.ema_decay = 0.0;
    cfg.schedule.lr = 2e-4;
    cfg.schedule.min_lr = 2e-5;
    cfg.schedule.warmup_steps = (steps / 20).max(1);
    cfg.checkpoint.every = (steps / 3).max(1);
    cfg.checkpoint.keep_best = false;
    cfg.eval.every = (steps / 3).max(1);
    Ok(cfg)
}

/// One logged distillation step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillStepMetrics {
    /// Optimizer steps done.
    pub step: u64,
    /// `L_LM + lambda * L_sCD`.
    pub total: f64,
    /// LM cross-entropy.
    pub lm: f64,
    /// The adaptive-weighted consistency loss `mean(e^-w mse + w)` (negative once the
    /// learned weights track small errors: not comparable across runs).
    pub consistency: f64,
    /// The tangent warm-up factor `r` of the step.
    pub tangent_warmup: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// Steps skipped so far (non-finite loss or gradient).
    pub skipped: u64,
    /// Whether this step was skipped.
    pub skipped_this: bool,
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
}

impl Record for DistillStepMetrics {
    fn step(&self) -> u64 {
        self.step
    }
    fn summary(&self) -> String {
        format!(
            "lm {:.3} scd {:.3} r {:.2} | {:.1} img/s | lr {:.2e}",
            self.lm, self.consistency, self.tangent_warmup, self.images_per_s, self.lr
        )
    }
}

/// Where a distillation's data stream stands: the pipeline, and how many micro-batches
/// were drawn (the stream of the proposal angles and noise).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DistillDataState {
    /// The training pipeline's position.
    pub pipeline: PipelineState,
    /// Micro-batches drawn so far.
    pub draws: u64,
}

/// Consistency distillation of a teacher checkpoint.
pub struct DistillTask<B: AutodiffBackend> {
    cfg: ExperimentConfig,
    settings: DistillSettings,
    m: TransfusionConfig,
    tokenizer: Arc<TextTokenizer>,
    meta: ModelMeta,
    teacher: Transfusion<B::InnerBackend>,
    student: Transfusion<B>,
    device: B::Device,
    feed: Option<Feed>,
    draws: u64,
}

impl<B: AutodiffBackend> DistillTask<B> {
    /// Loads the teacher (twice: the frozen teacher and the student's starting point) and
    /// checks the config against it, before anything is written.
    pub fn new(
        cfg: &ExperimentConfig,
        settings: &DistillSettings,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.guidance >= 1.0,
            "--cfg {}: the distilled guidance scale must be at least 1",
            settings.guidance
        );
        anyhow::ensure!(
            (1..=100).contains(&settings.derivative_span),
            "the derivative's span must be 1 to 100 grid steps, not {}",
            settings.derivative_span
        );
        anyhow::ensure!(
            (1..=2).contains(&settings.sampling_steps),
            "a consistency model samples in 1 or 2 steps, not {}",
            settings.sampling_steps
        );
        let tokenizer = Arc::new(load_tokenizer(cfg, None)?);
        let m = cfg.validate(tokenizer.vocab_size())?;
        let (teacher, mut meta, _) = load_model::<B::InnerBackend>(&settings.teacher, device)
            .with_context(|| format!("teacher {}", settings.teacher.display()))?;
        if meta.model != m {
            bail!(
                "{}: the teacher's model config differs from the run's",
                settings.teacher.display()
            );
        }
        let (student, _, _) = load_model::<B>(&settings.teacher, device)?;
        meta.consistency = Some(ConsistencyMeta {
            distilled_guidance: settings.guidance,
            sampling_steps: settings.sampling_steps,
            teacher: settings.teacher.clone(),
        });
        let precision = cfg.training.precision;
        Ok(Self {
            cfg: cfg.clone(),
            settings: settings.clone(),
            m,
            tokenizer,
            meta,
            teacher: teacher.with_precision(precision),
            student: student.with_precision(precision),
            device: device.clone(),
            feed: None,
            draws: 0,
        })
    }

    /// `-ln D` with `D` the values of one latent (see [`AdaptiveWeight::new`]).
    fn initial_log_weight(&self) -> f64 {
        let d = self.m.latent_channels * self.m.latent_size * self.m.latent_size;
        -(d as f64).ln()
    }

    fn write_configs(&self, dir: &Path) -> anyhow::Result<()> {
        write_file(
            &dir.join(CONFIG_FILE),
            serde_json::to_string_pretty(&self.cfg)?,
        )?;
        write_file(
            &dir.join(DISTILL_FILE),
            serde_json::to_string_pretty(&self.settings)?,
        )?;
        Ok(())
    }
}

impl<B: AutodiffBackend> TrainTask<B> for DistillTask<B> {
    type Model = ConsistencyStudent<B>;
    type Batch = DistillBatch<B::InnerBackend>;
    type DataState = DistillDataState;
    type Step = DistillStepMetrics;
    type Eval = EvalMetrics;

    fn settings(&self) -> EngineSettings {
        let c = &self.cfg;
        EngineSettings {
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
            keep_best: false,
            max_consecutive_nonfinite: c.training.max_consecutive_nonfinite,
            seed: c.seed,
            ema_decay: c.training.ema_decay,
        }
    }

    fn checkpoint_files(&self) -> &'static [&'static str] {
        DISTILL_CHECKPOINT_FILES
    }

    fn write_run_files(&self, out: &Path) -> anyhow::Result<()> {
        self.write_configs(out)
    }

    fn init_model(&self, device: &B::Device, _materialize: bool) -> ConsistencyStudent<B> {
        ConsistencyStudent {
            model: self.student.clone(),
            weight: AdaptiveWeight::new(
                ADAPTIVE_WEIGHT_FEATURES,
                self.initial_log_weight(),
                device,
            ),
        }
    }

    fn load_model(
        &mut self,
        dir: &Path,
        device: &B::Device,
    ) -> anyhow::Result<ConsistencyStudent<B>> {
        let (model, saved, _) = load_model::<B>(dir, device)?;
        if saved.model != self.m {
            bail!(
                "{}: the checkpoint's model config differs from this distillation's",
                dir.display()
            );
        }
        let weight = load_weights(
            AdaptiveWeight::new(ADAPTIVE_WEIGHT_FEATURES, self.initial_log_weight(), device),
            &dir.join(ADAPTIVE_WEIGHT_FILE),
            "the adaptive loss weight",
        )?;
        Ok(ConsistencyStudent {
            model: model.with_precision(self.cfg.training.precision),
            weight,
        })
    }

    fn save_model(
        &self,
        dir: &Path,
        model: &ConsistencyStudent<B::InnerBackend>,
        step: u64,
    ) -> anyhow::Result<()> {
        let mut meta = self.meta.clone();
        meta.step = step;
        save_model(dir, &model.model, &meta, &self.tokenizer)?;
        save_weights(&model.weight, &dir.join(ADAPTIVE_WEIGHT_FILE))?;
        self.write_configs(dir)
    }

    fn start_data(&mut self, resume: Option<&DistillDataState>) -> anyhow::Result<()> {
        self.feed = Some(Feed::start(
            &self.cfg,
            &self.m,
            &self.tokenizer,
            resume.map(|r| &r.pipeline),
        )?);
        self.draws = resume.map_or(0, |r| r.draws);
        Ok(())
    }

    fn data_state(&self) -> DistillDataState {
        DistillDataState {
            pipeline: self.feed.as_ref().map(Feed::state).unwrap_or_default(),
            draws: self.draws,
        }
    }

    fn next_batch(
        &mut self,
        keep: bool,
        device: &B::Device,
    ) -> anyhow::Result<Option<(DistillBatch<B::InnerBackend>, Work)>> {
        let feed = self
            .feed
            .as_mut()
            .context("the data stream was not started")?;
        let rows = feed.next_rows()?;
        let draw = self.draws;
        self.draws += 1;
        if !keep {
            return Ok(None);
        }
        let batch = distill_batch::<B::InnerBackend>(
            &rows,
            feed.batcher(),
            self.tokenizer.special(),
            (&self.teacher.schedule(), self.settings.derivative_span),
            (self.cfg.seed, draw),
            device,
        )?;
        let targets: f32 = batch.packed.lm_mask.clone().sum().into_scalar().elem();
        let work = Work {
            tokens: rows.iter().map(|r| r.used() as u64).sum(),
            images: batch.packed.num_images() as u64,
            units: [targets.round() as u64, batch.generation.len() as u64],
        };
        Ok(Some((batch, work)))
    }

    fn loss(
        &self,
        model: &ConsistencyStudent<B>,
        batch: DistillBatch<B::InnerBackend>,
        step: u64,
    ) -> TaskLoss<B> {
        let inputs = DistillLossInputs {
            teacher: &self.teacher,
            guidance: self.settings.guidance,
            warmup: self.settings.warmup_at(step),
            weight: self.settings.consistency_weight,
            derivative_span: self.settings.derivative_span,
        };
        distill_loss(model, batch, &inputs)
    }

    fn step_record(&self, f: &StepFigures) -> DistillStepMetrics {
        DistillStepMetrics {
            step: f.step,
            total: f.losses[0],
            lm: f.losses[1],
            consistency: f.losses[2],
            tangent_warmup: self.settings.warmup_at(f.step.saturating_sub(1)),
            grad_norm: f.grad_norm,
            lr: f.lr,
            images_per_s: f.images_per_s,
            skipped: f.skipped,
            skipped_this: f.skipped_this,
            elapsed_s: f.elapsed_s,
        }
    }

    fn evaluate(
        &mut self,
        model: &ConsistencyStudent<B::InnerBackend>,
        step: u64,
    ) -> anyhow::Result<EvalMetrics> {
        evaluate_held_out(
            &self.cfg,
            &self.m,
            &self.tokenizer,
            &model.model,
            &self.device,
            step,
        )
    }

    fn eval_loss(&self, _eval: &EvalMetrics) -> Option<f64> {
        None
    }

    fn plot(
        &self,
        lines: &[Line<DistillStepMetrics, EvalMetrics>],
        path: &Path,
    ) -> anyhow::Result<()> {
        plot_distill(lines, path)
    }
}

/// Distils `settings.teacher` with `cfg` on `device` (see the module docs).
pub fn run_distill<B: AutodiffBackend>(
    cfg: &ExperimentConfig,
    settings: &DistillSettings,
    opts: &RunOptions,
    hooks: &mut EngineHooks<'_, DistillStepMetrics>,
    device: &B::Device,
) -> anyhow::Result<DistillSummary> {
    let mut task = DistillTask::<B>::new(cfg, settings, device)?;
    run_task(&mut task, opts, hooks, device)
}
