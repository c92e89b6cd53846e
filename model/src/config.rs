//! The model configuration, its presets and its validation.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::prediction::Prediction;

/// How image latents enter and leave the transformer (PAPER.md, "Architecture").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageIoConfig {
    /// A timestep embedding added to every patch, one linear layer in, one linear layer out.
    Linear,
    /// U-Net down blocks before patching, up blocks (with skips) after.
    Unet(UNetConfig),
}

/// Whether image positions share the decoder's weights with text (the paper) or have
/// their own (LMFusion's modality-specific weights).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModalityWeights {
    /// One set of weights for every position.
    #[default]
    Shared,
    /// Every decoder layer holds a second set of norms, attention projections and MLP used
    /// at image positions (initialised as a copy of the text set); attention itself stays
    /// one over the whole sequence.
    Untied,
}

/// Shape of the U-Net patch adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Channels per level; one 2x down-sampling between consecutive levels.
    pub channels: Vec<usize>,
    /// ResNet blocks per level.
    pub blocks_per_level: usize,
    /// GroupNorm groups (1 gives a plain LayerNorm over each feature map, as the paper).
    pub norm_groups: usize,
}

impl UNetConfig {
    /// Total down-sampling factor of the U-Net: `2^(levels - 1)`.
    pub fn downsampling(&self) -> usize {
        1 << self.channels.len().saturating_sub(1)
    }
}

/// A configuration error naming the offending key.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid model config: `{key}` {message}")]
pub struct ConfigError {
    /// The key, as spelled in the config file.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Everything needed to build a [`crate::Transfusion`].
#[derive(Config, Debug, PartialEq)]
pub struct TransfusionConfig {
    /// Vocabulary size `v` (including the special tokens BOS, EOS, PAD, BOI, EOI).
    pub vocab_size: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads `h`.
    pub n_heads: usize,
    /// Key/value heads (equal to `n_heads` unless grouped-query attention is wanted).
    pub n_kv_heads: usize,
    /// SwiGLU hidden width.
    pub d_hidden: usize,
    /// Latent channels `c` (8 for the paper's VAE, 3 in pixel space).
    pub latent_channels: usize,
    /// Latent side `H = W` (32 for a 256px image through an 8x VAE).
    pub latent_size: usize,
    /// Patch side `k` over the latent (1, 2, 4 or 8).
    pub patch_size: usize,
    /// Image adapter.
    pub image_io: ImageIoConfig,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// Width of the sinusoidal timestep features.
    #[config(default = 256)]
    pub d_timestep: usize,
    /// Weight `lambda` of the diffusion loss in `L = L_LM + lambda * L_DDPM`.
    #[config(default = 5.0)]
    pub diffusion_loss_weight: f64,
    /// Training timesteps `T` of the noise schedule.
    #[config(default = 1000)]
    pub timesteps: usize,
    /// What the image head predicts: `epsilon` (the paper; also when absent, so configs
    /// written before this key existed load unchanged) or `v`.
    pub prediction: Option<Prediction>,
    /// Adds a fixed 2D sin-cos position embedding to every patch token of the linear
    /// adapter (absent or false: RoPE's 1D positions only, as the paper).
    pub patch_position_embedding: Option<bool>,
    /// Shared or untied decoder weights for the two modalities (absent: shared).
    pub modality_weights: Option<ModalityWeights>,
}

/// The largest model [`TransfusionConfig::validate`] accepts, in GiB of f32 weights (a
/// 256B-parameter model): larger ones cannot be trained or run on any one device.
pub const MAX_WEIGHTS_GIB: f64 = 1024.0;

/// The SwiGLU hidden width Llama uses for width `d`: `8d/3` rounded up to a multiple of 64.
pub fn llama_hidden(d_model: usize) -> usize {
    (8 * d_model / 3).div_ceil(64) * 64
}

impl TransfusionConfig {
    fn paper(vocab_size: usize, n_layers: usize, d_model: usize, n_heads: usize) -> Self {
        Self::new(
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            n_heads,
            llama_hidden(d_model),
            8,
            32,
            2,
            ImageIoConfig::Linear,
        )
    }

    /// A 4-layer, 128-wide model (about 1M parameters with a 512-token vocabulary) over
    /// 32x32 pixel-space RGB images in 4x4 patches: the CPU demo and the tests.
    pub fn tiny(vocab_size: usize) -> Self {
        Self::new(
            vocab_size,
            128,
            4,
            4,
            4,
            384,
            3,
            32,
            4,
            ImageIoConfig::Linear,
        )
        .with_d_timestep(64)
        .with_patch_position_embedding(Some(true))
    }

    /// The paper's 0.16B model: 16 layers, width 768, 12 heads.
    pub fn paper_160m(vocab_size: usize) -> Self {
        Self::paper(vocab_size, 16, 768, 12)
    }

    /// The paper's 0.37B model: 24 layers, width 1024, 16 heads.
    pub fn paper_370m(vocab_size: usize) -> Self {
        Self::paper(vocab_size, 24, 1024, 16)
    }

    /// The paper's 0.76B model: 24 layers, width 1536, 24 heads.
    pub fn paper_760m(vocab_size: usize) -> Self {
        Self::paper(vocab_size, 24, 1536, 24)
    }

    /// The paper's 1.4B model: 24 layers, width 2048, 16 heads.
    pub fn paper_1_4b(vocab_size: usize) -> Self {
        Self::paper(vocab_size, 24, 2048, 16)
    }

