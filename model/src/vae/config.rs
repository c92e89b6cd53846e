//! [`VaeConfig`]: the shape of a KL autoencoder (diffusers `AutoencoderKL` layout), its
//! presets, and its parameter count computed from the config alone.

use burn::prelude::*;

use super::decoder::Decoder;
use super::encoder::Encoder;
use super::AutoencoderKl;
use crate::resnet::group_count;

/// Configuration of an [`AutoencoderKl`].
///
/// Level `i` of the encoder has `base_channels * channel_mults[i]` channels; every level
/// but the last halves the resolution, so the down-sampling factor is
/// `2^(channel_mults.len() - 1)` (4x: 3 levels, 8x: 4 levels, 16x: 5 levels).
/// Latents handed to the diffusion model are `(z - shift_factor) * scaling_factor`.
#[derive(Config, Debug)]
pub struct VaeConfig {
    /// Image channels in and out (3 for RGB).
    #[config(default = 3)]
    pub image_channels: usize,
    /// Channels of the first level (diffusers `block_out_channels[0]`).
    pub base_channels: usize,
    /// Per-level channel multipliers of `base_channels`; one entry per level.
    pub channel_mults: Vec<usize>,
    /// ResNet blocks per encoder level (diffusers `layers_per_block`); the decoder has one
    /// more per level.
    pub blocks_per_level: usize,
    /// Latent channels `c` (4, 8 or 16 in practice).
    pub latent_channels: usize,
    /// GroupNorm groups (diffusers `norm_num_groups`); lowered to a divisor of the
    /// channel count where needed.
    #[config(default = 32)]
    pub norm_groups: usize,
    /// GroupNorm epsilon (diffusers' autoencoder uses 1e-6).
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Self-attention in the mid blocks (diffusers `mid_block_add_attention`).
    #[config(default = true)]
    pub mid_attention: bool,
    /// 1x1 convolution on the encoder's moments (diffusers `use_quant_conv`).
    #[config(default = true)]
    pub use_quant_conv: bool,
    /// 1x1 convolution before the decoder (diffusers `use_post_quant_conv`).
    #[config(default = true)]
    pub use_post_quant_conv: bool,
    /// Latent scale: `latent = (z - shift_factor) * scaling_factor`.
    #[config(default = 1.0)]
    pub scaling_factor: f64,
    /// Latent shift, see `scaling_factor`.
    #[config(default = 0.0)]
    pub shift_factor: f64,
}

impl VaeConfig {
    /// The paper's autoencoder: 8x down-sampling, 8 latent channels, the Stable Diffusion
    /// VAE's body (128 base channels, multipliers 1, 2, 4, 4, 2 blocks per level):
    /// 83,709,419 parameters (the paper says "86M"; it does not give the exact layout).
    /// The scaling factor is 1 until a trained VAE's latent statistics set it.
    pub fn paper() -> Self {
        Self::new(128, vec![1, 2, 4, 4], 2, 8)
    }

    /// The Stable Diffusion VAE (`AutoencoderKL` of SD 1.x/2.x): 8x, 4 latent channels,
    /// scaling factor 0.18215; 83,653,863 parameters.
    pub fn sd() -> Self {
        Self::new(128, vec![1, 2, 4, 4], 2, 4).with_scaling_factor(0.18215)
    }

    /// A small autoencoder for the demo and tests: 32 base channels, multipliers 1, 2
    /// (2x down-sampling), one block per level, 4 latent channels, 8 norm groups. Trains
    /// on 32x32 images on a CPU in minutes.
    pub fn tiny() -> Self {
        Self::new(32, vec![1, 2], 1, 4).with_norm_groups(8)
    }

    /// Number of resolution levels (`channel_mults.len()`).
    pub fn levels(&self) -> usize {
        self.channel_mults.len()
    }

    /// Spatial down-sampling factor `2^(levels - 1)`.
    pub fn down_factor(&self) -> usize {
        1 << (self.levels().max(1) - 1)
    }

    /// The same config with `log2(factor) + 1` levels: multipliers are cut, or the last
    /// one is repeated. Panics unless `factor` is a power of two.
    pub fn with_down_factor(mut self, factor: usize) -> Self {
        assert!(
            factor.is_power_of_two(),
            "down-sampling factor should be a power of two, got {factor}"
        );
        let levels = factor.trailing_zeros() as usize + 1;
        let last = *self.channel_mults.last().unwrap_or(&1);
        self.channel_mults.resize(levels, last);
        self
    }

