//! The plain-Burn path of each operation in [`crate::ops`]: the maths as a composition of
//! Burn's tensor operations, for every backend without a kernel of its own (and for any
//! dtype other than f32 on `flex`). These are the definitions the kernels must match.

use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::activation::silu;

/// `softmax(q k^T / sqrt(hd) + bias) v` (`bias`: `0` where a key is visible, `-inf` where
/// masked).
///
/// A row whose keys are all masked gives zeros. The shift before the exponential is the
/// row maximum (clamped to at least `-1e4`), which the softmax does not depend on.
///
/// # Shapes
/// - `q`: `[b, h, s, hd]`, `k`, `v`: `[b, h, lk, hd]`, `bias`: `[b, h, s, lk]`
/// - output: `[b, h, s, hd]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    let q = q.mul_scalar(scale);
    // [b, h, s, lk]
    let scores = q.matmul(k.swap_dims(2, 3)) + bias;
    // [b, h, s, 1]; detached: any shift gives the same softmax
    let shift = scores.clone().detach().max_dim(3).clamp_min(-1.0e4);
    let weights = (scores - shift).exp();
    let sum = weights.clone().sum_dim(3).clamp_min(1.0e-30);
    // normalising the [.., hd] output rather than the [.., lk] weights
    weights.matmul(v) / sum
}

/// `x w + bias`, Burn's linear layer on two-dimensional input.
///
/// # Shapes
/// - `x`: `[rows, d_in]`, `weight`: `[d_in, d_out]`, `bias`: `[d_out]`
/// - output: `[rows, d_out]`
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    burn::tensor::module::linear(x, weight, bias)
}

/// RMSNorm over the last dimension with `norm`'s gain and epsilon.
///
/// # Shapes
/// - `x`: `[.., d]`; output `[.., d]`
pub fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    norm.forward(x)
}

/// `silu(gate) * up`, the gated product of a SwiGLU block.
///
/// # Shapes
/// `gate`, `up`: the same shape; output that shape
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}
