//! The noise schedule against reference numbers: a numpy transcription of the formulas
//! (scripts/schedule_reference.py -> tests/fixtures/schedule.json) and HuggingFace
//! diffusers' DDPM/DDIM schedulers, an independent implementation
//! (scripts/scheduler_reference.py -> tests/fixtures/scheduler_diffusers.json).

use burn::backend::NdArray;
use burn::prelude::*;
use serde_json::Value;
use transfusion_model::NoiseSchedule;

fn fixture() -> Value {
    serde_json::from_str(include_str!("../fixtures/schedule.json")).unwrap()
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
    // Fixed values (no shared RNG, so every run checks the same numbers): x0 spread over
    // [-1, 1], eps over about [-2, 2].
    let n: usize = shape.iter().product();
    let x0: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 41) as f32 / 20.0) - 1.0)
        .collect();
    let eps: Vec<f32> = (0..n).map(|i| 2.0 * (i as f32 * 1.7 + 0.3).sin()).collect();
    (
        Tensor::from_data(TensorData::new(x0, shape), dev),
        Tensor::from_data(TensorData::new(eps, shape), dev),
    )
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
        // f32: x_t / sqrt(abar) and eps sqrt(1/abar - 1) are each rounded at |.| <= ~30
        // (t = 900, 1/sqrt(abar) = 6.5), so about 4e-6 (3.2e-6 is the largest seen in an
        // f32 emulation over 20000 draws); 5e-5 leaves margin.
        assert!(diff < 5e-5, "predict_x0 t={ti}: {diff}");
    }
}

