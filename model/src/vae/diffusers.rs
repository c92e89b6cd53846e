//! Loading diffusers `AutoencoderKL` weights (`diffusion_pytorch_model.safetensors` +
//! `config.json`, the layout of the Stable Diffusion / SDXL / SD3 / Flux VAE folders)
//! through burn-store.
//!
//! The module's field names follow diffusers, so the key remapping is the short table
//! [`DIFFUSERS_KEY_MAP`]; burn-store's `PyTorchToBurnAdapter` transposes Linear weights
//! (PyTorch `[out, in]`, Burn `[in, out]`). Before anything is applied, every key of the
//! file is checked against the model: unknown keys, missing keys and shape mismatches are
//! all reported by their diffusers name in one [`VaeLoadError::Mismatch`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::config::Config;
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    KeyRemapper, ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter,
    SafetensorsStore, TensorSnapshot,
};
use serde::{Deserialize, Serialize};

use super::{AutoencoderKl, VaeConfig};

/// One rename between a diffusers key and a Burn parameter path.
#[derive(Clone, Copy, Debug)]
pub struct KeyRule {
    /// Text in the diffusers key.
    pub diffusers: &'static str,
    /// Its replacement in the Burn path.
    pub burn: &'static str,
    /// Only at the end of the key (parameter names); otherwise anywhere.
    pub suffix: bool,
    /// A legacy alias (old diffusers attention names): diffusers -> Burn only.
    pub legacy: bool,
}

const fn rule(diffusers: &'static str, burn: &'static str, suffix: bool, legacy: bool) -> KeyRule {
    KeyRule {
        diffusers,
        burn,
        suffix,
        legacy,
    }
}

/// The whole diffusers -> Burn key mapping, applied in order. Every other part of a key
/// is the same on both sides (`encoder.down_blocks.1.resnets.0.conv1.weight`,
/// `decoder.up_blocks.0.resnets.2.norm2...`, `mid_block.attentions.0.to_q...`,
/// `quant_conv`, `post_quant_conv`, `conv_in`, `conv_out`, `conv_norm_out`).
pub const DIFFUSERS_KEY_MAP: &[KeyRule] = &[
    // ResNet 1x1 shortcut: diffusers `conv_shortcut`, ours `shortcut`.
    rule(".conv_shortcut.", ".shortcut.", false, false),
    // The single sampler of a level: a ModuleList in diffusers, an Option here.
    rule(".downsamplers.0.", ".downsampler.", false, false),
    rule(".upsamplers.0.", ".upsampler.", false, false),
    // Attention output: `to_out` is a ModuleList [Linear, Dropout] in diffusers.
    rule(".to_out.0.", ".to_out.", false, false),
    // GroupNorm parameters: PyTorch weight/bias, Burn gamma/beta.
    rule(".norm1.weight", ".norm1.gamma", true, false),
    rule(".norm1.bias", ".norm1.beta", true, false),
    rule(".norm2.weight", ".norm2.gamma", true, false),
    rule(".norm2.bias", ".norm2.beta", true, false),
    rule(".group_norm.weight", ".group_norm.gamma", true, false),
    rule(".group_norm.bias", ".group_norm.beta", true, false),
    rule(".conv_norm_out.weight", ".conv_norm_out.gamma", true, false),
    rule(".conv_norm_out.bias", ".conv_norm_out.beta", true, false),
    // Diffusers < 0.14 attention names (Linear, or 1x1 conv in converted LDM files).
    rule(".query.", ".to_q.", false, true),
    rule(".key.", ".to_k.", false, true),
    rule(".value.", ".to_v.", false, true),
    rule(".proj_attn.", ".to_out.", false, true),
];

/// The Burn parameter path of a diffusers key.
pub fn burn_path(diffusers_key: &str) -> String {
    let mut key = diffusers_key.to_string();
    for r in DIFFUSERS_KEY_MAP {
        key = apply_rule(&key, r.diffusers, r.burn, r.suffix);
    }
    key
}

/// The (current, non-legacy) diffusers key of a Burn parameter path.
pub fn diffusers_key(burn_path: &str) -> String {
    let mut key = burn_path.to_string();
    for r in DIFFUSERS_KEY_MAP.iter().rev().filter(|r| !r.legacy) {
        key = apply_rule(&key, r.burn, r.diffusers, r.suffix);
    }
    key
}