    /// The paper's 7B model: 32 layers, width 4096, 32 heads.
    pub fn paper_7b(vocab_size: usize) -> Self {
        Self::paper(vocab_size, 32, 4096, 32)
    }

    /// A preset by name (`tiny`, `paper_160m`, `paper_370m`, `paper_760m`, `paper_1_4b`,
    /// `paper_7b`).
    pub fn preset(name: &str, vocab_size: usize) -> Option<Self> {
        Some(match name {
            "tiny" => Self::tiny(vocab_size),
            "paper_160m" | "160m" => Self::paper_160m(vocab_size),
            "paper_370m" | "370m" => Self::paper_370m(vocab_size),
            "paper_760m" | "760m" => Self::paper_760m(vocab_size),
            "paper_1_4b" | "1.4b" => Self::paper_1_4b(vocab_size),
            "paper_7b" | "7b" => Self::paper_7b(vocab_size),
            _ => return None,
        })
    }

    /// Names accepted by [`TransfusionConfig::preset`].
    pub const PRESETS: [&'static str; 6] = [
        "tiny",
        "paper_160m",
        "paper_370m",
        "paper_760m",
        "paper_1_4b",
        "paper_7b",
    ];

    /// Whether image positions have their own decoder weights.
    pub fn untied(&self) -> bool {
        self.modality_weights == Some(ModalityWeights::Untied)
    }

    /// Head dimension `hd`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Patches per image `n = (H/k)^2` of the square `latent_size` latent.
    pub fn patches_per_image(&self) -> usize {
        crate::patch::num_patches(self.latent_size, self.latent_size, self.patch_size)
    }

    /// Length of one patch vector, `c * k * k`.
    pub fn patch_dim(&self) -> usize {
        self.latent_channels * self.patch_size * self.patch_size
    }

    /// Checks every constraint the network relies on, naming the key that breaks one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, message: String| Err(ConfigError { key, message });
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("d_hidden", self.d_hidden),
            ("latent_channels", self.latent_channels),
            ("latent_size", self.latent_size),
            ("patch_size", self.patch_size),
            ("timesteps", self.timesteps),
        ] {
            if v == 0 {
                return err(key, "must be positive".into());
            }
        }
        // Beyond these no model fits any device (and the size arithmetic would overflow).
        for (key, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("d_model", self.d_model, 1 << 16),
            ("n_layers", self.n_layers, 1 << 12),
            ("d_hidden", self.d_hidden, 1 << 18),
            ("latent_channels", self.latent_channels, 1 << 12),
            ("latent_size", self.latent_size, 1 << 12),
            ("timesteps", self.timesteps, 1 << 20),
        ] {
            if v > max {
                return err(key, format!("({v}) is beyond the largest supported, {max}"));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return err(
                "norm_eps",
                format!("must be a positive number, got {}", self.norm_eps),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return err(
                "rope_theta",
                format!("must be a number above 1, got {}", self.rope_theta),
            );
        }
        for (key, divisor, of, value) in [
            ("n_heads", self.n_heads, "d_model", self.d_model),
            ("n_kv_heads", self.n_kv_heads, "n_heads", self.n_heads),
            (
                "patch_size",
                self.patch_size,
                "latent_size",
                self.latent_size,
            ),
        ] {
            if value % divisor != 0 {
                return err(key, format!("({divisor}) must divide {of} ({value})"));
            }
        }
        if self.head_dim() % 2 != 0 {
            return err(
                "n_heads",
                format!(
                    "gives an odd head dimension {}; RoPE needs it even",
                    self.head_dim()
                ),
            );
        }
        if self.d_timestep % 2 != 0 {
            return err("d_timestep", "must be even".into());
        }
        if !(self.diffusion_loss_weight.is_finite() && self.diffusion_loss_weight >= 0.0) {
            return err(
                "diffusion_loss_weight",
                "must be a finite number >= 0".into(),
            );
        }
        if self.patch_position_embedding == Some(true) && self.d_model % 4 != 0 {
            return err(
                "patch_position_embedding",
                format!("needs d_model divisible by 4 (got {})", self.d_model),
            );
        }
        let params = self.param_count();
        let gib = (params.total() * 4) as f64 / (1u64 << 30) as f64;
        if gib > MAX_WEIGHTS_GIB {
            let key = if params.embedding + params.lm_head > params.decoder {
                "vocab_size"
            } else {
                "n_layers"
            };
            return err(
                key,
                format!(
                    "gives {} parameters, {gib:.0} GiB of f32 weights (more than {MAX_WEIGHTS_GIB} \
                     GiB, beyond any one device)",
                    params.total()
                ),
            );
        }
        if let ImageIoConfig::Unet(u) = &self.image_io {
            if u.channels.is_empty() || u.channels.contains(&0) {
                return err(
                    "image_io.channels",
                    "must list at least one positive channel count".into(),
                );
            }
            if u.blocks_per_level == 0 {
                return err("image_io.blocks_per_level", "must be positive".into());
            }
            if u.norm_groups == 0 {
                return err("image_io.norm_groups", "must be positive".into());
            }
            let down = u.downsampling();
            if self.patch_size % down != 0 {
                return err(
                    "image_io.channels",
                    format!(
                        "has {} levels (down-sampling {down}x), which must divide patch_size ({})",
                        u.channels.len(),
                        self.patch_size
                    ),
                );
            }
        }
        Ok(())
    }
}
