//! The Transfusion network: token embedding and image adapter in, one shared decoder, LM
//! head and image adapter out.

use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::prelude::*;

use crate::batch::TransfusionBatch;
use crate::block::{DecoderBlock, DecoderBlockConfig};
use crate::config::TransfusionConfig;
use crate::image_adapter::{init_image_adapter, ImageAdapter, ImageContext};
use crate::kv_cache::CacheMode;
use crate::loss::{masked_cross_entropy, per_image_mse, TransfusionLoss};
use crate::patch::num_patches;
use crate::precision::Precision;
use crate::prediction::Prediction;
use crate::schedule::NoiseSchedule;

impl TransfusionConfig {
    /// Builds the network. Call [`TransfusionConfig::validate`] first for a readable
    /// error; an invalid config panics here.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Transfusion<B> {
        self.build(device, DecoderBlockConfig::init)
    }

    /// The network as a skeleton to load weights into: no parameter is drawn (untied image
    /// weights are not copied from the text weights, see
    /// [`DecoderBlockConfig::init_unloaded`]). Until loaded, its untied image weights
    /// differ from [`TransfusionConfig::init`]'s.
    pub fn init_unloaded<B: Backend>(&self, device: &B::Device) -> Transfusion<B> {
        self.build(device, DecoderBlockConfig::init_unloaded)
    }

    /// The network, each decoder layer built by `block`.
    fn build<B: Backend>(
        &self,
        device: &B::Device,
        block: fn(&DecoderBlockConfig, &B::Device) -> DecoderBlock<B>,
    ) -> Transfusion<B> {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        let d = self.d_model;
        Transfusion {
            tok_emb: EmbeddingConfig::new(self.vocab_size, d)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            blocks: (0..self.n_layers)
                .map(|_| {
                    let layer =
                        DecoderBlockConfig::new(d, self.n_heads, self.n_kv_heads, self.d_hidden)
                            .with_norm_eps(self.norm_eps)
                            .with_untied(self.untied());
                    block(&layer, device)
                })
                .collect(),
            norm: RmsNormConfig::new(d)
                .with_epsilon(self.norm_eps)
                .init(device),
            lm_head: LinearConfig::new(d, self.vocab_size)
                .with_bias(false)
                .init(device),
            image: init_image_adapter(self, device),
            head_dim: self.head_dim(),
            latent_size: self.latent_size,
            rope_theta: self.rope_theta,
            loss_weight: self.diffusion_loss_weight,
            timesteps: self.timesteps,
            prediction: self.prediction.unwrap_or_default(),
            precision: Precision::F32,
            blockwise_from: crate::ops::blockwise::MIN_KEYS,
        }
    }
}

/// The Transfusion model.
#[derive(Module, Debug)]
pub struct Transfusion<B: Backend> {
    /// Token embedding `[v, d]`.
    pub tok_emb: Embedding<B>,
    /// Decoder layers.
    pub blocks: Vec<DecoderBlock<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head `d -> v`.
    pub lm_head: Linear<B>,
    /// Image adapter (linear or U-Net).
    pub image: ImageAdapter<B>,
    /// Head dimension `hd`.
    pub head_dim: usize,
    /// Latent side `H = W`.
    pub latent_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// `lambda`.
    pub loss_weight: f64,
    /// Training timesteps `T`.
    pub timesteps: usize,
    /// What the image head predicts (`eps` or `v`).
    #[module(skip)]
    pub prediction: Prediction,
    /// The type of the decoder's matrix products (f32 unless set with
    /// [`Transfusion::with_precision`]); not part of the weights.
    #[module(skip)]
    pub precision: Precision,
    /// Passes over at least this many keys take the blockwise attention, whose memory is
    /// linear in the sequence ([`crate::ops::blockwise::MIN_KEYS`] unless set with
    /// [`Transfusion::with_blockwise_from`]); not part of the weights.
    #[module(skip)]
    pub blockwise_from: usize,
}

impl<B: Backend> Transfusion<B> {
    /// The noise schedule the model is trained with.
    pub fn schedule(&self) -> NoiseSchedule {
        NoiseSchedule::cosine(self.timesteps)
    }

    /// The same model computing its decoder products in `precision` (weights stay f32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The same model taking the blockwise attention from `keys` keys on
    /// (`usize::MAX`: never, the dense attention everywhere).
    pub fn with_blockwise_from(mut self, keys: usize) -> Self {
        self.blockwise_from = keys;
        self
    }

    /// Number of decoder layers.
    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Patches per image `n` (see [`TransfusionConfig::patches_per_image`]).
    pub fn patches_per_image(&self) -> usize {
        num_patches(self.latent_size, self.latent_size, self.image.patch_size)
    }

