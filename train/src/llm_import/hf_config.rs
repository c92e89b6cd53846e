//! The Hugging Face `config.json` of a Llama-family model: the keys the import reads, and a
//! clear refusal (naming the key) of every option the decoder does not implement.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ImportError;

/// Architectures whose decoder is exactly Llama's (pre-norm RMSNorm, SwiGLU without
/// biases, half-split RoPE, optional grouped-query attention).
pub const SUPPORTED_MODEL_TYPES: [&str; 2] = ["llama", "mistral"];

/// What the import needs from a Llama-family `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHfConfig {
    /// Rows of the embedding table (may exceed the tokenizer's vocabulary: padding rows).
    pub vocab_size: usize,
    /// Width `d`.
    pub hidden_size: usize,
    /// SwiGLU hidden width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head is the transposed embedding table (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// The model's own beginning-of-sequence id, if it has one.
    pub bos_token_id: Option<u32>,
    /// The model's own end-of-sequence id (the first, when the file lists several).
    pub eos_token_id: Option<u32>,
}

impl LlamaHfConfig {
    /// Reads and checks `config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, ImportError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ImportError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses the text of a `config.json` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ImportError> {
        let json: Value = serde_json::from_str(text).map_err(|e| ImportError::Invalid {
            path: path.to_path_buf(),
            message: format!("not JSON: {e}"),
        })?;
        let keys = Keys { json: &json, path };
        let model_type = keys.string("model_type")?;
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(keys.bad(
                "model_type",
                format!(
                    "`{model_type}` is not a Llama-family architecture this importer maps (one of {})",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            ));
        }
        if let Some(act) = keys.optional_string("hidden_act")? {
            if act != "silu" {
                return Err(keys.bad(
                    "hidden_act",
                    format!("`{act}`: only SwiGLU with silu is implemented"),
                ));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if json.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(keys.bad(key, "biases are not implemented (the decoder has none)"));
            }
        }
        if !json.get("sliding_window").is_none_or(Value::is_null) {
            return Err(keys.bad(
                "sliding_window",
                "sliding-window attention is not implemented (it must be null)",
            ));
        }
        let hidden_size = keys.count("hidden_size")?;
        let num_attention_heads = keys.count("num_attention_heads")?;
        let num_key_value_heads = match json.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => keys.count("num_key_value_heads")?,
        };
        if let Some(v) = json.get("head_dim").filter(|v| !v.is_null()) {
            let hd = v.as_u64().unwrap_or(0) as usize;
            if hd * num_attention_heads != hidden_size {
                return Err(keys.bad(
                    "head_dim",
                    format!(
                        "{v} differs from hidden_size / num_attention_heads = {}: the decoder's \
                         head dimension is the width over the heads",
                        hidden_size / num_attention_heads.max(1)
                    ),
                ));
            }
        }
        let rope_theta = rope_theta(&keys)?;
        let token_id = |key: &str| -> Result<Option<u32>, ImportError> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(ids)) => {
                    Ok(ids.first().and_then(Value::as_u64).map(|i| i as u32))
                }
                Some(v) => v
                    .as_u64()
                    .map(|i| Some(i as u32))
                    .ok_or_else(|| keys.bad(key, format!("must be a token id, got {v}"))),
            }
        };
        Ok(Self {
            vocab_size: keys.count("vocab_size")?,
            hidden_size,
            intermediate_size: keys.count("intermediate_size")?,
            num_hidden_layers: keys.count("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            rope_theta,
            rms_norm_eps: keys.number("rms_norm_eps")?,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: token_id("bos_token_id")?,
            eos_token_id: token_id("eos_token_id")?,
        })
    }
}

/// The RoPE base: `rope_theta` (older files) or `rope_parameters.rope_theta` (newer ones);
/// any scaling (`rope_scaling`, or a `rope_type` other than `default`) is refused.
fn rope_theta(keys: &Keys) -> Result<f64, ImportError> {
    let json = keys.json;
    if let Some(s) = json.get("rope_scaling").filter(|v| !v.is_null()) {
        return Err(keys.bad(
            "rope_scaling",
            format!("{s}: RoPE scaling is not implemented (plain RoPE only)"),
        ));
    }
    match json.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(p) => {
            let kind = p
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(keys.bad(
                    "rope_parameters.rope_type",
                    format!("`{kind}`: RoPE scaling is not implemented (plain RoPE only)"),
                ));
            }
            p.get("rope_theta")
                .and_then(Value::as_f64)
                .ok_or_else(|| keys.bad("rope_parameters.rope_theta", "missing or not a number"))
        }
        None => Ok(json
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(10000.0)),
    }
}

/// Typed access to the keys of one config file, with errors naming the key.
struct Keys<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Keys<'_> {
    fn bad(&self, key: &str, message: impl Into<String>) -> ImportError {
        ImportError::Key {
            path: PathBuf::from(self.path),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn optional_string(&self, key: &str) -> Result<Option<String>, ImportError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(key, format!("must be a string, got {v}"))),
        }
    }

    fn string(&self, key: &str) -> Result<String, ImportError> {
        self.optional_string(key)?
            .ok_or_else(|| self.bad(key, "missing"))
    }

    fn count(&self, key: &str) -> Result<usize, ImportError> {
        match self.json.get(key) {
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(self.bad(key, format!("must be a positive integer, got {v}"))),
            },
            None => Err(self.bad(key, "missing")),
        }
    }

    fn number(&self, key: &str) -> Result<f64, ImportError> {
        match self.json.get(key) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(key, format!("must be a number, got {v}"))),
            None => Err(self.bad(key, "missing")),
        }
    }
}
