//! Continuous-time consistency distillation (sCD, Lu & Song 2024) on the TrigFlow path of
//! [`crate::trigflow`], with `sigma_d = 1`.
//!
//! A consistency model's velocity `F_theta(x, phi)` defines `f(x, phi) = cos phi x - sin phi
//! F_theta`, which should return the same clean sample from every point of one probability-
//! flow trajectory. Distillation pulls `F_theta` towards `F^- + g`, where `F^-` is the
//! student without gradient and the tangent
//!
//! ```text
//! g = -cos^2 phi (F^- - dx/dphi) - r cos phi sin phi (x + dF^-/dphi)
//! ```
//!
//! uses the teacher's probability-flow velocity `dx/dphi` and the student's derivative along
//! that trajectory, `dF^-/dphi`. Burn has no forward-mode differentiation, so the derivative
//! is a central finite difference ([`central_difference`]). `r` ramps from 0 to 1 (tangent
//! warm-up); `g` is normalised per sample ([`normalize_tangent`]); the squared error is
//! weighted by a learned `w(phi)` ([`adaptive_weighted_loss`]).
//!
//! The student's time input must be smooth in `phi`: the model suite's toy distillation
//! (a 2-D mixture) converges with features of the angle itself (sCM's `c_noise = phi`), but
//! with the DDPM checkpoints' 1000-step-scale features of [`crate::trigflow::timestep_of_phi`]
//! it diverged at lr 5e-4 and smeared the modes at 1e-4: those features turn within a
//! thousandth of a radian, so the finite difference measures their wiggle, not the flow.
//!
//! Distilling a DDPM checkpoint therefore keeps to its timestep grid
//! ([`proposal_step`]): each sample's angle is the proposal's draw rounded to the nearest
//! training step, and the finite difference spans grid steps `t - k` and `t + k`
//! ([`grid_neighbours`]), so the teacher and the student are only ever asked at the
//! timesteps they were trained on. A trained network is not smooth from one step to the
//! next (its time features turn within a few steps), so `k` is a measured setting of the
//! distillation, not the `f32` optimum of a smooth function ([`DEFAULT_FD_STEP`]): the
//! error, about `h^2 |third derivative| / 6 + jitter / h`, favours a wide step when the
//! jitter dominates.
//!
//! Angles are per sample and live on the host (`&[f64]`); tensor code multiplies by their
//! cosines and sines broadcast over each sample.

use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::timestep::sinusoidal_embedding;
use crate::trigflow::{phi_at, timestep_of_phi};
use crate::NoiseSchedule;

/// sCM's proposal mean `P_mean` for `tau` in `tan phi = e^tau / sigma_d`.
pub const PROPOSAL_MEAN: f64 = -1.0;
/// sCM's proposal standard deviation `P_std`.
pub const PROPOSAL_STD: f64 = 1.4;
/// The angle a two-step sampler re-noises to (sCM: 1.1).
pub const PHI_MID: f64 = 1.1;
/// The step `h` of [`central_difference`] in the angle (radians) for `f32` evaluations:
/// truncation error grows as `h^2` and rounding as `1e-7 / h`. Measured on a smooth
/// closed-form velocity (the model suite's `consistency` tests sweep `1e-1..1e-4`): `1e-3`
/// gave the smallest error (1.1e-4, against 3e-4 at 3e-3 and 4e-4 at 3e-4).
pub const DEFAULT_FD_STEP: f64 = 1e-3;
/// The constant `c` of the tangent normalisation `g / (||g|| + c)`.
pub const TANGENT_NORM_EPS: f64 = 0.1;

/// The angle of a proposal draw `tau` (`tan phi = e^tau` with `sigma_d = 1`), in `(0, pi/2)`.
pub fn proposal_phi(tau: f64) -> f64 {
    tau.exp().atan()
}

/// The training step of a proposal draw `tau` on `schedule`'s grid: the step nearest the
/// angle [`proposal_phi`]`(tau)`, kept inside `span..=T-1-span` so that both neighbours
/// of [`grid_neighbours`] exist.
pub fn proposal_step(schedule: &NoiseSchedule, tau: f64, span: usize) -> usize {
    let last = schedule.len() - 1;
    assert!(
        span >= 1 && 2 * span <= last,
        "span {span} does not fit {last} steps"
    );
    let t = timestep_of_phi(schedule, proposal_phi(tau)).round() as usize;
    t.clamp(span, last - span)
}

/// The central difference's neighbours of grid step `t`, `span` steps either side, and
/// the signed angle from `t` to each.
pub fn grid_neighbours(schedule: &NoiseSchedule, t: usize, span: usize) -> GridNeighbours {
    let phi = phi_at(schedule, t);
    GridNeighbours {
        behind: t - span,
        ahead: t + span,
        to_behind: phi_at(schedule, t - span) - phi,
        to_ahead: phi_at(schedule, t + span) - phi,
    }
}

/// See [`grid_neighbours`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GridNeighbours {
    /// The step before.
    pub behind: usize,
    /// The step after.
    pub ahead: usize,
    /// `phi_{t-1} - phi_t` (negative).
    pub to_behind: f64,
    /// `phi_{t+1} - phi_t` (positive).
    pub to_ahead: f64,
}

