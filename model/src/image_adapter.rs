//! The image adapter: noisy latents plus timesteps in, `[N, n, d]` tokens out; transformer
//! outputs at image positions in, noise prediction `[N, c, H, W]` out.
//!
//! Two options, as in the paper: [`LinearAdapter`] and the U-Net of [`crate::unet`].

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::config::{ImageIoConfig, TransfusionConfig};
use crate::patch::{patchify, unpatchify};
use crate::patch_position::patch_position_embedding;
use crate::timestep::{TimestepEmbedder, TimestepEmbedderConfig};
use crate::unet::{init_unet, UNetAdapter};

/// The linear adapter: `patch + temb -> Linear -> d`, and `d -> Linear -> patch`.
#[derive(Module, Debug)]
pub struct LinearAdapter<B: Backend> {
    /// Patch vector (`c*k*k`) to `d`.
    pub proj_in: Linear<B>,
    /// `d` to the predicted noise of a patch.
    pub proj_out: Linear<B>,
}

/// What the decoder side needs from the encoder side of one forward pass.
#[derive(Clone, Debug)]
pub struct ImageContext<B: Backend> {
    /// Timestep embedding. Shape `[N, d_temb]`.
    pub temb: Tensor<B, 2>,
    /// U-Net skip activations (empty for the linear adapter).
    pub skips: Vec<Tensor<B, 4>>,
}

/// The image adapter of a model: exactly one of the two options is present.
#[derive(Module, Debug)]
pub struct ImageAdapter<B: Backend> {
    /// Timestep conditioning.
    pub timestep: TimestepEmbedder<B>,
    /// Linear option.
    pub linear: Option<LinearAdapter<B>>,
    /// U-Net option.
    pub unet: Option<UNetAdapter<B>>,
    /// Patch side `k`.
    pub patch_size: usize,
    /// Latent channels `c`.
    pub channels: usize,
    /// Whether linear-adapter tokens get the 2D patch position embedding.
    pub position_embedding: bool,
}

/// Builds the adapter the config asks for.
pub fn init_image_adapter<B: Backend>(
    cfg: &TransfusionConfig,
    device: &B::Device,
) -> ImageAdapter<B> {
    let (linear, unet, d_temb) = match &cfg.image_io {
        ImageIoConfig::Linear => {
            let p = cfg.patch_dim();
            let adapter = LinearAdapter {
                proj_in: LinearConfig::new(p, cfg.d_model)
                    .with_bias(false)
                    .init(device),
                proj_out: LinearConfig::new(cfg.d_model, p)
                    .with_bias(false)
                    .init(device),
            };
            (Some(adapter), None, p)
        }
        ImageIoConfig::Unet(u) => {
            let d_temb = 4 * u.channels[0];
            let unet = init_unet(
                u,
                cfg.latent_channels,
                cfg.patch_size,
                cfg.d_model,
                d_temb,
                device,
            );
            (None, Some(unet), d_temb)
        }
    };
    ImageAdapter {
        timestep: TimestepEmbedderConfig::new(d_temb.max(cfg.d_timestep), d_temb)
            .with_d_freq(cfg.d_timestep)
            .init(device),
        linear,
        unet,
        patch_size: cfg.patch_size,
        channels: cfg.latent_channels,
        position_embedding: cfg.patch_position_embedding.unwrap_or(false),
    }
}

impl<B: Backend> ImageAdapter<B> {
    /// Embeds noisy latents as transformer tokens; `t` is each image's (possibly fractional)
    /// timestep.
    ///
    /// # Shapes
    /// - `x_t`: `[N, c, H, W]`, `t`: `[N]`
    /// - tokens: `[N, n, d]`
    pub fn encode(&self, x_t: Tensor<B, 4>, t: Tensor<B, 1>) -> (Tensor<B, 3>, ImageContext<B>) {
        let temb = self.timestep.forward(t);
        if let Some(unet) = &self.unet {
            let (tokens, skips) = unet.encode(x_t, &temb);
            return (tokens, ImageContext { temb, skips });
        }
        let linear = self
            .linear
            .as_ref()
            .expect("an image adapter has one option");
        // [N, n, c*k*k] + [N, 1, c*k*k]
        let patches = patchify(x_t, self.patch_size);
        let [n_img, n, p] = patches.dims();
        let patches = patches + temb.clone().reshape([n_img, 1, p]).expand([n_img, n, p]);
        let mut tokens = linear.proj_in.forward(patches);
        if self.position_embedding {
            // [n, d] -> [1, n, d], the same for every image
            let [_, _, d] = tokens.dims();
            let grid = (n as f64).sqrt().round() as usize;
            let pos = patch_position_embedding::<B>(grid, d, &tokens.device());
            tokens = tokens + pos.unsqueeze::<3>();
        }
        (
            tokens,
            ImageContext {
                temb,
                skips: vec![],
            },
        )
    }

    /// Turns the transformer's outputs at image positions into the noise prediction.
    ///
    /// # Shapes
    /// - `hidden`: `[N, n, d]`; output `[N, c, H, W]` with `H = W = latent_size`
    pub fn decode(
        &self,
        hidden: Tensor<B, 3>,
        ctx: &ImageContext<B>,
        latent_size: usize,
    ) -> Tensor<B, 4> {
        if let Some(unet) = &self.unet {
            return unet.decode(hidden, &ctx.temb, &ctx.skips);
        }
        let linear = self
            .linear
            .as_ref()
            .expect("an image adapter has one option");
        unpatchify(
            linear.proj_out.forward(hidden),
            self.patch_size,
            self.channels,
            latent_size,
            latent_size,
        )
    }
}
