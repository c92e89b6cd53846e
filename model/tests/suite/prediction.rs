//! The image head's targets: `eps` and `v` agree with their definitions, and the noise
//! implied by a perfect `v` prediction is the true noise.

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::Distribution;
use transfusion_model::{NoiseSchedule, Prediction, TransfusionConfig};

type B = NdArray;

fn max_abs(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
    (a - b).abs().max().into_scalar()
}

fn inputs() -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 1, Int>) {
    let dev = Default::default();
    let x0 = Tensor::<B, 4>::random([4, 3, 8, 8], Distribution::Uniform(-1.0, 1.0), &dev);
    let eps = Tensor::<B, 4>::random([4, 3, 8, 8], Distribution::Normal(0.0, 1.0), &dev);
    let t = Tensor::<B, 1, Int>::from_ints([0, 100, 500, 999], &dev);
    (x0, eps, t)
}

#[test]
fn each_target_converts_back_to_the_true_noise() {
    let s = NoiseSchedule::cosine(1000);
    // `eps` is its own target and converts exactly; `v`'s round trip rounds in f32.
    for (prediction, tol) in [(Prediction::Epsilon, 0.0), (Prediction::V, 1e-5)] {
        let (x0, eps, t) = inputs();
        let x_t = s.q_sample(x0.clone(), eps.clone(), t.clone());
        let target = prediction.target(&s, x0, eps.clone(), t.clone());
        if prediction == Prediction::Epsilon {
            assert_eq!(max_abs(target.clone(), eps.clone()), 0.0);
        }
        let diff = max_abs(prediction.to_eps(&s, target, x_t, t), eps);
        assert!(
            diff <= tol,
            "{prediction:?}: eps recovered from the target: {diff}"
        );
    }
}

#[test]
fn v_target_matches_its_definition_per_image() {
    let s = NoiseSchedule::cosine(1000);
    let (x0, eps, t) = inputs();
    let v = Prediction::V.target(&s, x0.clone(), eps.clone(), t);
    for (k, ti) in [0usize, 100, 500, 999].into_iter().enumerate() {
        let a = s.alphas_cumprod[ti];
        let expected =
            eps.clone().narrow(0, k, 1) * a.sqrt() - x0.clone().narrow(0, k, 1) * (1.0 - a).sqrt();
        let diff = max_abs(v.clone().narrow(0, k, 1), expected);
        assert!(diff < 1e-6, "t = {ti}: {diff}");
    }
}

#[test]
fn configs_without_a_prediction_key_load_as_epsilon() {
    let mut json: serde_json::Value =
        serde_json::to_value(TransfusionConfig::tiny(512)).expect("serialize");
    json.as_object_mut().unwrap().remove("prediction");
    let back: TransfusionConfig = serde_json::from_value(json).expect("old configs load");
    assert_eq!(back.prediction, None);
    let model = back.init::<B>(&Default::default());
    assert_eq!(model.prediction, Prediction::Epsilon);
    let v: TransfusionConfig = serde_json::from_str(
        &serde_json::to_string(&TransfusionConfig::tiny(512).with_prediction(Some(Prediction::V)))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v.prediction, Some(Prediction::V));
    assert_eq!(v.init::<B>(&Default::default()).prediction, Prediction::V);
}
