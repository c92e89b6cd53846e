//! Interleaved (mixed-modal) generation.
//!
//! Text is decoded in LM mode. When the model emits BOI, the decoder switches to diffusion
//! mode: BOI is appended, `n` noise patches are denoised at the end of the sequence (over
//! the cached prefix, which does not grow), the clean image is encoded once at `t = 0` and
//! appended to the cache, EOI follows, and LM decoding continues. Under guidance the
//! unconditional branch of each image is `BOS BOI` with its own cache, run in the same
//! batch as the conditional document.

use std::path::{Path, PathBuf};

use crate::error::Result;
use burn::prelude::*;
use image::RgbImage;
use transfusion_data::files::{create_dir, write_file};
use transfusion_data::image::save_png;
use transfusion_data::rng::derive_seed;

use crate::context::Rows;
use crate::guidance::{unconditional_prompt, Guidance};
use crate::pipeline::{ImageOptions, Pipeline};
use crate::text::{TextOptions, TokenSampler};

/// One piece of a generated document.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    /// Decoded text.
    Text(String),
    /// A generated image.
    Image(RgbImage),
}

/// Options of [`Pipeline::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Text decoding (`max_tokens` counts text tokens, BOI included).
    pub text: TextOptions,
    /// Diffusion settings of every image (`num` is ignored: one image per BOI).
    pub image: ImageOptions,
    /// Most images in the document; BOI is never sampled after that.
    pub max_images: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            text: TextOptions::default(),
            image: ImageOptions::default(),
            max_images: 4,
        }
    }
}

/// A generated document with its raw token ids and latents (for tests and tools).
#[derive(Clone, Debug)]
pub struct Document<B: Backend> {
    /// Text tokens, with BOI where each image starts (EOI and image tokens not listed).
    pub tokens: Vec<u32>,
    /// Image latents `[1, c, H, W]`, in order.
    pub latents: Vec<Tensor<B, 4>>,
}

impl<B: Backend> Pipeline<B> {
    /// Generates a document continuing `prompt`, with text and images interleaved.
    pub fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<Vec<Segment>> {
        let doc = self.generate_document(prompt, opts)?;
        let boi = self.meta.special_tokens.boi;
        let mut segments = vec![];
        let mut images = doc.latents.into_iter();
        for piece in doc.tokens.split_inclusive(|&t| t == boi) {
            let (text, has_image) = match piece.split_last() {
                Some((&last, rest)) if last == boi => (rest, true),
                _ => (piece, false),
            };
            if !text.is_empty() {
                segments.push(Segment::Text(self.tokenizer.decode(text)));
            }
            if has_image {
                let x = images.next().expect("one latent per BOI");
                segments.extend(self.to_images(x).into_iter().map(Segment::Image));
            }
        }
        Ok(segments)
    }

    /// [`Pipeline::generate`] returning token ids and latents.
    pub fn generate_document(&self, prompt: &str, opts: &GenerateOptions) -> Result<Document<B>> {
        opts.text.validate()?;
        self.check_image_options(&opts.image)?;
        let special = self.meta.special_tokens;
        let ids = self.encode_prompt(prompt)?;
        let (mut rows, mut hidden) = Rows::start(
            &self.model,
            &[ids],
            self.cache_policy,
            special.pad,
            self.tr(),
        );
        let guidance = Guidance::new(opts.image.cfg);
        let mut sampler = TokenSampler::new(opts.text.seed, 0);
        let mut doc = Document {
            tokens: vec![],
            latents: vec![],
        };
        for step in 0..opts.text.max_tokens {
            let banned = self.text_banned(doc.latents.len() < opts.max_images);
            let logits = self.logits(hidden);
            let id = sampler.sample(&logits[0], &banned, &opts.text);
            if id == special.eos {
                break;
            }
            doc.tokens.push(id);
            if id != special.boi {
                if step + 1 == opts.text.max_tokens {
                    break;
                }
                hidden = rows.push_tokens(&self.model, &[id], self.tr());
                continue;
            }
            // Diffusion mode.
            rows.push_tokens(&self.model, &[special.boi], self.tr());
            let seed = derive_seed(&[opts.image.seed, doc.latents.len() as u64]);
            let branches = if guidance.active() {
                let (uncond, _) = Rows::start(
                    &self.model,
                    &[unconditional_prompt(&special)],
                    self.cache_policy,
                    special.pad,
                    self.tr(),
                );
                Rows::stack(vec![rows.clone(), uncond])
            } else {
                rows.clone()
            };
            let x0 = self.denoise(&branches, 1, &opts.image, seed, |_, _| {});
            rows.push_image(&self.model, x0.clone(), self.tr());
            doc.latents.push(x0);
            hidden = rows.push_tokens(&self.model, &[special.eoi], self.tr());
        }
        Ok(doc)
    }
}

/// Writes a generated document to the directory `out` (created if needed): each image as
/// `image-K.png` (K from 1) and `transcript.md`, the prompt followed by the segments with
/// the images linked in place. Returns the transcript's path and the number of images.
pub fn write_transcript(
    prompt: &str,
    segments: &[Segment],
    out: &Path,
) -> Result<(PathBuf, usize)> {
    create_dir(out)?;
    let mut md = format!("# Transfusion\n\n**Prompt:** {prompt}\n\n---\n\n");
    md.push_str(prompt);
    let mut k = 0;
    for seg in segments {
        match seg {
            Segment::Text(t) => md.push_str(t),
            Segment::Image(img) => {
                k += 1;
                let name = format!("image-{k}.png");
                save_png(img, &out.join(&name))?;
                md.push_str(&format!("\n\n![image {k}]({name})\n\n"));
            }
        }
    }
    md.push('\n');
    let path = out.join("transcript.md");
    write_file(&path, md)?;
    Ok((path, k))
}
