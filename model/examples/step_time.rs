//! Forward+backward step time of the `tiny` preset on each CPU backend and on wgpu.
//!
//! `cargo run --release -p transfusion-model --example step_time [-- STEPS]`
//!
//! The batch: 8 rows of 128 positions, each a 10-token caption, BOI, 64 patches (32x32 RGB
//! in 4x4 patches), EOI, EOS, then padding. Prints the median step time after warm-up.

#[path = "../tests/suite/common/mod.rs"]
mod common;

use std::time::Instant;

use burn::backend::{Autodiff, Flex, NdArray, Wgpu};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use common::{build_batch, Seg};
use transfusion_model::TransfusionConfig;

fn measure<B: AutodiffBackend>(name: &str, steps: usize) {
    let device = B::Device::default();
    let cfg = TransfusionConfig::tiny(512);
    let mut model = cfg.init::<B>(&device);
    let doc = vec![
        Seg::Text((1..=11).collect()),
        Seg::Image(500),
        Seg::Text(vec![4, 2]),
    ];
    let rows: Vec<_> = (0..8).map(|_| vec![doc.clone()]).collect();
    let batch = build_batch::<B>(&rows, 128, &cfg, &device);
    let mut optim = AdamWConfig::new().init();
    let mut times = vec![];
    for i in 0..steps + 3 {
        let start = Instant::now();
        let loss = model.forward_loss(batch.clone());
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        model = optim.step(1e-4, model, grads);
        // Force completion before stopping the clock.
        let _ = model.lm_head.weight.val().sum().into_scalar();
        if i >= 3 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let tokens = 8.0 * 128.0;
    println!(
        "{name:<10} tiny fwd+bwd+AdamW: median {median:8.1} ms/step  ({:.0} tokens/s, {} params)",
        tokens / (median / 1e3),
        cfg.param_count().total()
    );
}

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    measure::<Autodiff<NdArray>>("ndarray", steps);
    measure::<Autodiff<Flex>>("flex", steps);
    measure::<Autodiff<Wgpu>>("wgpu", steps);
}