/// The learned log-weight `w` of [`adaptive_weighted_loss`] for each sample's timestep: a
/// linear map of the timestep's sinusoidal features plus a bias. It only shapes the
/// distillation loss; inference never uses it.
#[derive(Module, Debug)]
pub struct AdaptiveWeight<B: Backend> {
    /// Features to log-weight, `d_freq -> 1`.
    pub linear: Linear<B>,
    /// Width of the sinusoidal features.
    pub d_freq: usize,
}

impl<B: Backend> AdaptiveWeight<B> {
    /// A constant log-weight `initial` over `d_freq` sinusoidal features (zero weights,
    /// bias `initial`).
    ///
    /// The distillation's squared error is at most `1 / D` at the start (the target is
    /// `F^- + g` with `||g|| < 1` over `D` values), so `initial = -ln D` puts
    /// `e^{-w} mse` near 1 from the first step; from 0 it would take the weight hundreds of
    /// steps to get there while the consistency term's gradient is `D` times too small.
    pub fn new(d_freq: usize, initial: f64, device: &B::Device) -> Self {
        let mut linear = LinearConfig::new(d_freq, 1)
            .with_initializer(Initializer::Zeros)
            .init(device);
        linear.bias = linear.bias.map(|b| b.map(|t| t.add_scalar(initial)));
        Self { linear, d_freq }
    }

    /// The log-weight of each sample's timestep.
    ///
    /// # Shapes
    /// `t`: `[N]` -> `[N]`
    pub fn forward(&self, t: Tensor<B, 1>) -> Tensor<B, 1> {
        let n = t.dims()[0];
        self.linear
            .forward(sinusoidal_embedding(t, self.d_freq))
            .reshape([n])
    }
}

/// A per-sample factor `[N, 1, .., 1]` expanded to `shape`: `g(phi_i)` for sample `i`.
///
/// # Shapes
/// - `phi`: `N` values; output `shape` with `shape[0] = N`
pub fn per_sample<B: Backend, const D: usize>(
    phi: &[f64],
    g: impl Fn(f64) -> f64,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    assert_eq!(phi.len(), shape[0], "one angle per sample");
    let mut column = [1usize; D];
    column[0] = phi.len();
    let values: Vec<f32> = phi.iter().map(|&p| g(p) as f32).collect();
    Tensor::<B, D>::from_data(TensorData::new(values, column), device).expand(shape)
}

/// `dF/dphi` along a trajectory from two evaluations a step `h` either side:
/// `(F(x + h dx/dphi, phi + h) - F(x - h dx/dphi, phi - h)) / 2h`.
///
/// # Shapes
/// - `ahead`, `behind`: any shape `S`; output `S`
pub fn central_difference<B: Backend, const D: usize>(
    ahead: Tensor<B, D>,
    behind: Tensor<B, D>,
    h: f64,
) -> Tensor<B, D> {
    (ahead - behind).div_scalar(2.0 * h)
}

/// The sCD tangent `g = -cos^2 phi (F^- - dx/dphi) - r cos phi sin phi (x + dF^-/dphi)`.
///
/// # Shapes
/// - `x`, `student`, `teacher_velocity`, `student_derivative`: `[N, ..]`; `phi`: `N` angles;
///   output `[N, ..]`
pub fn consistency_tangent<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    student: Tensor<B, D>,
    teacher_velocity: Tensor<B, D>,
    student_derivative: Tensor<B, D>,
    phi: &[f64],
    warmup: f64,
) -> Tensor<B, D> {
    let shape = x.dims();
    let device = x.device();
    let cos2 = per_sample::<B, D>(phi, |p| p.cos().powi(2), shape, &device);
    let cos_sin = per_sample::<B, D>(phi, |p| warmup * p.cos() * p.sin(), shape, &device);
    -(cos2 * (student - teacher_velocity)) - cos_sin * (x + student_derivative)
}

/// `g / (||g|| + c)` with the L2 norm of each sample and `c` = [`TANGENT_NORM_EPS`].
///
/// # Shapes
/// - `g`: `[N, ..]`; output `[N, ..]`
pub fn normalize_tangent<B: Backend, const D: usize>(g: Tensor<B, D>) -> Tensor<B, D> {
    let shape = g.dims();
    let n = shape[0];
    let norm = g
        .clone()
        .reshape([n as i32, -1])
        .powf_scalar(2.0)
        .sum_dim(1)
        .sqrt()
        .add_scalar(TANGENT_NORM_EPS);
    let mut column = [1usize; D];
    column[0] = n;
    g / norm.reshape(column).expand(shape)
}

/// The distillation loss `mean_i [ e^{-w_i} mse_i + w_i ]`: `mse_i` is sample `i`'s mean
/// squared error of `student` against `target` (`||.||^2 / D`), `w_i` the learned log-weight
/// of its angle. At the optimum `e^{w_i}` tracks `mse_i`, which evens out the loss across
/// angles.
///
/// # Shapes
/// - `student`, `target`: `[N, ..]`; `log_weight`: `[N]`; output `[1]`
pub fn adaptive_weighted_loss<B: Backend, const D: usize>(
    student: Tensor<B, D>,
    target: Tensor<B, D>,
    log_weight: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let n = student.dims()[0];
    let mse = (student - target)
        .reshape([n as i32, -1])
        .powf_scalar(2.0)
        .mean_dim(1)
        .reshape([n]);
    ((-log_weight.clone()).exp() * mse + log_weight).mean()
}
