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

use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    ModuleAdapter, ModuleSnapshot, SafetensorsStore, TensorSnapshot, TensorSnapshotError,
};
use serde::{Deserialize, Serialize};
use transfusion_data::files::{create_dir, write_file};
use transfusion_data::tokenizer::{SpecialTokens, TextTokenizer};
use transfusion_model::{Transfusion, TransfusionConfig};

use crate::error::{Result, RuntimeError};

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

/// The version of `model.json` this build writes (key `format`). Version 1 files name
/// every key of the model config and nothing else; version 2 adds `modality_weights`
/// (version 1 files lack it: shared weights). Files without the key are version 0
/// (written before it existed): a model-config key they lack takes the default documented
/// on [`TransfusionConfig`], which is what those files meant when they were written.
pub const META_FORMAT: u64 = 2;

/// Model-config keys added after format 1, with the format that added them: an older file
/// may lack them (their absence means what the file meant when it was written).
const ADDED_KEYS: [(&str, u64); 1] = [("modality_weights", 2)];

/// Everything inference needs besides the weights and the tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Set when the model is consistency-distilled (`transfusion-train distill`): it draws
    /// images in one or two steps with the consistency sampler, its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ConsistencyMeta>,
}

/// What a consistency-distilled model records about its distillation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyMeta {
    /// The classifier-free guidance scale baked into it (its teacher's velocity was
    /// guided at this scale): sample it without guidance.
    pub distilled_guidance: f64,
    /// Its default number of sampling steps (1 or 2).
    pub sampling_steps: usize,
    /// The teacher checkpoint it was distilled from.
    pub teacher: PathBuf,
}

/// Writes weights, metadata and tokenizer into `dir` (created if missing).
pub fn save_model<B: Backend>(
    dir: &Path,
    model: &Transfusion<B>,
    meta: &ModelMeta,
    tokenizer: &TextTokenizer,
) -> Result<()> {
    create_dir(dir)?;
    save_weights(model, &dir.join(WEIGHTS_FILE))?;
    let mut value = serde_json::to_value(meta).expect("model metadata serialises to JSON");
    value["format"] = META_FORMAT.into();
    value["tokenizer_fingerprint"] = tokenizer.fingerprint().into();
    let json = serde_json::to_string_pretty(&value).expect("a JSON value serialises");
    write_file(&dir.join(META_FILE), json)?;
    tokenizer.save(dir.join(TOKENIZER_FILE))?;
    Ok(())
}

/// Reads `model.json` of a checkpoint.
pub fn load_meta(dir: &Path) -> Result<ModelMeta> {
    Ok(load_meta_file(dir)?.meta)
}

/// Reads `model.json` of a checkpoint with the tokenizer fingerprint it records.
pub fn load_meta_file(dir: &Path) -> Result<MetaFile> {
    let path = dir.join(META_FILE);
    if !dir.is_dir() {
        return Err(RuntimeError::invalid(
            dir,
            "the checkpoint does not exist or is not a directory",
        ));
    }
    let text = fs::read_to_string(&path).map_err(|e| {
        RuntimeError::invalid(dir, format!("checkpoint: cannot read {META_FILE}: {e}"))
    })?;
    let file = parse_meta(&text)
        .map_err(|e| RuntimeError::invalid(&path, format!("not a valid model description: {e}")))?;
    file.meta
        .model
        .validate()
        .map_err(|e| RuntimeError::invalid(&path, format!("invalid model config: {e}")))?;
    Ok(file)
}

/// Parses the text of a `model.json` of any known [`META_FORMAT`]: unknown keys are
/// refused at every level (a misspelt key would otherwise be ignored and its default
/// silently used), and from version 1 on every model-config key must be present.
pub fn parse_meta(text: &str) -> Result<MetaFile> {
    let bad = RuntimeError::Meta;
    let mut value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let tokenizer_fingerprint = match value
        .as_object_mut()
        .and_then(|o| o.remove("tokenizer_fingerprint"))
    {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| bad(format!("`tokenizer_fingerprint` must be a string, got {v}")))?
                .to_string(),
        ),
    };
    let format = match value.as_object_mut().and_then(|o| o.remove("format")) {
        None => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad(format!("`format` must be a version number, got {v}")))?,
    };
    if format > META_FORMAT {
        return Err(bad(format!(
            "format {format} was written by a newer version (this one reads up to \
             {META_FORMAT}): update transfusion"
        )));
    }
    let written: Vec<String> = value
        .get("model")
        .and_then(|m| m.as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let meta: ModelMeta = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let known = serde_json::to_value(&meta.model).expect("a model config serialises to JSON");
    let known = known.as_object().expect("a config serialises to an object");
    let unknown: Vec<&String> = written.iter().filter(|k| !known.contains_key(*k)).collect();
    if !unknown.is_empty() {
        return Err(bad(format!("unknown key(s) in `model`: {unknown:?}")));
    }
    let missing: Vec<&String> = known
        .keys()
        .filter(|k| !written.contains(k))
        .filter(|k| {
            !ADDED_KEYS
                .iter()
                .any(|(a, since)| a == k && format < *since)
        })
        .collect();
    if format >= 1 && !missing.is_empty() {
        return Err(bad(format!(
            "`model` lacks key(s) {missing:?} (format {format} names every key)"
        )));
    }
    if format >= 1 && tokenizer_fingerprint.is_none() {
        return Err(bad(format!(
            "lacks `tokenizer_fingerprint` (format {format} records it)"
        )));
    }
    Ok(MetaFile {
        meta,
        tokenizer_fingerprint,
    })
}

