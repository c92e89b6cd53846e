//! The mid block shared by encoder and decoder: ResNet, spatial self-attention, ResNet
//! (diffusers `UNetMidBlock2D` with one layer).

use burn::prelude::*;

use super::attention::SpatialSelfAttention;
use super::config::VaeConfig;
use crate::resnet::ResnetBlock;

/// `resnets[1](attentions[0](resnets[0](x)))`; the vectors mirror diffusers' key layout
/// (`mid_block.resnets.{0,1}`, `mid_block.attentions.0`). Without attention
/// (`mid_attention = false`) `attentions` is empty.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    /// The two ResNet blocks.
    pub resnets: Vec<ResnetBlock<B>>,
    /// The attention layer between them (zero or one).
    pub attentions: Vec<SpatialSelfAttention<B>>,
}

impl<B: Backend> MidBlock<B> {
    /// Builds the block for `channels` channels.
    pub fn new(config: &VaeConfig, channels: usize, device: &B::Device) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| config.resnet(channels, channels, device))
                .collect(),
            attentions: config
                .mid_attention
                .then(|| SpatialSelfAttention::new(config, channels, device))
                .into_iter()
                .collect(),
        }
    }

    /// # Shapes
    /// `[N, c, H, W] -> [N, c, H, W]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, None);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attn.forward(x), None);
        }
        if self.attentions.is_empty() {
            x = self.resnets[1].forward(x, None);
        }
        x
    }
}
