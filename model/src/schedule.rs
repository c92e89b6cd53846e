//! The diffusion math shared by training and inference: the cosine noise schedule
//! (Nichol & Dhariwal 2021) over `T` steps, `q_sample`, the epsilon target, the DDPM
//! posterior, respacing to fewer sampling steps, and the DDPM and DDIM sampling steps.
//!
//! Conventions: timesteps are indices `t in 0..T`; `alphas_cumprod[t]` is `abar` *after*
//! step `t` (so `t = 0` is already slightly noisy). Coefficients are computed in `f64` on
//! the host; tensor code multiplies by them.

use burn::prelude::*;

/// A (possibly respaced) noise schedule with its precomputed coefficients.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// `beta_t`.
    pub betas: Vec<f64>,
    /// `abar_t = prod_{s <= t} (1 - beta_s)`.
    pub alphas_cumprod: Vec<f64>,
    /// `abar_{t-1}` with `abar_{-1} = 1`.
    pub alphas_cumprod_prev: Vec<f64>,
    /// Variance of `q(x_{t-1} | x_t, x_0)`.
    pub posterior_variance: Vec<f64>,
    /// Log of the posterior variance, with `t = 0` clipped to the value at `t = 1`.
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of `x_0` in the posterior mean.
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of `x_t` in the posterior mean.
    pub posterior_mean_coef2: Vec<f64>,
    /// For each step of this schedule, the training timestep the model is conditioned on
    /// (the identity for the full schedule).
    pub timestep_map: Vec<usize>,
}

