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

use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, SafetensorsStore,
    TensorSnapshot,
};

use super::{AutoencoderKl, VaeConfig};

mod config;
mod keys;

pub use config::DiffusersVaeConfig;
pub use keys::{burn_path, diffusers_key, key_remapper, KeyRule, DIFFUSERS_KEY_MAP};

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
