//! Layer recomputation gives the gradients of one backward pass through the whole graph.

use burn::backend::ndarray::NdArray;
use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use transfusion_model::config::ModalityWeights;
use transfusion_model::{
    ImageIoConfig, Transfusion, TransfusionBatch, TransfusionConfig, UNetConfig,
};

use crate::common::{build_batch, collect, long_batch, mixed_batch, test_config, tweak, Seg};

/// A batch without any image.
fn text_batch<B: Backend>(cfg: &TransfusionConfig, dev: &B::Device) -> TransfusionBatch<B> {
    use Seg::*;
    let rows = vec![vec![vec![Text(vec![1, 5, 6, 7, 3, 9, 2])]]];
    build_batch::<B>(&rows, 12, cfg, dev)
}

/// The loss and gradients of one step, through the whole graph and with recomputation.
fn both<B: AutodiffBackend>(
    model: &Transfusion<B>,
    batch: &TransfusionBatch<B>,
) -> ((f64, Vec<Option<Vec<f64>>>), (f64, Vec<Option<Vec<f64>>>)) {
    let loss = model.forward_loss(batch.clone()).total;
    let value = loss.clone().into_scalar().elem::<f64>();
    let whole = GradientsParams::from_grads(loss.backward(), model);
    let image = model.noised_images(batch);
    let (recomputed, value_r) = model.recomputed_gradients(batch, image, |flat, out| {
        let total = model.loss_of_outputs(flat, out, batch).total;
        let value = total.clone().into_scalar().elem::<f64>();
        (total, value)
    });
    (
        (value, collect(model, &whole)),
        (value_r, collect(model, &recomputed)),
    )
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn recompute_matches<B: AutodiffBackend>(name: &str) {
    let dev: B::Device = Default::default();
    let unet = tweak(|c| {
        c.image_io = ImageIoConfig::Unet(UNetConfig {
            channels: vec![8, 16],
            blocks_per_level: 1,
            norm_groups: 4,
        })
    });
    let untied_gqa = tweak(|c| {
        c.modality_weights = Some(ModalityWeights::Untied);
        c.n_kv_heads = 2;
        c.n_layers = 3;
    });
    let cases: Vec<(&str, TransfusionConfig, fn(&_, &B::Device) -> _, bool)> = vec![
        (
            "linear adapter, packed mixed batch",
            test_config(),
            mixed_batch::<B>,
            false,
        ),
        (
            "U-Net adapter (skips and timestep embedding as context)",
            unet,
            mixed_batch::<B>,
            false,
        ),
        (
            "untied weights, GQA, 3 layers",
            untied_gqa.clone(),
            mixed_batch::<B>,
            false,
        ),
        (
            "untied weights, text frozen",
            untied_gqa.clone(),
            mixed_batch::<B>,
            true,
        ),
        (
            "text frozen, no image: no embedding trains",
            untied_gqa,
            text_batch::<B>,
            true,
        ),
        ("no image", test_config(), text_batch::<B>, false),
        (
            "1100 positions, blockwise attention",
            test_config(),
            long_batch::<B>,
            false,
        ),
    ];
    for (label, cfg, batch, frozen) in cases {
        let model = cfg.init::<B>(&dev);
        transfusion_model::params::materialize(&model);
        let model = if frozen { model.freeze_text() } else { model };
        let batch = batch(&cfg, &dev);
        let ((loss, whole), (loss_r, recomputed)) = both(&model, &batch);
        assert!(
            (loss - loss_r).abs() <= 1e-6 * loss.abs(),
            "{name}, {label}: loss {loss} vs {loss_r}"
        );
        let mut compared = 0;
        let mut worst = 0.0f64;
        for (i, (a, b)) in whole.iter().zip(&recomputed).enumerate() {
            let (Some(a), Some(b)) = (a, b) else {
                assert_eq!(a.is_some(), b.is_some(), "{name}, {label}: weight {i}");
                continue;
            };
            let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            let rel = norm(&diff) / norm(a).max(1e-30);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-6,
                "{name}, {label}: weight {i} gradient {rel:e} relative away"
            );
            compared += 1;
        }
        assert!(compared > 10, "{name}, {label}: only {compared} gradients");
        eprintln!("{name}, {label}: {compared} gradients, worst relative difference {worst:e}");
    }
}

#[test]
fn recomputed_gradients_match_one_backward_pass_on_flex() {
    recompute_matches::<Autodiff<Flex>>("flex");
}

#[test]
fn recomputed_gradients_match_one_backward_pass_on_ndarray() {
    recompute_matches::<Autodiff<NdArray>>("ndarray");
}
