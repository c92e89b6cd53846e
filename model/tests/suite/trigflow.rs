//! The cosine schedule as a TrigFlow path (sCM): each identity the consistency sampler and
//! distillation build on, checked against the schedule's own `q_sample` and `v` target.

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use transfusion_model::trigflow::{consistency_x0, phi_at, phi_of_abar, trig_noise, trig_velocity};
use transfusion_model::{NoiseSchedule, Prediction};

type B = NdArray;

const TIMESTEPS: [usize; 5] = [0, 100, 500, 900, 999];

fn max_abs<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// Fixed inputs: `x0` in [-1, 1] and unit-normal `eps`, one image per timestep.
fn inputs() -> (Tensor<B, 4>, Tensor<B, 4>) {
    let dev = Default::default();
    let shape = [TIMESTEPS.len(), 3, 4, 4];
    let n: usize = shape.iter().product();
    let x0: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let eps = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    (Tensor::from_data(TensorData::new(x0, shape), &dev), eps)
}

fn image(x: &Tensor<B, 4>, i: usize) -> Tensor<B, 4> {
    x.clone().slice([i..i + 1])
}

#[test]
fn the_cosine_path_is_trigflow_and_v_is_its_velocity() {
    let s = NoiseSchedule::cosine(1000);
    let (x0, eps) = inputs();
    let dev = Default::default();
    let t = Tensor::<B, 1, Int>::from_data(
        TensorData::new(TIMESTEPS.map(|t| t as i64).to_vec(), [TIMESTEPS.len()]),
        &dev,
    );
    let x_t = s.q_sample(x0.clone(), eps.clone(), t.clone());
    let v = Prediction::V.target(&s, x0.clone(), eps.clone(), t);
    for (i, &step) in TIMESTEPS.iter().enumerate() {
        let phi = phi_at(&s, step);
        let (x0_i, eps_i) = (image(&x0, i), image(&eps, i));
        // x_phi is q_sample; F is the v target (f32 products: a few ulps).
        let x_phi = trig_noise(x0_i.clone(), eps_i.clone(), phi);
        assert!(max_abs(x_phi.clone(), image(&x_t, i)) < 1e-6, "t = {step}");
        let f = trig_velocity(x0_i.clone(), eps_i.clone(), phi);
        assert!(max_abs(f.clone(), image(&v, i)) < 1e-6, "t = {step}");
        // The consistency function of the path's own velocity returns x0 (f32 rounding of
        // four products of terms up to |eps| ~ 4: a few 1e-7 each).
        assert!(max_abs(consistency_x0(x_phi, f.clone(), phi), x0_i.clone()) < 4e-6);
        // F = dx/dphi: a central difference in f64-sized steps (error O(h^2) = 1e-6).
        let h = 1e-3;
        let ahead = trig_noise(x0_i.clone(), eps_i.clone(), phi + h);
        let behind = trig_noise(x0_i, eps_i, phi - h);
        let numeric = (ahead - behind).div_scalar(2.0 * h);
        assert!(max_abs(numeric, f) < 2e-3, "t = {step}");
    }
}

#[test]
fn angles_rise_from_near_zero_to_just_below_a_right_angle() {
    let s = NoiseSchedule::cosine(1000);
    assert_eq!(phi_of_abar(1.0), 0.0);
    assert!((phi_of_abar(0.5) - std::f64::consts::FRAC_PI_4).abs() < 1e-15);
    let phis: Vec<f64> = (0..1000).map(|t| phi_at(&s, t)).collect();
    assert!(phis.windows(2).all(|w| w[1] > w[0]), "increasing in t");
    assert!(phis[0] > 0.0 && phis[0] < 0.02, "{}", phis[0]);
    // phi_max, the one-step sampler's start: cos phi_max = sqrt(abar_999).
    let end = phis[999];
    assert!(end < std::f64::consts::FRAC_PI_2 && end > 1.55, "{end}");
    assert!((end.cos() - s.alphas_cumprod[999].sqrt()).abs() < 1e-12);
}
