//! The decoder: latent to image (diffusers `Decoder` with `UpDecoderBlock2D` levels).

use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::prelude::*;
use burn::tensor::activation::silu;

use super::config::VaeConfig;
use super::mid_block::MidBlock;
use crate::resnet::{conv3x3, ResnetBlock, Upsample};

/// One resolution level: `blocks_per_level + 1` ResNet blocks, then 2x up-sampling
/// except at the last (finest) level.
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    /// The ResNet blocks.
    pub resnets: Vec<ResnetBlock<B>>,
    /// Up-sampling (diffusers `upsamplers.0`), absent at the finest level.
    pub upsampler: Option<Upsample<B>>,
}

impl<B: Backend> UpBlock<B> {
    /// # Shapes
    /// `[N, c_in, H, W] -> [N, c_out, 2H, 2W]` (`H, W` kept at the finest level)
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for resnet in &self.resnets {
            x = resnet.forward(x, None);
        }
        match &self.upsampler {
            Some(up) => up.forward(x),
            None => x,
        }
    }
}

/// `conv_in`, the mid block, the up levels (coarsest first, as diffusers' `up_blocks`),
/// `conv_norm_out` + SiLU, `conv_out` to the image channels.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// 3x3 convolution from the latent channels.
    pub conv_in: Conv2d<B>,
    /// ResNet + attention + ResNet at the coarsest level.
    pub mid_block: MidBlock<B>,
    /// Resolution levels, coarsest first.
    pub up_blocks: Vec<UpBlock<B>>,
    /// Final norm.
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3 convolution to the image.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    /// Builds the decoder of `config`.
    pub fn new(config: &VaeConfig, device: &B::Device) -> Self {
        let ch: Vec<usize> = config.block_out_channels().into_iter().rev().collect();
        let levels = ch.len();
        let mut c_prev = ch[0];
        let up_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let resnets = (0..=config.blocks_per_level)
                    .map(|j| config.resnet(if j == 0 { c_prev } else { c }, c, device))
                    .collect();
                c_prev = c;
                UpBlock {
                    resnets,
                    upsampler: (i + 1 < levels).then(|| Upsample::new(c, device)),
                }
            })
            .collect();
        Self {
            conv_in: conv3x3(config.latent_channels, ch[0], device),
            mid_block: MidBlock::new(config, ch[0], device),
            up_blocks,
            conv_norm_out: config.group_norm(ch[levels - 1], device),
            conv_out: conv3x3(ch[levels - 1], config.image_channels, device),
        }
    }

    /// # Shapes
    /// `[N, c, h, w] -> [N, 3, h*f, w*f]` with `f` the down-sampling factor
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.mid_block.forward(self.conv_in.forward(z));
        for block in &self.up_blocks {
            x = block.forward(x);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
