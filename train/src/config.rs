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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use transfusion_data::mixture::Balance;
use transfusion_data::source::{SourceKind, SourceSpec};
use transfusion_model::{Precision, Prediction, TransfusionConfig};

/// A configuration error naming the offending key (dotted path as in the TOML file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config: `{key}` {message}")]
pub struct ConfigError {
    /// The key, e.g. `training.seq_len` or `model.config.n_heads`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn bad<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
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
    /// short run (warmup 10% of `steps`), as `run --preset P --data ...` builds it.
    pub fn quick(preset: &str, data: Vec<SourceSpec>, steps: u64) -> Self {
        Self {
            seed: 0,
            model: ModelSection {
                preset: Some(preset.to_string()),
                config: None,
                lambda: None,
                prediction: None,
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

    /// Parses TOML text (unknown keys are errors naming the key).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let value: toml::Value = toml::from_str(text).map_err(|e| ConfigError {
            key: "<file>".into(),
            message: format!("is not valid TOML: {e}"),
        })?;
        check_model_config_keys(&value)?;
        toml::from_str::<Self>(text).map_err(|e| {
            let msg = e.message().to_string();
            // serde names the unknown field; report it with its table.
            let table = table_at(text, e.span());
            let key = match (unknown_key(&msg), table) {
                (Some(k), Some(t)) => format!("{t}.{k}"),
                (Some(k), None) => k,
                (None, Some(t)) => t,
                (None, None) => "<file>".into(),
            };
            ConfigError {
                key,
                message: format!("{msg}{}", span_hint(text, e.span())),
            }
        })
    }

    /// Reads and parses a TOML file.
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Self::from_toml_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The model configuration for a tokenizer of `vocab_size` ids.
    pub fn model_config(&self, vocab_size: usize) -> Result<TransfusionConfig, ConfigError> {
        let mut cfg = match (&self.model.config, &self.model.preset) {
            (Some(c), _) => c.clone(),
            (None, Some(p)) => {
                TransfusionConfig::preset(p, vocab_size).ok_or_else(|| ConfigError {
                    key: "model.preset".into(),
                    message: format!(
                        "`{p}` is not a preset (one of {})",
                        TransfusionConfig::PRESETS.join(", ")
                    ),
                })?
            }
            (None, None) => return bad("model", "needs `preset` or a `[model.config]` table"),
        };
        if let Some(l) = self.model.lambda {
            cfg.diffusion_loss_weight = l;
        }
        if let Some(p) = self.model.prediction {
            cfg.prediction = Some(p);
        }
        Ok(cfg)
    }

