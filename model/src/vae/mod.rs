//! The image autoencoder: a convolutional KL autoencoder with the architecture of
//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE family).
//!
//! - [`VaeConfig`]: shape and presets ([`VaeConfig::paper`], [`VaeConfig::sd`],
//!   [`VaeConfig::tiny`]), latent scale/shift, parameter count.
//! - [`AutoencoderKl`]: [`encode`](AutoencoderKl::encode) to a [`DiagonalGaussian`],
//!   [`decode`](AutoencoderKl::decode), [`forward`](AutoencoderKl::forward) for training.
//! - [`vae_loss`] (L1/L2 reconstruction + KL) and [`psnr`].
//! - [`diffusers`]: loading a diffusers `AutoencoderKL` `.safetensors` + `config.json`.
//!
//! The ResNet, down-sampling and up-sampling blocks are the ones of [`crate::resnet`],
//! shared with the U-Net patch adapter.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod diffusers;
pub mod encoder;
pub mod loss;
pub mod mid_block;
pub mod posterior;

pub use config::VaeConfig;
pub use diffusers::{load_diffusers_vae, DiffusersVaeConfig, VaeLoadError};
pub use loss::{psnr, vae_loss, ReconLoss, VaeLoss};
pub use posterior::DiagonalGaussian;

use burn::nn::conv::Conv2d;
use burn::prelude::*;

use decoder::Decoder;
use encoder::Encoder;

/// A KL autoencoder: images `[N, 3, H, W]` in `[-1, 1]` to latents `[N, c, H/f, W/f]`
/// and back. Build it with [`VaeConfig::init`].
#[derive(Module, Debug)]
pub struct AutoencoderKl<B: Backend> {
    /// Image to moments.
    pub encoder: Encoder<B>,
    /// Latent to image.
    pub decoder: Decoder<B>,
    /// 1x1 convolution on the moments (diffusers `quant_conv`).
    pub quant_conv: Option<Conv2d<B>>,
    /// 1x1 convolution on the latent before decoding (diffusers `post_quant_conv`).
    pub post_quant_conv: Option<Conv2d<B>>,
}

/// What [`AutoencoderKl::forward`] returns.
#[derive(Clone, Debug)]
pub struct VaeOutput<B: Backend> {
    /// The decoded image `[N, 3, H, W]`.
    pub recon: Tensor<B, 4>,
    /// The posterior the decoded latent came from.
    pub posterior: DiagonalGaussian<B>,
    /// Per-image KL to the prior `[N]`.
    pub kl: Tensor<B, 1>,
}

impl<B: Backend> AutoencoderKl<B> {
    /// The posterior over latents of images in `[-1, 1]` (unscaled latent space).
    ///
    /// # Shapes
    /// `x`: `[N, 3, H, W]` with `H, W` multiples of the down-sampling factor `f`;
    /// mean and log-variance `[N, c, H/f, W/f]`
    pub fn encode(&self, x: Tensor<B, 4>) -> DiagonalGaussian<B> {
        let moments = self.encoder.forward(x);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(moments),
            None => moments,
        };
        DiagonalGaussian::from_moments(moments)
    }

    /// Decodes an (unscaled) latent to an image in about `[-1, 1]` (not clamped).
    ///
    /// # Shapes
    /// `[N, c, h, w] -> [N, 3, h*f, w*f]`
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// Encode, sample (or take the mode when `sample` is false), decode: what training
    /// needs, with the per-image KL.
    ///
    /// # Shapes
    /// `x`: `[N, 3, H, W]`; `recon`: `[N, 3, H, W]`; `kl`: `[N]`
    pub fn forward(&self, x: Tensor<B, 4>, sample: bool) -> VaeOutput<B> {
        let posterior = self.encode(x);
        let z = if sample {
            posterior.sample()
        } else {
            posterior.mode()
        };
        Self::finish(self.decode(z), posterior)
    }

    /// [`AutoencoderKl::forward`] with the posterior sample `mean + std * eps` taken with a
    /// given standard normal `eps` (so a caller controls the randomness).
    ///
    /// # Shapes
    /// `x`: `[N, 3, H, W]`, `eps`: `[N, c, H/f, W/f]`
    pub fn forward_with_noise(&self, x: Tensor<B, 4>, eps: Tensor<B, 4>) -> VaeOutput<B> {
        let posterior = self.encode(x);
        let z = posterior.sample_with(eps);
        Self::finish(self.decode(z), posterior)
    }

    fn finish(recon: Tensor<B, 4>, posterior: DiagonalGaussian<B>) -> VaeOutput<B> {
        VaeOutput {
            recon,
            kl: posterior.kl(),
            posterior,
        }
    }

    /// Diffusion-ready latents of images: the posterior mode (or a sample), then
    /// `(z - shift) * scale` from `config`.
    ///
    /// # Shapes
    /// `[N, 3, H, W] -> [N, c, H/f, W/f]`
    pub fn encode_latents(
        &self,
        config: &VaeConfig,
        x: Tensor<B, 4>,
        sample: bool,
    ) -> Tensor<B, 4> {
        let posterior = self.encode(x);
        let z = if sample {
            posterior.sample()
        } else {
            posterior.mode()
        };
        config.scale_latent(z)
    }

    /// Images from diffusion latents: `latent / scale + shift`, then decode.
    ///
    /// # Shapes
    /// `[N, c, h, w] -> [N, 3, h*f, w*f]`
    pub fn decode_latents(&self, config: &VaeConfig, latent: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decode(config.unscale_latent(latent))
    }
}
