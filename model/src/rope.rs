//! Rotary position embedding with explicit position ids.
//!
//! Layout: the half-split convention (`rotate_half`) of Llama checkpoints in the wild: the
//! first `hd/2` features pair with the last `hd/2`. Positions are given per token, so packed
//! documents restart at 0 and cached decoding continues at any offset.

use burn::prelude::*;

/// Cosine and sine tables for one call, broadcastable over heads.
#[derive(Clone, Debug)]
pub struct RopeTables<B: Backend> {
    /// Shape `[b, 1, s, hd/2]`.
    pub cos: Tensor<B, 4>,
    /// Shape `[b, 1, s, hd/2]`.
    pub sin: Tensor<B, 4>,
}

/// Inverse frequencies `theta^(-2i/hd)` for `i in 0..hd/2`.
pub fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64) as f32)
        .collect()
}

/// Builds the cos/sin tables for the given position ids.
///
/// # Shapes
/// - `positions`: `[b, s]`
/// - output tables: `[b, 1, s, hd/2]`
pub fn rope_tables<B: Backend>(
    positions: Tensor<B, 2, Int>,
    head_dim: usize,
    theta: f64,
) -> RopeTables<B> {
    let device = positions.device();
    let [b, s] = positions.dims();
    let half = head_dim / 2;
    let freqs =
        Tensor::<B, 1>::from_floats(inverse_frequencies(head_dim, theta).as_slice(), &device)
            .reshape([1, 1, 1, half]);
    // [b, s] -> [b, 1, s, 1] * [1, 1, 1, hd/2] -> [b, 1, s, hd/2]
    let angles = positions
        .float()
        .reshape([b, 1, s, 1])
        .expand([b, 1, s, half])
        * freqs.expand([b, 1, s, half]);
    RopeTables {
        cos: angles.clone().cos(),
        sin: angles.sin(),
    }
}

/// Rotates `x` by the tables.
///
/// # Shapes
/// - `x`: `[b, h, s, hd]`; tables `[b, 1, s, hd/2]`; output `[b, h, s, hd]`.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, tables: &RopeTables<B>) -> Tensor<B, 4> {
    let [b, h, s, hd] = x.dims();
    let half = hd / 2;
    let cos = tables.cos.clone().expand([b, h, s, half]);
    let sin = tables.sin.clone().expand([b, h, s, half]);
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(
        vec![
            x1.clone() * cos.clone() - x2.clone() * sin.clone(),
            x2 * cos + x1 * sin,
        ],
        3,
    )
}
