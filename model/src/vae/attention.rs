//! Single-head self-attention over the spatial positions of a feature map, as in the mid
//! block of diffusers' `AutoencoderKL` (`Attention` with one head, GroupNorm in front,
//! residual connection).

use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::config::VaeConfig;

/// `x + to_out(attention(to_q(n), to_k(n), to_v(n)))` with `n = group_norm(x)` seen as
/// `H*W` tokens of width `c`. Field names follow diffusers (`to_out` is its `to_out.0`).
#[derive(Module, Debug)]
pub struct SpatialSelfAttention<B: Backend> {
    /// Norm in front of the projections.
    pub group_norm: GroupNorm<B>,
    /// Query projection.
    pub to_q: Linear<B>,
    /// Key projection.
    pub to_k: Linear<B>,
    /// Value projection.
    pub to_v: Linear<B>,
    /// Output projection.
    pub to_out: Linear<B>,
}

impl<B: Backend> SpatialSelfAttention<B> {
    /// Builds the layer for `channels` channels.
    pub fn new(config: &VaeConfig, channels: usize, device: &B::Device) -> Self {
        let linear = || LinearConfig::new(channels, channels).init(device);
        Self {
            group_norm: config.group_norm(channels, device),
            to_q: linear(),
            to_k: linear(),
            to_v: linear(),
            to_out: linear(),
        }
    }

    /// # Shapes
    /// `[N, c, H, W] -> [N, c, H, W]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        // [N, c, H, W] -> [N, c, H*W] -> [N, H*W, c]
        let tokens = self
            .group_norm
            .forward(x.clone())
            .reshape([n, c, h * w])
            .swap_dims(1, 2);
        // [N, H*W, c] -> [N, 1, H*W, c]: one head of width c
        let head = |t: Tensor<B, 3>| t.reshape([n, 1, h * w, c]);
        let q = head(self.to_q.forward(tokens.clone()));
        let k = head(self.to_k.forward(tokens.clone()));
        let v = head(self.to_v.forward(tokens));
        let out = attention(q, k, v, None, None, AttentionModuleOptions::default());
        // [N, 1, H*W, c] -> [N, H*W, c] -> [N, c, H*W] -> [N, c, H, W]
        let out = self
            .to_out
            .forward(out.reshape([n, h * w, c]))
            .swap_dims(1, 2)
            .reshape([n, c, h, w]);
        x + out
    }
}
