//! A batch of sequences being generated ("rows"), over a KV cache or by full recomputation.
//!
//! [`Rows`] is the one place that runs the transformer during generation. Every generation
//! mode (text, image, caption, interleaved) is a sequence of three operations on it:
//! - [`Rows::push_tokens`]: append one text token per row, get the hidden state of that
//!   position (for the next-token logits);
//! - [`Rows::image_steps`], then [`ImageSteps::eps`] per step: run the `n` patches of a
//!   noisy image `x_t` at the end of every row and get the noise prediction, *without*
//!   keeping them (a diffusion step);
//! - [`Rows::push_image`]: append a clean image (encoded at `t = 0`) to every row.
//!
//! Two policies give the same results (up to float rounding), which the tests check:
//! - [`CachePolicy::Cached`]: the prefix lives in a [`KvCache`]; tokens are appended with
//!   `CacheMode::Append`, diffusion steps run only the `n` image tokens with
//!   `CacheMode::ReadOnly` (the cache does not grow while denoising).
//! - [`CachePolicy::Recompute`]: the reference: every call re-runs the whole sequence.
//!
//! # Rows of different lengths: left padding
//! Rows may have different lengths (CFG's conditional `BOS caption BOI` next to the
//! unconditional `BOS BOI`, or prompts of different lengths). Shorter rows are *left-padded*
//! so all rows end at the same column and new positions are appended at one column for
//! all rows. Padding positions get document id 0 and real positions document id 1; the
//! Transfusion mask only lets a query see keys of its own document, so real positions never
//! see padding (and padding only sees padding, so no mask row is empty). RoPE positions and
//! the mask's `index` are *logical* positions inside each row (0 at the row's BOS), so a
//! padded row computes exactly what it would compute alone.
//!
//! Files: `mod.rs` (the rows and their operations), `cached.rs` (the KV-cache path),
//! `recompute.rs` (the reference path), `padding.rs` (the left-padded layout both share).

mod cached;
mod padding;
mod recompute;

use std::sync::Mutex;

use burn::prelude::*;
use transfusion_model::pass::PassPlan;
use transfusion_model::KvCache;
use transfusion_model::Transfusion;

use padding::index_tensor;
use recompute::Item;

/// How generation runs the transformer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// Encode the prefix once into a KV cache; each step runs only the new positions.
    #[default]
    Cached,
    /// Re-run the whole sequence at every step (reference path for tests and the bench).
    Recompute,
}

/// What kind of forward pass a [`ForwardRecord`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardKind {
    /// Encoding a prompt.
    Prefix,
    /// Appending text tokens.
    Tokens,
    /// One diffusion step (noise prediction of a noisy image).
    DiffusionStep,
    /// Appending a clean image.
    Image,
}

/// One transformer forward pass, as recorded for instrumentation (tests, the bench).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardRecord {
    /// Why it ran.
    pub kind: ForwardKind,
    /// Shape `[b, s, d]` of the embeddings the decoder ran on.
    pub input: [usize; 3],
    /// Cached positions the pass attended to (0 when recomputing).
    pub cached_before: usize,
    /// Cached positions after the pass.
    pub cached_after: usize,
}

/// Shared instrumentation: every forward pass of a pipeline is recorded here.
pub type Trace = Mutex<Vec<ForwardRecord>>;

/// A batch of sequences under generation. See the module docs.
#[derive(Clone, Debug)]
pub struct Rows<B: Backend> {
    policy: CachePolicy,
    pad: u32,
    device: B::Device,
    /// Next logical position of each row.
    next_pos: Vec<usize>,
    /// Images already in each row (the next image gets span id `images + 1`).
    images: Vec<usize>,
    /// `Cached`: keys/values and metadata of every row, left-padded to one length.
    cache: Option<KvCache<B>>,
    /// `Recompute`: the content of each row.
    history: Vec<Vec<Item<B>>>,
}

