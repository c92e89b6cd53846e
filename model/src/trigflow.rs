//! The model's cosine schedule read as a TrigFlow path (sCM, Lu & Song 2024) with
//! `sigma_d = 1`: the foundation of consistency distillation and few-step sampling.
//!
//! With `phi = atan2(sqrt(1 - abar), sqrt(abar))` (so `cos phi = sqrt(abar)`,
//! `sin phi = sqrt(1 - abar)`):
//!
//! ```text
//! x_phi   = cos phi * x0 + sin phi * eps          (= q_sample at the same abar)
//! F       = cos phi * eps - sin phi * x0 = dx_phi / dphi   (the v-prediction target)
//! f(x, F) = cos phi * x - sin phi * F = x0        (the consistency function)
//! ```
//!
//! Angles are `f64` on the host (as the schedule's coefficients); tensor code multiplies by
//! their cosines and sines.

use burn::prelude::*;

use crate::NoiseSchedule;

/// The TrigFlow angle of a cumulative signal fraction `abar` in `(0, 1]`.
pub fn phi_of_abar(abar: f64) -> f64 {
    (1.0 - abar).max(0.0).sqrt().atan2(abar.sqrt())
}

/// The angle of timestep `t` of `schedule` (`t = T - 1` is the schedule's end, `phi_max`).
pub fn phi_at(schedule: &NoiseSchedule, t: usize) -> f64 {
    phi_of_abar(schedule.alphas_cumprod[t])
}

/// The continuous timestep of angle `phi`: exactly `t` at `phi_at(schedule, t)`, linear in
/// `phi` between neighbouring steps, clamped to `0..=T-1` outside the schedule's angles. A
/// continuous-time model is conditioned on it (the timestep embedding takes real values).
pub fn timestep_of_phi(schedule: &NoiseSchedule, phi: f64) -> f64 {
    let last = schedule.len() - 1;
    let at = |t: usize| phi_at(schedule, t);
    if phi <= at(0) {
        return 0.0;
    }
    if phi >= at(last) {
        return last as f64;
    }
    // The first step whose angle is above `phi` (angles increase with `t`).
    let hi = schedule
        .alphas_cumprod
        .partition_point(|&abar| phi_of_abar(abar) <= phi);
    let (a, b) = (at(hi - 1), at(hi));
    (hi - 1) as f64 + (phi - a) / (b - a)
}

/// The point at angle `phi` on the path from `x0` to `eps`: `cos phi x0 + sin phi eps`.
///
/// # Shapes
/// - `x0`, `eps`: any shape `S`; output `S`
pub fn trig_noise<B: Backend, const D: usize>(
    x0: Tensor<B, D>,
    eps: Tensor<B, D>,
    phi: f64,
) -> Tensor<B, D> {
    x0.mul_scalar(phi.cos()) + eps.mul_scalar(phi.sin())
}

/// The path's velocity `dx/dphi = cos phi eps - sin phi x0` (TrigFlow's `F`, the
/// v-prediction target).
///
/// # Shapes
/// - `x0`, `eps`: any shape `S`; output `S`
pub fn trig_velocity<B: Backend, const D: usize>(
    x0: Tensor<B, D>,
    eps: Tensor<B, D>,
    phi: f64,
) -> Tensor<B, D> {
    eps.mul_scalar(phi.cos()) - x0.mul_scalar(phi.sin())
}

/// The consistency function `f(x, phi) = cos phi x - sin phi F`: the clean sample implied
/// by a point `x` at angle `phi` and a velocity `F` there (exactly `x0` for the path's own
/// velocity).
///
/// # Shapes
/// - `x`, `velocity`: any shape `S`; output `S`
pub fn consistency_x0<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    velocity: Tensor<B, D>,
    phi: f64,
) -> Tensor<B, D> {
    x.mul_scalar(phi.cos()) - velocity.mul_scalar(phi.sin())
}