#[test]
fn ddim_with_the_true_noise_recovers_x0_in_one_jump() {
    let dev = Default::default();
    let s = NoiseSchedule::cosine(1000);
    let (x0, eps) = latents_and_noise([1, 1, 4, 4], &dev);
    // Respaced to 2 steps: [0, 999]. From 999 with the true noise, DDIM lands on x at t=0
    // and from 0 on x0.
    // Tolerance 1e-2 is set by f32 cancellation, not by the formula: at t = 999,
    // 1/sqrt(abar) = 2e4 multiplies the rounding of x_t and of the two ~1e5 products in
    // predict_x0 (ulp 8e-3). An f32 emulation over 20000 random draws: median 2e-3, max
    // 9.8e-3; the inputs here are fixed, so the check cannot flake.
    // The exact comparison of DDIM steps is `ddim_steps_match_diffusers`.
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

// --- Against HuggingFace diffusers (scripts/scheduler_reference.py ->
// tests/fixtures/scheduler_diffusers.json): DDPMScheduler / DDIMScheduler with
// `squaredcos_cap_v2`, epsilon prediction, linspace spacing, evaluated in float64.

fn diffusers() -> Value {
    serde_json::from_str(include_str!("../fixtures/scheduler_diffusers.json")).unwrap()
}

/// The fixture's `x_t`, `eps` and fixed `noise`, `[1, 2, 4, 4]`.
fn step_inputs(f: &Value, dev: &burn::backend::ndarray::NdArrayDevice) -> [Tensor<B, 4>; 3] {
    let shape: [usize; 4] = serde_json::from_value(f["shape"].clone()).unwrap();
    ["x_t", "eps", "noise"].map(|k| {
        let v: Vec<f32> = floats(&f[k]).iter().map(|&x| x as f32).collect();
        Tensor::from_data(burn::tensor::TensorData::new(v, shape), dev)
    })
}

/// Element-wise `|ours - want| <= tol * max(1, |want|)`; returns the largest scaled error.
fn close_f32(ours: Tensor<B, 4>, want: &Value, tol: f64, what: &str) -> f64 {
    let ours = ours.into_data().to_vec::<f32>().unwrap();
    let want = floats(want);
    assert_eq!(ours.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (j, (&o, &w)) in ours.iter().zip(&want).enumerate() {
        let err = (o as f64 - w).abs() / w.abs().max(1.0);
        assert!(err <= tol, "{what}[{j}]: ours {o}, diffusers {w}");
        worst = worst.max(err);
    }
    worst
}

/// Tolerance of one f32 sampling step against diffusers' float64 one, relative to
/// `max(1, |x|)`: the inputs are f32-exact with |x| <= 3 (x_t, eps, the predicted x_0), our
/// coefficients are f64 rounded to f32 (2^-24 relative), and a step is under ten f32
/// multiply-adds, each rounding to 2^-24 (6e-8) of a value <= 3: at most ~2e-6 (measured:
/// 1.8e-7 for DDPM, 1.3e-7 for DDIM). Clipping, or a coefficient of a neighbouring step,
/// moves the output by > 1e-3.
const STEP_TOL: f64 = 2e-6;

#[test]
fn cosine_schedule_matches_diffusers() {
    let f = diffusers();
    let s = NoiseSchedule::cosine(1000);
    assert_eq!(f["T"].as_u64(), Some(1000));
    // Both sides evaluate the same cosine in f64: agreement to rounding.
    for (t, (b, a)) in indices(&f["probe_t"]).iter().zip(
        floats(&f["betas"])
            .into_iter()
            .zip(floats(&f["alphas_cumprod"])),
    ) {
        assert!(
            (s.betas[*t] - b).abs() <= 1e-12 * b,
            "betas[{t}]: {} vs {b}",
            s.betas[*t]
        );
        assert!(
            (s.alphas_cumprod[*t] - a).abs() <= 1e-12 * a,
            "alphas_cumprod[{t}]: {} vs {a}",
            s.alphas_cumprod[*t]
        );
    }
}

/// Ours is `round(i (T-1)/(S-1))`; diffusers' `linspace` spacing is numpy's
/// `linspace(0, T-1, S).round()`, which rounds ties (x.5) to even.
#[test]
fn spaced_timesteps_match_diffusers_linspace_spacing() {
    let f = diffusers();
    let s = NoiseSchedule::cosine(1000);
    for (steps, want) in f["spacing"].as_object().unwrap() {
        let steps: usize = steps.parse().unwrap();
        assert_eq!(s.spaced_timesteps(steps), indices(want), "{steps} steps");
    }
}

/// One step case of the diffusers fixture: the cosine schedule respaced to its step count,
/// its step index (whose timestep is checked against the fixture's), its `x_0` clip and a
/// label for messages.
struct StepCase {
    s: NoiseSchedule,
    i: usize,
    clip: Option<f64>,
    what: String,
}

fn step_case(case: &Value, sampler: &str) -> StepCase {
    let field = |key: &str| case[key].as_u64().unwrap() as usize;
    let (steps, i, t) = (field("steps"), field("i"), field("t"));
    let clip = case["clip"].as_bool().unwrap().then_some(1.0);
    let what = format!("{sampler} {steps} steps, i {i} (t {t}), clip {clip:?}");
    let full = NoiseSchedule::cosine(1000);
    let s = if steps == 1000 {
        full
    } else {
        full.respaced(steps)
    };
    assert_eq!(s.timestep_map[i], t, "{what}: timestep");
    StepCase { s, i, clip, what }
}

#[test]
fn ddpm_steps_match_diffusers() {
    let f = diffusers();
    let dev = Default::default();
    let [x_t, eps, noise] = step_inputs(&f, &dev);
    let mut worst = 0.0f64;
    for case in f["ddpm"].as_array().unwrap() {
        let StepCase { s, i, clip, what } = step_case(case, "ddpm");
        // Posterior variance: f64 on both sides (diffusers clamps it to >= 1e-20 at t = 0).
        let var = case["variance"].as_f64().unwrap();
        assert!(
            (s.posterior_variance[i] - var).abs() <= 1e-12 * var + 1e-19,
            "{what}: variance {} vs {var}",
            s.posterior_variance[i]
        );
        let zero = Tensor::zeros(x_t.dims(), &dev);
        let mean = s.ddpm_step(x_t.clone(), eps.clone(), i, zero, clip);
        worst = worst.max(close_f32(
            mean,
            &case["mean"],
            STEP_TOL,
            &format!("{what}: mean"),
        ));
        let sample = s.ddpm_step(x_t.clone(), eps.clone(), i, noise.clone(), clip);
        worst = worst.max(close_f32(
            sample,
            &case["sample"],
            STEP_TOL,
            &format!("{what}: sample"),
        ));
    }
    eprintln!("ddpm: largest scaled error {worst:.2e}");
}

#[test]
fn ddim_steps_match_diffusers() {
    let f = diffusers();
    let dev = Default::default();
    let [x_t, eps, _] = step_inputs(&f, &dev);
    let mut worst = 0.0f64;
    for case in f["ddim"].as_array().unwrap() {
        let StepCase { s, i, clip, what } = step_case(case, "ddim");
        let t_prev = case["t_prev"].as_i64().unwrap();
        if i > 0 {
            assert_eq!(
                s.timestep_map[i - 1] as i64,
                t_prev,
                "{what}: previous timestep"
            );
        }
        let prev = s.ddim_step(x_t.clone(), eps.clone(), i, clip);
        worst = worst.max(close_f32(prev, &case["sample"], STEP_TOL, &what));
    }
    eprintln!("ddim: largest scaled error {worst:.2e}");
}

#[test]
fn min_snr_weights_match_reference() {
    let f = fixture();
    let s = NoiseSchedule::cosine(1000);
    let probe = indices(&f["probe_t"]);
    for (prediction, key) in [
        (transfusion_model::Prediction::Epsilon, "eps"),
        (transfusion_model::Prediction::V, "v"),
    ] {
        let w = prediction.min_snr_weights(&s, 5.0);
        assert_eq!(w.len(), 1000);
        for (&t, want) in probe.iter().zip(floats(&f["min_snr_5"][key])) {
            close(w[t], want, &format!("min-SNR-5 {key} weight at t = {t}"));
        }
    }
    // The device lookup gives the same weights, in f32.
    let w = transfusion_model::Prediction::V.min_snr_weights(&s, 5.0);
    let t = Tensor::<NdArray, 1, Int>::from_ints([0, 500, 999], &Default::default());
    let looked: Vec<f32> = NoiseSchedule::lookup(&w, t).into_data().to_vec().unwrap();
    for (got, t) in looked.iter().zip([0usize, 500, 999]) {
        assert_eq!(*got, w[t] as f32, "lookup at t = {t}");
    }
}
