//! Starting from a pretrained language model: a Hugging Face Llama-family folder
//! (`config.json`, `model.safetensors` or sharded weights with their index,
//! `tokenizer.json`) becomes a Transfusion checkpoint whose decoder computes exactly what
//! the language model computed on text.
//!
//! What is mapped (Hugging Face name -> this project's module):
//! `model.embed_tokens` -> `tok_emb`; per layer `input_layernorm` -> `attn_norm`,
//! `self_attn.{q,k,v,o}_proj` -> `attn.{wq,wk,wv,wo}`, `post_attention_layernorm` ->
//! `mlp_norm`, `mlp.{gate,up,down}_proj` -> `mlp.{w1,w3,w2}`; `model.norm` -> `norm`;
//! `lm_head` (or the embedding table when tied) -> `lm_head`. Linear weights are transposed
//! (PyTorch `[out, in]`, Burn `[in, out]`); the RoPE layout is the same half split, so no
//! permutation is needed.
//!
//! What is new: the five Transfusion special tokens are added to the tokenizer when it lacks
//! them. Their embedding rows: `<|bos|>` and `<|eos|>` copy the model's own BOS/EOS rows (so
//! a document starts and ends as the language model knows), the others are drawn from a
//! normal with the embedding table's standard deviation. Their LM-head rows: `<|eos|>`
//! copies the model's EOS row; the others are the mean row (their logit is the mean logit,
//! never the largest, so greedy text is unchanged). The image adapters are freshly
//! initialised from the seed. The checkpoint is pixel space, v-prediction. With untied
//! modality weights every layer's image weights start as a copy of its text weights, and
//! `run --init CKPT --freeze-text` trains the image side only.

mod hf_config;
mod hf_weights;
mod rows;

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use transfusion_data::tokenizer::{TextTokenizer, SPECIAL_TOKENS};
use transfusion_model::config::ConfigError;
use transfusion_model::prediction::Prediction;
use transfusion_model::{
    ImageIoConfig, ModalityWeights, Transfusion, TransfusionConfig, UNetConfig,
};
use transfusion_runtime::checkpoint::{save_model, AutoencoderRef, ModelMeta, TOKENIZER_FILE};

pub use hf_config::{LlamaHfConfig, SUPPORTED_MODEL_TYPES};
pub use hf_weights::{HfTensor, HfWeights, INDEX_FILE, SINGLE_FILE};

use crate::engine::seeded_module;

/// Errors of the import, each naming the file (and key or tensor) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file (or folder).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key of `config.json` is missing, malformed or names an unsupported option.
    #[error("{}: key `{key}`: {message}", path.display())]
    Key {
        /// The config file.
        path: PathBuf,
        /// The key, as spelled in the file.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor the decoder needs is not in the weights.
    #[error("the weights lack tensor `{name}`")]
    MissingTensor {
        /// Its Hugging Face name.
        name: String,
    },
    /// A tensor's shape does not match `config.json`.
    #[error("{}: tensor `{name}` has shape {found:?}, config.json implies {expected:?}", file.display())]
    TensorShape {
        /// Its Hugging Face name.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The shape the config implies (file layout).
        expected: Vec<usize>,
        /// The stored shape.
        found: Vec<usize>,
    },
    /// A tensor is stored in a type the import does not widen (quantised, integer).
    #[error("{}: tensor `{name}` is stored as {dtype}; only f32, f16, bf16 and f64 weights are read", file.display())]
    TensorType {
        /// Its Hugging Face name.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The stored type.
        dtype: String,
    },
    /// The weights hold tensors the decoder has no place for (biases, other modules).
    #[error("the weights hold tensors a Llama decoder does not have: {0}")]
    UnknownTensors(String),
    /// The resulting model configuration is invalid.
    #[error("the imported model: {0}")]
    Model(#[from] ConfigError),
    /// The checkpoint could not be written.
    #[error("cannot write the checkpoint {}: {message}", path.display())]
    Write {
        /// The checkpoint directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Which image adapter the imported model gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterChoice {
    /// One linear layer in and out (with a timestep embedding and 2D patch positions).
    Linear,
    /// U-Net down/up blocks around the patching (two levels, 64 and 128 channels).
    Unet,
}

/// What the import adds to the language model.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Side of the square images in pixels (pixel space: the latent side).
    pub image_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// Image adapter.
    pub adapter: AdapterChoice,
    /// Shared decoder weights, or untied: image positions get a copy of every layer's
    /// weights to train while the text set keeps the language model's.
    pub modality_weights: ModalityWeights,
    /// Seed of the new weights (adapters, new embedding rows).
    pub seed: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            image_size: 32,
            patch_size: 4,
            adapter: AdapterChoice::Linear,
            modality_weights: ModalityWeights::Shared,
            seed: 0,
        }
    }
}

