//! Diffusion timestep conditioning: a sinusoidal embedding followed by a small MLP.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;

/// Sinusoidal features of timesteps (the transformer's positional formula):
/// `[cos(t * f_i), sin(t * f_i)]` with `f_i = 10000^(-i / (dim/2))`.
///
/// Times are real-valued: the integer steps `0..T` of diffusion training give exactly the
/// features they always had, and consistency models condition on the fractional step of a
/// continuous angle (see [`crate::trigflow::timestep_of_phi`]).
///
/// # Shapes
/// `t`: `[N]` -> `[N, dim]`
pub fn sinusoidal_embedding<B: Backend>(t: Tensor<B, 1>, dim: usize) -> Tensor<B, 2> {
    let device = t.device();
    let n = t.dims()[0];
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::<B, 1>::from_floats(freqs.as_slice(), &device).reshape([1, half]);
    // [N, 1] * [1, half] -> [N, half]
    let args = t.reshape([n, 1]).expand([n, half]) * freqs.expand([n, half]);
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

/// Configuration of [`TimestepEmbedder`].
#[derive(Config, Debug)]
pub struct TimestepEmbedderConfig {
    /// Width of the sinusoidal features.
    #[config(default = 128)]
    pub d_freq: usize,
    /// Hidden width of the MLP.
    pub d_hidden: usize,
    /// Output width.
    pub d_out: usize,
}

impl TimestepEmbedderConfig {
    /// Builds the embedder.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TimestepEmbedder<B> {
        TimestepEmbedder {
            fc1: LinearConfig::new(self.d_freq, self.d_hidden).init(device),
            fc2: LinearConfig::new(self.d_hidden, self.d_out).init(device),
            d_freq: self.d_freq,
        }
    }
}

/// `Linear -> SiLU -> Linear` over sinusoidal timestep features.
#[derive(Module, Debug)]
pub struct TimestepEmbedder<B: Backend> {
    /// First layer.
    pub fc1: Linear<B>,
    /// Second layer.
    pub fc2: Linear<B>,
    /// Width of the sinusoidal features.
    pub d_freq: usize,
}

impl<B: Backend> TimestepEmbedder<B> {
    /// The embedding of (possibly fractional) timesteps `t`.
    ///
    /// # Shapes
    /// `t`: `[N]` -> `[N, d_out]`
    pub fn forward(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        let x = sinusoidal_embedding(t, self.d_freq);
        self.fc2.forward(silu(self.fc1.forward(x)))
    }
}
