//! Packed rows to the model's input, [`TransfusionBatch`], and back (for tests).
//!
//! Per position `i` of a row (flat index `r*s + i` over the batch):
//! - `targets[i] = tokens[i+1]` (the next token in the same row); the last position and
//!   padding get the pad id.
//! - `lm_mask[i] = 1` iff `i` and `i+1` belong to the same document and neither is a
//!   patch: text predicting text. So BOI -> first patch: 0; last patch -> EOI: 0
//!   (input is a patch); EOI -> next text: 1; EOS -> next document: 0.
//! - `source_index[r*s + i]` = `r*s + i` for text and padding, `b*s + img*n + p` for patch
//!   `p` of image `img` (images counted over the whole batch, row by row).
//! - `patch_positions[img*n + p]` = the flat position of that patch.
//!
//! Diffusion noise is drawn on the CPU from [`Rng64`] seeded by
//! `(batcher seed, row noise_seed, image index in row)`, so it is the same on every
//! backend and for every batch composition. A batch may hold zero images: `latents` and
//! `noise` then have shape `[0, c, H, W]`, `timesteps` `[0]`, `patch_positions` `[0]`.

use burn::prelude::*;
use burn::tensor::TensorData;
use transfusion_model::batch::TransfusionBatch;

use crate::error::DataError;
use crate::packing::PackedRow;
use crate::rng::Rng64;
use crate::sequence::{num_patches, ImageSlot};

/// What every batch must agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Latent shape `[c, H, W]` of every image.
    pub latent_shape: [usize; 3],
    /// Patch side `k`.
    pub patch_size: usize,
    /// The pad id (targets of the last position and of padding).
    pub pad_id: u32,
}

/// Builds [`TransfusionBatch`]es from [`PackedRow`]s.
#[derive(Clone, Debug)]
pub struct TransfusionBatcher {
    /// Shapes and ids.
    pub config: BatcherConfig,
    /// Seed of the diffusion noise.
    pub seed: u64,
}

/// A batch as plain CPU arrays (row-major), before it becomes tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchArrays {
    /// Batch size `b`.
    pub b: usize,
    /// Row length `s`.
    pub s: usize,
    /// Number of images.
    pub n_img: usize,
    /// Patches per image `n`.
    pub n: usize,
    /// `[b, s]`.
    pub tokens: Vec<i64>,
    /// `[b, s]`.
    pub targets: Vec<i64>,
    /// `[m]`: the flat positions (`row * s + i`) where the LM loss counts, in order.
    pub text_targets: Vec<i64>,
    /// `[b, s]`.
    pub positions: Vec<i64>,
    /// `[b, s]`.
    pub span_ids: Vec<i64>,
    /// `[b, s]`.
    pub doc_ids: Vec<i64>,
    /// `[n_img, c, H, W]`.
    pub latents: Vec<f32>,
    /// `[n_img, c, H, W]`.
    pub noise: Vec<f32>,
    /// `[n_img]`.
    pub timesteps: Vec<i64>,
    /// `[b*s]`.
    pub source_index: Vec<i64>,
    /// `[n_img*n]`.
    pub patch_positions: Vec<i64>,
}

/// Targets and LM mask of one row (see the module docs).
pub fn row_targets(row: &PackedRow) -> (Vec<u32>, Vec<f32>) {
    let s = row.seq_len();
    let span = row.span_ids();
    let mut targets = vec![row.pad_id(); s];
    let mut mask = vec![0.0f32; s];
    for i in 0..s.saturating_sub(1) {
        if row.doc_ids[i] == 0 {
            continue;
        }
        targets[i] = row.tokens[i + 1];
        let same_doc = row.doc_ids[i + 1] == row.doc_ids[i];
        if same_doc && span[i] == 0 && span[i + 1] == 0 {
            mask[i] = 1.0;
        }
    }
    (targets, mask)
}

impl TransfusionBatcher {
    /// A batcher for latents of `latent_shape`, patches of side `patch_size`.
    pub fn new(latent_shape: [usize; 3], patch_size: usize, pad_id: u32, seed: u64) -> Self {
        Self {
            config: BatcherConfig {
                latent_shape,
                patch_size,
                pad_id,
            },
            seed,
        }
    }

    /// Patches per image `n`.
    pub fn patches_per_image(&self) -> Result<usize, DataError> {
        num_patches(self.config.latent_shape, self.config.patch_size)
    }

