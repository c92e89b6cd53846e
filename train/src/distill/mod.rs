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
pub mod plot;
pub mod settings;

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use transfusion_data::files::write_json;
use transfusion_data::pipeline::PipelineState;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_model::consistency::AdaptiveWeight;
use transfusion_model::{Transfusion, TransfusionConfig};
use transfusion_runtime::checkpoint::{
    load_model, load_weights, save_model, save_weights, ConsistencyMeta, ModelMeta, META_FILE,
    TOKENIZER_FILE, WEIGHTS_FILE,
};

pub use batch::{distill_batch, generation_images, DistillBatch};
pub use loss::{distill_loss, ConsistencyStudent, DistillLossInputs};
pub use settings::{
    distill_config, DistillLosses, DistillSettings, DistillStepMetrics, DEFAULT_CONSISTENCY_WEIGHT,
    DEFAULT_DERIVATIVE_SPAN,
};

use crate::checkpoint::{CONFIG_FILE, STATE_FILE};
use crate::config::ExperimentConfig;
use crate::data::load_tokenizer;
use crate::distill::plot::plot_distill;
use crate::engine::feed::Feed;
use crate::engine::metrics::Line;
use crate::engine::{
    run_task, EngineHooks, EngineSettings, RunOptions, RunOutcome, StepFigures, TaskLoss,
    TrainTask, Work,
};
use crate::error::{Result, TrainError};
use crate::held_out::evaluate_held_out;
use crate::held_out::EvalMetrics;

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
/// Width of the adaptive weight's sinusoidal timestep features.
const ADAPTIVE_WEIGHT_FEATURES: usize = 64;

/// What a distillation run did.
pub type DistillSummary = RunOutcome<DistillStepMetrics, EvalMetrics>;

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
    ) -> Result<Self> {
        if !(settings.guidance >= 1.0) {
            return Err(TrainError::Setting(format!(
                "--cfg {}: the distilled guidance scale must be at least 1",
                settings.guidance
            )));
        }
        if !(1..=100).contains(&settings.derivative_span) {
            return Err(TrainError::Setting(format!(
                "the derivative's span must be 1 to 100 grid steps, not {}",
                settings.derivative_span
            )));
        }
        if !(1..=2).contains(&settings.sampling_steps) {
            return Err(TrainError::Setting(format!(
                "a consistency model samples in 1 or 2 steps, not {}",
                settings.sampling_steps
            )));
        }
        if cfg.training.recompute != crate::config::Recompute::None {
            return Err(TrainError::Setting(
                "training.recompute: distillation keeps its activations (its steps are a few \
                 images each); recompute applies to Transfusion training"
                    .into(),
            ));
        }
        let tokenizer = Arc::new(load_tokenizer(cfg, None)?);
        let m = cfg.validate(tokenizer.vocab_size())?;
        let (teacher, mut meta, _) = load_model::<B::InnerBackend>(&settings.teacher, device)
            .map_err(|e| {
                TrainError::from(e).within(format!("teacher {}", settings.teacher.display()))
            })?;
        if meta.model != m {
            return Err(TrainError::invalid(
                &settings.teacher,
                "the teacher's model config differs from the run's",
            ));
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

    fn write_configs(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(CONFIG_FILE), &self.cfg)?;
        Ok(write_json(&dir.join(DISTILL_FILE), &self.settings)?)
    }
}

impl<B: AutodiffBackend> TrainTask<B> for DistillTask<B> {
    type Model = ConsistencyStudent<B>;
    type Batch = DistillBatch<B::InnerBackend>;
    type DataState = DistillDataState;
    type Step = DistillStepMetrics;
    type Eval = EvalMetrics;

    fn settings(&self) -> EngineSettings {
        // No keep-best: the held-out losses do not measure few-step sampling.
        EngineSettings {
            keep_best: false,
            ..EngineSettings::from_config(&self.cfg)
        }
    }

    fn checkpoint_files(&self) -> &'static [&'static str] {
        DISTILL_CHECKPOINT_FILES
    }

    fn write_run_files(&self, out: &Path) -> Result<()> {
        self.write_configs(out)
    }

    fn init_model(&self, device: &B::Device) -> Result<ConsistencyStudent<B>> {
        Ok(ConsistencyStudent {
            model: self.student.clone(),
            weight: AdaptiveWeight::new(
                ADAPTIVE_WEIGHT_FEATURES,
                self.initial_log_weight(),
                device,
            ),
        })
    }

    fn load_model(&mut self, dir: &Path, device: &B::Device) -> Result<ConsistencyStudent<B>> {
        let (model, saved, _) = load_model::<B>(dir, device)?;
        if saved.model != self.m {
            return Err(TrainError::invalid(
                dir,
                "the checkpoint's model config differs from this distillation's",
            ));
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
    ) -> Result<()> {
        let mut meta = self.meta.clone();
        meta.step = step;
        save_model(dir, &model.model, &meta, &self.tokenizer)?;
        save_weights(&model.weight, &dir.join(ADAPTIVE_WEIGHT_FILE))?;
        self.write_configs(dir)
    }

    fn start_data(&mut self, resume: Option<&DistillDataState>) -> Result<()> {
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
    ) -> Result<Option<(DistillBatch<B::InnerBackend>, Work)>> {
        let feed = self
            .feed
            .as_mut()
            .expect("the engine starts the data stream before it asks for batches");
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
        let work = Work {
            tokens: rows.iter().map(|r| r.used() as u64).sum(),
            images: batch.packed.num_images() as u64,
            units: [batch.text_targets, batch.generation.len() as u64],
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
        f.with_losses(DistillLosses {
            total: f.losses[0],
            lm: f.losses[1],
            consistency: f.losses[2],
            tangent_warmup: self.settings.warmup_at(f.step.saturating_sub(1)),
        })
    }

    fn evaluate(
        &mut self,
        model: &ConsistencyStudent<B::InnerBackend>,
        step: u64,
    ) -> Result<EvalMetrics> {
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

    fn plot(&self, lines: &[Line<DistillStepMetrics, EvalMetrics>], path: &Path) -> Result<()> {
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
) -> Result<DistillSummary> {
    let mut task = DistillTask::<B>::new(cfg, settings, device)?;
    run_task(&mut task, opts, hooks, device)
}
