//! Convolutional building blocks shared by the U-Net patch adapter and the VAE: a ResNet
//! block with optional timestep conditioning, 2x down-sampling and 2x up-sampling.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::silu;

/// A 3x3 convolution with "same" padding.
pub fn conv3x3<B: Backend>(c_in: usize, c_out: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// Largest group count `<= wanted` that divides `channels` (GroupNorm needs a divisor).
pub fn group_count(channels: usize, wanted: usize) -> usize {
    (1..=wanted.min(channels))
        .rev()
        .find(|g| channels % g == 0)
        .unwrap_or(1)
}

/// Configuration of [`ResnetBlock`].
#[derive(Config, Debug)]
pub struct ResnetBlockConfig {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// GroupNorm groups (1 makes it a LayerNorm over channels and space).
    #[config(default = 32)]
    pub groups: usize,
    /// Width of the timestep embedding, `None` for an unconditioned block (VAE).
    pub d_temb: Option<usize>,
    /// GroupNorm epsilon (PyTorch's default 1e-5; diffusers' autoencoder uses 1e-6).
    #[config(default = 1e-5)]
    pub norm_eps: f64,
}

impl ResnetBlockConfig {
    /// Builds the block.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock<B> {
        let norm = |c| {
            GroupNormConfig::new(group_count(c, self.groups), c)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        ResnetBlock {
            norm1: norm(self.c_in),
            conv1: conv3x3(self.c_in, self.c_out, device),
            temb_proj: self
                .d_temb
                .map(|d| LinearConfig::new(d, self.c_out).init(device)),
            norm2: norm(self.c_out),
            conv2: conv3x3(self.c_out, self.c_out, device),
            shortcut: (self.c_in != self.c_out)
                .then(|| Conv2dConfig::new([self.c_in, self.c_out], [1, 1]).init(device)),
        }
    }
}

/// `x + conv(silu(norm(conv(silu(norm(x))) + temb)))`, with a 1x1 shortcut when the
/// channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock<B: Backend> {
    /// First norm.
    pub norm1: GroupNorm<B>,
    /// First convolution.
    pub conv1: Conv2d<B>,
    /// Projection of the timestep embedding added after the first convolution.
    pub temb_proj: Option<Linear<B>>,
    /// Second norm.
    pub norm2: GroupNorm<B>,
    /// Second convolution.
    pub conv2: Conv2d<B>,
    /// 1x1 convolution on the residual path when channels change.
    pub shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock<B> {
    /// # Shapes
    /// - `x`: `[N, c_in, H, W]`, `temb`: `[N, d_temb]` (ignored if the block has none)
    /// - output: `[N, c_out, H, W]`
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = match (&self.temb_proj, temb) {
            (Some(proj), Some(t)) => {
                let [n, c, hh, ww] = h.dims();
                // [N, d_temb] -> [N, c] -> [N, c, 1, 1]
                h + proj
                    .forward(silu(t.clone()))
                    .reshape([n, c, 1, 1])
                    .expand([n, c, hh, ww])
            }
            _ => h,
        };
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}

/// 2x down-sampling by a strided 3x3 convolution.
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    /// The strided convolution.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample<B> {
    /// Builds the layer for `channels` channels with symmetric padding 1.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self::with_padding(channels, PaddingConfig2d::Explicit(1, 1, 1, 1), device)
    }

    /// Builds the layer with explicit `padding` (`Explicit(top, left, bottom, right)`), e.g.
    /// diffusers' autoencoder pads only bottom and right: `Explicit(0, 0, 1, 1)`.
    pub fn with_padding(channels: usize, padding: PaddingConfig2d, device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(padding)
                .init(device),
        }
    }

    /// # Shapes
    /// `[N, c, H, W] -> [N, c, H/2, W/2]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(x)
    }
}

/// 2x nearest-neighbour up-sampling followed by a 3x3 convolution.
#[derive(Module, Debug)]
pub struct Upsample<B: Backend> {
    /// The convolution after up-sampling.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample<B> {
    /// Builds the layer for `channels` channels.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv3x3(channels, channels, device),
        }
    }

    /// # Shapes
    /// `[N, c, H, W] -> [N, c, 2H, 2W]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(upsample_nearest2x(x))
    }
}

/// Nearest-neighbour 2x up-sampling by broadcasting.
///
/// # Shapes
/// `[N, c, H, W] -> [N, c, 2H, 2W]`
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1])
        .expand([n, c, h, 2, w, 2])
        .reshape([n, c, 2 * h, 2 * w])
}
