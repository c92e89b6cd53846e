//! The VAE run's config: [`VaeTrainConfig`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use transfusion_data::source::SourceSpec;
use transfusion_model::vae::{ReconLoss, VaeConfig};

use crate::config::{validate_optimizer, OptimizerSection, ScheduleSection};
use crate::error::{Result, TrainError};

/// The run config file (in the run directory and in every checkpoint).
pub const VAE_TRAIN_FILE: &str = "vae_train.json";

/// Everything that defines a VAE training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaeTrainConfig {
    /// The preset the network came from (informational).
    pub preset: String,
    /// The network.
    pub vae: VaeConfig,
    /// Image sources (`KIND:LOCATION`; text-only records are skipped).
    pub data: Vec<SourceSpec>,
    /// Held-out image sources; empty: the training sources with the held-out shapes seed
    /// (for `shapes:` a disjoint set; for other sources give this explicitly).
    pub held_out: Vec<SourceSpec>,
    /// Side of the square training images in pixels (center-crop + resize).
    pub image_size: u32,
    /// Optimizer steps.
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW betas, epsilon, weight decay.
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule.
    pub schedule: ScheduleSection,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// Weight of the per-element KL term.
    pub kl_weight: f64,
    /// Reconstruction distance.
    pub loss: ReconLoss,
    /// Evaluate (PSNR, grid, latent statistics) every this many steps (0: at the end only).
    pub eval_every: u64,
    /// Held-out images for PSNR and latent statistics.
    pub eval_images: usize,
    /// Held-out images in the reconstruction grid (one row of originals, one of
    /// reconstructions).
    pub grid_images: usize,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Step checkpoints kept.
    pub keep_last: usize,
    /// Log a train line every this many steps.
    pub log_every: u64,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (absent
    /// in configs written before it existed: 20).
    #[serde(default = "default_nonfinite")]
    pub max_consecutive_nonfinite: u32,
    /// Cap of the decay of an EMA of the weights, in [0, 1) (0: none; see the training
    /// engine's `ema` module).
    #[serde(default)]
    pub ema_decay: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

fn default_nonfinite() -> u32 {
    20
}

impl VaeTrainConfig {
    /// The VAE presets by name.
    pub const PRESETS: [&'static str; 3] = ["tiny", "sd", "paper"];

    /// The network of preset `name`.
    pub fn preset_vae(name: &str) -> Option<VaeConfig> {
        match name {
            "tiny" => Some(VaeConfig::tiny()),
            "sd" => Some(VaeConfig::sd()),
            "paper" => Some(VaeConfig::paper()),
            _ => None,
        }
    }

    /// A run of preset `name` on `data` with the preset's default budget: `tiny` trains on
    /// 32px images (1500 steps of 16, lr 1e-3, a few CPU minutes); `sd` and `paper` on
    /// 256px images (20000 steps of 8, lr 1e-4: a GPU job).
    pub fn preset(name: &str, data: Vec<SourceSpec>) -> Result<Self> {
        let vae = Self::preset_vae(name).ok_or_else(|| {
            TrainError::Setting(format!(
                "unknown VAE preset `{name}` (one of {})",
                Self::PRESETS.join(", ")
            ))
        })?;
        let tiny = name == "tiny";
        Ok(Self {
            preset: name.to_string(),
            vae,
            data,
            held_out: vec![],
            image_size: if tiny { 32 } else { 256 },
            steps: if tiny { 1500 } else { 20_000 },
            batch_size: if tiny { 16 } else { 8 },
            optimizer: OptimizerSection {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            schedule: ScheduleSection {
                lr: if tiny { 1e-3 } else { 1e-4 },
                min_lr: if tiny { 1e-4 } else { 1e-5 },
                warmup_steps: if tiny { 50 } else { 500 },
            },
            grad_clip: 1.0,
            kl_weight: 1e-4,
            loss: ReconLoss::L1,
            eval_every: if tiny { 250 } else { 2000 },
            eval_images: 64,
            grid_images: 8,
            checkpoint_every: if tiny { 500 } else { 2000 },
            keep_last: 3,
            log_every: 10,
            max_consecutive_nonfinite: default_nonfinite(),
            ema_decay: 0.0,
            seed: 0,
        })
    }

    /// Checks the config; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let refuse = |message: String| Err(TrainError::Setting(message));
        if self.data.is_empty() {
            return refuse("VAE training: no --data source".into());
        }
        if self.steps == 0 {
            return refuse(format!("steps must be >= 1, got {}", self.steps));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return refuse(format!(
                "ema_decay must be in [0, 1) (0: no EMA), got {}",
                self.ema_decay
            ));
        }
        validate_optimizer(&self.optimizer, &self.schedule, self.steps)?;
        let f = self.vae.down_factor() as u32;
        if self.image_size == 0 || self.image_size % f != 0 {
            return refuse(format!(
                "image_size {} should be a positive multiple of the VAE's down-sampling \
                 factor {f}",
                self.image_size
            ));
        }
        if self.batch_size == 0 {
            return refuse("batch_size should be positive".into());
        }
        if self.eval_images == 0 {
            return refuse("eval_images should be positive".into());
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            return refuse(format!(
                "kl_weight should be finite and >= 0, got {}",
                self.kl_weight
            ));
        }
        Ok(())
    }
}

/// Reads the run config stored in a VAE checkpoint or run directory.
pub fn read_vae_train_config(dir: &Path) -> Result<VaeTrainConfig> {
    let path = dir.join(VAE_TRAIN_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io("read", &path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::invalid(&path, format!("bad VAE run config: {e}")))
}