fn apply_rule(key: &str, from: &str, to: &str, suffix: bool) -> String {
    if suffix {
        match key.strip_suffix(from) {
            Some(stem) => format!("{stem}{to}"),
            None => key.to_string(),
        }
    } else {
        key.replace(from, to)
    }
}

/// [`DIFFUSERS_KEY_MAP`] as burn-store's regex remapper.
pub fn key_remapper() -> KeyRemapper {
    let patterns = DIFFUSERS_KEY_MAP.iter().map(|r| {
        let from = r.diffusers.replace('.', r"\.");
        let from = if r.suffix { format!("{from}$") } else { from };
        (from, r.burn.to_string())
    });
    KeyRemapper::from_pattern_iter(patterns)
        .expect("DIFFUSERS_KEY_MAP should hold valid regular expressions")
}

/// Errors of [`load_diffusers_vae`].
#[derive(Debug, thiserror::Error)]
pub enum VaeLoadError {
    /// The config file could not be read or parsed.
    #[error("cannot read diffusers VAE config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The config describes something this autoencoder cannot represent.
    #[error("unsupported diffusers VAE config: {0}")]
    Unsupported(String),
    /// The weight file could not be read.
    #[error("cannot read VAE weights {path}: {message}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The weight file does not match the model: every problem, by diffusers key name.
    #[error("VAE weights {path} do not match the model:\n{}", format_problems(.unknown, .missing, .shapes))]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Keys in the file the model has no parameter for.
        unknown: Vec<String>,
        /// Model parameters (by diffusers key) absent from the file.
        missing: Vec<String>,
        /// `(key, expected, found)` shapes, in the file's (PyTorch) layout.
        shapes: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
}

fn format_problems(
    unknown: &[String],
    missing: &[String],
    shapes: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut lines = Vec::new();
    for (key, expected, found) in shapes {
        lines.push(format!(
            "  shape mismatch for key `{key}`: expected {expected:?}, found {found:?}"
        ));
    }
    for key in missing {
        lines.push(format!("  missing key `{key}`"));
    }
    for key in unknown {
        lines.push(format!("  unknown key `{key}`"));
    }
    lines.join("\n")
}

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

/// Adapts diffusers tensors before burn-store applies them: floats are cast to f32
/// (VAE files are often f16), 1x1-convolution attention weights `[o, i, 1, 1]` of
/// converted LDM files become Linear weights `[o, i]`, then `PyTorchToBurnAdapter`
/// transposes Linear weights.
#[derive(Clone, Default)]
struct DiffusersAdapter;

fn is_linear_weight(snapshot: &TensorSnapshot) -> bool {
    snapshot.module_type().as_deref() == Some("Struct:Linear")
        && snapshot
            .path_stack
            .as_ref()
            .and_then(|p| p.last())
            .is_some_and(|name| name == "weight")
}

/// A 1x1-convolution weight shape `[o, i, 1, 1]` as a Linear one `[o, i]`.
fn squeeze_1x1(shape: &[usize]) -> Option<Vec<usize>> {
    match shape {
        [o, i, 1, 1] => Some(vec![*o, *i]),
        _ => None,
    }
}

impl ModuleAdapter for DiffusersAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let squeezed = is_linear_weight(snapshot)
            .then(|| squeeze_1x1(&snapshot.shape))
            .flatten();
        let cast = matches!(snapshot.dtype, DType::F16 | DType::BF16 | DType::F64);
        let snapshot = if squeezed.is_some() || cast {
            let data_fn = snapshot.clone_data_fn();
            let shape = squeezed.clone();
            let adapted = Rc::new(move || {
                let mut data = data_fn()?;
                if cast {
                    data = data.convert_dtype(DType::F32);
                }
                if let Some(shape) = &shape {
                    data.shape = shape.clone().into();
                }
                Ok(data)
            });
            TensorSnapshot::from_closure(
                adapted,
                if cast { DType::F32 } else { snapshot.dtype },
                squeezed
                    .map(Into::into)
                    .unwrap_or_else(|| snapshot.shape.clone()),
                snapshot.path_stack.clone().unwrap_or_default(),
                snapshot.container_stack.clone().unwrap_or_default(),
                snapshot.tensor_id.unwrap_or_default(),
            )
        } else {
            snapshot.clone()
        };
        PyTorchToBurnAdapter.adapt(&snapshot)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Checks every key and shape of a diffusers file against `model`, by diffusers name.