/// Adds `rec` to the trace, if one is kept.
fn record(trace: Option<&Trace>, rec: ForwardRecord) {
    if let Some(t) = trace {
        t.lock()
            .expect("trace lock should not be poisoned")
            .push(rec);
    }
}

impl<B: Backend> Rows<B> {
    /// Starts one row per prompt (each non-empty, normally beginning with BOS) and returns
    /// the rows with the final-normed hidden state of each prompt's last position `[b, d]`.
    pub fn start(
        model: &Transfusion<B>,
        prompts: &[Vec<u32>],
        policy: CachePolicy,
        pad: u32,
        trace: Option<&Trace>,
    ) -> (Self, Tensor<B, 2>) {
        assert!(
            !prompts.is_empty() && prompts.iter().all(|p| !p.is_empty()),
            "Rows::start needs at least one non-empty prompt"
        );
        let mut rows = Self {
            policy,
            pad,
            device: model.tok_emb.weight.device(),
            next_pos: prompts.iter().map(|p| p.len()).collect(),
            images: vec![0; prompts.len()],
            cache: None,
            history: vec![],
        };
        let hidden = match policy {
            CachePolicy::Cached => rows.cached_prefix(model, prompts, trace),
            CachePolicy::Recompute => {
                rows.history = prompts
                    .iter()
                    .map(|p| p.iter().map(|&t| Item::Token(t)).collect())
                    .collect();
                rows.full_forward(model, None, ForwardKind::Prefix, trace)
            }
        };
        (rows, last_column(hidden))
    }

    /// Number of rows `b`.
    pub fn len(&self) -> usize {
        self.next_pos.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.next_pos.is_empty()
    }

    /// Logical length of each row.
    pub fn row_lengths(&self) -> &[usize] {
        &self.next_pos
    }

    /// Cached positions (columns, padding included); 0 when recomputing.
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// The policy these rows run under.
    pub fn policy(&self) -> CachePolicy {
        self.policy
    }

    /// Appends one token to every row; returns the hidden state of the new position `[b, d]`.
    pub fn push_tokens(
        &mut self,
        model: &Transfusion<B>,
        tokens: &[u32],
        trace: Option<&Trace>,
    ) -> Tensor<B, 2> {
        assert_eq!(
            tokens.len(),
            self.len(),
            "push_tokens needs one token per row"
        );
        let hidden = match self.policy {
            CachePolicy::Cached => self.cached_tokens(model, tokens, trace),
            CachePolicy::Recompute => {
                for (row, &t) in self.history.iter_mut().zip(tokens) {
                    row.push(Item::Token(t));
                }
                self.full_forward(model, None, ForwardKind::Tokens, trace)
            }
        };
        self.next_pos.iter_mut().for_each(|p| *p += 1);
        last_column(hidden)
    }

    /// The diffusion steps of an image after every row's content, as the rows stand now.
    /// Nothing is kept: with a cache, each step is a `CacheMode::ReadOnly` pass over only
    /// the `n` image tokens, planned once (RoPE tables, attention mask) for every step.
    pub fn image_steps<'a>(&'a self, model: &'a Transfusion<B>) -> ImageSteps<'a, B> {
        let plan = match self.policy {
            CachePolicy::Cached => Some(self.step_plan(model, model.patches_per_image())),
            CachePolicy::Recompute => None,
        };
        ImageSteps {
            rows: self,
            model,
            plan,
        }
    }

    /// Appends a clean image (one per row, encoded at `t = 0`) to every row.
    ///
    /// # Shapes
    /// `x0`: `[b, c, H, W]`
    pub fn push_image(&mut self, model: &Transfusion<B>, x0: Tensor<B, 4>, trace: Option<&Trace>) {
        assert_eq!(
            x0.dims()[0],
            self.len(),
            "push_image needs one image per row"
        );
        let n = model.patches_per_image();
        match self.policy {
            CachePolicy::Cached => self.cached_image(model, x0, n, trace),
            CachePolicy::Recompute => {
                for (r, row) in self.history.iter_mut().enumerate() {
                    row.push(Item::Image(x0.clone().narrow(0, r, 1)));
                }
            }
        }
        self.next_pos.iter_mut().for_each(|p| *p += n);
        self.images.iter_mut().for_each(|k| *k += 1);
    }

