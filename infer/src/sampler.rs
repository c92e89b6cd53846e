//! Diffusion samplers over the model's noise schedule: DDPM ancestral sampling with `S`
//! steps respaced over the `T = 1000` training steps (the paper: 250), deterministic
//! DDIM (eta = 0) with any number of steps, and the consistency sampler (sCM) with 1 or 2
//! steps: predict `x_0` from pure noise at the schedule's end, and for a second step
//! re-noise it to the angle [`PHI_MID`] and predict again.
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
use transfusion_model::consistency::PHI_MID;
use transfusion_model::trigflow::timestep_of_phi;
use transfusion_model::NoiseSchedule;

/// Which sampler runs the reverse process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplerKind {
    /// Ancestral DDPM (stochastic).
    #[default]
    Ddpm,
    /// DDIM with eta = 0 (deterministic given the initial noise).
    Ddim,
    /// Consistency sampling in 1 or 2 steps (for consistency-distilled checkpoints).
    Consistency,
}

impl SamplerKind {
    /// The steps a sampler runs when none are asked for: the paper's 250 for DDPM, 50 for
    /// DDIM, 2 for the consistency sampler.
    pub fn default_steps(self) -> usize {
        match self {
            Self::Ddpm => 250,
            Self::Ddim => 50,
            Self::Consistency => 2,
        }
    }

    /// The most steps the sampler can run (`None`: the schedule's length).
    pub fn max_steps(self) -> Option<usize> {
        match self {
            Self::Consistency => Some(2),
            Self::Ddpm | Self::Ddim => None,
        }
    }
}

/// The training steps a consistency sampler of `steps` steps (1 or 2) conditions on, in
/// increasing order: the schedule's end (`phi_max`), preceded for two steps by the step
/// whose angle is nearest [`PHI_MID`].
pub fn consistency_timesteps(base: &NoiseSchedule, steps: usize) -> Vec<usize> {
    let last = base.len() - 1;
    if steps <= 1 {
        return vec![last];
    }
    let mid = (timestep_of_phi(base, PHI_MID).round() as usize).min(last - 1);
    vec![mid, last]
}

impl FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ddpm" => Ok(Self::Ddpm),
            "ddim" => Ok(Self::Ddim),
            "consistency" => Ok(Self::Consistency),
            other => Err(format!(
                "unknown sampler `{other}`: use ddpm, ddim or consistency"
            )),
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Consistency => "consistency",
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
    /// (see [`transfusion_runtime::autoencoder::Autoencoder::x0_bound`]).
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
        let schedule = match kind {
            SamplerKind::Consistency => base.respaced_at(&consistency_timesteps(base, steps)),
            SamplerKind::Ddpm | SamplerKind::Ddim => base.respaced(steps.max(1)),
        };
        Self {
            kind,
            schedule,
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
    /// image shape (used by DDPM and the consistency sampler for `i > 0` only).
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
        // Fresh noise for the steps that add some (none after the last step).
        let mut fresh = |x: &Tensor<B, 4>| {
            if i > 0 {
                noise.normal::<B>(x.dims(), &x.device())
            } else {
                Tensor::zeros(x.dims(), &x.device())
            }
        };
        match self.kind {
            SamplerKind::Ddpm => {
                let z = fresh(&x_t);
                self.schedule.ddpm_step(x_t, eps, i, z, self.x0_clip)
            }
            SamplerKind::Ddim => self.schedule.ddim_step(x_t, eps, i, self.x0_clip),
            SamplerKind::Consistency => {
                let z = fresh(&x_t);
                self.schedule.consistency_step(x_t, eps, i, z, self.x0_clip)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn a_consistency_step_predicts_x0_clips_it_and_renoises_to_the_next_step() {
        let base = NoiseSchedule::cosine(1000);
        let s = Sampler::new(SamplerKind::Consistency, &base, 2, Some(1.0));
        let [mid, last] = [s.schedule.timestep_map[0], s.schedule.timestep_map[1]];
        let dev = Default::default();
        let x = Tensor::<NdArray, 4>::from_floats([[[[0.3, -0.8]]]], &dev);
        let eps = Tensor::<NdArray, 4>::from_floats([[[[0.2, -0.9]]]], &dev);
        // Step 1 at t = 999 with its fresh noise drawn from stream (seed 5, image 0).
        let mut noise = NoiseSource::new(5, 1);
        let got: Vec<f32> = s
            .step(x.clone(), eps.clone(), 1, &mut noise)
            .into_data()
            .to_vec()
            .unwrap();
        let z: Vec<f32> = NoiseSource::new(5, 1)
            .normal::<NdArray>([1, 1, 1, 2], &dev)
            .into_data()
            .to_vec()
            .unwrap();
        let (a, b) = (base.alphas_cumprod[last], base.alphas_cumprod[mid]);
        for (j, (xv, ev)) in [(0.3f64, 0.2f64), (-0.8, -0.9)].into_iter().enumerate() {
            let x0 = ((xv - (1.0 - a).sqrt() * ev) / a.sqrt()).clamp(-1.0, 1.0);
            let want = b.sqrt() * x0 + (1.0 - b).sqrt() * z[j] as f64;
            assert!(
                (got[j] as f64 - want).abs() < 1e-4,
                "{j}: {} vs {want}",
                got[j]
            );
        }
        // The last step returns the predicted x0 itself.
        let out: Vec<f32> = s.step(x, eps, 0, &mut noise).into_data().to_vec().unwrap();
        let x0 = (0.3 - (1.0 - b).sqrt() * 0.2) / b.sqrt();
        assert!((out[0] as f64 - x0.clamp(-1.0, 1.0)).abs() < 1e-5);
    }
}
