//! The SwiGLU feed-forward block of Llama: `w2(silu(w1 x) * w3 x)`, no biases.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::ops::swiglu;
use crate::precision::Precision;

/// Configuration of [`SwiGluMlp`].
#[derive(Config, Debug)]
pub struct SwiGluMlpConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Hidden width of the gated layer.
    pub d_hidden: usize,
}

impl SwiGluMlpConfig {
    /// Builds the block with small normal initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> SwiGluMlp<B> {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        SwiGluMlp {
            w1: lin(self.d_model, self.d_hidden),
            w3: lin(self.d_model, self.d_hidden),
            w2: lin(self.d_hidden, self.d_model),
        }
    }
}

/// SwiGLU MLP.
#[derive(Module, Debug)]
pub struct SwiGluMlp<B: Backend> {
    /// Gate projection `d -> hidden`.
    pub w1: Linear<B>,
    /// Up projection `d -> hidden`.
    pub w3: Linear<B>,
    /// Down projection `hidden -> d`.
    pub w2: Linear<B>,
}

impl<B: Backend> SwiGluMlp<B> {
    /// # Shapes
    /// `[b, s, d] -> [b, s, d]`; the three products in `precision`.
    pub fn forward(&self, x: Tensor<B, 3>, precision: Precision) -> Tensor<B, 3> {
        let gate = precision.linear(&self.w1, x.clone());
        let up = precision.linear(&self.w3, x);
        precision.linear(&self.w2, swiglu(gate, up))
    }
}
