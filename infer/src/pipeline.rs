//! The generation API: [`Pipeline`] holds a model, its metadata and tokenizer, and offers
//! [`Pipeline::text`], [`Pipeline::image`], [`Pipeline::caption`] and
//! [`Pipeline::generate`] (interleaved, in [`crate::interleave`]); text and captions are
//! decoded in `decode.rs`.
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
//! # Ok::<(), transfusion_infer::InferError>(())
//! ```

use std::path::Path;
use std::sync::Mutex;

use burn::prelude::*;
use image::RgbImage;
use transfusion_data::sequence::TokenSource;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_model::{Precision, Transfusion};

use crate::context::{CachePolicy, ForwardRecord, Rows, Trace};
use crate::error::{InferError, Result};
use crate::guidance::{duplicate, unconditional_prompt, Guidance};
use crate::sampler::{NoiseSource, Sampler, SamplerKind};
use transfusion_runtime::autoencoder::{load_vae, Autoencoder};
use transfusion_runtime::checkpoint::{load_model, AutoencoderRef, ModelMeta};

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

impl ImageOptions {
    /// The options a model samples with unless told otherwise: a consistency-distilled
    /// model (see [`ModelMeta::consistency`]) uses the consistency sampler at its recorded
    /// steps without guidance (its teacher's guidance is baked in); any other model
    /// `fallback`.
    pub fn for_model(meta: &ModelMeta, fallback: ImageOptions) -> ImageOptions {
        match &meta.consistency {
            Some(c) => ImageOptions {
                steps: c.sampling_steps,
                sampler: SamplerKind::Consistency,
                cfg: 1.0,
                ..fallback
            },
            None => fallback,
        }
    }

    /// These options with what the user asked for: a sampler other than these options'
    /// without steps takes its own default steps ([`SamplerKind::default_steps`]).
    pub fn with_overrides(
        self,
        sampler: Option<SamplerKind>,
        steps: Option<usize>,
        cfg: Option<f64>,
    ) -> ImageOptions {
        let steps = match (steps, sampler) {
            (Some(s), _) => s,
            (None, Some(k)) if k != self.sampler => k.default_steps(),
            (None, _) => self.steps,
        };
        ImageOptions {
            steps,
            sampler: sampler.unwrap_or(self.sampler),
            cfg: cfg.unwrap_or(self.cfg),
            ..self
        }
    }
}

/// The most memory one image batch may be estimated to need (see
/// [`Pipeline::check_image_options`]); beyond it generation could only abort on allocation.
pub const MAX_GENERATION_GIB: f64 = 64.0;

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
    /// Loads a checkpoint directory (see [`transfusion_runtime::checkpoint`]) onto `device`, with its
    /// autoencoder (a VAE path in `model.json` is relative to the checkpoint directory).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let (model, meta, tokenizer) = load_model::<B>(dir, device)?;
        let within = |e: InferError| e.within(format!("checkpoint {}", dir.display()));
        let autoencoder =
            load_autoencoder::<B>(&meta.autoencoder, Some(dir), device).map_err(within)?;
        Self::from_parts_with_autoencoder(model, meta, tokenizer, autoencoder).map_err(within)
    }

    /// The image options this model samples with unless told otherwise (see
    /// [`ImageOptions::for_model`] over [`ImageOptions::default`]).
    pub fn default_image_options(&self) -> ImageOptions {
        ImageOptions::for_model(&self.meta, ImageOptions::default())
    }

    /// The same pipeline computing the decoder's products in `precision`, after checking
    /// that the backend supports it.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        precision
            .check_backend::<B>(&self.device)
            .map_err(|e| InferError::Options(format!("--precision: {e}")))?;
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
            )));
        }
        tokenizer.check_matches(&meta.special_tokens, meta.model.vocab_size)?;
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

    /// `BOS` + the prompt's tokens, special ids removed as training removes them from
    /// captions (a prompt containing `<|boi|>` must not open an image).
    pub(crate) fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.meta.special_tokens.bos];
        ids.extend(
            self.tokenizer
                .encode_clean(prompt)
                .map_err(|e| InferError::Options(format!("cannot tokenize the prompt: {e}")))?,
        );
        Ok(ids)
    }

    /// Refuses image options that would fail late or silently: no image, no step, more
    /// steps than the training schedule has, a guidance scale that is negative or not
    /// finite, or a batch whose estimated memory exceeds [`MAX_GENERATION_GIB`].
    pub fn check_image_options(&self, opts: &ImageOptions) -> Result<()> {
        let m = &self.meta.model;
        if opts.num == 0 {
            return Err(InferError::Options(
                "the number of images must be at least 1".into(),
            ));
        }
        if opts.steps == 0 || opts.steps > m.timesteps {
            return Err(InferError::Options(format!(
                "steps must be in 1..={} (the model's training timesteps), got {}",
                m.timesteps, opts.steps
            )));
        }
        if let Some(max) = opts.sampler.max_steps() {
            if opts.steps > max {
                return Err(InferError::Options(format!(
                    "the {} sampler takes 1..={max} steps, got {}",
                    opts.sampler, opts.steps
                )));
            }
        }
        if !(opts.cfg.is_finite() && opts.cfg >= 0.0) {
            return Err(InferError::Options(format!(
                "the guidance scale must be a finite number >= 0 (0 or 1: none), got {}",
                opts.cfg
            )));
        }
        // The rows' KV caches and one step's activations, for a prompt of up to 256 tokens.
        let rows = (opts.num * Guidance::new(opts.cfg).branches()) as f64;
        let n = self.patches_per_image() as f64;
        let positions = 256.0 + n + 2.0;
        let kv = (m.n_layers * 2 * m.n_kv_heads * m.head_dim()) as f64 * positions;
        let step = n * (m.d_hidden + 4 * m.d_model) as f64 + (m.n_heads as f64) * n * positions;
        let gib = rows * (kv + step) * 4.0 / (1u64 << 30) as f64;
        if gib > MAX_GENERATION_GIB {
            return Err(InferError::Options(format!(
                "{} images need about {gib:.0} GiB (more than {MAX_GENERATION_GIB} GiB): \
                 generate fewer per call (image k of a seed does not depend on the batch)",
                opts.num
            )));
        }
        Ok(())
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
        self.check_image_options(opts)?;
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
        let sampler = Sampler::new(
            opts.sampler,
            &self.model.schedule(),
            opts.steps,
            self.autoencoder.x0_bound(),
        );
        let mut noise = NoiseSource::new(seed, n);
        let c = self.meta.model.latent_channels;
        let h = self.meta.model.latent_size;
        let mut x = noise.normal::<B>([n, c, h, h], &self.device);
        let steps = rows.image_steps(&self.model);
        let plan = sampler.plan();
        let total = plan.len();
        for (done, (i, t)) in plan.into_iter().enumerate() {
            let x_in = if guidance.active() {
                duplicate(x.clone())
            } else {
                x.clone()
            };
            let eps = guidance.combine(steps.eps(x_in, t, self.tr()));
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
                return Err(InferError::invalid(
                    &full,
                    "the model's autoencoder is the VAE here, which does not exist (model.json \
                     `autoencoder.path`; put the VAE there or edit the path)",
                ));
            }
            let vae = load_vae::<B>(&full, device)
                .map_err(|e| e.within(format!("the model's VAE {}", full.display())))?;
            Ok(Autoencoder::Vae(vae))
        }
    }
}
