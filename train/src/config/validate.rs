//! Checking every value of the experiment config before any work starts.

use transfusion_data::source::SourceKind;
use transfusion_model::TransfusionConfig;

use super::{bad, ConfigError, ExperimentConfig, OptimizerSection, ScheduleSection};

impl ExperimentConfig {
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
        if let Some(w) = self.model.modality_weights {
            cfg.modality_weights = Some(w);
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
                SourceKind::ImageFolder
                    | SourceKind::Coco
                    | SourceKind::Wds
                    | SourceKind::Shapes
                    | SourceKind::Digits
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
        let t = &self.training;
        if t.steps == 0 {
            return bad("training.steps", "must be >= 1");
        }
        validate_optimizer(&self.optimizer, &self.schedule, t.steps)?;
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
        // The memory plan of one step, against the most any device could hold (the
        // device's own memory is checked where the device is known: `run`).
        let shape = crate::memory_plan::step_shape(self, &m);
        let gib_of = |s: &crate::memory_plan::StepShape| {
            crate::memory_plan::plan(s).peak() / (1u64 << 30) as f64
        };
        let gib = gib_of(&shape);
        if gib > MAX_STEP_GIB {
            // the row length is to blame when even one row is too much
            let one_row = crate::memory_plan::StepShape {
                batch_size: 1,
                ..shape.clone()
            };
            return bad(
                if gib_of(&one_row) > MAX_STEP_GIB {
                    "training.seq_len"
                } else {
                    "training.batch_size"
                },
                format!(
                    "batch_size {} x seq_len {} needs about {gib:.0} GiB per device for one \
                     step (more than {MAX_STEP_GIB} GiB, beyond any one device; \
                     `transfusion-train plan` shows the parts); use grad_accum for larger \
                     batches",
                    t.batch_size, t.seq_len
                ),
            );
        }
        if !(t.grad_clip >= 0.0 && t.grad_clip.is_finite()) {
            return bad("training.grad_clip", "must be >= 0 (0 disables clipping)");
        }
        if !(t.min_snr_gamma >= 0.0 && t.min_snr_gamma.is_finite()) {
            return bad(
                "training.min_snr_gamma",
                format!(
                    "must be >= 0 (0: uniform weighting), got {}",
                    t.min_snr_gamma
                ),
            );
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return bad(
                "training.ema_decay",
                format!("must be in [0, 1) (0: no EMA), got {}", t.ema_decay),
            );
        }
        if t.freeze_text && !m.untied() {
            return bad(
                "training.freeze_text",
                "needs untied modality weights (model.modality_weights = \"untied\", or \
                 `import-llm --modality-weights untied`): with shared weights the frozen text \
                 weights are the whole decoder",
            );
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

/// The most memory one step may need per device (see [`crate::memory_plan`]); beyond it
/// the run could only abort on allocation, whatever the device.
pub const MAX_STEP_GIB: f64 = 1024.0;

/// Checks the optimizer and learning-rate schedule sections (shared by every trainer);
/// `steps` is the run's length, which the warm-up must not exceed.
pub fn validate_optimizer(
    o: &OptimizerSection,
    s: &ScheduleSection,
    steps: u64,
) -> Result<(), ConfigError> {
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
    if s.warmup_steps > steps {
        return bad(
            "schedule.warmup_steps",
            format!("({}) exceeds the run's steps ({steps})", s.warmup_steps),
        );
    }
    Ok(())
}
