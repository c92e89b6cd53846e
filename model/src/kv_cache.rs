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
    /// Appends new positions along the sequence axis.
    pub fn append(self, other: LayerKv<B>) -> Self {
        Self {
            key: Tensor::cat(vec![self.key, other.key], 2),
            value: Tensor::cat(vec![self.value, other.value], 2),
        }
    }

    /// Keeps the first `len` positions.
    pub fn truncate(self, len: usize) -> Self {
        Self {
            key: self.key.narrow(2, 0, len),
            value: self.value.narrow(2, 0, len),
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
}

/// How a forward pass uses the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Attend to the cache and append the new positions to it.
    Append,
    /// Attend to the cache but leave it unchanged (diffusion steps).
    ReadOnly,
}
