//! The Transfusion objective `L = L_LM + lambda * L_DDPM` and its parts.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// The loss of one batch, its parts, and what evaluation needs.
#[derive(Clone, Debug)]
pub struct TransfusionLoss<B: Backend> {
    /// `L_LM + lambda * L_DDPM`. Shape `[1]`.
    pub total: Tensor<B, 1>,
    /// Mean cross-entropy over text targets. Shape `[1]`.
    pub lm: Tensor<B, 1>,
    /// Mean over images of the per-image MSE of the head's target (noise or velocity; 0
    /// without images). Shape `[1]`.
    pub diffusion: Tensor<B, 1>,
    /// Target MSE of every image. Shape `[n_img]`.
    pub diffusion_per_image: Tensor<B, 1>,
    /// Number of text targets the LM loss averaged over.
    pub lm_targets: Tensor<B, 1>,
}

/// Mean cross-entropy over the positions where `mask` is 1.
///
/// Returns the mean and the number of counted targets.
///
/// # Shapes
/// - `logits`: `[m, v]`, `targets`: `[m]`, `mask`: `[m]`; outputs `[1]`
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    mask: Tensor<B, 1>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let m = targets.dims()[0];
    // [m, v] -> [m, 1] log-probability of the target
    let picked = log_softmax(logits, 1)
        .gather(1, targets.reshape([m, 1]))
        .reshape([m]);
    let count = mask.clone().sum();
    let nll = (picked * mask).sum().neg() / count.clone().clamp_min(1.0);
    (nll, count)
}

/// Per-image mean squared error between the head's output and its target.
///
/// # Shapes
/// - `pred`, `target`: `[N, c, H, W]`; output `[N]`
pub fn per_image_mse<B: Backend>(pred: Tensor<B, 4>, target: Tensor<B, 4>) -> Tensor<B, 1> {
    let n = pred.dims()[0];
    (pred - target)
        .powi_scalar(2)
        .reshape([n as i32, -1])
        .mean_dim(1)
        .reshape([n])
}
