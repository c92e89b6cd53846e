//! The generation API: [`Pipeline`] holds a model, its metadata and tokenizer, and offers
//! [`Pipeline::text`], [`Pipeline::image`], [`Pipeline::caption`] and
//! [`Pipeline::generate`] (interleaved, in [`crate::interleave`]).
//!
//! Sequence layouts follow training (`transfusion_data::sequence`):
//! - text: `BOS prompt ...` decoded until EOS;
//! - text-to-image: `BOS caption BOI [n noisy patches]` (unconditional branch: `BOS BOI`);
//! - captioning: `BOS BOI [n clean patches, t = 0] EOI ...` decoded until EOS.
//!
//! ```no_run
//! # use burn::backend::NdArray;
//! # use transfusion_infer::pipeline::{Pipeline, ImageOptions};
//! # use transfusion_infer::text::TextOptions;
//! let pipe = Pipeline::<NdArray>::load("checkpoints/demo".as_ref(), &Default::default())?;
//! let text = pipe.text("a red circle", &TextOptions::default())?;
//! let images = pipe.image("a red circle", &ImageOptions { num: 4, ..Default::default() })?;
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Result};
use burn::prelude::*;
use image::RgbImage;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_model::{Precision, Transfusion};

use crate::autoencoder::{load_vae, Autoencoder};
use crate::checkpoint::{load_model, AutoencoderRef, ModelMeta};
use crate::context::{CachePolicy, ForwardRecord, Rows, Trace};
use crate::guidance::{duplicate, unconditional_prompt, Guidance};
use crate::sampler::{NoiseSource, Sampler, SamplerKind};
use crate::text::{StreamDecoder, TextOptions, TokenSampler};

/// Errors about what was asked of a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The requested image size is not what the model's patching represents.
    #[error(
        "--size {requested}: this model generates {size}x{size} images only (latent \
         {latent}x{latent}, patch {patch}: {n} patches per image); use --size {size}"
    )]
    ImageSize {
        /// Requested side in pixels.
        requested: u32,
        /// The model's image side.
        size: u32,
        /// Latent side.
        latent: usize,
        /// Patch side.
        patch: usize,
        /// Patches per image.
        n: usize,
    },
    /// Metadata and model disagree.
    #[error("checkpoint metadata: {0}")]
    Meta(String),
}

/// Options of text-to-image generation.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageOptions {
    /// Images to generate, in one batch.
    pub num: usize,
    /// Sampling steps (respaced over the training schedule). Paper: 250.
    pub steps: usize,
    /// DDPM or DDIM.
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale (0 or 1: no unconditional branch).
    pub cfg: f64,
    /// Seed of the noise (image `k` uses the stream `(seed, k)`).
    pub seed: u64,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            num: 1,
            steps: 250,
            sampler: SamplerKind::Ddpm,
            cfg: 3.0,
            seed: 0,
        }
    }
}

/// A model ready to generate. See the module docs.
pub struct Pipeline<B: Backend> {
    /// The network.
    pub model: Transfusion<B>,
    /// Its metadata (config, special tokens, image size).
    pub meta: ModelMeta,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Pixels to latents and back (pixel space or a VAE).
    pub autoencoder: Autoencoder<B>,
    /// KV cache (default) or full recomputation (the reference path).
    pub cache_policy: CachePolicy,
    /// Whether forward passes are recorded (see [`Pipeline::take_trace`]).
    pub record: bool,
    device: B::Device,
    trace: Trace,
}