    /// A new batch made of the rows `idx` (repeats allowed), e.g. one prompt's cache
    /// repeated for N images. Cheap: one `select` per cached tensor.
    pub fn select(&self, idx: &[usize]) -> Self {
        let pick = |v: &[usize]| idx.iter().map(|&i| v[i]).collect();
        Self {
            policy: self.policy,
            pad: self.pad,
            device: self.device.clone(),
            next_pos: pick(&self.next_pos),
            images: pick(&self.images),
            cache: (self.cache.as_ref()).map(|c| c.select(index_tensor::<B>(idx, &self.device))),
            history: if self.history.is_empty() {
                vec![]
            } else {
                idx.iter().map(|&i| self.history[i].clone()).collect()
            },
        }
    }

    /// Stacks batches into one, left-padding shorter caches (padding: zero keys and
    /// values, document id 0, so it is masked out). All parts must share a policy.
    pub fn stack(parts: Vec<Self>) -> Self {
        assert!(!parts.is_empty(), "Rows::stack needs at least one part");
        let first = &parts[0];
        let (policy, pad, device) = (first.policy, first.pad, first.device.clone());
        assert!(
            parts.iter().all(|p| p.policy == policy),
            "mixed cache policies"
        );
        let cache = (policy == CachePolicy::Cached).then(|| {
            let caches: Vec<&KvCache<B>> = parts
                .iter()
                .map(|p| p.cache.as_ref().expect("cached rows have a cache"))
                .collect();
            KvCache::cat_rows(&caches)
        });
        Self {
            policy,
            pad,
            device,
            next_pos: parts.iter().flat_map(|p| p.next_pos.clone()).collect(),
            images: parts.iter().flat_map(|p| p.images.clone()).collect(),
            cache,
            history: parts.iter().flat_map(|p| p.history.clone()).collect(),
        }
    }
}

/// The last position of every row: `[b, s, d] -> [b, d]`.
fn last_column<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, s, d] = h.dims();
    h.narrow(1, s - 1, 1).reshape([b, d])
}

/// The diffusion steps of one image after every row of a [`Rows`] (see
/// [`Rows::image_steps`]); the rows cannot change while it lives, and its steps run the
/// model it was planned for.
pub struct ImageSteps<'a, B: Backend> {
    rows: &'a Rows<B>,
    model: &'a Transfusion<B>,
    /// The planned pass over the image's positions (cached rows).
    plan: Option<PassPlan<B>>,
}

impl<B: Backend> ImageSteps<'_, B> {
    /// The noise prediction for the noisy images `x_t` (one per row) at model timestep
    /// `t`, placed after each row's content.
    ///
    /// # Shapes
    /// `x_t`: `[b, c, H, W]` -> `[b, c, H, W]`
    pub fn eps(&self, x_t: Tensor<B, 4>, t: usize, trace: Option<&Trace>) -> Tensor<B, 4> {
        let (rows, model) = (self.rows, self.model);
        let b = rows.len();
        assert_eq!(x_t.dims()[0], b, "a diffusion step needs one image per row");
        let tt = Tensor::<B, 1, Int>::from_ints(vec![t as i64; b].as_slice(), &rows.device);
        let (patches, ctx) = model.embed_image(x_t.clone(), tt.clone().float());
        let n = patches.dims()[1];
        let h = match &self.plan {
            Some(plan) => rows.cached_step(model, patches, plan, trace),
            None => {
                let h = rows.full_forward(model, Some(patches), ForwardKind::DiffusionStep, trace);
                let l = h.dims()[1];
                h.narrow(1, l - n, n)
            }
        };
        model.predict_noise(h, &ctx, x_t, tt)
    }
}
