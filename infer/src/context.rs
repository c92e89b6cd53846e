//! A batch of sequences being generated ("rows"), over a KV cache or by full recomputation.
//!
//! [`Rows`] is the one place that runs the transformer during generation. Every generation
//! mode (text, image, caption, interleaved) is a sequence of three operations on it:
//! - [`Rows::push_tokens`]: append one text token per row, get the hidden state of that
//!   position (for the next-token logits);
//! - [`Rows::image_eps`]: run the `n` patches of a noisy image `x_t` at the end of every
//!   row and get the noise prediction, *without* keeping them (a diffusion step);
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

use std::sync::Mutex;

use burn::prelude::*;
use transfusion_model::kv_cache::{CacheMode, KvCache, LayerKv};
use transfusion_model::mask::SpanMeta;
use transfusion_model::Transfusion;

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

#[derive(Clone, Debug)]
enum Item<B: Backend> {
    Token(u32),
    /// Clean latent `[1, c, H, W]`, encoded at `t = 0`.
    Image(Tensor<B, 4>),
}

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

fn ints<B: Backend>(v: Vec<i64>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints(v.as_slice(), device).reshape(shape)
}

fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::<B, 1, Int>::from_ints(v.as_slice(), device)
}

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
        let device = model.tok_emb.weight.device();
        let b = prompts.len();
        let mut rows = Self {
            policy,
            pad,
            device: device.clone(),
            next_pos: prompts.iter().map(|p| p.len()).collect(),
            images: vec![0; b],
            cache: None,
            history: vec![],
        };
        let hidden = match policy {
            CachePolicy::Cached => {
                let l = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
                let (mut tok, mut pos, mut doc) = (vec![], vec![], vec![]);
                for p in prompts {
                    let padn = l - p.len();
                    tok.extend(std::iter::repeat_n(pad as i64, padn));
                    tok.extend(p.iter().map(|&t| t as i64));
                    pos.extend(std::iter::repeat_n(0, padn));
                    pos.extend(0..p.len() as i64);
                    doc.extend(std::iter::repeat_n(0, padn));
                    doc.extend(std::iter::repeat_n(1, p.len()));
                }
                let positions = ints::<B>(pos, [b, l], &device);
                let meta = SpanMeta {
                    index: positions.clone(),
                    span: Tensor::zeros([b, l], &device),
                    doc: ints::<B>(doc, [b, l], &device),
                };
                let x = model.embed_tokens(ints::<B>(tok, [b, l], &device));
                let mut cache = KvCache::new(model.n_layers());
                let h = model.forward_embeddings(
                    x,
                    positions,
                    meta,
                    Some(&mut cache),
                    CacheMode::Append,
                );
                record(
                    trace,
                    ForwardRecord {
                        kind: ForwardKind::Prefix,
                        input: [b, l, h.dims()[2]],
                        cached_before: 0,
                        cached_after: cache.len(),
                    },
                );
                rows.cache = Some(cache);
                last_column(h)
            }
            CachePolicy::Recompute => {
                rows.history = prompts
                    .iter()
                    .map(|p| p.iter().map(|&t| Item::Token(t)).collect())
                    .collect();
                let (h, _) = rows.full_forward(model, None, ForwardKind::Prefix, trace);
                last_column(h)
            }
        };
        (rows, hidden)
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
        let b = self.len();
        assert_eq!(tokens.len(), b, "push_tokens needs one token per row");
        let hidden = match self.policy {
            CachePolicy::Cached => {
                let dev = &self.device;
                let tok = ints::<B>(tokens.iter().map(|&t| t as i64).collect(), [b, 1], dev);
                let positions = ints::<B>(
                    self.next_pos.iter().map(|&p| p as i64).collect(),
                    [b, 1],
                    dev,
                );
                let meta = SpanMeta {
                    index: positions.clone(),
                    span: Tensor::zeros([b, 1], dev),
                    doc: Tensor::ones([b, 1], dev),
                };
                let x = model.embed_tokens(tok);
                let d = x.dims()[2];
                let cache = self.cache.as_mut().expect("cached rows have a cache");
                let before = cache.len();
                let h =
                    model.forward_embeddings(x, positions, meta, Some(cache), CacheMode::Append);
                record(
                    trace,
                    ForwardRecord {
                        kind: ForwardKind::Tokens,
                        input: [b, 1, d],
                        cached_before: before,
                        cached_after: cache.len(),
                    },
                );
                last_column(h)
            }
            CachePolicy::Recompute => {
                for (row, &t) in self.history.iter_mut().zip(tokens) {
                    row.push(Item::Token(t));
                }
                let (h, _) = self.full_forward(model, None, ForwardKind::Tokens, trace);
                last_column(h)
            }
        };
        self.next_pos.iter_mut().for_each(|p| *p += 1);
        hidden
    }

    /// One diffusion step: the noise prediction for the noisy images `x_t` (one per row)
    /// at model timestep `t`, placed after each row's content. Nothing is kept: with a
    /// cache, the pass is `CacheMode::ReadOnly` and runs only the `n` image tokens.
    ///
    /// # Shapes
    /// `x_t`: `[b, c, H, W]` -> `[b, c, H, W]`
    pub fn image_eps(
        &self,
        model: &Transfusion<B>,
        x_t: Tensor<B, 4>,
        t: usize,
        trace: Option<&Trace>,
    ) -> Tensor<B, 4> {
        let b = self.len();
        assert_eq!(x_t.dims()[0], b, "image_eps needs one image per row");
        let dev = &self.device;
        let tt = Tensor::<B, 1, Int>::from_ints(vec![t as i64; b].as_slice(), dev);
        match self.policy {
            CachePolicy::Cached => {
                let (patches, ctx) = model.embed_image(x_t.clone(), tt.clone());
                let [_, n, d] = patches.dims();
                let (positions, meta) = self.image_meta(n);
                let cache = self.cache.as_ref().expect("cached rows have a cache");
                // A read-only pass never writes to the cache; a cheap clone (reference
                // counted tensors) satisfies the `&mut` of the model's signature.
                let mut view = cache.clone();
                let h = model.forward_embeddings(
                    patches,
                    positions,
                    meta,
                    Some(&mut view),
                    CacheMode::ReadOnly,
                );
                debug_assert_eq!(view.len(), cache.len(), "read-only pass grew the cache");
                record(
                    trace,
                    ForwardRecord {
                        kind: ForwardKind::DiffusionStep,
                        input: [b, n, d],
                        cached_before: cache.len(),
                        cached_after: view.len(),
                    },
                );
                model.predict_noise(h, &ctx, x_t, tt)
            }
            CachePolicy::Recompute => {
                let (h, ctx) = self.full_forward(
                    model,
                    Some((x_t.clone(), tt.clone())),
                    ForwardKind::DiffusionStep,
                    trace,
                );
                let ctx = ctx.expect("an image was embedded");
                let n = self.patches(model);
                let l = h.dims()[1];
                model.predict_noise(h.narrow(1, l - n, n), &ctx, x_t, tt)
            }
        }
    }

    /// Appends a clean image (one per row, encoded at `t = 0`) to every row.
    ///
    /// # Shapes
    /// `x0`: `[b, c, H, W]`
    pub fn push_image(&mut self, model: &Transfusion<B>, x0: Tensor<B, 4>, trace: Option<&Trace>) {
        let b = self.len();
        assert_eq!(x0.dims()[0], b, "push_image needs one image per row");
        let n = self.patches(model);
        match self.policy {
            CachePolicy::Cached => {
                let tt = Tensor::<B, 1, Int>::zeros([b], &self.device);
                let (patches, _) = model.embed_image(x0, tt);
                let d = patches.dims()[2];
                let (positions, meta) = self.image_meta(n);
                let cache = self.cache.as_mut().expect("cached rows have a cache");
                let before = cache.len();
                model.forward_embeddings(patches, positions, meta, Some(cache), CacheMode::Append);
                record(
                    trace,
                    ForwardRecord {
                        kind: ForwardKind::Image,
                        input: [b, n, d],
                        cached_before: before,
                        cached_after: cache.len(),
                    },
                );
            }
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
        let cache = self.cache.as_ref().map(|c| {
            let i = index_tensor::<B>(idx, &self.device);
            KvCache {
                layers: c
                    .layers
                    .iter()
                    .map(|l| {
                        l.as_ref().map(|kv| LayerKv {
                            key: kv.key.clone().select(0, i.clone()),
                            value: kv.value.clone().select(0, i.clone()),
                        })
                    })
                    .collect(),
                meta: c.meta.as_ref().map(|m| SpanMeta {
                    index: m.index.clone().select(0, i.clone()),
                    span: m.span.clone().select(0, i.clone()),
                    doc: m.doc.clone().select(0, i.clone()),
                }),
            }
        });
        Self {
            policy: self.policy,
            pad: self.pad,
            device: self.device.clone(),
            next_pos: idx.iter().map(|&i| self.next_pos[i]).collect(),
            images: idx.iter().map(|&i| self.images[i]).collect(),
            cache,
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
        let next_pos = parts.iter().flat_map(|p| p.next_pos.clone()).collect();
        let images = parts.iter().flat_map(|p| p.images.clone()).collect();
        let history = parts.iter().flat_map(|p| p.history.clone()).collect();
        let cache = (policy == CachePolicy::Cached).then(|| {
            let caches: Vec<&KvCache<B>> = parts
                .iter()
                .map(|p| p.cache.as_ref().expect("cached rows have a cache"))
                .collect();
            let l = caches.iter().map(|c| c.len()).max().unwrap_or(0);
            let n_layers = caches[0].layers.len();
            let padded: Vec<KvCache<B>> = caches.iter().map(|c| left_pad(c, l, &device)).collect();
            KvCache {
                layers: (0..n_layers)
                    .map(|li| {
                        let kvs: Vec<&LayerKv<B>> = padded
                            .iter()
                            .map(|c| c.layers[li].as_ref().expect("a started cache is full"))
                            .collect();
                        Some(LayerKv {
                            key: Tensor::cat(kvs.iter().map(|kv| kv.key.clone()).collect(), 0),
                            value: Tensor::cat(kvs.iter().map(|kv| kv.value.clone()).collect(), 0),
                        })
                    })
                    .collect(),
                meta: Some({
                    let metas: Vec<&SpanMeta<B>> = padded
                        .iter()
                        .map(|c| c.meta.as_ref().expect("non-empty"))
                        .collect();
                    SpanMeta {
                        index: Tensor::cat(metas.iter().map(|m| m.index.clone()).collect(), 0),
                        span: Tensor::cat(metas.iter().map(|m| m.span.clone()).collect(), 0),
                        doc: Tensor::cat(metas.iter().map(|m| m.doc.clone()).collect(), 0),
                    }
                }),
            }
        });
        Self {
            policy,
            pad,
            device,
            next_pos,
            images,
            cache,
            history,
        }
    }

    fn patches(&self, model: &Transfusion<B>) -> usize {
        (model.latent_size / model.image.patch_size).pow(2)
    }

    /// Positions and metadata of `n` image tokens appended to every row.
    fn image_meta(&self, n: usize) -> (Tensor<B, 2, Int>, SpanMeta<B>) {
        let b = self.len();
        let dev = &self.device;
        let pos: Vec<i64> = self
            .next_pos
            .iter()
            .flat_map(|&p| (p as i64)..(p + n) as i64)
            .collect();
        let span: Vec<i64> = self
            .images
            .iter()
            .flat_map(|&k| std::iter::repeat_n(k as i64 + 1, n))
            .collect();
        let positions = ints::<B>(pos, [b, n], dev);
        let meta = SpanMeta {
            index: positions.clone(),
            span: ints::<B>(span, [b, n], dev),
            doc: Tensor::ones([b, n], dev),
        };
        (positions, meta)
    }

    /// The reference path: embeds every row from scratch (plus an optional noisy image at
    /// the end of each row), left-pads to one length and runs the decoder without cache.
    /// Returns the hidden states `[b, L, d]` and the noisy image's context.
    fn full_forward(
        &self,
        model: &Transfusion<B>,
        noisy: Option<(Tensor<B, 4>, Tensor<B, 1, Int>)>,
        kind: ForwardKind,
        trace: Option<&Trace>,
    ) -> (
        Tensor<B, 3>,
        Option<transfusion_model::image_io::ImageContext<B>>,
    ) {
        let dev = &self.device;
        let b = self.len();
        let (noisy_patches, ctx) = match noisy {
            Some((x, t)) => {
                let (p, c) = model.embed_image(x, t);
                (Some(p), Some(c))
            }
            None => (None, None),
        };
        // Per row: embedding pieces, span ids.
        let mut rows_x = Vec::with_capacity(b);
        let mut rows_span = Vec::with_capacity(b);
        for (r, items) in self.history.iter().enumerate() {
            let mut pieces: Vec<Tensor<B, 3>> = vec![];
            let mut span: Vec<i64> = vec![];
            let mut run: Vec<i64> = vec![];
            let mut k = 0i64;
            let flush = |run: &mut Vec<i64>,
                         pieces: &mut Vec<Tensor<B, 3>>,
                         span: &mut Vec<i64>| {
                if !run.is_empty() {
                    let len = run.len();
                    pieces.push(model.embed_tokens(ints::<B>(std::mem::take(run), [1, len], dev)));
                    span.extend(std::iter::repeat_n(0, len));
                }
            };
            for item in items {
                match item {
                    Item::Token(t) => run.push(*t as i64),
                    Item::Image(x0) => {
                        flush(&mut run, &mut pieces, &mut span);
                        k += 1;
                        let (p, _) = model.embed_image(x0.clone(), Tensor::zeros([1], dev));
                        span.extend(std::iter::repeat_n(k, p.dims()[1]));
                        pieces.push(p);
                    }
                }
            }
            flush(&mut run, &mut pieces, &mut span);
            if let Some(p) = &noisy_patches {
                let p = p.clone().narrow(0, r, 1);
                span.extend(std::iter::repeat_n(k + 1, p.dims()[1]));
                pieces.push(p);
            }
            rows_x.push(Tensor::cat(pieces, 1));
            rows_span.push(span);
        }
        let l = rows_span.iter().map(|s| s.len()).max().unwrap_or(0);
        let (mut xs, mut pos, mut span, mut doc) = (vec![], vec![], vec![], vec![]);
        for (x, s) in rows_x.into_iter().zip(rows_span) {
            let padn = l - s.len();
            if padn > 0 {
                let pad_tok = ints::<B>(vec![self.pad as i64; padn], [1, padn], dev);
                xs.push(Tensor::cat(vec![model.embed_tokens(pad_tok), x], 1));
            } else {
                xs.push(x);
            }
            pos.extend(std::iter::repeat_n(0, padn));
            pos.extend(0..s.len() as i64);
            span.extend(std::iter::repeat_n(0, padn));
            span.extend(s.iter().copied());
            doc.extend(std::iter::repeat_n(0, padn));
            doc.extend(std::iter::repeat_n(1, s.len()));
        }
        let x = Tensor::cat(xs, 0);
        let d = x.dims()[2];
        let positions = ints::<B>(pos, [b, l], dev);
        let meta = SpanMeta {
            index: positions.clone(),
            span: ints::<B>(span, [b, l], dev),
            doc: ints::<B>(doc, [b, l], dev),
        };
        let h = model.forward_embeddings(x, positions, meta, None, CacheMode::ReadOnly);
        record(
            trace,
            ForwardRecord {
                kind,
                input: [b, l, d],
                cached_before: 0,
                cached_after: 0,
            },
        );
        (h, ctx)
    }
}

/// The last position of every row: `[b, s, d] -> [b, d]`.
fn last_column<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, s, d] = h.dims();
    h.narrow(1, s - 1, 1).reshape([b, d])
}

/// Left-pads a cache to `len` columns with masked padding (zeros, document id 0).
fn left_pad<B: Backend>(c: &KvCache<B>, len: usize, device: &B::Device) -> KvCache<B> {
    let padn = len - c.len();
    if padn == 0 {
        return c.clone();
    }
    let pad4 = |t: &Tensor<B, 4>| {
        let [b, h, _, hd] = t.dims();
        Tensor::cat(vec![Tensor::zeros([b, h, padn, hd], device), t.clone()], 2)
    };
    let pad2 = |t: &Tensor<B, 2, Int>| {
        let b = t.dims()[0];
        Tensor::cat(vec![Tensor::zeros([b, padn], device), t.clone()], 1)
    };
    KvCache {
        layers: c
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|kv| LayerKv {
                    key: pad4(&kv.key),
                    value: pad4(&kv.value),
                })
            })
            .collect(),
        meta: c.meta.as_ref().map(|m| SpanMeta {
            index: pad2(&m.index),
            span: pad2(&m.span),
            doc: pad2(&m.doc),
        }),
    }
}
