//! [`DiffusersVaeConfig`]: the `config.json` of a diffusers `AutoencoderKL` and its
//! translation to a [`VaeConfig`].

use std::path::Path;

use burn::config::Config;
use serde::{Deserialize, Serialize};

use super::VaeLoadError;
use crate::vae::VaeConfig;

/// The fields of a diffusers `AutoencoderKL` `config.json` this loader reads (others,
/// like `_class_name` or `sample_size`, are ignored). Defaults are diffusers' defaults.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(default)]
pub struct DiffusersVaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Encoder block types (all `DownEncoderBlock2D`).
    pub down_block_types: Vec<String>,
    /// Decoder block types (all `UpDecoderBlock2D`).
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level.
    pub layers_per_block: usize,
    /// Activation (only `silu`).
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Latent scale.
    pub scaling_factor: f64,
    /// Latent shift (SD3 / Flux), `null` for none.
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    pub mid_block_add_attention: bool,
}

impl Default for DiffusersVaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl Config for DiffusersVaeConfig {}

impl DiffusersVaeConfig {
    /// Reads a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, VaeLoadError> {
        let bytes = std::fs::read(path).map_err(|e| VaeLoadError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::load_binary(&bytes).map_err(|e| VaeLoadError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The equivalent [`VaeConfig`]. Channels must be multiples of the first level's.
    pub fn to_vae_config(&self) -> Result<VaeConfig, VaeLoadError> {
        let unsupported = |m: String| Err(VaeLoadError::Unsupported(m));
        if self.act_fn != "silu" {
            return unsupported(format!("act_fn `{}` (only `silu`)", self.act_fn));
        }
        if self.in_channels != self.out_channels {
            return unsupported(format!(
                "in_channels {} != out_channels {}",
                self.in_channels, self.out_channels
            ));
        }
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return unsupported("empty block_out_channels".into());
        }
        let check_types = |types: &[String], want: &str, name: &str| {
            if types.len() != levels || types.iter().any(|t| t != want) {
                Err(VaeLoadError::Unsupported(format!(
                    "{name} {types:?} (expected {levels} x `{want}`)"
                )))
            } else {
                Ok(())
            }
        };
        check_types(
            &self.down_block_types,
            "DownEncoderBlock2D",
            "down_block_types",
        )?;
        check_types(&self.up_block_types, "UpDecoderBlock2D", "up_block_types")?;
        let base = self.block_out_channels[0];
        if base == 0 || self.block_out_channels.iter().any(|c| c % base != 0) {
            return unsupported(format!(
                "block_out_channels {:?} are not multiples of the first",
                self.block_out_channels
            ));
        }
        let mults = self.block_out_channels.iter().map(|c| c / base).collect();
        Ok(
            VaeConfig::new(base, mults, self.layers_per_block, self.latent_channels)
                .with_image_channels(self.in_channels)
                .with_norm_groups(self.norm_num_groups)
                .with_norm_eps(1e-6)
                .with_mid_attention(self.mid_block_add_attention)
                .with_use_quant_conv(self.use_quant_conv)
                .with_use_post_quant_conv(self.use_post_quant_conv)
                .with_scaling_factor(self.scaling_factor)
                .with_shift_factor(self.shift_factor.unwrap_or(0.0)),
        )
    }
}
