//! Rotary position embedding with explicit position ids.
//!
//! Layout: the half-split convention (`rotate_half`) of Llama checkpoints in the wild: the
//! first `hd/2` features pair with the last `hd/2`. Positions are given per token, so packed
//! documents restart at 0 and cached decoding continues at any offset.
//!
//! Rotation runs in the projections' own `[b, s, h, hd]` layout against tables built once per
//! forward pass at that full shape, so every product is between two dense tensors of one
//! shape (CPU backends take a slow strided path for broadcasts and transposed views).

use burn::prelude::*;

/// Cosine and sine tables for one call and one head count, dense `[b, s, heads, hd]`: the
/// cosine repeated over both halves, the sine with its first half negated, so that
/// `rot(x) = x * cos + swap_halves(x) * sin`.
#[derive(Clone, Debug)]
pub struct RopeTables<B: Backend> {
    /// Shape `[b, s, heads, hd]`.
    pub cos: Tensor<B, 4>,
    /// Shape `[b, s, heads, hd]`; `-sin` in the first half, `sin` in the second.
    pub sin: Tensor<B, 4>,
}

/// Inverse frequencies `theta^(-2i/hd)` for `i in 0..hd/2`.
pub fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64) as f32)
        .collect()
}

/// Builds the tables for the given position ids and `heads` heads.
///
/// # Shapes
/// - `positions`: `[b, s]`
/// - output tables: `[b, s, heads, hd]`
pub fn rope_tables<B: Backend>(
    positions: Tensor<B, 2, Int>,
    head_dim: usize,
    theta: f64,
    heads: usize,
) -> RopeTables<B> {
    let device = positions.device();
    let [b, s] = positions.dims();
    let half = head_dim / 2;
    let freqs =
        Tensor::<B, 1>::from_floats(inverse_frequencies(head_dim, theta).as_slice(), &device)
            .reshape([1, 1, 1, half]);
    // [b, s] -> [b, s, 1, 1] * [1, 1, 1, hd/2] -> [b, s, 1, hd/2]
    let angles = positions
        .float()
        .reshape([b, s, 1, 1])
        .expand([b, s, 1, half])
        * freqs.expand([b, s, 1, half]);
    let (cos, sin) = (angles.clone().cos(), angles.sin());
    // [b, s, 1, hd/2] -> [b, s, 1, hd] -> [b, s, heads, hd], dense
    let cos = Tensor::cat(vec![cos.clone(), cos], 3).repeat_dim(2, heads);
    let sin = Tensor::cat(vec![sin.clone().neg(), sin], 3).repeat_dim(2, heads);
    RopeTables { cos, sin }
}

/// Rotates `x` by the tables: `(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)` per pair.
///
/// # Shapes
/// - `x`: `[b, s, h, hd]`; tables `[b, s, h, hd]`; output `[b, s, h, hd]`.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, tables: &RopeTables<B>) -> Tensor<B, 4> {
    let hd = x.dims()[3];
    let half = hd / 2;
    // (x1, x2) -> (x2, x1)
    let swapped = Tensor::cat(
        vec![
            x.clone().narrow(3, half, half),
            x.clone().narrow(3, 0, half),
        ],
        3,
    );
    x * tables.cos.clone() + swapped * tables.sin.clone()
}
