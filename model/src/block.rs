//! One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;

use crate::attention::{Attention, AttentionConfig, LayerContext};
use crate::kv_cache::LayerKv;
use crate::mlp::{SwiGluMlp, SwiGluMlpConfig};

/// Configuration of [`DecoderBlock`].
#[derive(Config, Debug)]
pub struct DecoderBlockConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// SwiGLU hidden width.
    pub d_hidden: usize,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
}

impl DecoderBlockConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DecoderBlock<B> {
        let norm = || {
            RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        DecoderBlock {
            attn_norm: norm(),
            attn: AttentionConfig::new(self.d_model, self.n_heads, self.n_kv_heads).init(device),
            mlp_norm: norm(),
            mlp: SwiGluMlpConfig::new(self.d_model, self.d_hidden).init(device),
        }
    }
}

/// A Llama-style decoder layer.
#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm before the MLP.
    pub mlp_norm: RmsNorm<B>,
    /// SwiGLU MLP.
    pub mlp: SwiGluMlp<B>,
}

impl<B: Backend> DecoderBlock<B> {
    /// # Shapes
    /// - `x`: `[b, s, d]`, `ctx.mask`: `[b, s, past + s]`; output `[b, s, d]`
    ///
    /// Norms and the residual stream stay in f32; attention and MLP products run in
    /// `ctx.precision`. Also returns the new positions' keys/values (see
    /// [`Attention::forward`]).
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LayerContext<B>) -> (Tensor<B, 3>, LayerKv<B>) {
        let normed = self.attn_norm.forward(x.clone());
        let (a, kv) = self.attn.forward(normed, ctx);
        let x = x + a;
        let x = x.clone() + self.mlp.forward(self.mlp_norm.forward(x), ctx.precision);
        (x, kv)
    }
}