impl<B: Backend> Pipeline<B> {
    /// Loads a checkpoint directory (see [`crate::checkpoint`]) onto `device`, with its
    /// autoencoder (a VAE path in `model.json` is relative to the checkpoint directory).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let (model, meta, tokenizer) = load_model::<B>(dir, device)?;
        let autoencoder = load_autoencoder::<B>(&meta.autoencoder, Some(dir), device)
            .map_err(|e| anyhow::anyhow!("checkpoint {}: {e:#}", dir.display()))?;
        Self::from_parts_with_autoencoder(model, meta, tokenizer, autoencoder)
            .map_err(|e| anyhow::anyhow!("checkpoint {}: {e}", dir.display()))
    }

    /// The same pipeline computing the decoder's products in `precision`, after checking
    /// that the backend supports it.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        precision
            .check_backend::<B>(&self.device)
            .map_err(|e| anyhow::anyhow!("--precision: {e}"))?;
        self.model = self.model.with_precision(precision);
        Ok(self)
    }

    /// Wraps an in-memory model (e.g. the one being trained, via `model.valid()`); a VAE
    /// named in `meta` is loaded from its path (relative to the working directory).
    pub fn from_parts(
        model: Transfusion<B>,
        meta: ModelMeta,
        tokenizer: TextTokenizer,
    ) -> Result<Self> {
        let device = model.tok_emb.weight.device();
        let autoencoder = load_autoencoder::<B>(&meta.autoencoder, None, &device)?;
        Self::from_parts_with_autoencoder(model, meta, tokenizer, autoencoder)
    }

    /// Wraps an in-memory model and autoencoder, checking that the autoencoder's latents
    /// `[c, S/f, S/f]` are what the model diffuses over.
    pub fn from_parts_with_autoencoder(
        model: Transfusion<B>,
        meta: ModelMeta,
        tokenizer: TextTokenizer,
        autoencoder: Autoencoder<B>,
    ) -> Result<Self> {
        let (c, f) = autoencoder.latent_geometry();
        let m = &meta.model;
        if m.latent_channels != c || m.latent_size * f != meta.image_size as usize {
            let what = match &autoencoder {
                Autoencoder::Pixel => "pixel space".to_string(),
                Autoencoder::Vae(_) => format!("the VAE ({c} channels, {f}x down-sampling)"),
            };
            return Err(InferError::Meta(format!(
                "{what} turns {0}x{0} images into latents [{c}, {1}, {1}], but the model \
                 expects [{2}, {3}, {3}]",
                meta.image_size,
                meta.image_size as usize / f,
                m.latent_channels,
                m.latent_size
            ))
            .into());
        }
        tokenizer
            .check_matches(&meta.special_tokens, meta.model.vocab_size)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let device = model.tok_emb.weight.device();
        Ok(Self {
            model,
            meta,
            tokenizer,
            autoencoder,
            cache_policy: CachePolicy::Cached,
            record: false,
            device,
            trace: Mutex::new(vec![]),
        })
    }

    /// The same pipeline with another cache policy.
    pub fn with_cache_policy(mut self, policy: CachePolicy) -> Self {
        self.cache_policy = policy;
        self
    }

    /// The same pipeline, recording every forward pass.
    pub fn with_trace(mut self) -> Self {
        self.record = true;
        self
    }

    /// Returns and clears the recorded forward passes.
    pub fn take_trace(&self) -> Vec<ForwardRecord> {
        std::mem::take(
            &mut *self
                .trace
                .lock()
                .expect("trace lock should not be poisoned"),
        )
    }

    /// The device the model lives on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Side in pixels of the images this model generates and reads.
    pub fn image_size(&self) -> u32 {
        self.meta.image_size
    }

    /// Patches per image `n`.
    pub fn patches_per_image(&self) -> usize {
        self.meta.model.patches_per_image()
    }

    /// Checks that `size` pixels is what the model's patching represents.
    pub fn check_size(&self, size: u32) -> Result<(), InferError> {
        if size == self.meta.image_size {
            return Ok(());
        }
        Err(InferError::ImageSize {
            requested: size,
            size: self.meta.image_size,
            latent: self.meta.model.latent_size,
            patch: self.meta.model.patch_size,
            n: self.patches_per_image(),
        })
    }

    pub(crate) fn tr(&self) -> Option<&Trace> {
        self.record.then_some(&self.trace)
    }

    /// `BOS` + the prompt's tokens.
    pub(crate) fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.meta.special_tokens.bos];
        ids.extend(
            self.tokenizer
                .try_encode(prompt)
                .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?,
        );
        Ok(ids)
    }

    /// Tokens never sampled in text mode (BOI is allowed only in interleaved generation).
    pub(crate) fn text_banned(&self, allow_boi: bool) -> Vec<u32> {
        let s = &self.meta.special_tokens;
        let mut v = vec![s.bos, s.pad, s.eoi];
        if !allow_boi {
            v.push(s.boi);
        }
        v
    }

    /// Host copy of `[b, v]` logits of the hidden states `[b, d]`.
    pub(crate) fn logits(&self, hidden: Tensor<B, 2>) -> Vec<Vec<f32>> {
        let logits = self.model.lm_logits(hidden);
        let [b, v] = logits.dims();
        let flat: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("logits should convert to f32");
        (0..b).map(|r| flat[r * v..(r + 1) * v].to_vec()).collect()
    }

    /// Decodes up to `opts.max_tokens` tokens for every row, stopping a row at EOS (not
    /// included) and all rows when every row stopped. `on_token(row, id)` sees each token.
    pub(crate) fn decode_rows(
        &self,
        rows: &mut Rows<B>,
        mut hidden: Tensor<B, 2>,
        opts: &TextOptions,
        banned: &[u32],
        mut on_token: impl FnMut(usize, u32),
    ) -> Vec<Vec<u32>> {
        let b = rows.len();
        let eos = self.meta.special_tokens.eos;
        let pad = self.meta.special_tokens.pad;
        let mut samplers: Vec<TokenSampler> = (0..b)
            .map(|r| TokenSampler::new(opts.seed, r as u64))
            .collect();
        let mut out = vec![vec![]; b];
        let mut done = vec![false; b];
        for step in 0..opts.max_tokens {
            let logits = self.logits(hidden);
            let mut next = vec![pad; b];
            for r in 0..b {
                if done[r] {
                    continue;
                }
                let id = samplers[r].sample(&logits[r], banned, opts);
                if id == eos {
                    done[r] = true;
                } else {
                    out[r].push(id);
                    on_token(r, id);
                    next[r] = id;
                }
            }
            if done.iter().all(|&d| d) || step + 1 == opts.max_tokens {
                break;
            }
            hidden = rows.push_tokens(&self.model, &next, self.tr());
        }
        out
    }

    /// Continues `prompt` with text (no images).
    pub fn text(&self, prompt: &str, opts: &TextOptions) -> Result<String> {
        self.text_stream(prompt, opts, |_| {})
    }

    /// Like [`Pipeline::text`], calling `on_text` with each new piece of text as it is
    /// decoded.
    pub fn text_stream(
        &self,
        prompt: &str,
        opts: &TextOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<String> {
        let mut stream = StreamDecoder::default();
        let out = self.decode_prompt(prompt, opts, |id| {
            let piece = stream.push(id, |ids| self.tokenizer.decode(ids));
            if !piece.is_empty() {
                on_text(&piece);
            }
        })?;
        let rest = stream.finish(|ids| self.tokenizer.decode(ids));
        if !rest.is_empty() {
            on_text(&rest);
        }
        Ok(self.tokenizer.decode(&out))
    }

    /// Decodes text after `prompt` (one row, KV cached per the policy), calling
    /// `on_token` with each new id.
    fn decode_prompt(
        &self,
        prompt: &str,
        opts: &TextOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        let ids = self.encode_prompt(prompt)?;
        let (mut rows, hidden) = Rows::start(
            &self.model,
            &[ids],
            self.cache_policy,
            self.meta.special_tokens.pad,
            self.tr(),
        );
        let banned = self.text_banned(false);
        Ok(self
            .decode_rows(&mut rows, hidden, opts, &banned, |_, id| on_token(id))
            .remove(0))
    }

    /// The token ids [`Pipeline::text`] would produce.
    pub fn text_tokens(&self, prompt: &str, opts: &TextOptions) -> Result<Vec<u32>> {
        self.decode_prompt(prompt, opts, |_| {})
    }

    /// Generates `opts.num` images for `prompt` in one batch.
    pub fn image(&self, prompt: &str, opts: &ImageOptions) -> Result<Vec<RgbImage>> {
        let x = self.image_tensor(prompt, opts, |_, _| {})?;
        Ok(self.to_images(x))
    }

    /// Generates images as the `[N, c, H, W]` latent tensor in `[-1, 1]`, calling
    /// `on_step(done, total)` after each diffusion step.
    pub fn image_tensor(
        &self,
        prompt: &str,
        opts: &ImageOptions,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor<B, 4>> {
        if opts.num == 0 {
            bail!("the number of images must be at least 1");
        }
        let special = self.meta.special_tokens;
        let mut cond = self.encode_prompt(prompt)?;
        cond.push(special.boi);
        let guidance = Guidance::new(opts.cfg);
        let n = opts.num;
        let pad = special.pad;
        // One prefix pass for both branches (left-padded batch of 2), then each prefix
        // cache is repeated for the N images.
        let rows = if guidance.active() {
            let prompts = [cond, unconditional_prompt(&special)];
            let (rows, _) = Rows::start(&self.model, &prompts, self.cache_policy, pad, self.tr());
            let idx: Vec<usize> = (0..2 * n).map(|r| r / n).collect();
            rows.select(&idx)
        } else {
            let (rows, _) = Rows::start(&self.model, &[cond], self.cache_policy, pad, self.tr());
            rows.select(&vec![0; n])
        };
        Ok(self.denoise(&rows, n, opts, opts.seed, on_step))
    }

    /// Runs the reverse process for `n` images at the end of `rows` (`n` rows, or `2n`
    /// under guidance: conditional rows then unconditional rows). Returns `x_0`.
    pub(crate) fn denoise(
        &self,
        rows: &Rows<B>,
        n: usize,
        opts: &ImageOptions,
        seed: u64,
        mut on_step: impl FnMut(usize, usize),
    ) -> Tensor<B, 4> {
        let guidance = Guidance::new(opts.cfg);
        assert_eq!(rows.len(), n * guidance.branches(), "rows per image");
        let sampler = Sampler::new(opts.sampler, &self.model.schedule(), opts.steps);
        let mut noise = NoiseSource::new(seed, n);
        let c = self.meta.model.latent_channels;
        let h = self.meta.model.latent_size;
        let mut x = noise.normal::<B>([n, c, h, h], &self.device);
        let plan = sampler.plan();
        let total = plan.len();
        for (done, (i, t)) in plan.into_iter().enumerate() {
            let x_in = if guidance.active() {
                duplicate(x.clone())
            } else {
                x.clone()
            };
            let eps = guidance.combine(rows.image_eps(&self.model, x_in, t, self.tr()));
            x = sampler.step(x, eps, i, &mut noise);
            on_step(done + 1, total);
        }
        x
    }

    /// Converts latents `[N, c, h, w]` to images (decoded by the VAE, if any; pixel
    /// latents in `[-1, 1]` otherwise).
    pub fn to_images(&self, x: Tensor<B, 4>) -> Vec<RgbImage> {
        self.autoencoder.decode_images(x)
    }

    /// Converts images (center-cropped and resized to the model's size) to latents
    /// `[N, c, H, W]` (encoded by the VAE, if any).
    pub fn from_images(&self, images: &[RgbImage]) -> Tensor<B, 4> {
        self.autoencoder
            .encode_images(images, self.meta.image_size, &self.device)
    }

    /// One caption per image, all images in one batch.
    pub fn caption(&self, images: &[RgbImage], opts: &TextOptions) -> Result<Vec<String>> {
        Ok(self
            .caption_tokens(images, opts)?
            .iter()
            .map(|ids| self.tokenizer.decode(ids))
            .collect())
    }

    /// The token ids of [`Pipeline::caption`].
    pub fn caption_tokens(&self, images: &[RgbImage], opts: &TextOptions) -> Result<Vec<Vec<u32>>> {
        if images.is_empty() {
            return Ok(vec![]);
        }
        let special = self.meta.special_tokens;
        let x0 = self.from_images(images);
        let n = images.len();
        let (rows, _) = Rows::start(
            &self.model,
            &[vec![special.bos, special.boi]],
            self.cache_policy,
            special.pad,
            self.tr(),
        );
        let mut rows = rows.select(&vec![0; n]);
        rows.push_image(&self.model, x0, self.tr());
        let hidden = rows.push_tokens(&self.model, &vec![special.eoi; n], self.tr());
        let banned = self.text_banned(false);
        Ok(self.decode_rows(&mut rows, hidden, opts, &banned, |_, _| {}))
    }
}

/// The autoencoder `aref` names: pixel space, or the VAE at its path (relative paths are
/// taken relative to `base`, the checkpoint directory, when given). A missing VAE is an
/// error naming the path.
pub fn load_autoencoder<B: Backend>(
    aref: &AutoencoderRef,
    base: Option<&Path>,
    device: &B::Device,
) -> Result<Autoencoder<B>> {
    match aref {
        AutoencoderRef::Pixel => Ok(Autoencoder::Pixel),
        AutoencoderRef::Vae { path } => {
            let full = match base {
                Some(b) if path.is_relative() => b.join(path),
                _ => path.clone(),
            };
            if !full.exists() {
                bail!(
                    "the model's autoencoder is the VAE at {}, which does not exist (model.json \
                     `autoencoder.path`; put the VAE there or edit the path)",
                    full.display()
                );
            }
            let vae = load_vae::<B>(&full, device)
                .map_err(|e| anyhow::anyhow!("the model's VAE {}: {e:#}", full.display()))?;
            Ok(Autoencoder::Vae(vae))
        }
    }
}
