//! What the image head predicts: the noise `eps` (the paper's choice) or the velocity
//! `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0` (Salimans & Ho 2022).
//!
//! Samplers always work with `eps`; [`Prediction::to_eps`] converts the head's output. With
//! `eps`, the implied `x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)` multiplies every error
//! of the head by `sqrt((1 - abar) / abar)` (about 13 at `t = 950` of the cosine schedule),
//! which a small, briefly trained model cannot afford: its early samples turn into patchy
//! noise. `v` keeps the implied `x_0` error bounded at every `t`.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::NoiseSchedule;

/// The image head's target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The added noise `eps` (the paper, following Ho et al. 2020).
    #[default]
    Epsilon,
    /// The velocity `v = sqrt(abar) eps - sqrt(1 - abar) x_0`.
    V,
}

impl Prediction {
    /// The training target for clean latents `x0`, noise `eps` and one timestep per image.
    ///
    /// # Shapes
    /// - `x0`, `eps`: `[N, c, H, W]`, `t`: `[N]`; output `[N, c, H, W]`
    pub fn target<B: Backend>(
        self,
        schedule: &NoiseSchedule,
        x0: Tensor<B, 4>,
        eps: Tensor<B, 4>,
        t: Tensor<B, 1, Int>,
    ) -> Tensor<B, 4> {
        match self {
            Self::Epsilon => eps,
            Self::V => {
                let (sa, s1a) = schedule.signal_noise_scales(t, x0.shape());
                eps * sa - x0 * s1a
            }
        }
    }

    /// The noise implied by the head's output `out` for the noisy latents `x_t`.
    ///
    /// # Shapes
    /// - `out`, `x_t`: `[N, c, H, W]`, `t`: `[N]`; output `[N, c, H, W]`
    pub fn to_eps<B: Backend>(
        self,
        schedule: &NoiseSchedule,
        out: Tensor<B, 4>,
        x_t: Tensor<B, 4>,
        t: Tensor<B, 1, Int>,
    ) -> Tensor<B, 4> {
        match self {
            Self::Epsilon => out,
            Self::V => {
                // x_t = sa x0 + s1a eps and v = sa eps - s1a x0  =>  eps = s1a x_t + sa v
                let (sa, s1a) = schedule.signal_noise_scales(t, out.shape());
                x_t * s1a + out * sa
            }
        }
    }

    /// The min-SNR-gamma weight (Hang et al. 2023) of each step's target MSE for this
    /// prediction: `min(SNR_t, gamma) / SNR_t` for `eps`, `min(SNR_t, gamma) / (SNR_t + 1)`
    /// for `v`, with `SNR_t = abar_t / (1 - abar_t)`. Either way the weighted target MSE is
    /// the `x_0` MSE times `min(SNR_t, gamma)`: the many low-noise steps, whose `x_0` is
    /// almost given, stop dominating the gradient.
    pub fn min_snr_weights(self, schedule: &NoiseSchedule, gamma: f64) -> Vec<f64> {
        schedule
            .snr()
            .into_iter()
            .map(|snr| {
                let clipped = snr.min(gamma);
                match self {
                    Self::Epsilon => clipped / snr,
                    Self::V => clipped / (snr + 1.0),
                }
            })
            .collect()
    }
}
