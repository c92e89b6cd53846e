//! The model part of a checkpoint directory, shared by training (which writes it) and
//! inference (which reads it):
//!
//! ```text
//! DIR/model.safetensors   weights (burn-store safetensors; readable by any safetensors tool)
//! DIR/model.json          ModelMeta: model config, special-token ids, image size, autoencoder
//! DIR/tokenizer.json      the tokenizer the model was trained with
//! ```
//! Training adds its own files (optimizer state, training state, experiment config) beside
//! these. Writes go to a temporary sibling directory that is renamed into place by the
//! caller (see the training crate), so a reader never sees a half-written checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use burn::prelude::*;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};
use transfusion_data::tokenizer::{SpecialTokens, TextTokenizer};
use transfusion_model::{Transfusion, TransfusionConfig};

/// File names inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Model metadata file.
pub const META_FILE: &str = "model.json";
/// Tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Which autoencoder maps images to the model's latents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AutoencoderRef {
    /// Pixel space: the latent is the `[-1, 1]` RGB image itself.
    Pixel,
    /// A VAE checkpoint directory (relative paths are relative to the checkpoint).
    Vae {
        /// Where the VAE checkpoint lives.
        path: PathBuf,
    },
}

/// Everything inference needs besides the weights and the tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The network's configuration.
    pub model: TransfusionConfig,
    /// Ids of BOS, EOS, PAD, BOI, EOI in the tokenizer the model was trained with.
    pub special_tokens: SpecialTokens,
    /// Side of the square training images, in pixels.
    pub image_size: u32,
    /// The autoencoder between pixels and latents.
    pub autoencoder: AutoencoderRef,
    /// Training step the weights come from (0 for an untrained model).
    #[serde(default)]
    pub step: u64,
}

/// Writes weights, metadata and tokenizer into `dir` (created if missing).
pub fn save_model<B: Backend>(
    dir: &Path,
    model: &Transfusion<B>,
    meta: &ModelMeta,
    tokenizer: &TextTokenizer,
) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    save_weights(model, &dir.join(WEIGHTS_FILE))?;
    let json = serde_json::to_string_pretty(meta)?;
    fs::write(dir.join(META_FILE), json)
        .with_context(|| format!("cannot write {}", dir.join(META_FILE).display()))?;
    tokenizer
        .save(dir.join(TOKENIZER_FILE))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Reads `model.json` of a checkpoint.
pub fn load_meta(dir: &Path) -> anyhow::Result<ModelMeta> {
    let path = dir.join(META_FILE);
    if !dir.is_dir() {
        bail!(
            "checkpoint {} does not exist or is not a directory",
            dir.display()
        );
    }
    let text = fs::read_to_string(&path)
        .with_context(|| format!("checkpoint {}: cannot read {META_FILE}", dir.display()))?;
    let meta: ModelMeta = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid model description", path.display()))?;
    meta.model
        .validate()
        .with_context(|| format!("{}: invalid model config", path.display()))?;
    Ok(meta)
}

/// Loads a checkpoint's model, metadata and tokenizer onto `device`, checking that the
/// tokenizer matches what the model was trained with.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> anyhow::Result<(Transfusion<B>, ModelMeta, TextTokenizer)> {
    let meta = load_meta(dir)?;
    let tok_path = dir.join(TOKENIZER_FILE);
    let tokenizer = TextTokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    tokenizer
        .check_matches(&meta.special_tokens, meta.model.vocab_size)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: tokenizer does not match the model: {e}",
                tok_path.display()
            )
        })?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        bail!("checkpoint {}: missing {WEIGHTS_FILE}", dir.display());
    }
    let model = load_weights(meta.model.init::<B>(device), &weights, "the model config")?;
    Ok((model, meta, tokenizer))
}

/// Writes every parameter of `model` to the safetensors file `weights` (burn-store,
/// readable by any safetensors tool), replacing it.
pub fn save_weights<B: Backend, M: Module<B>>(model: &M, weights: &Path) -> anyhow::Result<()> {
    let mut store = SafetensorsStore::from_file(weights).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", weights.display()))
}

/// Loads the safetensors file `weights` (written by burn-store) into `model`; a tensor
/// that is missing or does not fit is an error naming the file and `config` (what the
/// model was built from).
pub fn load_weights<B: Backend, M: Module<B>>(
    mut model: M,
    weights: &Path,
    config: &str,
) -> anyhow::Result<M> {
    let mut store = SafetensorsStore::from_file(weights);
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: {e}", weights.display()))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        bail!(
            "{}: weights do not match {config} (missing: {:?}; errors: {:?})",
            weights.display(),
            result.missing,
            result.errors
        );
    }
    Ok(model)
}