impl NoiseSchedule {
    /// The cosine schedule with `T` steps, offset `s = 0.008`, betas clipped at 0.999.
    pub fn cosine(timesteps: usize) -> Self {
        let s = 0.008;
        let f = |u: f64| {
            ((u + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        let t = timesteps as f64;
        let betas = (0..timesteps)
            .map(|i| (1.0 - f((i + 1) as f64 / t) / f(i as f64 / t)).min(0.999))
            .collect();
        Self::from_betas(betas, (0..timesteps).collect())
    }

    /// Builds every coefficient from a beta sequence.
    pub fn from_betas(betas: Vec<f64>, timestep_map: Vec<usize>) -> Self {
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod.iter().copied())
            .take(betas.len())
            .collect();
        let n = betas.len();
        let mut posterior_variance = vec![0.0; n];
        let mut coef1 = vec![0.0; n];
        let mut coef2 = vec![0.0; n];
        for i in 0..n {
            let (b, a, ap) = (betas[i], alphas_cumprod[i], alphas_cumprod_prev[i]);
            posterior_variance[i] = b * (1.0 - ap) / (1.0 - a);
            coef1[i] = b * ap.sqrt() / (1.0 - a);
            coef2[i] = (1.0 - ap) * (1.0 - b).sqrt() / (1.0 - a);
        }
        let posterior_log_variance_clipped = (0..n)
            .map(|i| posterior_variance[if i == 0 && n > 1 { 1 } else { i }].ln())
            .collect();
        Self {
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1: coef1,
            posterior_mean_coef2: coef2,
            timestep_map,
        }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Whether the schedule has no steps.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// `steps` evenly spaced timesteps of this schedule (`round(i (T-1)/(S-1))`, halves
    /// rounded to even as numpy's `linspace(...).round()` and so diffusers' "linspace"
    /// spacing do), always including the first and the last.
    pub fn spaced_timesteps(&self, steps: usize) -> Vec<usize> {
        let t = self.len();
        let steps = steps.clamp(1, t);
        if steps == 1 {
            return vec![t - 1];
        }
        let stride = (t - 1) as f64 / (steps - 1) as f64;
        let mut keep: Vec<usize> = (0..steps)
            .map(|i| (i as f64 * stride).round_ties_even() as usize)
            .collect();
        keep.dedup();
        keep
    }

    /// A schedule of `steps` steps that keeps this schedule's `abar` at the spaced
    /// timesteps (the respacing used for 250-step DDPM sampling of a 1000-step model).
    pub fn respaced(&self, steps: usize) -> Self {
        self.respaced_at(&self.spaced_timesteps(steps))
    }

    /// A schedule whose steps are this schedule's steps `keep` (increasing), with their
    /// `abar` kept.
    pub fn respaced_at(&self, keep: &[usize]) -> Self {
        assert!(
            keep.windows(2).all(|w| w[0] < w[1]),
            "respaced steps must increase"
        );
        let mut last = 1.0;
        let betas = keep
            .iter()
            .map(|&i| {
                let a = self.alphas_cumprod[i];
                let beta = 1.0 - a / last;
                last = a;
                beta
            })
            .collect();
        let map = keep.iter().map(|&i| self.timestep_map[i]).collect();
        Self::from_betas(betas, map)
    }

    fn gather<B: Backend>(values: &[f64], t: Tensor<B, 1, Int>) -> Tensor<B, 4> {
        let n = t.dims()[0];
        Self::lookup(values, t).reshape([n, 1, 1, 1])
    }

    /// `values[t]` for each timestep, as f32 on `t`'s device.
    ///
    /// # Shapes
    /// - `t`: `[N]`; output `[N]`
    pub fn lookup<B: Backend>(values: &[f64], t: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let table: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        Tensor::<B, 1>::from_floats(table.as_slice(), &t.device()).select(0, t)
    }

    /// The signal-to-noise ratio `abar_t / (1 - abar_t)` of every step.
    pub fn snr(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|a| a / (1.0 - a)).collect()
    }

    /// `sqrt(abar_t)` and `sqrt(1 - abar_t)` for one timestep per image, broadcast to
    /// `shape`.
    ///
    /// # Shapes
    /// - `t`: `[N]`; outputs `shape` (`[N, c, H, W]`)
    pub fn signal_noise_scales<B: Backend>(
        &self,
        t: Tensor<B, 1, Int>,
        shape: Shape,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let sqrt_a: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let sqrt_1ma: Vec<f64> = self
            .alphas_cumprod
            .iter()
            .map(|a| (1.0 - a).sqrt())
            .collect();
        (
            Self::gather(&sqrt_a, t.clone()).expand(shape.clone()),
            Self::gather(&sqrt_1ma, t).expand(shape),
        )
    }

    /// Forward noising `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, one `t` per image.
    ///
    /// # Shapes
    /// - `x0`, `noise`: `[N, c, H, W]`, `t`: `[N]`; output `[N, c, H, W]`
    pub fn q_sample<B: Backend>(
        &self,
        x0: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        t: Tensor<B, 1, Int>,
    ) -> Tensor<B, 4> {
        let (a, b) = self.signal_noise_scales(t, x0.shape());
        x0 * a + noise * b
    }

    /// `x_0` recovered from `x_t` and a noise prediction at step `i` of this schedule.
    pub fn predict_x0<B: Backend, const D: usize>(
        &self,
        x_t: Tensor<B, D>,
        eps: Tensor<B, D>,
        i: usize,
    ) -> Tensor<B, D> {
        let a = self.alphas_cumprod[i];
        x_t * (1.0 / a).sqrt() - eps * (1.0 / a - 1.0).sqrt()
    }

    /// Mean and log-variance of the posterior `q(x_{i-1} | x_i, x_0)`.
    pub fn posterior<B: Backend, const D: usize>(
        &self,
        x0: Tensor<B, D>,
        x_t: Tensor<B, D>,
        i: usize,
    ) -> (Tensor<B, D>, f64) {
        (
            x0 * self.posterior_mean_coef1[i] + x_t * self.posterior_mean_coef2[i],
            self.posterior_log_variance_clipped[i],
        )
    }

    /// One ancestral DDPM step from step `i` to `i - 1`.
    ///
    /// `noise` is the fresh Gaussian sample (ignored at `i = 0`); `clip` bounds the
    /// predicted `x_0` (e.g. `Some(1.0)` in pixel space).
    pub fn ddpm_step<B: Backend, const D: usize>(
        &self,
        x_t: Tensor<B, D>,
        eps: Tensor<B, D>,
        i: usize,
        noise: Tensor<B, D>,
        clip: Option<f64>,
    ) -> Tensor<B, D> {
        let x0 = clip_x0(self.predict_x0(x_t.clone(), eps, i), clip);
        let (mean, log_var) = self.posterior(x0, x_t, i);
        if i == 0 {
            mean
        } else {
            mean + noise * (0.5 * log_var).exp()
        }
    }

    /// One deterministic DDIM step (eta = 0) from step `i` to `i - 1` (to `x_0` at `i = 0`).
    pub fn ddim_step<B: Backend, const D: usize>(
        &self,
        x_t: Tensor<B, D>,
        eps: Tensor<B, D>,
        i: usize,
        clip: Option<f64>,
    ) -> Tensor<B, D> {
        let a = self.alphas_cumprod[i];
        let x0 = clip_x0(self.predict_x0(x_t.clone(), eps, i), clip);
        // Noise consistent with the (possibly clipped) x_0.
        let eps = (x_t - x0.clone() * a.sqrt()) / (1.0 - a).sqrt();
        let ap = self.alphas_cumprod_prev[i];
        x0 * ap.sqrt() + eps * (1.0 - ap).sqrt()
    }

    /// One consistency-model step from step `i`: jump to the predicted (clipped) `x_0`, then,
    /// for `i > 0`, re-noise it to step `i - 1` with the fresh Gaussian `noise` (ignored at
    /// `i = 0`, where `x_0` is the result).
    ///
    /// With the model's velocity `F` at angle `phi`, the predicted `x_0` is the consistency
    /// function `cos phi x - sin phi F` (see [`crate::trigflow::consistency_x0`]).
    pub fn consistency_step<B: Backend, const D: usize>(
        &self,
        x_t: Tensor<B, D>,
        eps: Tensor<B, D>,
        i: usize,
        noise: Tensor<B, D>,
        clip: Option<f64>,
    ) -> Tensor<B, D> {
        let x0 = clip_x0(self.predict_x0(x_t, eps, i), clip);
        if i == 0 {
            return x0;
        }
        let a = self.alphas_cumprod[i - 1];
        x0 * a.sqrt() + noise * (1.0 - a).sqrt()
    }
}

fn clip_x0<B: Backend, const D: usize>(x0: Tensor<B, D>, clip: Option<f64>) -> Tensor<B, D> {
    match clip {
        Some(c) => x0.clamp(-c, c),
        None => x0,
    }
}
