//! Transfusion pretraining as a task of the training engine: [`TransfusionTask`], and the
//! entry point [`run_training`].
//!
//! A run directory holds `config.json`, `metrics.jsonl`, `loss.png` and
//! `checkpoints/step-N/` (see [`crate::checkpoint`]). Each micro-batch is a packed batch of
//! mixed-modal rows; its loss is `L_LM + lambda * L_DDPM` with the two parts logged.

mod loss;
pub mod metrics;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use transfusion_data::files::write_json;
use transfusion_data::pipeline::PipelineState;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_model::{NoiseSchedule, Transfusion, TransfusionBatch, TransfusionConfig};
use transfusion_runtime::checkpoint::{load_model, save_model, ModelMeta};

pub use loss::{
    accumulate_grads, batch_units, recomputed_micro_step, transfusion_loss,
    weighted_transfusion_loss,
};

use crate::checkpoint::{CONFIG_FILE, REQUIRED_FILES};
use crate::config::{ExperimentConfig, Recompute};
use crate::data::{autoencoder_for, load_tokenizer};
use crate::engine::feed::Feed;
use crate::engine::metrics::Line;
use crate::engine::{
    run_task, seeded_module, EngineHooks, EngineSettings, MicroStep, Objective, RunOptions,
    RunOutcome, StepFigures, TaskLoss, TrainTask, Work,
};
use crate::error::{Result, TrainError};
use crate::held_out::evaluate_held_out;
use crate::held_out::EvalMetrics;
use crate::transfusion::metrics::plot_losses;
use crate::transfusion::metrics::{StepMetrics, TransfusionLosses};

/// What a Transfusion run did.
pub type RunSummary = RunOutcome<StepMetrics, EvalMetrics>;

/// Called at each evaluation with the current weights (no autodiff graph), the step and
/// the run directory: the inference crate plugs image and caption previews in here.
pub trait PreviewHook<B: Backend> {
    /// Writes previews for `step` (e.g. `out/previews/step-N.png`).
    fn preview(&mut self, model: &Transfusion<B>, step: u64, out: &Path) -> Result<()>;
}

impl<B: Backend, F> PreviewHook<B> for F
where
    F: FnMut(&Transfusion<B>, u64, &Path) -> Result<()>,
{
    fn preview(&mut self, model: &Transfusion<B>, step: u64, out: &Path) -> Result<()> {
        self(model, step, out)
    }
}

/// Optional callbacks of a run.
pub struct TrainHooks<B: AutodiffBackend> {
    /// Previews at evaluation time.
    pub preview: Option<Box<dyn PreviewHook<B::InnerBackend>>>,
    /// Fault injection for tests: when it returns true for a step (0-based index), that
    /// step's loss is multiplied by NaN before the backward pass.
    pub poison_step: Option<Box<dyn FnMut(u64) -> bool>>,
    /// Called after every logged step with its metrics (the demo's own reporting).
    pub on_step: Option<Box<dyn FnMut(&StepMetrics)>>,
}

impl<B: AutodiffBackend> Default for TrainHooks<B> {
    fn default() -> Self {
        Self {
            preview: None,
            poison_step: None,
            on_step: None,
        }
    }
}

impl<B: AutodiffBackend> TrainHooks<B> {
    /// Splits the hooks into the preview (for the task) and the engine's hooks.
    pub fn split(
        &mut self,
    ) -> (
        Option<&mut (dyn PreviewHook<B::InnerBackend> + 'static)>,
        EngineHooks<'_, StepMetrics>,
    ) {
        let engine = EngineHooks {
            poison_step: self
                .poison_step
                .as_deref_mut()
                .map(|f| f as &mut dyn FnMut(u64) -> bool),
            on_step: self
                .on_step
                .as_deref_mut()
                .map(|f| f as &mut dyn FnMut(&StepMetrics)),
        };
        (self.preview.as_deref_mut(), engine)
    }
}

/// A fresh Transfusion model of `m` from `seed` (see [`seeded_module`]).
pub fn seeded_init<B: Backend>(
    m: &TransfusionConfig,
    device: &B::Device,
    seed: u64,
) -> Transfusion<B> {
    seeded_module(device, seed, || m.init::<B>(device))
}

/// Transfusion pretraining on the experiment config's data.
pub struct TransfusionTask<'h, B: AutodiffBackend> {
    cfg: ExperimentConfig,
    m: TransfusionConfig,
    tokenizer: Arc<TextTokenizer>,
    meta: ModelMeta,
    out: PathBuf,
    device: B::Device,
    feed: Option<Feed>,
    preview: Option<&'h mut (dyn PreviewHook<B::InnerBackend> + 'static)>,
    /// The diffusion loss weight of each timestep (`training.min_snr_gamma`), or uniform.
    image_weights: Option<Vec<f64>>,
}