/// A parsed `model.json`: the metadata and what the file records beside it.
#[derive(Clone, Debug)]
pub struct MetaFile {
    /// The metadata.
    pub meta: ModelMeta,
    /// [`TextTokenizer::fingerprint`] of the tokenizer saved with the weights (absent in
    /// format 0 files).
    pub tokenizer_fingerprint: Option<String>,
}

/// Loads a checkpoint's model, metadata and tokenizer onto `device`, checking that the
/// tokenizer matches what the model was trained with.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Transfusion<B>, ModelMeta, TextTokenizer)> {
    let MetaFile {
        meta,
        tokenizer_fingerprint,
    } = load_meta_file(dir)?;
    let tok_path = dir.join(TOKENIZER_FILE);
    let tokenizer = TextTokenizer::from_file(&tok_path)?;
    tokenizer
        .check_matches(&meta.special_tokens, meta.model.vocab_size)
        .and_then(|()| match &tokenizer_fingerprint {
            Some(f) => tokenizer.check_fingerprint(f),
            None => Ok(()),
        })
        .map_err(|e| {
            RuntimeError::invalid(
                &tok_path,
                format!("tokenizer does not match the model: {e}"),
            )
        })?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(RuntimeError::invalid(
            dir,
            format!("checkpoint: missing {WEIGHTS_FILE}"),
        ));
    }
    let model = load_weights(
        meta.model.init_unloaded::<B>(device),
        &weights,
        "the model config",
    )?;
    Ok((model, meta, tokenizer))
}

/// Writes every parameter of `model` to the safetensors file `weights` (burn-store,
/// readable by any safetensors tool), replacing it.
pub fn save_weights<B: Backend, M: Module<B>>(model: &M, weights: &Path) -> Result<()> {
    let mut store = SafetensorsStore::from_file(weights).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| RuntimeError::invalid(weights, format!("cannot write: {e}")))
}

/// Reads every floating-point tensor as f32, whatever type the file stores it in (f16,
/// bf16 or f64, as other tools write them): the model's parameters are f32 (mixed
/// precision casts per operation, see [`transfusion_model::Precision`]), and a parameter
/// loaded in another type would make the first matmul panic. A tensor holding NaN or an
/// infinity is refused (a load error naming it): such weights only produce NaN outputs.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloatsAsFiniteF32;

impl ModuleAdapter for FloatsAsFiniteF32 {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        if !matches!(
            snapshot.dtype,
            DType::F16 | DType::BF16 | DType::F64 | DType::F32
        ) {
            return snapshot.clone();
        }
        let read = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            std::rc::Rc::new(move || {
                let data = read()?.convert_dtype(DType::F32);
                let values = data.as_slice::<f32>().map_err(|e| {
                    TensorSnapshotError::DataError(format!("not readable as f32: {e:?}"))
                })?;
                let bad = values.iter().filter(|v| !v.is_finite()).count();
                if bad > 0 {
                    return Err(TensorSnapshotError::DataError(format!(
                        "{bad} of {} values are NaN or infinite",
                        values.len()
                    )));
                }
                Ok(data)
            }),
            DType::F32,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// Loads the safetensors file `weights` (written by burn-store, or any tool: floats of any
/// width are read as f32) into `model`; a tensor that is missing, does not fit or holds
/// non-finite values is an error naming the file, the tensor and `config` (what the model
/// was built from).
pub fn load_weights<B: Backend, M: Module<B>>(
    mut model: M,
    weights: &Path,
    config: &str,
) -> Result<M> {
    let mut store = SafetensorsStore::from_file(weights).with_from_adapter(FloatsAsFiniteF32);
    let result = model
        .load_from(&mut store)
        .map_err(|e| RuntimeError::invalid(weights, e.to_string()))?;
    if !result.errors.is_empty() {
        let errors: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
        return Err(RuntimeError::invalid(
            weights,
            format!(
                "cannot load {} tensor(s) into {config}: {}",
                errors.len(),
                errors.join("; ")
            ),
        ));
    }
    if !result.missing.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
        return Err(RuntimeError::invalid(
            weights,
            format!(
                "weights do not match {config} (missing: {})",
                missing.join(", ")
            ),
        ));
    }
    Ok(model)
}
