//! The noise schedule against numbers from an independent numpy implementation
//! (scripts/schedule_reference.py -> tests/fixtures/schedule.json).

use burn::backend::NdArray;
use burn::prelude::*;
use serde_json::Value;
use transfusion_model::NoiseSchedule;

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/schedule.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    let tol = 1e-9 * b.abs().max(1e-3);
    assert!((a - b).abs() <= tol, "{what}: got {a}, expected {b}");
}

#[test]
fn cosine_schedule_matches_reference() {
    let f = fixture();
    let s = NoiseSchedule::cosine(1000);
    assert_eq!(s.len(), 1000);
    let probe = indices(&f["probe_t"]);
    for (key, ours) in [
        ("betas", &s.betas),
        ("alphas_cumprod", &s.alphas_cumprod),
        ("posterior_variance", &s.posterior_variance),
        (
            "posterior_log_variance_clipped",
            &s.posterior_log_variance_clipped,
        ),
        ("posterior_mean_coef1", &s.posterior_mean_coef1),
        ("posterior_mean_coef2", &s.posterior_mean_coef2),
    ] {
        for (t, want) in probe.iter().zip(floats(&f[key])) {
            close(ours[*t], want, &format!("{key}[{t}]"));
        }
    }
}

#[test]
fn respaced_schedules_match_reference() {
    let f = fixture();
    let full = NoiseSchedule::cosine(1000);
    for steps in [250usize, 50] {
        let r = &f[format!("respaced_{steps}")];
        let s = full.respaced(steps);
        let want_t = indices(&r["timesteps"]);
        assert_eq!(s.timestep_map, want_t);
        let idx = indices(&r["probe_index"]);
        for (key, ours) in [
            ("betas", &s.betas),
            ("posterior_variance", &s.posterior_variance),
            ("posterior_mean_coef1", &s.posterior_mean_coef1),
            ("posterior_mean_coef2", &s.posterior_mean_coef2),
        ] {
            for (i, want) in idx.iter().zip(floats(&r[key])) {
                close(ours[*i], want, &format!("respaced_{steps}.{key}[{i}]"));
            }
        }
        // Respacing keeps abar at the kept timesteps.
        for (j, &t) in s.timestep_map.iter().enumerate() {
            close(s.alphas_cumprod[j], full.alphas_cumprod[t], "respaced abar");
        }
    }
}

type B = NdArray;

/// Random latents in `[-1, 1]` and standard normal noise of `shape`.
fn latents_and_noise(
    shape: [usize; 4],
    dev: &burn::backend::ndarray::NdArrayDevice,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let x0 = Tensor::random(shape, burn::tensor::Distribution::Uniform(-1.0, 1.0), dev);
    let eps = Tensor::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), dev);
    (x0, eps)
}

#[test]
fn q_sample_and_x0_prediction_invert_each_other() {
    let dev = Default::default();
    let s = NoiseSchedule::cosine(1000);
    let (x0, eps) = latents_and_noise([3, 2, 4, 4], &dev);
    let t = [10i64, 500, 900];
    let xt = s.q_sample(x0.clone(), eps.clone(), Tensor::from_ints(t, &dev));
    for (i, &ti) in t.iter().enumerate() {
        let xt_i = xt.clone().narrow(0, i, 1);
        // x_t for image i equals the scalar formula
        let a = s.alphas_cumprod[ti as usize];
        let manual =
            x0.clone().narrow(0, i, 1) * a.sqrt() + eps.clone().narrow(0, i, 1) * (1.0 - a).sqrt();
        let diff: f32 = (xt_i.clone() - manual).abs().max().into_scalar();
        assert!(diff < 1e-5, "q_sample t={ti}: {diff}");
        let back = s.predict_x0(xt_i, eps.clone().narrow(0, i, 1), ti as usize);
        let diff: f32 = (back - x0.clone().narrow(0, i, 1))
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-3, "predict_x0 t={ti}: {diff}");
    }
}

#[test]
fn ddim_with_the_true_noise_recovers_x0_in_one_jump() {
    let dev = Default::default();
    let s = NoiseSchedule::cosine(1000);
    let (x0, eps) = latents_and_noise([1, 1, 4, 4], &dev);
    // Respaced to 2 steps: [0, 999]. From 999 with the true noise, DDIM lands on x at t=0
    // and from 0 on x0.
    let r = s.respaced(2);
    assert_eq!(r.timestep_map, vec![0, 999]);
    let xt = s.q_sample(x0.clone(), eps.clone(), Tensor::from_ints([999], &dev));
    let x_prev = r.ddim_step(xt, eps.clone(), 1, None);
    let expected = s.q_sample(x0.clone(), eps.clone(), Tensor::from_ints([0], &dev));
    let diff: f32 = (x_prev.clone() - expected).abs().max().into_scalar();
    assert!(diff < 1e-2, "{diff}");
    let last = r.ddim_step(x_prev, eps, 0, None);
    let diff: f32 = (last - x0).abs().max().into_scalar();
    assert!(diff < 1e-2, "{diff}");
}