impl<'h, B: AutodiffBackend> TransfusionTask<'h, B> {
    /// Loads the tokenizer, validates the config and checks the precision against the
    /// backend, all before anything is written.
    pub fn new(
        cfg: &ExperimentConfig,
        opts: &RunOptions,
        device: &B::Device,
        preview: Option<&'h mut (dyn PreviewHook<B::InnerBackend> + 'static)>,
    ) -> Result<Self> {
        let mut cfg = cfg.clone();
        cfg.apply_init(opts.config_dir.as_deref())?;
        let cfg = &cfg;
        let tokenizer = Arc::new(load_tokenizer(cfg, opts.config_dir.as_deref())?);
        let m = cfg.validate(tokenizer.vocab_size())?;
        cfg.training
            .precision
            .check_backend::<B>(device)
            .map_err(|e| TrainError::Setting(format!("training.precision: {e}")))?;
        let meta = ModelMeta {
            model: m.clone(),
            special_tokens: *tokenizer.special(),
            image_size: cfg.data.image_size,
            autoencoder: autoencoder_for(cfg)?,
            step: 0,
            consistency: None,
        };
        let gamma = cfg.training.min_snr_gamma;
        let prediction = m.prediction.unwrap_or_default();
        let image_weights = (gamma > 0.0).then(|| {
            let w = prediction.min_snr_weights(&NoiseSchedule::cosine(m.timesteps), gamma);
            // Mean 1 over the uniformly drawn timesteps: lambda keeps its balance.
            let mean = w.iter().sum::<f64>() / w.len() as f64;
            w.iter().map(|x| x / mean).collect()
        });
        Ok(Self {
            cfg: cfg.clone(),
            m,
            tokenizer,
            meta,
            out: opts.out.clone(),
            device: device.clone(),
            feed: None,
            preview,
            image_weights,
        })
    }
}

impl<B: AutodiffBackend> TransfusionTask<'_, B> {
    /// The run's precision, and its text weights frozen when `training.freeze_text`.
    fn prepared(&self, model: Transfusion<B>) -> Transfusion<B> {
        let model = model.with_precision(self.cfg.training.precision);
        if self.cfg.training.freeze_text {
            model.freeze_text()
        } else {
            model
        }
    }
}

