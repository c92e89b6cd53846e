//! The weights of a Hugging Face folder: one `model.safetensors`, or the shards a
//! `model.safetensors.index.json` lists. Tensors are read by name and widened to f32
//! (from bf16, f16, f32 or f64); every error names the tensor and its file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::ImportError;

/// Single-file weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor widened to f32, in the file's (PyTorch) layout.
#[derive(Clone, Debug)]
pub struct HfTensor {
    /// Row-major values.
    pub values: Vec<f32>,
    /// Shape as stored (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
}

/// The safetensors files of one model, read once, and which file holds each tensor.
pub struct HfWeights {
    files: HashMap<PathBuf, Vec<u8>>,
    location: BTreeMap<String, PathBuf>,
    /// The stored types seen (e.g. `BF16`), for the summary.
    dtypes: BTreeSet<String>,
}

impl HfWeights {
    /// Opens the weights of the folder `dir`.
    pub fn open(dir: &Path) -> Result<Self, ImportError> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let shards: Vec<PathBuf> = if index.is_file() {
            let text = read_text(&index)?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ImportError::Invalid {
                    path: index.clone(),
                    message: format!("not JSON: {e}"),
                })?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| ImportError::Invalid {
                    path: index.clone(),
                    message: "has no `weight_map` object".into(),
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            let hint = if dir.join("pytorch_model.bin").is_file() {
                " (it holds pytorch_model.bin: convert it to safetensors first)"
            } else {
                ""
            };
            return Err(ImportError::Invalid {
                path: dir.to_path_buf(),
                message: format!("holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}"),
            });
        };
        let mut weights = Self {
            files: HashMap::new(),
            location: BTreeMap::new(),
            dtypes: BTreeSet::new(),
        };
        for shard in shards {
            let bytes = std::fs::read(&shard).map_err(|source| ImportError::Read {
                path: shard.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| ImportError::Invalid {
                path: shard.clone(),
                message: format!("not a safetensors file: {e}"),
            })?;
            for (name, view) in st.iter() {
                weights.dtypes.insert(format!("{:?}", view.dtype()));
                weights.location.insert(name.to_string(), shard.clone());
            }
            weights.files.insert(shard, bytes);
        }
        Ok(weights)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Whether the weights hold `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The stored element types, e.g. `["BF16"]`.
    pub fn dtypes(&self) -> Vec<String> {
        self.dtypes.iter().cloned().collect()
    }

    /// Reads `name` as f32, checking its shape against `expected` (file layout) and that
    /// every value is finite.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<HfTensor, ImportError> {
        let file = self
            .location
            .get(name)
            .ok_or_else(|| ImportError::MissingTensor {
                name: name.to_string(),
            })?;
        let st = SafeTensors::deserialize(&self.files[file]).expect("checked when opened");
        let view = st.tensor(name).expect("listed when opened");
        let shape = view.shape().to_vec();
        if shape != expected {
            return Err(ImportError::TensorShape {
                name: name.to_string(),
                file: file.clone(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(ImportError::TensorType {
                    name: name.to_string(),
                    file: file.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(ImportError::Invalid {
                path: file.clone(),
                message: format!(
                    "tensor `{name}`: {bad} of {} values are NaN or infinite",
                    values.len()
                ),
            });
        }
        Ok(HfTensor { values, shape })
    }
}

fn read_text(path: &Path) -> Result<String, ImportError> {
    std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    })
}