    /// The batch as CPU arrays. Errors: no rows, rows of different lengths, an image whose
    /// latent shape or patch count differs from the config.
    pub fn arrays(&self, rows: &[PackedRow]) -> Result<BatchArrays, DataError> {
        let bad = |message: String| DataError::Batch(message);
        let b = rows.len();
        let s = rows
            .first()
            .ok_or_else(|| bad("no rows to batch".into()))?
            .seq_len();
        let n = self.patches_per_image()?;
        let shape = self.config.latent_shape;
        let numel: usize = shape.iter().product();
        let mut a = BatchArrays {
            b,
            s,
            n,
            ..Default::default()
        };
        for (r, row) in rows.iter().enumerate() {
            if row.seq_len() != s {
                return Err(bad(format!(
                    "row {r} has length {}, row 0 has {s}",
                    row.seq_len()
                )));
            }
            for (k, img) in row.images.iter().enumerate() {
                check_image(img, r, k, shape, n)?;
            }
        }
        let n_img: usize = rows.iter().map(|r| r.images.len()).sum();
        a.n_img = n_img;
        a.source_index = (0..(b * s) as i64).collect();
        a.patch_positions = Vec::with_capacity(n_img * n);
        a.latents = Vec::with_capacity(n_img * numel);
        a.noise = vec![0.0; n_img * numel];
        let mut img_index = 0usize;
        for (r, row) in rows.iter().enumerate() {
            let (targets, mask) = row_targets(row);
            let span = row.span_ids();
            a.tokens.extend(row.tokens.iter().map(|&x| x as i64));
            a.targets.extend(targets.iter().map(|&x| x as i64));
            let first = (r * s) as i64;
            a.text_targets.extend(
                mask.iter()
                    .enumerate()
                    .filter(|(_, &m)| m > 0.0)
                    .map(|(i, _)| first + i as i64),
            );
            a.positions.extend(row.positions.iter().map(|&x| x as i64));
            a.span_ids.extend(span.iter().map(|&x| x as i64));
            a.doc_ids.extend(row.doc_ids.iter().map(|&x| x as i64));
            for (k, img) in row.images.iter().enumerate() {
                for p in 0..n {
                    let flat = r * s + img.offset + p;
                    a.source_index[flat] = (b * s + img_index * n + p) as i64;
                    a.patch_positions.push(flat as i64);
                }
                a.latents.extend_from_slice(&img.latent);
                a.timesteps.push(img.t as i64);
                let mut rng = Rng64::from_parts(&[self.seed, row.noise_seed, k as u64]);
                rng.fill_normal(&mut a.noise[img_index * numel..(img_index + 1) * numel]);
                img_index += 1;
            }
        }
        Ok(a)
    }

    /// The model's input for `rows`, on `device`. Errors as [`TransfusionBatcher::arrays`].
    pub fn batch<B: Backend>(
        &self,
        rows: Vec<PackedRow>,
        device: &B::Device,
    ) -> Result<TransfusionBatch<B>, DataError> {
        let a = self.arrays(&rows)?;
        Ok(self.to_tensors(a, device))
    }

    /// Turns CPU arrays into tensors on `device`.
    pub fn to_tensors<B: Backend>(
        &self,
        a: BatchArrays,
        device: &B::Device,
    ) -> TransfusionBatch<B> {
        let [c, h, w] = self.config.latent_shape;
        let (b, s) = (a.b, a.s);
        let int2 = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, s]), device);
        let int1 = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [len]), device)
        };
        let img =
            |v: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v, [a.n_img, c, h, w]), device);
        TransfusionBatch {
            tokens: int2(a.tokens),
            targets: int2(a.targets),
            text_targets: int1(a.text_targets),
            positions: int2(a.positions),
            span_ids: int2(a.span_ids),
            doc_ids: int2(a.doc_ids),
            latents: img(a.latents),
            noise: img(a.noise),
            timesteps: int1(a.timesteps),
            source_index: int1(a.source_index),
            patch_positions: int1(a.patch_positions),
        }
    }
}

fn check_image(
    img: &ImageSlot,
    r: usize,
    k: usize,
    shape: [usize; 3],
    n: usize,
) -> Result<(), DataError> {
    if img.shape != shape {
        return Err(DataError::Batch(format!(
            "image {k} of row {r} has latent shape {:?} but this batch expects {shape:?} \
             (all images of a batch must share one latent shape)",
            img.shape
        )));
    }
    if img.n_patches != n || img.latent.len() != shape.iter().product::<usize>() {
        return Err(DataError::Batch(format!(
            "image {k} of row {r} has {} patches and {} values; expected {n} patches of a {shape:?} latent",
            img.n_patches,
            img.latent.len()
        )));
    }
    Ok(())
}

