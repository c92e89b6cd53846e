//! The encoder: image to the moments (mean, log-variance) of the latent posterior
//! (diffusers `Encoder` with `DownEncoderBlock2D` levels).

use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::prelude::*;
use burn::tensor::activation::silu;

use super::config::VaeConfig;
use super::mid_block::MidBlock;
use crate::resnet::{conv3x3, Downsample, ResnetBlock};

/// One resolution level: ResNet blocks, then 2x down-sampling except at the last level.
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    /// `blocks_per_level` ResNet blocks.
    pub resnets: Vec<ResnetBlock<B>>,
    /// Down-sampling (diffusers `downsamplers.0`), absent at the last level.
    pub downsampler: Option<Downsample<B>>,
}

impl<B: Backend> DownBlock<B> {
    /// # Shapes
    /// `[N, c_in, H, W] -> [N, c_out, H/2, W/2]` (`H, W` kept at the last level)
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for resnet in &self.resnets {
            x = resnet.forward(x, None);
        }
        match &self.downsampler {
            Some(down) => down.forward(x),
            None => x,
        }
    }
}

/// `conv_in`, the down levels, the mid block, `conv_norm_out` + SiLU, `conv_out` to
/// `2 * latent_channels` moments.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// 3x3 convolution from the image channels.
    pub conv_in: Conv2d<B>,
    /// Resolution levels, finest first.
    pub down_blocks: Vec<DownBlock<B>>,
    /// ResNet + attention + ResNet at the coarsest level.
    pub mid_block: MidBlock<B>,
    /// Final norm.
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3 convolution to the moments.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    /// Builds the encoder of `config`.
    pub fn new(config: &VaeConfig, device: &B::Device) -> Self {
        let ch = config.block_out_channels();
        let levels = ch.len();
        let top = ch[levels - 1];
        let mut c_prev = ch[0];
        let down_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let resnets = (0..config.blocks_per_level)
                    .map(|j| config.resnet(if j == 0 { c_prev } else { c }, c, device))
                    .collect();
                c_prev = c;
                DownBlock {
                    resnets,
                    downsampler: (i + 1 < levels).then(|| config.downsample(c, device)),
                }
            })
            .collect();
        Self {
            conv_in: conv3x3(config.image_channels, ch[0], device),
            down_blocks,
            mid_block: MidBlock::new(config, top, device),
            conv_norm_out: config.group_norm(top, device),
            conv_out: conv3x3(top, 2 * config.latent_channels, device),
        }
    }

    /// # Shapes
    /// `[N, 3, H, W] -> [N, 2c, H/f, W/f]` with `f` the down-sampling factor
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.conv_in.forward(x);
        for block in &self.down_blocks {
            x = block.forward(x);
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
