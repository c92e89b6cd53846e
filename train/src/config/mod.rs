//! The experiment configuration: TOML in, JSON saved beside every checkpoint.
//!
//! ```toml
//! seed = 0
//! [model]            # a preset name, or a full `[model.config]` table (TransfusionConfig)
//! preset = "tiny"
//! [data]             # sources as `KIND:LOCATION[@WEIGHT]` (see transfusion_data::source)
//! train = ["shapes:2000"]
//! [optimizer]        # AdamW; the paper's values are the defaults
//! [schedule]         # linear warmup, cosine decay to `min_lr`
//! [training]         # steps, batch size, row length, accumulation, clipping
//! [checkpoint]       # interval, keep-last-N, keep-best
//! [eval]             # interval, held-out batches, fixed timesteps
//! ```
//!
//! Every table rejects unknown keys, and [`ExperimentConfig::validate`] checks every value
//! before any work starts, naming the offending key (`training.seq_len`, ...).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use transfusion_data::mixture::Balance;
use transfusion_data::source::SourceSpec;
use transfusion_model::{ModalityWeights, Precision, Prediction, TransfusionConfig};

mod init;
mod overrides;
mod toml_file;
mod validate;
pub use overrides::ConfigOverride;
pub use validate::validate_optimizer;

/// A configuration error naming the offending key (dotted path as in the TOML file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config: `{key}` {message}")]
pub struct ConfigError {
    /// The key, e.g. `training.seq_len` or `model.config.n_heads`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn bad<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        key: key.into(),
        message: message.into(),
    })
}

/// The whole experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Seed of model initialisation and of every data stream (layouts, noise, shuffles).
    #[serde(default)]
    pub seed: u64,
    /// The network.
    pub model: ModelSection,
    /// Data sources and sequence layout.
    pub data: DataSection,
    /// AdamW settings.
    #[serde(default)]
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Steps, batch shape, accumulation, clipping, failure handling.
    pub training: TrainingSection,
    /// When and how many checkpoints to keep.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Periodic held-out evaluation.
    #[serde(default)]
    pub eval: EvalSection,
}

/// The network: a preset (sized to the tokenizer's vocabulary) or a full config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Preset name (`tiny`, `paper_160m`, `paper_370m`, `paper_760m`, `paper_1_4b`,
    /// `paper_7b`). Ignored when `config` is given.
    #[serde(default)]
    pub preset: Option<String>,
    /// A full model configuration (every field of `TransfusionConfig`).
    #[serde(default)]
    pub config: Option<TransfusionConfig>,
    /// Weight `lambda` of the diffusion loss (overrides the preset's 5.0).
    #[serde(default)]
    pub lambda: Option<f64>,
    /// What the image head predicts, `epsilon` (the paper) or `v` (overrides the preset).
    #[serde(default)]
    pub prediction: Option<Prediction>,
    /// Shared or untied decoder weights for text and image positions (overrides the
    /// preset's shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modality_weights: Option<ModalityWeights>,
    /// A checkpoint whose weights a fresh run starts from (e.g. one `import-llm` wrote):
    /// its model config, tokenizer and image size replace the run's
    /// ([`ExperimentConfig::apply_init`]). A resumed run continues from its own checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
}

/// Data sources and sequence layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training sources, `KIND:LOCATION[@WEIGHT]`.
    pub train: Vec<SourceSpec>,
    /// Held-out sources for evaluation. Empty: the training specs, with the shapes
    /// generator switched to its held-out seed (only `shapes` is then truly held out).
    #[serde(default)]
    pub held_out: Vec<SourceSpec>,
    /// Tokenizer file (`tokenizer.json`).
    #[serde(default = "default_tokenizer")]
    pub tokenizer: PathBuf,
    /// Side of the square images in pixels (pixel-space models: equals the latent size).
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    /// Probability that a pair is laid out caption first (paper 0.8).
    #[serde(default = "default_caption_first")]
    pub p_caption_first: f64,
    /// Probability that a caption-first pair loses its caption (CFG; paper 0.1).
    #[serde(default = "default_caption_dropout")]
    pub caption_dropout: f64,
    /// Timesteps of image-first pairs are drawn below this (paper 500; 0: no limit).
    #[serde(default = "default_noise_limit")]
    pub noise_limit: u32,
    /// What source weights balance: `tokens` (paper) or `samples`.
    #[serde(default = "default_balance")]
    pub balance: Balance,
    /// Batches prepared ahead on a background thread (0: none).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Bad records are errors instead of being skipped.
    #[serde(default)]
    pub strict: bool,
    /// Most shapes per generated `shapes` image (1 to 9).
    #[serde(default = "default_max_shapes")]
    pub shapes_max_shapes: usize,
}

