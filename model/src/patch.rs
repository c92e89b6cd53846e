//! Patchify and unpatchify: a latent `[N, c, H, W]` to `n = (H/k)(W/k)` patch vectors of
//! length `c*k*k`, ordered left-to-right, top-to-bottom, and back.
//!
//! Within one patch vector the layout is channel-major: `(channel, row-in-patch,
//! column-in-patch)`.

use burn::prelude::*;

/// Splits latents into patches.
///
/// # Shapes
/// `[N, c, H, W] -> [N, n, c*k*k]` with `n = (H/k) * (W/k)`
///
/// # Panics
/// If `k` does not divide `H` and `W` (configs are validated before a model is built).
pub fn patchify<B: Backend>(x: Tensor<B, 4>, k: usize) -> Tensor<B, 3> {
    let [n_img, c, h, w] = x.dims();
    assert!(
        h % k == 0 && w % k == 0,
        "patch side {k} should divide latent {h}x{w}"
    );
    let (gh, gw) = (h / k, w / k);
    // [N, c, gh, k, gw, k] -> [N, gh, gw, c, k, k]
    x.reshape([n_img, c, gh, k, gw, k])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([n_img, gh * gw, c * k * k])
}

/// Inverse of [`patchify`].
///
/// # Shapes
/// `[N, n, c*k*k] -> [N, c, H, W]`
pub fn unpatchify<B: Backend>(
    patches: Tensor<B, 3>,
    k: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> Tensor<B, 4> {
    let n_img = patches.dims()[0];
    let (gh, gw) = (height / k, width / k);
    // [N, gh, gw, c, k, k] -> [N, c, gh, k, gw, k]
    patches
        .reshape([n_img, gh, gw, channels, k, k])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([n_img, channels, height, width])
}

/// Number of patches of an `height x width` latent with patch side `k`.
pub fn num_patches(height: usize, width: usize, k: usize) -> usize {
    (height / k) * (width / k)
}
