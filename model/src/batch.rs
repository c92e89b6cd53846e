//! The model's input for one training step: a packed mixed-modal batch.
//!
//! Built by `transfusion-data`'s batcher; consumed by [`crate::Transfusion::forward_loss`].

use burn::prelude::*;

use crate::mask::SpanMeta;

/// One packed batch of mixed-modal sequences, ready for the model.
///
/// Layout conventions (see DESIGN.md, "Data flow"):
/// - Every row of length `s` holds one or more packed documents followed by padding.
/// - Image positions hold the placeholder token id (any valid id; it is never embedded
///   because the gather replaces those rows with patch embeddings).
/// - `source_index` says, for each flat position `i in 0..b*s`, which row of
///   `concat([text embeddings [b*s, d], patch embeddings [n_img*n, d]])` to take:
///   `i` itself for text and padding, `b*s + img*n + p` for patch `p` of image `img`.
/// - `patch_positions` is the inverse for images: the flat position (in `0..b*s`) of patch
///   `p` of image `img`, at index `img*n + p`.
#[derive(Clone, Debug)]
pub struct TransfusionBatch<B: Backend> {
    /// Token ids. Shape `[b, s]`.
    pub tokens: Tensor<B, 2, Int>,
    /// Next-token targets (the id at position `i + 1`). Shape `[b, s]`.
    pub targets: Tensor<B, 2, Int>,
    /// The flat positions (`row * s + i`) where the LM loss counts (text predicting text;
    /// never padding, an image position or a position whose target is a patch), in order:
    /// the LM head and cross-entropy run on these rows only. Shape `[m]`.
    pub text_targets: Tensor<B, 1, Int>,
    /// RoPE position ids; they restart at 0 for each packed document. Shape `[b, s]`.
    pub positions: Tensor<B, 2, Int>,
    /// Image span id per position: 0 for text, `k >= 1` for the k-th image of the row.
    /// Shape `[b, s]`.
    pub span_ids: Tensor<B, 2, Int>,
    /// Document id per position: `>= 1` for the packed documents of a row, 0 for padding.
    /// Shape `[b, s]`.
    pub doc_ids: Tensor<B, 2, Int>,
    /// Clean image latents `x_0`, in the order images appear (row-major over the batch).
    /// Shape `[n_img, c, H, W]`.
    pub latents: Tensor<B, 4>,
    /// Gaussian noise `eps` for each image. Shape `[n_img, c, H, W]`.
    pub noise: Tensor<B, 4>,
    /// Diffusion timestep per image, in `0..T`. Shape `[n_img]`.
    pub timesteps: Tensor<B, 1, Int>,
    /// Gather index placing text and patch embeddings in the sequence. Shape `[b*s]`.
    pub source_index: Tensor<B, 1, Int>,
    /// Flat sequence position of every patch. Shape `[n_img*n]`.
    pub patch_positions: Tensor<B, 1, Int>,
}

impl<B: Backend> TransfusionBatch<B> {
    /// What the attention mask is built from: each position's image span and document.
    ///
    /// # Shapes
    /// `[b, s]` tensors
    pub fn span_meta(&self) -> SpanMeta<B> {
        SpanMeta::full_rows(self.span_ids.clone(), self.doc_ids.clone())
    }

    /// Batch size `b`.
    pub fn batch_size(&self) -> usize {
        self.tokens.dims()[0]
    }

    /// Row length `s`.
    pub fn seq_len(&self) -> usize {
        self.tokens.dims()[1]
    }

    /// Number of images `n_img` in the batch.
    pub fn num_images(&self) -> usize {
        self.latents.dims()[0]
    }

    /// Moves every tensor to `device`.
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            tokens: self.tokens.to_device(device),
            targets: self.targets.to_device(device),
            text_targets: self.text_targets.to_device(device),
            positions: self.positions.to_device(device),
            span_ids: self.span_ids.to_device(device),
            doc_ids: self.doc_ids.to_device(device),
            latents: self.latents.to_device(device),
            noise: self.noise.to_device(device),
            timesteps: self.timesteps.to_device(device),
            source_index: self.source_index.to_device(device),
            patch_positions: self.patch_positions.to_device(device),
        }
    }
}