fn default_tokenizer() -> PathBuf {
    PathBuf::from("assets/tokenizer.json")
}
fn default_image_size() -> u32 {
    32
}
fn default_caption_first() -> f64 {
    0.8
}
fn default_caption_dropout() -> f64 {
    0.1
}
fn default_noise_limit() -> u32 {
    500
}
fn default_balance() -> Balance {
    Balance::Tokens
}
fn default_prefetch() -> usize {
    2
}
fn default_max_shapes() -> usize {
    1
}

/// AdamW (decoupled weight decay). Defaults: the paper's values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (applied to every parameter).
    pub weight_decay: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `min_lr` at the
/// last step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate (the cosine floor).
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            min_lr: 1.5e-5,
            warmup_steps: 4000,
        }
    }
}

/// Steps, batch shape and the update rule's knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Optimizer steps in the whole run (the schedule's length).
    pub steps: u64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Row length `s` in positions.
    pub seq_len: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Global gradient-norm clip (0: no clipping; paper 1.0).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Stop after this many consecutive non-finite steps.
    #[serde(default = "default_nonfinite")]
    pub max_consecutive_nonfinite: u32,
    /// Write a metrics line (and refresh the progress bar message) every N steps.
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// Type of the decoder's matrix products: `f32` (default), `bf16` or `f16`. Weights,
    /// gradients and AdamW state stay f32 (see `transfusion_model::precision`).
    #[serde(default)]
    pub precision: Precision,
    /// Cap of the decay of an exponential moving average of the weights, in [0, 1)
    /// (0: none). The average, with the warm-up `min(ema_decay, (1 + n) / (10 + n))`, is
    /// what evaluations score and checkpoints' `model.safetensors` holds; the trained
    /// weights are kept beside it for resuming.
    #[serde(default)]
    pub ema_decay: f64,
    /// Keep the text weights fixed: the token embedding, every layer's text norms,
    /// projections and MLP, the final norm and the LM head get no gradient and no optimizer
    /// state, so a model started from a language model (`import-llm`) keeps its text
    /// behaviour exactly. Needs untied modality weights.
    #[serde(default)]
    pub freeze_text: bool,
    /// Min-SNR-gamma weighting of the diffusion loss (Hang et al. 2023): each image's
    /// target MSE times `min(SNR_t, gamma) / SNR_t` (eps) or `/ (SNR_t + 1)` (v), i.e. its
    /// `x_0` MSE times `min(SNR_t, gamma)`, the weights scaled to mean 1 over the timesteps
    /// so that `lambda` keeps its balance. 0 (default): uniform over `t`. Usual: 5.
    #[serde(default)]
    pub min_snr_gamma: f64,
    /// What the backward pass recomputes instead of keeping: `"none"` (default) or
    /// `"layers"` (each decoder layer's activations, re-run from its input; the same
    /// gradients for about one more forward pass of compute).
    #[serde(default)]
    pub recompute: Recompute,
}

/// What the backward pass recomputes instead of keeping from the forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation.
    #[default]
    None,
    /// Keep each decoder layer's input only and re-run the layer in the backward pass
    /// ([`transfusion_model::Transfusion::recomputed_gradients`]).
    Layers,
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Layers => "layers",
        })
    }
}

impl std::str::FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Recompute::None),
            "layers" => Ok(Recompute::Layers),
            other => Err(format!(
                "unknown recompute `{other}` (expected none or layers)"
            )),
        }
    }
}

