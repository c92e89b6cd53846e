//! Multi-head (optionally grouped-query) self-attention with rotary position embeddings:
//! project, move the heads first, attend, move them back, project. Which kernel attends
//! and how the heads move are [`crate::ops`]' choice, made once per pass.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::kv_cache::LayerKv;
use crate::ops::{self, AttentionMask, HeadLayout};
use crate::precision::Precision;
use crate::rope::RopeTables;

/// Configuration of [`Attention`].
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Query heads `h`.
    pub n_heads: usize,
    /// Key/value heads (`h` for plain multi-head attention; a divisor of `h` for GQA).
    pub n_kv_heads: usize,
}

impl AttentionConfig {
    /// Builds the layer (no biases).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let hd = self.d_model / self.n_heads;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Attention {
            wq: lin(self.d_model, self.n_heads * hd),
            wk: lin(self.d_model, self.n_kv_heads * hd),
            wv: lin(self.d_model, self.n_kv_heads * hd),
            wo: lin(self.n_heads * hd, self.d_model),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: hd,
        }
    }
}

/// Self-attention layer.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection.
    pub wq: Linear<B>,
    /// Key projection.
    pub wk: Linear<B>,
    /// Value projection.
    pub wv: Linear<B>,
    /// Output projection.
    pub wo: Linear<B>,
    /// Query heads `h`.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head dimension `hd`.
    pub head_dim: usize,
}

/// What a decoder layer needs besides its input `x`: built once per layer of a forward
/// pass and handed down from the block to its attention.
#[derive(Debug)]
pub struct LayerContext<'a, B: Backend> {
    /// RoPE tables for the `s` new positions, for the query heads.
    pub rope_q: &'a RopeTables<B>,
    /// RoPE tables for the `s` new positions, for the key/value heads.
    pub rope_k: &'a RopeTables<B>,
    /// Which keys each query may not see, `[b, h, s, past + s]`, in the form of the pass
    /// (see [`AttentionMask`]).
    pub mask: &'a AttentionMask<B>,
    /// How the heads move between the projections' layout and the attention's.
    pub head_layout: &'a HeadLayout<B>,
    /// This layer's cached keys/values (`past` positions), if any.
    pub past: Option<&'a LayerKv<B>>,
    /// The type of the matrix products.
    pub precision: Precision,
    /// `[b, s]`, `true` at the new positions that are image patches: set when the model
    /// has untied modality weights (see [`crate::block::DecoderBlock`]).
    pub image_positions: Option<Tensor<B, 2, Bool>>,
}

impl<B: Backend> Attention<B> {
    /// Attends the new positions `x` to `ctx.past` (cached keys) followed by themselves.
    ///
    /// Returns the output and the new positions' keys/values (for the caller to cache).
    ///
    /// # Shapes
    /// - `x`: `[b, s, d]`; `ctx.mask`: `[b, h, s, past + s]`
    /// - output: `[b, s, d]`; returned keys/values `[b, h_kv, s, hd]`
    ///
    /// The projections and the attention run in `ctx.precision`; keys/values are returned
    /// (and cached) in f32.
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LayerContext<B>) -> (Tensor<B, 3>, LayerKv<B>) {
        let (q, k, v) = self.project(x, ctx);
        let (out, kv) = self.attend(q, k, v, ctx);
        (self.output(out, ctx), kv)
    }

    /// The rotated queries and keys, and the values, of the new positions.
    ///
    /// # Shapes
    /// - `x`: `[b, s, d]`; output `[b, h, s, hd]`, `[b, h_kv, s, hd]`, `[b, h_kv, s, hd]`
    pub fn project(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = x.dims();
        let hd = self.head_dim;
        // [b, s, h*hd] -> [b, s, h, hd] (rotated in this layout) -> [b, h, s, hd]
        let heads = |w: &Linear<B>, x, h| ctx.precision.linear(w, x).reshape([b, s, h, hd]);
        let layout = ctx.head_layout;
        let q = layout.rotated_heads_first(heads(&self.wq, x.clone(), self.n_heads), ctx.rope_q);
        let k = layout.rotated_heads_first(heads(&self.wk, x.clone(), self.n_kv_heads), ctx.rope_k);
        let v = layout.heads_first(heads(&self.wv, x, self.n_kv_heads));
        (q, k, v)
    }

    /// Attends the new positions' queries to `ctx.past` followed by their own keys/values.
    ///
    /// # Shapes
    /// - `q`: `[b, h, s, hd]`, `k`, `v`: `[b, h_kv, s, hd]`
    /// - output: `[b, s, h*hd]` (before the output projection); keys/values as given
    pub fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        ctx: &LayerContext<B>,
    ) -> (Tensor<B, 3>, LayerKv<B>) {
        let h = q.dims()[1];
        let precision = ctx.precision;
        let new = LayerKv { key: k, value: v };
        let all = match ctx.past {
            Some(p) => p.clone().append(new.clone()),
            None => new.clone(),
        };
        let k = repeat_kv(all.key, h / self.n_kv_heads);
        let v = repeat_kv(all.value, h / self.n_kv_heads);
        let [q, k, v] = [q, k, v].map(|t| precision.to_compute(t));
        let out = ops::attention(q, k, v, ctx.mask, precision);
        let out = precision.to_f32(out);
        // [b, h, s, hd] -> [b, s, h*hd]
        (ctx.head_layout.heads_last(out), new)
    }

    /// The output projection.
    ///
    /// # Shapes
    /// `[b, s, h*hd] -> [b, s, d]`
    pub fn output(&self, out: Tensor<B, 3>, ctx: &LayerContext<B>) -> Tensor<B, 3> {
        ctx.precision.linear(&self.wo, out)
    }
}

/// Repeats each key/value head `rep` times for grouped-query attention.
///
/// # Shapes
/// `[b, h_kv, l, hd] -> [b, h_kv * rep, l, hd]`
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, hkv, l, hd] = x.dims();
    x.reshape([b, hkv, 1, l, hd])
        .expand([b, hkv, rep, l, hd])
        .reshape([b, hkv * rep, l, hd])
}