fn check_keys<B: Backend>(model: &AutoencoderKl<B>, weights: &Path) -> Result<(), VaeLoadError> {
    let read_error = |message: String| VaeLoadError::Weights {
        path: weights.to_path_buf(),
        message,
    };
    let mut raw = SafetensorsStore::from_file(weights);
    // diffusers key -> (Burn path, shape in the file's layout)
    let mut file: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut by_path: BTreeMap<String, String> = BTreeMap::new();
    let mut unknown = BTreeSet::new();
    for (key, snapshot) in raw
        .get_all_snapshots()
        .map_err(|e| read_error(e.to_string()))?
    {
        let path = burn_path(key);
        if let Some(other) = by_path.insert(path.clone(), key.clone()) {
            // Both a current and a legacy name for one parameter.
            unknown.insert(other);
        }
        file.insert(key.clone(), snapshot.shape.to_vec());
    }

    // Burn path -> expected shape in PyTorch layout (Linear weights transposed back).
    let expected: BTreeMap<String, Vec<usize>> = model
        .collect(None, None, false)
        .into_iter()
        .map(|s| {
            let mut shape = s.shape.to_vec();
            if is_linear_weight(&s) {
                shape.reverse();
            }
            (s.full_path(), shape)
        })
        .collect();

    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    for (path, want) in &expected {
        match by_path.get(path) {
            None => missing.push(diffusers_key(path)),
            Some(key) => {
                let found = &file[key];
                let squeezed = (want.len() == 2).then(|| squeeze_1x1(found)).flatten();
                if found != want && squeezed.as_ref() != Some(want) {
                    shapes.push((key.clone(), want.clone(), found.clone()));
                }
            }
        }
    }
    for (path, key) in &by_path {
        if !expected.contains_key(path) {
            unknown.insert(key.clone());
        }
    }
    if unknown.is_empty() && missing.is_empty() && shapes.is_empty() {
        Ok(())
    } else {
        Err(VaeLoadError::Mismatch {
            path: weights.to_path_buf(),
            unknown: unknown.into_iter().collect(),
            missing,
            shapes,
        })
    }
}

/// Loads diffusers `AutoencoderKL` weights into `model` (whose config must match the
/// file). Nothing is applied unless every key and shape matches.
pub fn load_diffusers_weights<B: Backend>(
    model: AutoencoderKl<B>,
    weights: &Path,
) -> Result<AutoencoderKl<B>, VaeLoadError> {
    check_keys(&model, weights)?;
    let mut model = model;
    let mut store = SafetensorsStore::from_file(weights)
        .remap(key_remapper())
        .with_from_adapter(DiffusersAdapter)
        .allow_partial(true)
        .validate(false);
    let result = model
        .load_from(&mut store)
        .map_err(|e| VaeLoadError::Weights {
            path: weights.to_path_buf(),
            message: e.to_string(),
        })?;
    // `check_keys` makes these empty; kept as a guard against a table/adapter slip.
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(VaeLoadError::Weights {
            path: weights.to_path_buf(),
            message: format!("burn-store did not apply every tensor:\n{result}"),
        });
    }
    Ok(model)
}

/// Builds an [`AutoencoderKl`] from a diffusers `config.json` and loads its
/// `.safetensors` weights. Returns the config too (it holds the latent scale and shift).
///
/// `path` is either the VAE folder (holding `config.json` and
/// `diffusion_pytorch_model.safetensors`) or the `.safetensors` file itself, with
/// `config.json` beside it.
pub fn load_diffusers_vae<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(VaeConfig, AutoencoderKl<B>), VaeLoadError> {
    let (weights, config) = if path.is_dir() {
        (
            path.join("diffusion_pytorch_model.safetensors"),
            path.join("config.json"),
        )
    } else {
        let dir = path.parent().unwrap_or(Path::new("."));
        (path.to_path_buf(), dir.join("config.json"))
    };
    load_diffusers_files(&weights, &config, device)
}

/// [`load_diffusers_vae`] with both file paths given.
pub fn load_diffusers_files<B: Backend>(
    weights: &Path,
    config_json: &Path,
    device: &B::Device,
) -> Result<(VaeConfig, AutoencoderKl<B>), VaeLoadError> {
    let config = DiffusersVaeConfig::from_file(config_json)?.to_vae_config()?;
    let model = load_diffusers_weights(config.init(device), weights)?;
    Ok((config, model))
}
