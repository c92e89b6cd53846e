//! VAE throughput: [`bench_vae`] (`transfusion-train vae-bench`).

use std::time::Instant;

use burn::prelude::*;
use serde::Serialize;
use transfusion_model::params::{materialize, with_backend_rng};
use transfusion_model::vae::VaeConfig;

/// Encode and decode throughput of a VAE (`transfusion-train vae-bench`).
#[derive(Clone, Debug, Serialize)]
pub struct VaeBenchReport {
    /// The device.
    pub device: String,
    /// Parameters.
    pub params: usize,
    /// Image side.
    pub image_size: usize,
    /// Images per call.
    pub batch: usize,
    /// Encoded images per second (posterior mode).
    pub encode_images_per_s: f64,
    /// Decoded images per second.
    pub decode_images_per_s: f64,
}

/// Times `iters` encode and decode calls of a randomly initialised `config` on `batch`
/// random images of `size` pixels, after `warmup` untimed calls of each (each call ends
/// with a device read-back, so asynchronous backends are timed fully).
pub fn bench_vae<B: Backend>(
    config: &VaeConfig,
    size: usize,
    batch: usize,
    iters: usize,
    warmup: usize,
    device: &B::Device,
    label: &str,
) -> VaeBenchReport {
    let f = config.down_factor();
    let (model, x, z) = with_backend_rng(|| {
        let model = config.init::<B>(device);
        materialize(&model);
        // [N, 3, S, S]
        let x = Tensor::<B, 4>::random(
            [batch, 3, size, size],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            device,
        );
        // [N, c, S/f, S/f]
        let z = Tensor::<B, 4>::random(
            [batch, config.latent_channels, size / f, size / f],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            device,
        );
        (model, x, z)
    });
    let sync = |t: Tensor<B, 4>| {
        let _ = t.slice([0..1, 0..1, 0..1, 0..1]).into_data();
    };
    let time = |iters: usize, f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        t.elapsed().as_secs_f64()
    };
    let enc = || sync(model.encode(x.clone()).mode());
    let dec = || sync(model.decode(z.clone()));
    time(warmup, &enc);
    let te = time(iters, &enc);
    time(warmup, &dec);
    let td = time(iters, &dec);
    VaeBenchReport {
        device: label.to_string(),
        params: config.param_count(),
        image_size: size,
        batch,
        encode_images_per_s: (iters * batch) as f64 / te.max(1e-12),
        decode_images_per_s: (iters * batch) as f64 / td.max(1e-12),
    }
}
