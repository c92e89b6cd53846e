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

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::datasets::{indexed_iter, ImageData, RecordIter, Sample, SampleSource, SkipReport};
use crate::encoder::ImageEncoder;
use crate::error::DataError;

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
    /// What was encoded ([`SampleSource::describe`]).
    pub source: String,
    /// Text-only samples of the source that were left out.
    pub text_skipped: usize,
    /// The VAE checkpoint the latents were encoded with ([`ImageEncoder::autoencoder_path`]);
    /// absent for pixel-space caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<PathBuf>,
}

fn write_shard(
    dir: &Path,
    idx: usize,
    shape: [usize; 3],
    latents: &[f32],
    captions: &[String],
) -> Result<ShardEntry, DataError> {
    let file = format!("shard-{idx:05}.safetensors");
    let path = dir.join(&file);
    let count = captions.len();
    let bytes: Vec<u8> = latents.iter().flat_map(|v| v.to_le_bytes()).collect();
    let dims = vec![count, shape[0], shape[1], shape[2]];
    let view = TensorView::new(Dtype::F32, dims, &bytes)
        .map_err(|e| DataError::invalid(&path, format!("cannot build tensor: {e}")))?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        (
            "captions".to_string(),
            serde_json::to_string(captions).expect("strings serialize"),
        ),
    ]);
    safetensors::serialize_to_file([("latents", view)], Some(metadata), &path)
        .map_err(|e| DataError::invalid(&path, format!("cannot write safetensors: {e}")))?;
    Ok(ShardEntry { file, count })
}

/// Encodes every pair of one epoch of `source` (in order, epoch 0) with `encoder` and
/// writes a cache to `out_dir` (created if needed) with `per_shard` latents per shard.
/// Images are encoded in batches of [`ImageEncoder::batch_size`].
/// Text-only samples are left out (counted in the index); pairs that already carry a
/// latent are stored as they are (their shape must match the encoder's). `progress` is
/// called with (pairs read, records per epoch if known) after each record.
pub fn cache_latents(
    source: &dyn SampleSource,
    encoder: &dyn ImageEncoder,
    out_dir: &Path,
    per_shard: usize,
    mut progress: impl FnMut(usize, Option<usize>),
) -> Result<LatentIndex, DataError> {
    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    let per_shard = per_shard.max(1);
    let shape = encoder.latent_shape();
    let total = source.num_records();
    let mut index = LatentIndex {
        format: FORMAT.into(),
        version: 1,
        shape,
        count: 0,
        shards: Vec::new(),
        encoder: encoder.describe(),
        source: source.describe(),
        text_skipped: 0,
        vae: encoder.autoencoder_path(),
    };
    let batch = encoder.batch_size().max(1);
    let (mut latents, mut captions) = (Vec::new(), Vec::new());
    // Images waiting to be encoded as one batch, with their captions.
    let (mut pending, mut pending_captions): (Vec<image::RgbImage>, Vec<String>) =
        (Vec::new(), Vec::new());
    let add = |index: &mut LatentIndex,
               latents: &mut Vec<f32>,
               captions: &mut Vec<String>,
               data: Vec<f32>,
               caption: String|
     -> Result<(), DataError> {
        latents.extend_from_slice(&data);
        captions.push(caption);
        index.count += 1;
        if captions.len() == per_shard {
            index.shards.push(write_shard(
                out_dir,
                index.shards.len(),
                shape,
                latents,
                captions,
            )?);
            latents.clear();
            captions.clear();
        }
        Ok(())
    };
    let flush = |index: &mut LatentIndex,
                 latents: &mut Vec<f32>,
                 captions: &mut Vec<String>,
                 pending: &mut Vec<image::RgbImage>,
                 pending_captions: &mut Vec<String>|
     -> Result<(), DataError> {
        if pending.is_empty() {
            return Ok(());
        }
        let encoded = encoder.encode_batch(pending)?;
        if encoded.len() != pending.len() {
            return Err(DataError::invalid(
                out_dir,
                format!(
                    "{} returned {} latents for {} images",
                    encoder.describe(),
                    encoded.len(),
                    pending.len()
                ),
            ));
        }
        pending.clear();
        for (data, caption) in encoded.into_iter().zip(pending_captions.drain(..)) {
            add(index, latents, captions, data, caption)?;
        }
        Ok(())
    };
    for rec in source.iter_epoch(0, 0)? {
        match rec? {
            None => {}
            Some(Sample::Text(_)) => index.text_skipped += 1,
            Some(Sample::Pair { image, caption }) => match image {
                ImageData::Pixels(img) => {
                    pending.push(img);
                    pending_captions.push(caption);
                    if pending.len() == batch {
                        flush(
                            &mut index,
                            &mut latents,
                            &mut captions,
                            &mut pending,
                            &mut pending_captions,
                        )?;
                    }
                }
                ImageData::Latent { data, shape: s } if s == shape => {
                    // Keep the source's order: encode what waits first.
                    flush(
                        &mut index,
                        &mut latents,
                        &mut captions,
                        &mut pending,
                        &mut pending_captions,
                    )?;
                    add(&mut index, &mut latents, &mut captions, data, caption)?;
                }
                ImageData::Latent { shape: s, .. } => {
                    return Err(DataError::invalid(
                        out_dir,
                        format!("source latent shape {s:?} differs from the encoder's {shape:?}"),
                    ));
                }
            },
        }
        progress(index.count + pending.len(), total);
    }
    flush(
        &mut index,
        &mut latents,
        &mut captions,
        &mut pending,
        &mut pending_captions,
    )?;
    if !captions.is_empty() {
        index.shards.push(write_shard(
            out_dir,
            index.shards.len(),
            shape,
            &latents,
            &captions,
        )?);
    }
    let path = out_dir.join(INDEX_FILE);
    let json = serde_json::to_string_pretty(&index).expect("index serializes");
    std::fs::write(&path, json).map_err(|e| DataError::io(&path, e))?;
    Ok(index)
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

impl SampleSource for LatentCacheSource {
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

    fn num_records(&self) -> Option<usize> {
        Some(self.inner.index.count)
    }

    fn is_indexed(&self) -> bool {
        true
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

    fn iter_epoch(&self, epoch: u64, start: usize) -> Result<RecordIter, DataError> {
        Ok(indexed_iter(self, epoch, start))
    }

    fn skips(&self) -> SkipReport {
        SkipReport::default()
    }
}