fn one() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn default_clip() -> f64 {
    1.0
}
fn default_nonfinite() -> u32 {
    5
}

/// Checkpointing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Write a checkpoint every N steps (0: only at the end).
    pub every: u64,
    /// Keep the newest N step checkpoints.
    pub keep_last: usize,
    /// Also keep the checkpoint with the lowest eval loss in `checkpoints/best`.
    pub keep_best: bool,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 1000,
            keep_last: 3,
            keep_best: true,
        }
    }
}

/// Held-out evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every N steps (0: never, except at the end when `at_end`).
    pub every: u64,
    /// Held-out batches per evaluation.
    pub batches: usize,
    /// Fixed diffusion timesteps at which the diffusion loss is measured.
    pub timesteps: Vec<u32>,
    /// Also evaluate after the last step.
    pub at_end: bool,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 1000,
            batches: 4,
            timesteps: vec![100, 500, 900],
            at_end: true,
        }
    }
}

impl ExperimentConfig {
    /// A config for `preset` on `data` with the paper's optimizer and schedule scaled to a
    /// short run (warmup 10% of `steps`), as `run --preset P --data ...` builds it. The
    /// `tiny` preset gets the recipe measured on the demo (see [`Self::tiny_recipe`]).
    pub fn quick(preset: &str, data: Vec<SourceSpec>, steps: u64) -> Self {
        let mut cfg = Self::quick_paper(preset, data, steps);
        if preset == "tiny" {
            cfg.tiny_recipe();
        }
        cfg
    }

    /// The `tiny` preset's recipe, the demo's, measured on the shapes set (README):
    /// v-prediction (a model this small, trained for minutes, cannot afford
    /// eps-prediction's amplified errors at high noise: speckled images), rows of 160
    /// positions (two 76-position pairs), peak lr 2e-3 decaying to 1e-4 after a warm-up of
    /// 5% of the steps, and image-first pairs noised below t = 250 instead of the paper's
    /// 500 (better drawings on three seeds out of three; the caption-first share is the
    /// paper's 0.8 for every preset).
    pub fn tiny_recipe(&mut self) {
        self.model.prediction = Some(Prediction::V);
        self.data.noise_limit = 250;
        self.training.seq_len = 160;
        self.schedule.lr = 2e-3;
        self.schedule.min_lr = 1e-4;
        self.schedule.warmup_steps = (self.training.steps / 20).max(1);
    }

    fn quick_paper(preset: &str, data: Vec<SourceSpec>, steps: u64) -> Self {
        Self {
            seed: 0,
            model: ModelSection {
                preset: Some(preset.to_string()),
                config: None,
                lambda: None,
                prediction: None,
                modality_weights: None,
                init: None,
            },
            data: DataSection {
                train: data,
                held_out: vec![],
                tokenizer: default_tokenizer(),
                image_size: default_image_size(),
                p_caption_first: default_caption_first(),
                caption_dropout: default_caption_dropout(),
                noise_limit: default_noise_limit(),
                balance: default_balance(),
                prefetch: default_prefetch(),
                strict: false,
                shapes_max_shapes: default_max_shapes(),
            },
            optimizer: OptimizerSection::default(),
            schedule: ScheduleSection {
                lr: 1e-3,
                min_lr: 5e-5,
                warmup_steps: (steps / 10).max(1),
            },
            training: TrainingSection {
                steps,
                batch_size: 8,
                seq_len: 128,
                grad_accum: 1,
                grad_clip: 1.0,
                max_consecutive_nonfinite: default_nonfinite(),
                log_every: 1,
                precision: Precision::F32,
                ema_decay: 0.0,
                freeze_text: false,
                min_snr_gamma: 0.0,
                recompute: Recompute::None,
            },
            checkpoint: CheckpointSection {
                every: (steps / 4).max(1),
                keep_last: 2,
                keep_best: true,
            },
            eval: EvalSection {
                every: (steps / 4).max(1),
                ..EvalSection::default()
            },
        }
    }
}