impl<B: AutodiffBackend> TrainTask<B> for TransfusionTask<'_, B> {
    type Model = Transfusion<B>;
    type Batch = TransfusionBatch<B>;
    type DataState = PipelineState;
    type Step = StepMetrics;
    type Eval = EvalMetrics;

    fn settings(&self) -> EngineSettings {
        EngineSettings::from_config(&self.cfg)
    }

    fn checkpoint_files(&self) -> &'static [&'static str] {
        REQUIRED_FILES
    }

    fn write_run_files(&self, out: &Path) -> Result<()> {
        Ok(write_json(&out.join(CONFIG_FILE), &self.cfg)?)
    }

    fn init_model(&self, device: &B::Device) -> Result<Transfusion<B>> {
        let model = match &self.cfg.model.init {
            Some(dir) => {
                let (model, saved, _) = load_model::<B>(dir, device).map_err(|e| {
                    TrainError::from(e).within(format!("model.init = {}", dir.display()))
                })?;
                // lambda is a training choice; everything else must be the checkpoint's.
                let mut want = self.m.clone();
                want.diffusion_loss_weight = saved.model.diffusion_loss_weight;
                if saved.model != want {
                    return Err(TrainError::invalid(
                        dir,
                        "model.init: its model config differs from this run's (load the \
                         config with `ExperimentConfig::apply_init`)",
                    ));
                }
                model
            }
            None => seeded_module(device, self.cfg.seed, || self.m.init::<B>(device)),
        };
        Ok(self.prepared(model))
    }

    fn load_model(&mut self, dir: &Path, device: &B::Device) -> Result<Transfusion<B>> {
        let (model, saved, _) = load_model::<B>(dir, device)?;
        if saved.model != self.m {
            return Err(TrainError::invalid(
                dir,
                "the checkpoint's model config differs from this run's; resume with the \
                 same config (or without --config to use the checkpoint's)",
            ));
        }
        Ok(self.prepared(model))
    }

    fn save_model(
        &self,
        dir: &Path,
        model: &Transfusion<B::InnerBackend>,
        step: u64,
    ) -> Result<()> {
        let mut meta = self.meta.clone();
        meta.step = step;
        save_model(dir, model, &meta, &self.tokenizer)?;
        Ok(write_json(&dir.join(CONFIG_FILE), &self.cfg)?)
    }

    fn start_data(&mut self, resume: Option<&PipelineState>) -> Result<()> {
        self.feed = Some(Feed::start(&self.cfg, &self.m, &self.tokenizer, resume)?);
        Ok(())
    }

    fn data_state(&self) -> PipelineState {
        self.feed.as_ref().map(Feed::state).unwrap_or_default()
    }

    fn next_batch(
        &mut self,
        keep: bool,
        device: &B::Device,
    ) -> Result<Option<(TransfusionBatch<B>, Work)>> {
        let feed = self
            .feed
            .as_mut()
            .expect("the engine starts the data stream before it asks for batches");
        let rows = feed.next_rows()?;
        if !keep {
            return Ok(None);
        }
        let arrays = feed.batcher().arrays(&rows)?;
        let targets = arrays.text_targets.len() as u64;
        let work = Work {
            tokens: rows.iter().map(|r| r.used() as u64).sum(),
            images: arrays.n_img as u64,
            units: [targets, arrays.n_img as u64],
        };
        Ok(Some((feed.batcher().to_tensors::<B>(arrays, device), work)))
    }

    fn loss(&self, model: &Transfusion<B>, batch: TransfusionBatch<B>, _step: u64) -> TaskLoss<B> {
        weighted_transfusion_loss(model, batch, self.image_weights.as_deref())
    }

    fn gradients(
        &self,
        model: &Transfusion<B>,
        batch: TransfusionBatch<B>,
        step: u64,
        objective: &Objective,
    ) -> MicroStep {
        match self.cfg.training.recompute {
            Recompute::None => objective.backward(model, self.loss(model, batch, step)),
            Recompute::Layers => {
                recomputed_micro_step(model, batch, self.image_weights.as_deref(), objective)
            }
        }
    }

    fn step_record(&self, f: &StepFigures) -> StepMetrics {
        f.with_losses(TransfusionLosses {
            total: f.losses[0],
            lm: f.losses[1],
            diffusion: f.losses[2],
        })
    }

    fn evaluate(&mut self, model: &Transfusion<B::InnerBackend>, step: u64) -> Result<EvalMetrics> {
        let e = evaluate_held_out(
            &self.cfg,
            &self.m,
            &self.tokenizer,
            model,
            &self.device,
            step,
        )?;
        if let Some(p) = self.preview.as_mut() {
            p.preview(model, step, &self.out)
                .map_err(|e| e.within("preview hook"))?;
        }
        Ok(e)
    }

    fn eval_loss(&self, eval: &EvalMetrics) -> Option<f64> {
        Some(eval.figures.loss)
    }

    fn plot(&self, lines: &[Line<StepMetrics, EvalMetrics>], path: &Path) -> Result<()> {
        plot_losses(lines, path)
    }
}

/// Trains `cfg` on `device` (see the crate docs for the loop and the files it writes).
pub fn run_training<B: AutodiffBackend>(
    cfg: &ExperimentConfig,
    opts: &RunOptions,
    hooks: &mut TrainHooks<B>,
    device: &B::Device,
) -> Result<RunSummary> {
    let (preview, mut engine_hooks) = hooks.split();
    let mut task = TransfusionTask::<B>::new(cfg, opts, device, preview)?;
    run_task(&mut task, opts, &mut engine_hooks, device)
}
