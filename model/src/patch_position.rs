//! A fixed 2D sin-cos position embedding for image patch tokens.
//!
//! Inside the sequence, patches only carry RoPE's 1D position, so a patch learns where it
//! sits in the image only through its distance to the image's first token. Adding a 2D
//! embedding of its (row, column) tells it directly; it has no parameters. Half of the
//! width encodes the row, half the column, each as `sin`/`cos` pairs at geometric
//! frequencies (base 10000), as in MAE and DiT.

use burn::prelude::*;
use burn::tensor::TensorData;

/// The embedding of a `grid x grid` patch grid in raster order.
///
/// # Shapes
/// output `[grid * grid, d]` (`d` must be a multiple of 4)
pub fn patch_position_embedding<B: Backend>(
    grid: usize,
    d: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    assert!(
        d % 4 == 0,
        "the patch position embedding needs a width divisible by 4"
    );
    let quarter = d / 4;
    let freqs: Vec<f64> = (0..quarter)
        .map(|i| 10000f64.powf(-(i as f64) / quarter as f64))
        .collect();
    let mut data = Vec::with_capacity(grid * grid * d);
    for row in 0..grid {
        for col in 0..grid {
            for coord in [row, col] {
                data.extend(freqs.iter().map(|f| (coord as f64 * f).sin() as f32));
                data.extend(freqs.iter().map(|f| (coord as f64 * f).cos() as f32));
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [grid * grid, d]), device)
}