/// Burn's `DataLoader` interface (cargo feature `dataloader`).
#[cfg(feature = "dataloader")]
impl<B: Backend> burn::data::dataloader::batcher::Batcher<B, PackedRow, TransfusionBatch<B>>
    for TransfusionBatcher
{
    /// # Panics
    /// On the errors of [`TransfusionBatcher::arrays`] (the trait cannot return them);
    /// call the inherent `batch` to get a `Result`.
    fn batch(&self, items: Vec<PackedRow>, device: &B::Device) -> TransfusionBatch<B> {
        TransfusionBatcher::batch::<B>(self, items, device)
            .unwrap_or_else(|e| panic!("cannot batch packed rows: {e}"))
    }
}

/// Reads a batch back into packed rows (documents, images with their latents and
/// timesteps; not the noise), checking that every index tensor agrees with the others.
/// The inverse of [`TransfusionBatcher::batch`], for tests and debugging.
pub fn unpack_batch<B: Backend>(
    batch: &TransfusionBatch<B>,
    pad_id: u32,
) -> Result<Vec<PackedRow>, DataError> {
    let bad = |m: String| DataError::Batch(m);
    let ints = |t: TensorData| -> Vec<i64> {
        t.convert::<i64>().to_vec::<i64>().expect("int tensor data")
    };
    let (b, s) = (batch.batch_size(), batch.seq_len());
    let tokens = ints(batch.tokens.to_data());
    let positions = ints(batch.positions.to_data());
    let doc_ids = ints(batch.doc_ids.to_data());
    let span_ids = ints(batch.span_ids.to_data());
    let source_index = ints(batch.source_index.to_data());
    let patch_positions = ints(batch.patch_positions.to_data());
    let timesteps = ints(batch.timesteps.to_data());
    let [n_img, c, h, w] = batch.latents.dims();
    let latents: Vec<f32> = batch
        .latents
        .to_data()
        .convert::<f32>()
        .to_vec()
        .expect("float data");
    let n = patch_positions.len().checked_div(n_img).unwrap_or(0);
    if n_img * n != patch_positions.len() {
        return Err(bad(format!(
            "{} patch positions for {n_img} images",
            patch_positions.len()
        )));
    }
    let numel = c * h * w;
    let mut rows: Vec<PackedRow> = (0..b)
        .map(|r| {
            let mut row = PackedRow::new(s, pad_id);
            row.tokens = tokens[r * s..(r + 1) * s]
                .iter()
                .map(|&x| x as u32)
                .collect();
            row.positions = positions[r * s..(r + 1) * s]
                .iter()
                .map(|&x| x as u32)
                .collect();
            row.doc_ids = doc_ids[r * s..(r + 1) * s]
                .iter()
                .map(|&x| x as u32)
                .collect();
            row
        })
        .collect();
    let mut expected_source: Vec<i64> = (0..(b * s) as i64).collect();
    for img in 0..n_img {
        let first = patch_positions[img * n] as usize;
        let (r, offset) = (first / s, first % s);
        for p in 0..n {
            let pos = patch_positions[img * n + p] as usize;
            if pos != first + p {
                return Err(bad(format!(
                    "image {img}: patch {p} at {pos}, expected {}",
                    first + p
                )));
            }
            expected_source[pos] = (b * s + img * n + p) as i64;
        }
        let k = rows[r].images.len() as i64 + 1;
        if span_ids[first..first + n].iter().any(|&x| x != k) {
            return Err(bad(format!(
                "image {img}: span ids differ from {k} at its patches"
            )));
        }
        rows[r].images.push(ImageSlot {
            offset,
            n_patches: n,
            latent: latents[img * numel..(img + 1) * numel].to_vec(),
            shape: [c, h, w],
            t: timesteps[img] as u32,
        });
    }
    if expected_source != source_index {
        return Err(bad("source_index disagrees with patch_positions".into()));
    }
    for (r, row) in rows.iter_mut().enumerate() {
        row.restore_counts();
        if row
            .span_ids()
            .iter()
            .zip(&span_ids[r * s..(r + 1) * s])
            .any(|(&a, &b)| a as i64 != b)
        {
            return Err(bad(format!(
                "row {r}: span ids disagree with the image positions"
            )));
        }
    }
    Ok(rows)
}