    /// Checks every value (the model's for a vocabulary of `vocab_size`), naming the key.
    pub fn validate(&self, vocab_size: usize) -> Result<TransfusionConfig, ConfigError> {
        let m = self.model_config(vocab_size)?;
        let prefix = if self.model.config.is_some() {
            "model.config."
        } else {
            "model."
        };
        m.validate().map_err(|e| ConfigError {
            key: if e.key == "diffusion_loss_weight" {
                "model.lambda".into()
            } else {
                format!("{prefix}{}", e.key)
            },
            message: e.message,
        })?;
        if self.model.config.is_some() && m.vocab_size != vocab_size {
            return bad(
                "model.config.vocab_size",
                format!("is {} but the tokenizer has {vocab_size} ids", m.vocab_size),
            );
        }
        let d = &self.data;
        if d.train.is_empty() {
            return bad("data.train", "lists no sources");
        }
        let uses_pixels = d.train.iter().chain(&d.held_out).any(|s| {
            matches!(
                s.kind,
                SourceKind::ImageFolder | SourceKind::Coco | SourceKind::Wds | SourceKind::Shapes
            )
        });
        if uses_pixels && (m.latent_channels != 3 || m.latent_size != d.image_size as usize) {
            return bad(
                "data.image_size",
                format!(
                    "({}px RGB through the identity pixel encoder gives latents [3, {0}, {0}], \
                     but the model expects [{}, {}, {}]; set image_size to the latent size for a \
                     pixel-space model, or cache latents with a VAE and train on `latents:` sources",
                    d.image_size, m.latent_channels, m.latent_size, m.latent_size
                ),
            );
        }
        for (key, p) in [
            ("data.p_caption_first", d.p_caption_first),
            ("data.caption_dropout", d.caption_dropout),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, format!("must be in [0, 1], got {p}"));
            }
        }
        if !(1..=9).contains(&d.shapes_max_shapes) {
            return bad("data.shapes_max_shapes", "must be in 1..=9");
        }
        let o = &self.optimizer;
        for (key, v) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("must be in [0, 1), got {v}"));
            }
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            return bad("optimizer.eps", "must be a positive number");
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return bad("optimizer.weight_decay", "must be >= 0");
        }
        let s = &self.schedule;
        if !(s.lr > 0.0 && s.lr.is_finite()) {
            return bad(
                "schedule.lr",
                format!("must be a positive number, got {}", s.lr),
            );
        }
        if !(s.min_lr >= 0.0 && s.min_lr <= s.lr) {
            return bad(
                "schedule.min_lr",
                format!("must be in [0, lr = {}], got {}", s.lr, s.min_lr),
            );
        }
        let t = &self.training;
        if t.steps == 0 {
            return bad("training.steps", "must be >= 1");
        }
        if s.warmup_steps > t.steps {
            return bad(
                "schedule.warmup_steps",
                format!("({}) exceeds training.steps ({})", s.warmup_steps, t.steps),
            );
        }
        if t.batch_size == 0 {
            return bad("training.batch_size", "must be >= 1");
        }
        if t.grad_accum == 0 {
            return bad("training.grad_accum", "must be >= 1");
        }
        let need = m.patches_per_image() + 4;
        if t.seq_len < need {
            return bad(
                "training.seq_len",
                format!(
                    "({}) is shorter than one image: {} patches + BOS BOI EOI EOS = {need} positions",
                    t.seq_len,
                    m.patches_per_image()
                ),
            );
        }
        if !(t.grad_clip >= 0.0 && t.grad_clip.is_finite()) {
            return bad("training.grad_clip", "must be >= 0 (0 disables clipping)");
        }
        if t.max_consecutive_nonfinite == 0 {
            return bad("training.max_consecutive_nonfinite", "must be >= 1");
        }
        if t.log_every == 0 {
            return bad("training.log_every", "must be >= 1");
        }
        if self.checkpoint.keep_last == 0 {
            return bad("checkpoint.keep_last", "must be >= 1");
        }
        for &ts in &self.eval.timesteps {
            if ts as usize >= m.timesteps {
                return bad(
                    "eval.timesteps",
                    format!("{ts} is not below the model's {} timesteps", m.timesteps),
                );
            }
        }
        if self.eval.batches == 0 && (self.eval.every > 0 || self.eval.at_end) {
            return bad("eval.batches", "must be >= 1 when evaluation is on");
        }
        Ok(m)
    }
}

/// Rejects unknown keys inside `[model.config]` (the model crate's config type accepts
/// them silently): every key must round-trip through `TransfusionConfig`.
fn check_model_config_keys(value: &toml::Value) -> Result<(), ConfigError> {
    let Some(table) = value
        .get("model")
        .and_then(|m| m.get("config"))
        .and_then(|c| c.as_table())
    else {
        return Ok(());
    };
    let known: &[&str] = &[
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "d_hidden",
        "latent_channels",
        "latent_size",
        "patch_size",
        "image_io",
        "rope_theta",
        "norm_eps",
        "d_timestep",
        "diffusion_loss_weight",
        "timesteps",
    ];
    for k in table.keys() {
        if !known.contains(&k.as_str()) {
            return bad(
                format!("model.config.{k}"),
                format!("is not a model config key (known: {})", known.join(", ")),
            );
        }
    }
    Ok(())
}

/// Turns serde's "unknown field `x`, expected ..." into the key `x` with its table.
fn unknown_key(msg: &str) -> Option<String> {
    let rest = msg.split("unknown field `").nth(1)?;
    let field = rest.split('`').next()?;
    Some(field.to_string())
}

/// The `[table]` header above the error position, without brackets.
fn table_at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let start = span?.start.min(text.len());
    text[..start]
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .map(|l| l.trim().trim_matches(|c| c == '[' || c == ']').to_string())
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let table = text[..span.start.min(text.len())]
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .map(|l| l.trim().to_string());
    match table {
        Some(t) => format!(" (line {line}, in {t})"),
        None => format!(" (line {line})"),
    }
}
