//! Mixed precision: bf16/f16 products give nearly the f32 loss and gradients, the weights
//! and their gradients stay f32, training in bf16 lowers the loss, and a backend without
//! the compute type is refused with a message.

use crate::common::{mixed_batch, test_config};
use burn::backend::{Autodiff, Flex, NdArray};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::DType;
use transfusion_model::{Precision, Transfusion};

type B = Autodiff<Flex>;

fn model() -> Transfusion<B> {
    B::seed(&Default::default(), 7);
    test_config().init::<B>(&Default::default())
}

/// Loss and the gradient of the first query projection.
fn loss_and_grad(model: &Transfusion<B>) -> (f32, Vec<f32>, DType) {
    let batch = mixed_batch::<B>(&test_config(), &Default::default());
    let loss = model.forward_loss(batch).total;
    let value = loss.clone().into_scalar();
    let grads = loss.backward();
    let g = model.blocks[0].attn.wq.weight.grad(&grads).unwrap();
    let dtype = g.dtype();
    (
        value,
        g.into_data().convert::<f32>().to_vec().unwrap(),
        dtype,
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn half_precision_products_match_f32_closely_but_not_exactly() {
    let m = model();
    let (l32, g32, _) = loss_and_grad(&m);
    for p in [Precision::Bf16, Precision::F16] {
        let (l, g, dtype) = loss_and_grad(&m.clone().with_precision(p));
        let rel = ((l - l32) / l32).abs();
        // bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); the loss averages
        // many products, so it lands well inside 2%.
        assert!(rel < 0.02, "{p}: loss {l} vs f32 {l32} (relative {rel})");
        assert!(
            l != l32,
            "{p}: the loss equals the f32 loss exactly: no cast happened"
        );
        assert_eq!(
            dtype,
            DType::F32,
            "{p}: weight gradients must arrive in f32"
        );
        let c = cosine(&g, &g32);
        assert!(c > 0.99, "{p}: gradient cosine similarity to f32 is {c}");
    }
}

#[test]
fn weights_stay_f32_and_bf16_training_lowers_the_loss() {
    let mut m = model().with_precision(Precision::Bf16);
    let batch = mixed_batch::<B>(&test_config(), &Default::default());
    let mut optim = AdamWConfig::new().init();
    let mut losses = vec![];
    for _ in 0..30 {
        let loss = m.forward_loss(batch.clone()).total;
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        m = optim.step(3e-3, m, grads);
    }
    assert_eq!(m.blocks[0].mlp.w1.weight.val().dtype(), DType::F32);
    assert_eq!(
        m.precision,
        Precision::Bf16,
        "the optimizer step keeps the precision"
    );
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last.is_finite() && last < 0.5 * first,
        "loss {first} -> {last}"
    );
}

#[test]
fn backends_without_the_compute_type_are_refused_by_name() {
    let dev = Default::default();
    assert!(Precision::F32.check_backend::<NdArray>(&dev).is_ok());
    let err = Precision::Bf16.check_backend::<NdArray>(&dev).unwrap_err();
    assert!(
        err.contains("bf16") && err.contains("not supported"),
        "{err}"
    );
    // The backend's own panic message is captured into the error.
    assert!(err.contains("Unsupported dtype"), "{err}");
    let flex = Default::default();
    assert!(Precision::Bf16.check_backend::<Flex>(&flex).is_ok());
    assert!(Precision::F16.check_backend::<Flex>(&flex).is_ok());
}

#[test]
fn precision_parses_and_serializes_lowercase() {
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("FP16".parse::<Precision>().unwrap(), Precision::F16);
    assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
    assert!("int8".parse::<Precision>().unwrap_err().contains("int8"));
    assert_eq!(serde_json::to_string(&Precision::Bf16).unwrap(), "\"bf16\"");
    let p: Precision = serde_json::from_str("\"f16\"").unwrap();
    assert_eq!(p, Precision::F16);
}
