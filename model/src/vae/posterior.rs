//! The diagonal Gaussian posterior `q(z | x)` of a KL autoencoder.

use burn::prelude::*;
use burn::tensor::Distribution;

/// `N(mean, exp(logvar))` per latent element, from the encoder's `2c` moment channels
/// (the first `c` are the mean, the last `c` the log-variance, as in diffusers).
#[derive(Clone, Debug)]
pub struct DiagonalGaussian<B: Backend> {
    /// Mean `[N, c, h, w]`.
    pub mean: Tensor<B, 4>,
    /// Log-variance `[N, c, h, w]`, clamped to `[-30, 20]`.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Splits moments `[N, 2c, h, w]` into mean and (clamped) log-variance.
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let [_, c2, _, _] = moments.dims();
        assert!(
            c2 % 2 == 0,
            "moments should have an even channel count, got {c2}"
        );
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("chunk(2) should give two halves");
        let mean = halves.pop().expect("chunk(2) should give two halves");
        Self::new(mean, logvar)
    }

    /// A posterior from its mean and log-variance (the latter is clamped to `[-30, 20]`).
    pub fn new(mean: Tensor<B, 4>, logvar: Tensor<B, 4>) -> Self {
        Self {
            mean,
            logvar: logvar.clamp(-30.0, 20.0),
        }
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<B, 4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// A reparameterised sample `mean + std * eps`, `eps ~ N(0, 1)` from the backend's RNG.
    pub fn sample(&self) -> Tensor<B, 4> {
        let eps = crate::params::with_backend_rng(|| {
            Tensor::random(
                self.mean.shape(),
                Distribution::Normal(0.0, 1.0),
                &self.mean.device(),
            )
        });
        self.sample_with(eps)
    }

    /// `mean + std * eps` for a given `eps` of the mean's shape.
    pub fn sample_with(&self, eps: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone() + self.std() * eps
    }

    /// The mode (the mean): the deterministic latent.
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }

    /// `KL(q || N(0, 1))` per image, summed over latent elements:
    /// `0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)`.
    ///
    /// # Shapes
    /// output: `[N]`
    pub fn kl(&self) -> Tensor<B, 1> {
        let [n, c, h, w] = self.mean.dims();
        let terms = self.mean.clone().powi_scalar(2) + self.logvar.clone().exp()
            - 1.0
            - self.logvar.clone();
        // [N, c, h, w] -> [N, c*h*w] -> [N]
        terms.reshape([n, c * h * w]).sum_dim(1).reshape([n]) * 0.5
    }
}
