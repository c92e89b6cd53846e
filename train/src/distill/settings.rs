//! The distillation's settings ([`DistillSettings`], `distill.json`), its experiment
//! config ([`distill_config`]) and its logged step ([`DistillStepMetrics`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use transfusion_data::source::SourceSpec;
use transfusion_model::Prediction;
use transfusion_runtime::checkpoint::{load_meta, TOKENIZER_FILE};

use crate::checkpoint::{read_config, CONFIG_FILE};
use crate::config::{ExperimentConfig, ModelSection};
use crate::engine::metrics::{Figures, StepLine};
use crate::error::{Result, TrainError};

/// Default of [`DistillSettings::consistency_weight`].
pub const DEFAULT_CONSISTENCY_WEIGHT: f64 = 0.02;
/// Default of [`DistillSettings::derivative_span`].
pub const DEFAULT_DERIVATIVE_SPAN: usize = 16;

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
    /// (`k`; the cosine schedule's steps are 1.56e-3 rad apart). Measured on the demo
    /// checkpoint, 150 steps each: span 1 drew 9.4% all-correct and captioned 60.9%,
    /// span 16 45.3% and 78.1% (the network's jitter between neighbouring steps, divided
    /// by a small span, swamps the derivative).
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
) -> Result<ExperimentConfig> {
    let meta = load_meta(teacher)?;
    if let Some(c) = &meta.consistency {
        return Err(TrainError::Run(format!(
            "{}: the teacher is already consistency-distilled (from {}, guidance {} baked \
             in); distil its own teacher instead",
            teacher.display(),
            c.teacher.display(),
            c.distilled_guidance
        )));
    }
    if meta.model.prediction.unwrap_or_default() != Prediction::V {
        return Err(TrainError::Run(format!(
            "{}: the teacher predicts eps; consistency distillation needs a v-prediction \
             teacher (model.prediction = \"v\"), whose output is TrigFlow's velocity",
            teacher.display()
        )));
    }
    let mut cfg = if teacher.join(CONFIG_FILE).is_file() {
        read_config(teacher)?
    } else {
        if data.is_empty() {
            return Err(TrainError::Setting(format!(
                "{} holds no training config (config.json): give the data to distil on with \
                 --data KIND:LOCATION (e.g. --data shapes:100000)",
                teacher.display()
            )));
        }
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
        modality_weights: None,
        init: None,
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

/// The losses of a distillation step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillLosses {
    /// `L_LM + lambda * L_sCD`.
    pub total: f64,
    /// LM cross-entropy.
    pub lm: f64,
    /// The adaptive-weighted consistency loss `mean(e^-w mse + w)` (negative once the
    /// learned weights track small errors: not comparable across runs).
    pub consistency: f64,
    /// The tangent warm-up factor `r` of the step.
    pub tangent_warmup: f64,
}

/// One logged distillation step.
pub type DistillStepMetrics = StepLine<DistillLosses>;

impl Figures for DistillLosses {
    fn summary(&self) -> String {
        let (lm, scd, r) = (self.lm, self.consistency, self.tangent_warmup);
        format!("lm {lm:.3} scd {scd:.3} r {r:.2}")
    }
}