/// An imported model, before it is written.
pub struct Imported<B: Backend> {
    /// The network: the language model's decoder and fresh image adapters.
    pub model: Transfusion<B>,
    /// The language model's tokenizer with the Transfusion special tokens.
    pub tokenizer: TextTokenizer,
    /// What the checkpoint's `model.json` will hold.
    pub meta: ModelMeta,
    /// The source's `config.json`.
    pub source: LlamaHfConfig,
    /// The special tokens that were new to the tokenizer, with their ids.
    pub new_tokens: Vec<(&'static str, u32)>,
    /// The stored weight types (e.g. `BF16`).
    pub dtypes: Vec<String>,
}

/// Reads the Hugging Face folder `from` into a Transfusion model on `device`.
pub fn load_llama<B: Backend>(
    from: &Path,
    opts: &ImportOptions,
    device: &B::Device,
) -> Result<Imported<B>, ImportError> {
    if !from.is_dir() {
        return Err(ImportError::Invalid {
            path: from.to_path_buf(),
            message: "is not a directory".into(),
        });
    }
    let hf = LlamaHfConfig::from_dir(from)?;
    let tok_path = from.join(TOKENIZER_FILE);
    let original =
        tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ImportError::Invalid {
            path: tok_path.clone(),
            message: format!("not a readable tokenizer.json: {e}"),
        })?;
    let known_len = original
        .get_vocab(true)
        .values()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    if known_len > hf.vocab_size {
        return Err(ImportError::Invalid {
            path: tok_path,
            message: format!(
                "holds token ids up to {} but config.json's vocab_size is {}: not this model's \
                 tokenizer",
                known_len - 1,
                hf.vocab_size
            ),
        });
    }
    let new_tokens: Vec<&'static str> = SPECIAL_TOKENS
        .into_iter()
        .filter(|t| original.token_to_id(t).is_none())
        .collect();
    let tokenizer = TextTokenizer::from_tokenizer(original);
    let vocab_size = hf.vocab_size.max(tokenizer.vocab_size());
    let m = model_config(&hf, vocab_size, opts)?;
    let weights = HfWeights::open(from)?;
    let fresh = seeded_module(device, opts.seed, || m.init::<B>(device));
    let new_ids: Vec<(&'static str, u32)> = new_tokens
        .iter()
        .map(|t| (*t, tokenizer.token_id(t).expect("added")))
        .collect();
    let mut model = map_weights(fresh, &weights, &hf, &new_ids, device)?;
    if opts.modality_weights == ModalityWeights::Untied {
        // The image weights were drawn with the fresh model: copy the imported text set.
        model = model.untie_modalities();
    }
    let meta = ModelMeta {
        model: m,
        special_tokens: *tokenizer.special(),
        image_size: opts.image_size as u32,
        autoencoder: AutoencoderRef::Pixel,
        step: 0,
        consistency: None,
    };
    Ok(Imported {
        model,
        tokenizer,
        meta,
        dtypes: weights.dtypes(),
        source: hf,
        new_tokens: new_ids,
    })
}

/// Imports `from` and writes the checkpoint `out` (which must not exist yet, or be empty):
/// written beside it and renamed into place, so `out` is whole or absent.
pub fn import_llm<B: Backend>(
    from: &Path,
    out: &Path,
    opts: &ImportOptions,
    device: &B::Device,
) -> Result<Imported<B>, ImportError> {
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied || out.is_file() {
        return Err(ImportError::Invalid {
            path: out.to_path_buf(),
            message: "already exists: give a new checkpoint directory".into(),
        });
    }
    let imported = load_llama::<B>(from, opts, device)?;
    let name = out
        .file_name()
        .map_or("checkpoint".into(), |n| n.to_string_lossy());
    let tmp = out.with_file_name(format!(".{name}.importing"));
    let write_err = |message: String| ImportError::Write {
        path: out.to_path_buf(),
        message,
    };
    let _ = std::fs::remove_dir_all(&tmp);
    save_model(&tmp, &imported.model, &imported.meta, &imported.tokenizer)
        .map_err(|e| write_err(format!("{e:#}")))?;
    let _ = std::fs::remove_dir(out);
    std::fs::rename(&tmp, out).map_err(|e| write_err(e.to_string()))?;
    Ok(imported)
}

/// The Transfusion configuration of the language model with `vocab_size` rows.
fn model_config(
    hf: &LlamaHfConfig,
    vocab_size: usize,
    opts: &ImportOptions,
) -> Result<TransfusionConfig, ConfigError> {
    let image_io = match opts.adapter {
        AdapterChoice::Linear => ImageIoConfig::Linear,
        AdapterChoice::Unet => ImageIoConfig::Unet(UNetConfig {
            channels: vec![64, 128],
            blocks_per_level: 1,
            norm_groups: 1,
        }),
    };
    let linear = opts.adapter == AdapterChoice::Linear;
    let m = TransfusionConfig::new(
        vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.intermediate_size,
        3,
        opts.image_size,
        opts.patch_size,
        image_io,
    )
    .with_rope_theta(hf.rope_theta)
    .with_norm_eps(hf.rms_norm_eps)
    .with_prediction(Some(Prediction::V))
    .with_patch_position_embedding(Some(linear))
    .with_modality_weights(Some(opts.modality_weights));
    m.validate()?;
    Ok(m)
}

/// Puts the language model's weights into the decoder of `model`.
fn map_weights<B: Backend>(
    mut model: Transfusion<B>,
    w: &HfWeights,
    hf: &LlamaHfConfig,
    new_ids: &[(&'static str, u32)],
    device: &B::Device,
) -> Result<Transfusion<B>, ImportError> {
    let d = hf.hidden_size;
    let hd = d / hf.num_attention_heads;
    let (q_out, kv_out) = (hf.num_attention_heads * hd, hf.num_key_value_heads * hd);
    let mut used: Vec<String> = Vec::new();
    let mut read = |name: String, shape: &[usize]| {
        let t = w.tensor(&name, shape);
        used.push(name);
        t
    };
    let vector = |t: HfTensor| {
        let n = t.values.len();
        Param::from_tensor(Tensor::<B, 1>::from_data(
            TensorData::new(t.values, [n]),
            device,
        ))
    };
    // [out, in] (PyTorch) -> [in, out] (Burn)
    let linear = |t: HfTensor| {
        let [o, i] = [t.shape[0], t.shape[1]];
        Param::from_tensor(
            Tensor::<B, 2>::from_data(TensorData::new(t.values, [o, i]), device).transpose(),
        )
    };
    let emb = read("model.embed_tokens.weight".into(), &[hf.vocab_size, d])?;
    let head = if hf.tie_word_embeddings {
        emb.clone()
    } else {
        read("lm_head.weight".into(), &[hf.vocab_size, d])?
    };
    // The model was built with the extended vocabulary's rows.
    let v = model.tok_emb.weight.dims()[0];
    let fresh: Vec<f32> = model
        .tok_emb
        .weight
        .val()
        .into_data()
        .to_vec()
        .expect("f32 weights");
    let rows = rows::NewRows {
        new_ids,
        bos: hf.bos_token_id,
        eos: hf.eos_token_id,
    };
    let emb_rows = rows.embedding(&emb.values, hf.vocab_size, v, d, &fresh);
    let head_rows = rows.lm_head(&head.values, hf.vocab_size, v, d);
    let table =
        |values: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(values, [v, d]), device);
    model.tok_emb.weight = Param::from_tensor(table(emb_rows));
    // [v, d] -> [d, v]
    model.lm_head.weight = Param::from_tensor(table(head_rows).transpose());
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        block.attn_norm.gamma = vector(read(format!("{p}.input_layernorm.weight"), &[d])?);
        block.mlp_norm.gamma = vector(read(format!("{p}.post_attention_layernorm.weight"), &[d])?);
        let a = &mut block.attn;
        a.wq.weight = linear(read(format!("{p}.self_attn.q_proj.weight"), &[q_out, d])?);
        a.wk.weight = linear(read(format!("{p}.self_attn.k_proj.weight"), &[kv_out, d])?);
        a.wv.weight = linear(read(format!("{p}.self_attn.v_proj.weight"), &[kv_out, d])?);
        a.wo.weight = linear(read(format!("{p}.self_attn.o_proj.weight"), &[d, q_out])?);
        let h = hf.intermediate_size;
        let mlp = &mut block.mlp;
        mlp.w1.weight = linear(read(format!("{p}.mlp.gate_proj.weight"), &[h, d])?);
        mlp.w3.weight = linear(read(format!("{p}.mlp.up_proj.weight"), &[h, d])?);
        mlp.w2.weight = linear(read(format!("{p}.mlp.down_proj.weight"), &[d, h])?);
    }
    model.norm.gamma = vector(read("model.norm.weight".into(), &[d])?);
    let unknown: Vec<&str> = w
        .names()
        .filter(|n| !used.iter().any(|u| u == n))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(hf.tie_word_embeddings && *n == "lm_head.weight"))
        .collect();
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(8).copied().collect();
        let more = unknown.len().saturating_sub(shown.len());
        let tail = if more > 0 {
            format!(" (and {more} more)")
        } else {
            String::new()
        };
        return Err(ImportError::UnknownTensors(format!(
            "{}{tail}",
            shown.join(", ")
        )));
    }
    Ok(model)
}