    /// Embeds token ids.
    ///
    /// # Shapes
    /// `[b, s] -> [b, s, d]`
    pub fn embed_tokens(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.tok_emb.forward(tokens)
    }

    /// Embeds noisy latents as patch tokens (see [`ImageAdapter::encode`]); `t` holds each
    /// image's timestep, fractional for a continuous-time (consistency) model.
    ///
    /// # Shapes
    /// `x_t`: `[N, c, H, W]`, `t`: `[N]` -> `[N, n, d]`
    pub fn embed_image(
        &self,
        x_t: Tensor<B, 4>,
        t: Tensor<B, 1>,
    ) -> (Tensor<B, 3>, ImageContext<B>) {
        self.image.encode(x_t, t)
    }

    /// Places text and patch embeddings into the sequence with one gather.
    ///
    /// # Shapes
    /// - `tokens`: `[b, s]`, `patches`: `[N, n, d]` (or `None`), `source_index`: `[b*s]`
    /// - output: `[b, s, d]`
    pub fn embed_sequence(
        &self,
        tokens: Tensor<B, 2, Int>,
        patches: Option<Tensor<B, 3>>,
        source_index: Tensor<B, 1, Int>,
    ) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let text = self.embed_tokens(tokens);
        let d = text.dims()[2];
        let Some(patches) = patches else {
            return text;
        };
        let [n_img, n, _] = patches.dims();
        // [b*s + N*n, d] -> select -> [b*s, d] -> [b, s, d]
        let all = Tensor::cat(
            vec![text.reshape([b * s, d]), patches.reshape([n_img * n, d])],
            0,
        );
        all.select(0, source_index).reshape([b, s, d])
    }

    /// Logits of the next token.
    ///
    /// # Shapes
    /// `[.., d] -> [.., v]`
    pub fn lm_logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        self.precision.linear(&self.lm_head, hidden)
    }

    /// The image head's raw output (the noise or the velocity, see
    /// [`Transfusion::prediction`]) from the hidden states at image positions.
    ///
    /// # Shapes
    /// `hidden`: `[N, n, d]` -> `[N, c, H, W]`
    pub fn image_head(&self, hidden: Tensor<B, 3>, ctx: &ImageContext<B>) -> Tensor<B, 4> {
        self.image.decode(hidden, ctx, self.latent_size)
    }

    /// The noise `eps` predicted for the noisy latents `x_t` at timesteps `t`, whatever
    /// the head is trained to predict.
    ///
    /// # Shapes
    /// - `hidden`: `[N, n, d]`, `x_t`: `[N, c, H, W]`, `t`: `[N]`; output `[N, c, H, W]`
    pub fn predict_noise(
        &self,
        hidden: Tensor<B, 3>,
        ctx: &ImageContext<B>,
        x_t: Tensor<B, 4>,
        t: Tensor<B, 1, Int>,
    ) -> Tensor<B, 4> {
        let out = self.image_head(hidden, ctx);
        self.prediction.to_eps(&self.schedule(), out, x_t, t)
    }

    /// Runs one packed batch whose images are the noisy latents `x_t` at timesteps `t`
    /// (fractional for a continuous-time model; `None` when the batch holds no image):
    /// the final-normed hidden state of every position and the image head's output.
    ///
    /// # Shapes
    /// - `x_t`: `[N, c, H, W]`, `t`: `[N]`
    /// - output: hidden `[b*s, d]`, image head `[N, c, H, W]`
    pub fn forward_packed(
        &self,
        batch: &TransfusionBatch<B>,
        image: Option<(Tensor<B, 4>, Tensor<B, 1>)>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 4>>) {
        let (x, ctx) = self.embed_batch(batch, image);
        let hidden = self.forward_embeddings(
            x,
            batch.positions.clone(),
            batch.span_meta(),
            None,
            CacheMode::ReadOnly,
        );
        self.packed_outputs(hidden, ctx.as_ref(), batch)
    }

    /// The input embeddings of a packed batch whose images are `image` (noisy latents and
    /// timesteps), and the image adapter's context for the image head.
    ///
    /// # Shapes
    /// - `x_t`: `[N, c, H, W]`, `t`: `[N]`; output `[b, s, d]`
    pub fn embed_batch(
        &self,
        batch: &TransfusionBatch<B>,
        image: Option<(Tensor<B, 4>, Tensor<B, 1>)>,
    ) -> (Tensor<B, 3>, Option<ImageContext<B>>) {
        let (patches, ctx) = match image.map(|(x_t, t)| self.embed_image(x_t, t)) {
            Some((p, c)) => (Some(p), Some(c)),
            None => (None, None),
        };
        let x = self.embed_sequence(batch.tokens.clone(), patches, batch.source_index.clone());
        (x, ctx)
    }

    /// The final norm after the last decoder layer.
    ///
    /// # Shapes
    /// `[b, s, d] -> [b, s, d]`
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::ops::rms_norm(&self.norm, x)
    }

    /// The flat hidden states and the image head's output (where `ctx` is given) from the
    /// final-normed hidden states of a packed batch.
    ///
    /// # Shapes
    /// - `hidden`: `[b, s, d]`; output: `[b*s, d]`, `[N, c, H, W]`
    pub fn packed_outputs(
        &self,
        hidden: Tensor<B, 3>,
        ctx: Option<&ImageContext<B>>,
        batch: &TransfusionBatch<B>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 4>>) {
        let [b, s, d] = hidden.dims();
        let flat = hidden.reshape([b * s, d]);
        let out = ctx.map(|ctx| {
            // [N*n, d] -> [N, n, d]
            let img_hidden = flat
                .clone()
                .select(0, batch.patch_positions.clone())
                .reshape([batch.num_images(), self.patches_per_image(), d]);
            self.image_head(img_hidden, ctx)
        });
        (flat, out)
    }

    /// The mean next-token loss over the batch's text targets and their count, from the
    /// hidden states of [`Transfusion::forward_packed`]: the LM head and the cross-entropy
    /// run on the text-target rows only ([`TransfusionBatch::text_targets`]).
    ///
    /// # Shapes
    /// - `hidden`: `[b*s, d]`; output `[1]`, `[1]`
    pub fn lm_loss(
        &self,
        hidden: Tensor<B, 2>,
        batch: &TransfusionBatch<B>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let [b, s] = batch.tokens.dims();
        let device = hidden.device();
        let m = batch.text_targets.dims()[0];
        // No text target: one row counted with weight 0 (a zero loss, zero gradients).
        let (rows, mask) = if m > 0 {
            (batch.text_targets.clone(), Tensor::ones([m], &device))
        } else {
            (Tensor::zeros([1], &device), Tensor::zeros([1], &device))
        };
        // [m, d] -> [m, v]
        let logits = self.lm_logits(hidden.select(0, rows.clone()));
        let targets = batch.targets.clone().reshape([b * s]).select(0, rows);
        masked_cross_entropy(logits, targets, mask)
    }

    /// The batch's noisy latents `x_t = q_sample(latents, noise, t)` and their timesteps
    /// as the image input of [`Transfusion::forward_packed`]; `None` without images.
    ///
    /// # Shapes
    /// output: `x_t` `[N, c, H, W]`, `t` `[N]`
    pub fn noised_images(
        &self,
        batch: &TransfusionBatch<B>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 1>)> {
        (batch.num_images() > 0).then(|| {
            let x_t = self.schedule().q_sample(
                batch.latents.clone(),
                batch.noise.clone(),
                batch.timesteps.clone(),
            );
            (x_t, batch.timesteps.clone().float())
        })
    }

    /// The training loss from the outputs of [`Transfusion::forward_packed`] (`flat` hidden
    /// states, the image head's output): `L_LM`, `L_DDPM` and their weighted sum.
    ///
    /// # Shapes
    /// - `flat`: `[b*s, d]`, `out`: `[N, c, H, W]`
    pub fn loss_of_outputs(
        &self,
        flat: Tensor<B, 2>,
        out: Option<Tensor<B, 4>>,
        batch: &TransfusionBatch<B>,
    ) -> TransfusionLoss<B> {
        let device = flat.device();
        let (lm, lm_targets) = self.lm_loss(flat, batch);
        let (diffusion, per_image) = match out {
            Some(out) => {
                let target = self.prediction.target(
                    &self.schedule(),
                    batch.latents.clone(),
                    batch.noise.clone(),
                    batch.timesteps.clone(),
                );
                let per_image = per_image_mse(out, target);
                (per_image.clone().mean(), per_image)
            }
            None => (Tensor::zeros([1], &device), Tensor::zeros([0], &device)),
        };
        TransfusionLoss {
            total: lm.clone() + diffusion.clone() * self.loss_weight,
            lm,
            diffusion,
            diffusion_per_image: per_image,
            lm_targets,
        }
    }

    /// The training forward pass: noises the batch's latents, runs the whole packed
    /// sequence once, and returns `L_LM`, `L_DDPM` and their weighted sum.
    pub fn forward_loss(&self, batch: TransfusionBatch<B>) -> TransfusionLoss<B> {
        let image = self.noised_images(&batch);
        let (flat, out) = self.forward_packed(&batch, image);
        self.loss_of_outputs(flat, out, &batch)
    }
}
