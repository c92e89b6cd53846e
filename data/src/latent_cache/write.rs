//! Writing a latent cache: [`cache_latents`] (the layout is in the [parent module](super)).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::{LatentIndex, ShardEntry, FORMAT, INDEX_FILE};
use crate::datasets::{ImageData, Sample, SampleSource};
use crate::encoder::ImageEncoder;
use crate::error::DataError;

/// Writes a cache directory shard by shard: buffers latents until a shard is full, and
/// encodes pixel images in batches of the encoder's batch size.
struct CacheWriter<'a> {
    dir: &'a Path,
    encoder: &'a dyn ImageEncoder,
    per_shard: usize,
    /// Images encoded per batch.
    batch: usize,
    index: LatentIndex,
    /// Latents of the shard being filled, `[count, c, H, W]` row-major.
    latents: Vec<f32>,
    captions: Vec<String>,
    /// Images waiting to be encoded as one batch, with their captions.
    pending: Vec<image::RgbImage>,
    pending_captions: Vec<String>,
}

impl CacheWriter<'_> {
    /// Adds an encoded latent; writes the shard when it is full.
    fn push_latent(&mut self, data: Vec<f32>, caption: String) -> Result<(), DataError> {
        self.latents.extend_from_slice(&data);
        self.captions.push(caption);
        self.index.count += 1;
        if self.captions.len() == self.per_shard {
            self.write_shard()?;
        }
        Ok(())
    }

    /// Queues an image for encoding; encodes the queue when it holds a batch.
    fn push_image(&mut self, img: image::RgbImage, caption: String) -> Result<(), DataError> {
        self.pending.push(img);
        self.pending_captions.push(caption);
        if self.pending.len() == self.batch {
            self.encode_pending()?;
        }
        Ok(())
    }

    /// Encodes the queued images (if any) and adds their latents in order.
    fn encode_pending(&mut self) -> Result<(), DataError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let encoded = self.encoder.encode_batch(&self.pending)?;
        if encoded.len() != self.pending.len() {
            return Err(DataError::invalid(
                self.dir,
                format!(
                    "{} returned {} latents for {} images",
                    self.encoder.describe(),
                    encoded.len(),
                    self.pending.len()
                ),
            ));
        }
        self.pending.clear();
        let captions = std::mem::take(&mut self.pending_captions);
        for (data, caption) in encoded.into_iter().zip(captions) {
            self.push_latent(data, caption)?;
        }
        Ok(())
    }

    /// Writes the buffered latents as the next shard `shard-NNNNN.safetensors`.
    fn write_shard(&mut self) -> Result<(), DataError> {
        let file = format!("shard-{:05}.safetensors", self.index.shards.len());
        let path = self.dir.join(&file);
        let count = self.captions.len();
        let shape = self.index.shape;
        let bytes: Vec<u8> = self.latents.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dims = vec![count, shape[0], shape[1], shape[2]];
        let view = TensorView::new(Dtype::F32, dims, &bytes)
            .map_err(|e| DataError::invalid(&path, format!("cannot build tensor: {e}")))?;
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "captions".to_string(),
                serde_json::to_string(&self.captions).expect("strings serialize"),
            ),
        ]);
        safetensors::serialize_to_file([("latents", view)], Some(metadata), &path)
            .map_err(|e| DataError::invalid(&path, format!("cannot write safetensors: {e}")))?;
        self.index.shards.push(ShardEntry { file, count });
        self.latents.clear();
        self.captions.clear();
        Ok(())
    }

    /// Encodes what is queued, writes the last (partial) shard and then `index.json`.
    fn finish(mut self) -> Result<LatentIndex, DataError> {
        self.encode_pending()?;
        if !self.captions.is_empty() {
            self.write_shard()?;
        }
        let path = self.dir.join(INDEX_FILE);
        let json = serde_json::to_string_pretty(&self.index).expect("index serializes");
        crate::files::write_file(&path, json)?;
        Ok(self.index)
    }
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
    crate::files::create_dir(out_dir)?;
    let shape = encoder.latent_shape();
    let total = source.num_records();
    let mut w = CacheWriter {
        dir: out_dir,
        encoder,
        per_shard: per_shard.max(1),
        batch: encoder.batch_size().max(1),
        index: LatentIndex {
            format: FORMAT.into(),
            version: 1,
            shape,
            count: 0,
            shards: Vec::new(),
            encoder: encoder.describe(),
            source: source.describe(),
            text_skipped: 0,
            vae: encoder.autoencoder_path(),
        },
        latents: Vec::new(),
        captions: Vec::new(),
        pending: Vec::new(),
        pending_captions: Vec::new(),
    };
    for rec in source.iter_epoch(0, 0)? {
        match rec? {
            None => {}
            Some(Sample::Text(_)) => w.index.text_skipped += 1,
            Some(Sample::Pair { image, caption }) => match image {
                ImageData::Pixels(img) => w.push_image(img, caption)?,
                ImageData::Latent { data, shape: s } if s == shape => {
                    // Keep the source's order: encode what waits first.
                    w.encode_pending()?;
                    w.push_latent(data, caption)?;
                }
                ImageData::Latent { shape: s, .. } => {
                    return Err(DataError::invalid(
                        out_dir,
                        format!("source latent shape {s:?} differs from the encoder's {shape:?}"),
                    ));
                }
            },
        }
        progress(w.index.count + w.pending.len(), total);
    }
    w.finish()
}
