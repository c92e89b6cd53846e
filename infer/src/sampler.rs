//! Diffusion samplers over the model's noise schedule: DDPM ancestral sampling with `S`
//! steps respaced over the `T = 1000` training steps (the paper: 250), and deterministic
//! DDIM (eta = 0) with any number of steps.
//!
//! The predicted `x_0` is clipped to the autoencoder's bound (`[-1, 1]` in pixel space, none
//! in a VAE's latent space). All randomness (the initial
//! noise and DDPM's per-step noise) is drawn on the host from a seeded SplitMix64 stream
//! per image ([`NoiseSource`]), so a seed reproduces the same images on a given backend, and
//! image `k` of a batch does not depend on the batch size.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::TensorData;
use transfusion_data::rng::Rng64;
use transfusion_model::NoiseSchedule;

/// Which sampler runs the reverse process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplerKind {
    /// Ancestral DDPM (stochastic).
    #[default]
    Ddpm,
    /// DDIM with eta = 0 (deterministic given the initial noise).
    Ddim,
}

impl FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ddpm" => Ok(Self::Ddpm),
            "ddim" => Ok(Self::Ddim),
            other => Err(format!("unknown sampler `{other}`: use ddpm or ddim")),
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
        })
    }
}

/// A sampler bound to a respaced schedule.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// DDPM or DDIM.
    pub kind: SamplerKind,
    /// The respaced schedule (`timestep_map[i]` is the model timestep of step `i`).
    pub schedule: NoiseSchedule,
    /// Predicted `x_0` is clipped to `[-bound, bound]`; `None` leaves it alone
    /// (see [`crate::autoencoder::Autoencoder::x0_bound`]).
    pub x0_clip: Option<f64>,
}

impl Sampler {
    /// `steps` steps over the model's training schedule `base`, clipping the predicted
    /// `x_0` to `[-bound, bound]` when `x0_clip` is `Some(bound)`.
    pub fn new(
        kind: SamplerKind,
        base: &NoiseSchedule,
        steps: usize,
        x0_clip: Option<f64>,
    ) -> Self {
        Self {
            kind,
            schedule: base.respaced(steps.max(1)),
            x0_clip,
        }
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.schedule.len()
    }

    /// Steps in the order they run: `(i, model timestep)` for `i = S-1 .. 0`.
    pub fn plan(&self) -> Vec<(usize, usize)> {
        (0..self.steps())
            .rev()
            .map(|i| (i, self.schedule.timestep_map[i]))
            .collect()
    }

    /// One reverse step from step `i` to `i - 1`. `noise` draws fresh Gaussian noise of the
    /// image shape (used by DDPM for `i > 0` only).
    ///
    /// # Shapes
    /// `x_t`, `eps`: `[N, c, H, W]` -> `[N, c, H, W]`
    pub fn step<B: Backend>(
        &self,
        x_t: Tensor<B, 4>,
        eps: Tensor<B, 4>,
        i: usize,
        noise: &mut NoiseSource,
    ) -> Tensor<B, 4> {
        match self.kind {
            SamplerKind::Ddpm => {
                let device = x_t.device();
                let z = if i > 0 {
                    noise.normal::<B>(x_t.dims(), &device)
                } else {
                    Tensor::zeros(x_t.dims(), &device)
                };
                self.schedule.ddpm_step(x_t, eps, i, z, self.x0_clip)
            }
            SamplerKind::Ddim => self.schedule.ddim_step(x_t, eps, i, self.x0_clip),
        }
    }
}

/// Seeded host-side Gaussian noise, one independent stream per image.
#[derive(Clone, Debug)]
pub struct NoiseSource {
    rngs: Vec<Rng64>,
}

impl NoiseSource {
    /// Streams for images `0..n` of `seed` (image `k` uses the stream `(seed, k)`).
    pub fn new(seed: u64, n: usize) -> Self {
        Self {
            rngs: (0..n as u64)
                .map(|k| Rng64::from_parts(&[seed, k]))
                .collect(),
        }
    }

    /// A standard normal tensor `[N, c, H, W]`, image `k` drawn from stream `k`.
    pub fn normal<B: Backend>(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        let [n, c, h, w] = shape;
        assert_eq!(n, self.rngs.len(), "one noise stream per image");
        let per = c * h * w;
        let mut data = vec![0f32; n * per];
        for (rng, chunk) in self.rngs.iter_mut().zip(data.chunks_mut(per)) {
            rng.fill_normal(chunk);
        }
        Tensor::from_data(TensorData::new(data, shape), device)
    }
}
