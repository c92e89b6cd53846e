//! Training loss of the autoencoder (reconstruction + weighted KL) and PSNR.

use burn::prelude::*;

use super::posterior::DiagonalGaussian;

/// Reconstruction distance.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ReconLoss {
    /// Mean absolute error.
    L1,
    /// Mean squared error.
    L2,
}

/// The parts of [`vae_loss`].
#[derive(Clone, Debug)]
pub struct VaeLoss<B: Backend> {
    /// `recon + kl_weight * kl`, a scalar `[1]` to call `backward` on.
    pub loss: Tensor<B, 1>,
    /// Reconstruction loss, mean over pixel elements `[1]`.
    pub recon: Tensor<B, 1>,
    /// KL per latent element (per-image KL summed over elements, divided by the latent
    /// element count, averaged over the batch) `[1]`.
    pub kl: Tensor<B, 1>,
}

/// `recon(x, recon_x) + kl_weight * KL`, both terms means per element so the weight does
/// not depend on the image size.
///
/// Latent-diffusion's recipe (sums over pixels, KL weight 1e-6 on the per-image KL sum)
/// corresponds to `kl_weight = 1e-6 * latent_elements / pixel_elements`, e.g. 1e-6 / 24
/// for an 8x autoencoder with 8 latent channels; values around 1e-6 ... 1e-4 keep latents
/// close to unit scale without hurting reconstructions.
///
/// # Shapes
/// - `x`, `recon_x`: `[N, 3, H, W]` in `[-1, 1]`
pub fn vae_loss<B: Backend>(
    x: Tensor<B, 4>,
    recon_x: Tensor<B, 4>,
    posterior: &DiagonalGaussian<B>,
    kl_weight: f64,
    kind: ReconLoss,
) -> VaeLoss<B> {
    let diff = recon_x - x;
    let recon = match kind {
        ReconLoss::L1 => diff.abs().mean(),
        ReconLoss::L2 => diff.powi_scalar(2).mean(),
    };
    let [_, c, h, w] = posterior.mean.dims();
    let kl = posterior.kl().mean() / (c * h * w) as f64;
    VaeLoss {
        loss: recon.clone() + kl.clone() * kl_weight,
        recon,
        kl,
    }
}

/// Peak signal-to-noise ratio in dB of images in `[-1, 1]` (measured on the `[0, 1]`
/// scale, `10 log10(1 / mse)`), from the mean squared error over the whole batch.
/// Identical images give `f32::INFINITY`.
///
/// # Shapes
/// - `x`, `y`: `[N, C, H, W]` (any equal shapes work)
pub fn psnr<B: Backend, const D: usize>(x: Tensor<B, D>, y: Tensor<B, D>) -> f32 {
    // [-1, 1] -> [0, 1] halves differences: mse01 = mse / 4
    let mse: f32 = (x - y).powi_scalar(2).mean().into_scalar().elem::<f32>() / 4.0;
    if mse <= 0.0 {
        f32::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}
