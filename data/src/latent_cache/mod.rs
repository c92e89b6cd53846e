//! Latent cache: encode a source's images once, store the latents and captions in
//! safetensors shards, and read them back as a source (`latents:DIR`).
//!
//! Layout of a cache directory:
//! - `shard-00000.safetensors`, ...: one F32 tensor `latents` of shape
//!   `[count, c, H, W]`; the header's `__metadata__` holds `captions` (a JSON array of
//!   strings, one per latent) and `format`.
//! - `index.json` ([`LatentIndex`]): shape, count, shards, encoder description; written
//!   last, so a cache without it is incomplete.
//!
//! The files open in Python with `safetensors.safe_open(path, "np")`.

mod write;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::datasets::{ImageData, IndexedSource, Sample};
use crate::error::DataError;

pub use write::cache_latents;

/// Name of the index file in a cache directory.
pub const INDEX_FILE: &str = "index.json";
/// Value of `format` in the index and in shard metadata.
pub const FORMAT: &str = "transfusion-latents";
/// Default latents per shard.
pub const DEFAULT_PER_SHARD: usize = 1024;

/// One shard of a cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the cache directory.
    pub file: String,
    /// Latents in it.
    pub count: usize,
}

/// `index.json` of a latent cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatentIndex {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// Latent shape `[c, H, W]`.
    pub shape: [usize; 3],
    /// Total latents.
    pub count: usize,
    /// The shards, in order.
    pub shards: Vec<ShardEntry>,
    /// The encoder that produced the latents ([`ImageEncoder::describe`]).
    pub encoder: String,
    /// What was encoded ([`crate::datasets::SampleSource::describe`]).
    pub source: String,
    /// Text-only samples of the source that were left out.
    pub text_skipped: usize,
    /// The VAE checkpoint the latents were encoded with ([`ImageEncoder::autoencoder_path`]);
    /// absent for pixel-space caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<PathBuf>,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    /// Byte offset of the first latent in the file.
    data_start: u64,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    index: LatentIndex,
    shards: Vec<Shard>,
    /// Index of the first latent of each shard.
    starts: Vec<usize>,
    captions: Vec<String>,
}

/// A latent cache read back as pairs with [`ImageData::Latent`] images.
#[derive(Clone, Debug)]
pub struct LatentCacheSource {
    inner: Arc<Inner>,
}

/// Reads and checks a shard's safetensors header: returns (data start, captions).
fn read_header(
    path: &Path,
    count: usize,
    shape: [usize; 3],
) -> Result<(u64, Vec<String>), DataError> {
    let bad = |m: String| DataError::invalid(path, m);
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| DataError::io(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad("not a safetensors file (bad header length)".into()));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| DataError::io(path, e))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad safetensors header: {e}")))?;
    let t = &header["latents"];
    let want: Vec<usize> = vec![count, shape[0], shape[1], shape[2]];
    let got: Option<Vec<usize>> = serde_json::from_value(t["shape"].clone()).ok();
    if t["dtype"] != "F32" || got.as_ref() != Some(&want) {
        return Err(bad(format!(
            "tensor `latents` should be F32 {want:?}, header says {} {:?}",
            t["dtype"], got
        )));
    }
    let offsets: (u64, u64) = serde_json::from_value(t["data_offsets"].clone())
        .map_err(|_| bad("bad data_offsets".into()))?;
    let bytes = (want.iter().product::<usize>() * 4) as u64;
    if offsets.1 - offsets.0 != bytes || 8 + n + offsets.1 > file_len {
        return Err(bad("truncated or inconsistent latent data".into()));
    }
    let captions: Vec<String> = header["__metadata__"]["captions"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("no `captions` in the metadata".into()))?;
    if captions.len() != count {
        return Err(bad(format!(
            "{} captions for {count} latents",
            captions.len()
        )));
    }
    Ok((8 + n + offsets.0, captions))
}

impl LatentCacheSource {
    /// Opens a cache directory written by [`cache_latents`], checking every shard header.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let index: LatentIndex = serde_json::from_str(&text)
            .map_err(|e| DataError::invalid(&path, format!("not a latent cache index: {e}")))?;
        if index.format != FORMAT {
            return Err(DataError::invalid(
                &path,
                format!("format `{}` is not `{FORMAT}`", index.format),
            ));
        }
        let (mut shards, mut starts, mut captions) = (Vec::new(), Vec::new(), Vec::new());
        for s in &index.shards {
            // Shards live in the cache directory: a name with `..`, a root or a drive
            // would read a file elsewhere.
            if !crate::datasets::is_safe_relative(&s.file) {
                return Err(DataError::invalid(
                    &path,
                    format!(
                        "shard `{}` is not a plain name inside the cache directory",
                        s.file
                    ),
                ));
            }
            let p = dir.join(&s.file);
            let (data_start, caps) = read_header(&p, s.count, index.shape)?;
            starts.push(captions.len());
            captions.extend(caps);
            shards.push(Shard {
                path: p,
                data_start,
            });
        }
        if captions.len() != index.count {
            return Err(DataError::invalid(
                &path,
                format!(
                    "index says {} latents, shards hold {}",
                    index.count,
                    captions.len()
                ),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                index,
                shards,
                starts,
                captions,
            }),
        })
    }

    /// The cache's index.
    pub fn index(&self) -> &LatentIndex {
        &self.inner.index
    }
}

impl IndexedSource for LatentCacheSource {
    fn describe(&self) -> String {
        let i = &self.inner.index;
        format!(
            "latents {}: {} latents {:?} in {} shards (encoder: {})",
            self.inner.dir.display(),
            i.count,
            i.shape,
            i.shards.len(),
            i.encoder
        )
    }

    fn record_count(&self) -> usize {
        self.inner.index.count
    }

    fn get(&self, _epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        let inner = &self.inner;
        if index >= inner.index.count {
            return Err(DataError::invalid(
                &inner.dir,
                format!("latent {index} out of range"),
            ));
        }
        let s = inner.starts.partition_point(|&st| st <= index) - 1;
        let shard = &inner.shards[s];
        let shape = inner.index.shape;
        let numel: usize = shape.iter().product();
        let mut f = File::open(&shard.path).map_err(|e| DataError::io(&shard.path, e))?;
        let at = shard.data_start + ((index - inner.starts[s]) * numel * 4) as u64;
        f.seek(SeekFrom::Start(at))
            .map_err(|e| DataError::io(&shard.path, e))?;
        let mut bytes = vec![0u8; numel * 4];
        f.read_exact(&mut bytes)
            .map_err(|e| DataError::io(&shard.path, e))?;
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Some(Sample::Pair {
            image: ImageData::Latent { data, shape },
            caption: inner.captions[index].clone(),
        }))
    }
}
