//! The U-Net patch adapter: down blocks encode the noisy latent before patching, up blocks
//! (with skip connections) decode the transformer's output after unpatching.
//!
//! With `L` levels the down path halves the resolution `L - 1` times, so the transformer
//! sees patches of side `k / 2^(L-1)` over the down-sampled feature map and still `n =
//! (H/k)(W/k)` tokens per image.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::config::UNetConfig;
use crate::patch::{patchify, unpatchify};
use crate::resnet::{conv3x3, group_count, Downsample, ResnetBlock, ResnetBlockConfig, Upsample};

/// One level of the down path.
#[derive(Module, Debug)]
pub struct DownLevel<B: Backend> {
    /// ResNet blocks of the level.
    pub blocks: Vec<ResnetBlock<B>>,
    /// Down-sampling after the level (`None` on the last level).
    pub down: Option<Downsample<B>>,
}

/// One level of the up path.
#[derive(Module, Debug)]
pub struct UpLevel<B: Backend> {
    /// ResNet blocks; the first takes the skip connection concatenated on channels.
    pub blocks: Vec<ResnetBlock<B>>,
    /// Up-sampling after the level (`None` on the top level).
    pub up: Option<Upsample<B>>,
}

/// U-Net encoder/decoder around the transformer.
#[derive(Module, Debug)]
pub struct UNetAdapter<B: Backend> {
    /// Latent channels to the first level's channels.
    pub conv_in: Conv2d<B>,
    /// Down path, top level first.
    pub down: Vec<DownLevel<B>>,
    /// Patch vector of the deepest feature map to `d`.
    pub proj_in: Linear<B>,
    /// `d` to a patch vector of the deepest feature map.
    pub proj_out: Linear<B>,
    /// Up path, deepest level first.
    pub up: Vec<UpLevel<B>>,
    /// Final norm.
    pub norm_out: GroupNorm<B>,
    /// Back to latent channels (the noise prediction).
    pub conv_out: Conv2d<B>,
    /// Patch side over the deepest feature map.
    pub inner_patch: usize,
}

/// Builds a [`UNetAdapter`].
pub fn init_unet<B: Backend>(
    cfg: &UNetConfig,
    latent_channels: usize,
    patch_size: usize,
    d_model: usize,
    d_temb: usize,
    device: &B::Device,
) -> UNetAdapter<B> {
    let levels = cfg.channels.len();
    let block = |c_in, c_out| {
        ResnetBlockConfig::new(c_in, c_out)
            .with_d_temb(Some(d_temb))
            .with_groups(cfg.norm_groups)
            .init(device)
    };
    let mut c_prev = cfg.channels[0];
    let down = cfg
        .channels
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let blocks = (0..cfg.blocks_per_level)
                .map(|j| block(if j == 0 { c_prev } else { c }, c))
                .collect();
            c_prev = c;
            DownLevel {
                blocks,
                down: (i + 1 < levels).then(|| Downsample::new(c, device)),
            }
        })
        .collect();
    let c_deep = *cfg.channels.last().expect("validated: at least one level");
    let inner_patch = patch_size / cfg.downsampling();
    let d_patch = c_deep * inner_patch * inner_patch;
    let mut c_cur = c_deep;
    let up = cfg
        .channels
        .iter()
        .enumerate()
        .rev()
        .map(|(i, &c)| {
            let blocks = (0..cfg.blocks_per_level)
                .map(|j| block(if j == 0 { c_cur + c } else { c }, c))
                .collect();
            c_cur = c;
            UpLevel {
                blocks,
                up: (i > 0).then(|| Upsample::new(c, device)),
            }
        })
        .collect();
    UNetAdapter {
        conv_in: conv3x3(latent_channels, cfg.channels[0], device),
        down,
        proj_in: LinearConfig::new(d_patch, d_model).init(device),
        proj_out: LinearConfig::new(d_model, d_patch).init(device),
        up,
        norm_out: GroupNormConfig::new(
            group_count(cfg.channels[0], cfg.norm_groups),
            cfg.channels[0],
        )
        .init(device),
        conv_out: conv3x3(cfg.channels[0], latent_channels, device),
        inner_patch,
    }
}

impl<B: Backend> UNetAdapter<B> {
    /// Down path and patch embedding. Returns the tokens and the skip activations.
    ///
    /// # Shapes
    /// - `x`: `[N, c, H, W]`, `temb`: `[N, d_temb]`
    /// - tokens: `[N, n, d]`; skips: one `[N, c_i, H_i, W_i]` per level
    pub fn encode(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
    ) -> (Tensor<B, 3>, Vec<Tensor<B, 4>>) {
        let mut h = self.conv_in.forward(x);
        let mut skips = Vec::with_capacity(self.down.len());
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(h, Some(temb));
            }
            skips.push(h.clone());
            if let Some(down) = &level.down {
                h = down.forward(h);
            }
        }
        (self.proj_in.forward(patchify(h, self.inner_patch)), skips)
    }

    /// Patch un-embedding and up path.
    ///
    /// # Shapes
    /// - `hidden`: `[N, n, d]`, skips as returned by [`UNetAdapter::encode`]
    /// - output: `[N, c, H, W]`
    pub fn decode(
        &self,
        hidden: Tensor<B, 3>,
        temb: &Tensor<B, 2>,
        skips: &[Tensor<B, 4>],
    ) -> Tensor<B, 4> {
        let [_, c_deep, hh, ww] = skips.last().expect("one skip per level").dims();
        let mut h = unpatchify(
            self.proj_out.forward(hidden),
            self.inner_patch,
            c_deep,
            hh,
            ww,
        );
        for (level, skip) in self.up.iter().zip(skips.iter().rev()) {
            h = Tensor::cat(vec![h, skip.clone()], 1);
            for block in &level.blocks {
                h = block.forward(h, Some(temb));
            }
            if let Some(up) = &level.up {
                h = up.forward(h);
            }
        }
        self.conv_out.forward(silu(self.norm_out.forward(h)))
    }
}