    /// Channels of each level (diffusers `block_out_channels`).
    pub fn block_out_channels(&self) -> Vec<usize> {
        self.channel_mults
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// Group count used by a GroupNorm over `channels` channels.
    pub fn groups_for(&self, channels: usize) -> usize {
        group_count(channels, self.norm_groups)
    }

    /// Latent for the diffusion model from a VAE sample: `(z - shift) * scale`.
    pub fn scale_latent<B: Backend>(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        (z - self.shift_factor) * self.scaling_factor
    }

    /// Inverse of [`VaeConfig::scale_latent`]: `latent / scale + shift`.
    pub fn unscale_latent<B: Backend>(&self, latent: Tensor<B, 4>) -> Tensor<B, 4> {
        latent / self.scaling_factor + self.shift_factor
    }

    /// Builds the autoencoder. Panics on an empty `channel_mults`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> AutoencoderKl<B> {
        assert!(
            !self.channel_mults.is_empty(),
            "VaeConfig::channel_mults should have at least one level"
        );
        let c2 = 2 * self.latent_channels;
        let c = self.latent_channels;
        AutoencoderKl {
            encoder: Encoder::new(self, device),
            decoder: Decoder::new(self, device),
            quant_conv: self.use_quant_conv.then(|| conv1x1(c2, c2, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv1x1(c, c, device)),
        }
    }

    /// Counts the parameters [`VaeConfig::init`] creates (without allocating them).
    pub fn param_count(&self) -> usize {
        let conv3 = |i: usize, o: usize| 9 * i * o + o;
        let conv1 = |i: usize, o: usize| i * o + o;
        let norm = |c: usize| 2 * c;
        let resnet = |i: usize, o: usize| {
            norm(i) + conv3(i, o) + norm(o) + conv3(o, o) + if i != o { conv1(i, o) } else { 0 }
        };
        let attention = |c: usize| norm(c) + 4 * conv1(c, c);
        let mid = |c: usize| 2 * resnet(c, c) + if self.mid_attention { attention(c) } else { 0 };
        let ch = self.block_out_channels();
        let levels = ch.len();
        let top = ch[levels - 1];
        let (c, lc) = (self.image_channels, self.latent_channels);

        let mut encoder = conv3(c, ch[0]);
        let mut c_prev = ch[0];
        for (i, &co) in ch.iter().enumerate() {
            for j in 0..self.blocks_per_level {
                encoder += resnet(if j == 0 { c_prev } else { co }, co);
            }
            if i + 1 < levels {
                encoder += conv3(co, co);
            }
            c_prev = co;
        }
        encoder += mid(top) + norm(top) + conv3(top, 2 * lc);

        let mut decoder = conv3(lc, top) + mid(top);
        let mut c_prev = top;
        for (i, &co) in ch.iter().rev().enumerate() {
            for j in 0..=self.blocks_per_level {
                decoder += resnet(if j == 0 { c_prev } else { co }, co);
            }
            if i + 1 < levels {
                decoder += conv3(co, co);
            }
            c_prev = co;
        }
        decoder += norm(ch[0]) + conv3(ch[0], c);

        let quant = if self.use_quant_conv {
            conv1(2 * lc, 2 * lc)
        } else {
            0
        };
        let post_quant = if self.use_post_quant_conv {
            conv1(lc, lc)
        } else {
            0
        };
        encoder + decoder + quant + post_quant
    }
}

/// A 1x1 convolution with bias.
pub(crate) fn conv1x1<B: Backend>(
    c_in: usize,
    c_out: usize,
    device: &B::Device,
) -> burn::nn::conv::Conv2d<B> {
    burn::nn::conv::Conv2dConfig::new([c_in, c_out], [1, 1]).init(device)
}

impl VaeConfig {
    /// A GroupNorm over `channels` with this config's groups and epsilon.
    pub(crate) fn group_norm<B: Backend>(
        &self,
        channels: usize,
        device: &B::Device,
    ) -> burn::nn::GroupNorm<B> {
        burn::nn::GroupNormConfig::new(self.groups_for(channels), channels)
            .with_epsilon(self.norm_eps)
            .init(device)
    }

    /// The shared [`ResnetBlock`](crate::resnet::ResnetBlock) without timestep
    /// conditioning, with this config's norm epsilon.
    pub(crate) fn resnet<B: Backend>(
        &self,
        c_in: usize,
        c_out: usize,
        device: &B::Device,
    ) -> crate::resnet::ResnetBlock<B> {
        crate::resnet::ResnetBlockConfig::new(c_in, c_out)
            .with_groups(self.norm_groups)
            .with_norm_eps(self.norm_eps)
            .init(device)
    }

    /// The shared [`Downsample`](crate::resnet::Downsample) with diffusers' padding:
    /// zero rows/columns added at the bottom and right only (`F.pad(x, (0, 1, 0, 1))`),
    /// then a stride-2 3x3 convolution without padding. Same output shape as the
    /// symmetric padding of `Downsample::new` for even sizes; pretrained weights expect
    /// this alignment.
    pub(crate) fn downsample<B: Backend>(
        &self,
        channels: usize,
        device: &B::Device,
    ) -> crate::resnet::Downsample<B> {
        // (top, left, bottom, right)
        crate::resnet::Downsample::with_padding(
            channels,
            burn::nn::PaddingConfig2d::Explicit(0, 0, 1, 1),
            device,
        )
    }
}
