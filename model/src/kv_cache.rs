//! The key/value cache for incremental decoding.
//!
//! One entry per layer holds the keys and values of every cached position, and one shared
//! [`SpanMeta`] records those positions' indices, image spans and documents so the
//! Transfusion mask can be built between new queries and cached keys.
//!
//! Diffusion steps run the `n` noisy patches against the cached prefix *without* appending
//! (the cache does not grow while denoising); after the last step the clean image is run
//! once more in append mode. [`KvCache::truncate`] rolls the cache back to any earlier
//! length, and `clone()` is a cheap snapshot (tensors are reference-counted).

use burn::prelude::*;

use crate::mask::SpanMeta;

/// Cached keys and values of one layer.
#[derive(Clone, Debug)]
pub struct LayerKv<B: Backend> {
    /// Keys after RoPE. Shape `[b, h_kv, len, hd]`.
    pub key: Tensor<B, 4>,
    /// Values. Shape `[b, h_kv, len, hd]`.
    pub value: Tensor<B, 4>,
}

impl<B: Backend> LayerKv<B> {
    /// Applies `f` to the keys and to the values.
    pub fn map(self, f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>) -> Self {
        Self {
            key: f(self.key),
            value: f(self.value),
        }
    }

    /// Appends new positions along the sequence axis.
    ///
    /// # Shapes
    /// `[b, h_kv, l1, hd]` and `[b, h_kv, l2, hd]` -> `[b, h_kv, l1 + l2, hd]`
    pub fn append(self, other: LayerKv<B>) -> Self {
        Self {
            key: Tensor::cat(vec![self.key, other.key], 2),
            value: Tensor::cat(vec![self.value, other.value], 2),
        }
    }

    /// Keeps the first `len` positions.
    ///
    /// # Shapes
    /// `[b, h_kv, l, hd] -> [b, h_kv, len, hd]`
    pub fn truncate(self, len: usize) -> Self {
        self.map(|t| t.narrow(2, 0, len))
    }

    /// Stacks the caches of several batches of the same length row-wise.
    ///
    /// # Shapes
    /// `[b_i, h_kv, l, hd]` each -> `[sum b_i, h_kv, l, hd]`
    pub fn cat_rows(parts: Vec<Self>) -> Self {
        let (keys, values): (Vec<_>, Vec<_>) =
            parts.into_iter().map(|kv| (kv.key, kv.value)).unzip();
        Self {
            key: Tensor::cat(keys, 0),
            value: Tensor::cat(values, 0),
        }
    }
}

/// The prefix cache of a whole model.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    /// One entry per transformer layer; `None` before anything is cached.
    pub layers: Vec<Option<LayerKv<B>>>,
    /// Metadata of the cached positions (`None` when empty).
    pub meta: Option<SpanMeta<B>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            meta: None,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.meta.as_ref().map_or(0, |m| m.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rolls the cache back to its first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        for layer in self.layers.iter_mut() {
            *layer = layer.take().map(|kv| kv.truncate(len));
        }
        self.meta = self.meta.take().map(|m| m.truncate(len));
        if len == 0 {
            self.meta = None;
            self.layers.iter_mut().for_each(|l| *l = None);
        }
    }

    /// Records the metadata of newly appended positions (called once per forward, after
    /// every layer appended its keys).
    pub(crate) fn append_meta(&mut self, meta: SpanMeta<B>) {
        self.meta = Some(match self.meta.take() {
            Some(old) => old.cat(meta),
            None => meta,
        });
    }

    /// The next free absolute index (the length of the cached row).
    pub fn next_index(&self) -> usize {
        self.len()
    }

    /// Applies `layer` to every cached layer and `meta` to the metadata.
    fn map(
        &self,
        layer: impl Fn(LayerKv<B>) -> LayerKv<B>,
        meta: impl FnOnce(SpanMeta<B>) -> SpanMeta<B>,
    ) -> Self {
        Self {
            layers: self.layers.iter().map(|l| l.clone().map(&layer)).collect(),
            meta: self.meta.clone().map(meta),
        }
    }

    /// The rows `idx` (repeats allowed), e.g. one prompt's cache repeated for N images.
    /// Cheap: one `select` per cached tensor.
    ///
    /// # Shapes
    /// every `[b, ..]` tensor -> `[idx.len(), ..]`
    pub fn select(&self, idx: Tensor<B, 1, Int>) -> Self {
        let rows = |t: Tensor<B, 4>| t.select(0, idx.clone());
        self.map(|kv| kv.map(rows), |m| m.select(idx.clone()))
    }

    /// The cache left-padded to `len` positions with masked padding (zero keys and values,
    /// document id 0). `len` must be at least [`KvCache::len`].
    ///
    /// # Shapes
    /// `[b, .., l, ..]` -> `[b, .., len, ..]`
    pub fn pad_left(&self, len: usize) -> Self {
        let n = len - self.len();
        if n == 0 {
            return self.clone();
        }
        // [b, h_kv, l, hd] -> [b, h_kv, n + l, hd]
        let pad = |t: Tensor<B, 4>| {
            let [b, h, _, hd] = t.dims();
            Tensor::cat(vec![Tensor::zeros([b, h, n, hd], &t.device()), t], 2)
        };
        self.map(|kv| kv.map(pad), |m| m.pad_left(n))
    }

    /// Stacks the caches of several batches into one, left-padding the shorter ones to the
    /// longest (see [`KvCache::pad_left`]). Every part must be non-empty.
    ///
    /// # Shapes
    /// `[b_i, .., l_i, ..]` each -> `[sum b_i, .., max l_i, ..]`
    pub fn cat_rows(parts: &[&Self]) -> Self {
        let len = parts.iter().map(|c| c.len()).max().unwrap_or(0);
        let padded: Vec<Self> = parts.iter().map(|c| c.pad_left(len)).collect();
        let n_layers = padded.first().map_or(0, |c| c.layers.len());
        let layers = (0..n_layers)
            .map(|l| {
                let kvs = padded
                    .iter()
                    .map(|c| c.layers[l].clone().expect("a started cache is full"))
                    .collect();
                Some(LayerKv::cat_rows(kvs))
            })
            .collect();
        let metas = padded
            .into_iter()
            .map(|c| c.meta.expect("a started cache has metadata"))
            .collect();
        Self {
            layers,
            meta: Some(SpanMeta::cat_rows(metas)),
        }
    }
}

/// How a forward pass uses the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Attend to the cache and append the new positions to it.
    Append,
    /// Attend to the cache but leave it unchanged (diffusion steps).
    ReadOnly,
}
