//! Time of the VAE's building blocks (forward+backward) on each CPU backend and wgpu.
//!
//! `cargo run --release -p transfusion-model --example vae_ops`

use std::time::Instant;

use burn::backend::{Autodiff, Flex, NdArray, Wgpu};
use burn::nn::conv::Conv2dConfig;
use burn::nn::{GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use transfusion_model::vae::VaeConfig;

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut times = vec![];
    for _ in 0..3 {
        let start = Instant::now();
        f();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[1]
}

fn measure<B: AutodiffBackend>(name: &str) {
    let device = B::Device::default();
    let x = Tensor::<B, 4>::random([4, 32, 32, 32], Distribution::Normal(0.0, 1.0), &device)
        .require_grad();
    let conv = Conv2dConfig::new([32, 32], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init::<B>(&device);
    let fwd = time(|| {
        let _ = conv.forward(x.clone()).sum().into_scalar();
    });
    let bwd = time(|| {
        let g = conv.forward(x.clone()).sum().backward();
        let _ = conv.weight.grad(&g).unwrap().sum().into_scalar();
    });
    println!("{name:<8} conv3x3 32->32 4x32x32: fwd {fwd:7.1} ms, fwd+bwd {bwd:7.1} ms");
    let norm = GroupNormConfig::new(8, 32).init::<B>(&device);
    let nb = time(|| {
        let g = norm.forward(x.clone()).sum().backward();
        let _ = x.grad(&g).unwrap().sum().into_scalar();
    });
    println!("{name:<8} groupnorm 4x32x32x32: fwd+bwd {nb:7.1} ms");
    let vae = VaeConfig::tiny().init::<B>(&device);
    let img = Tensor::<B, 4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let enc = time(|| {
        let _ = vae.encode(img.clone()).mean.sum().into_scalar();
    });
    println!("{name:<8} tiny VAE encode 4x32px: {enc:7.1} ms");
    let step = time(|| {
        let post = vae.encode(img.clone());
        let rec = vae.decode(post.mean.clone());
        let g = (rec - img.clone()).abs().mean().backward();
        let _ = vae
            .encoder
            .conv_in
            .weight
            .grad(&g)
            .unwrap()
            .sum()
            .into_scalar();
    });
    println!("{name:<8} tiny VAE encode+decode fwd+bwd 4x32px: {step:7.1} ms");
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if which == "all" || which == "ndarray" {
        measure::<Autodiff<NdArray>>("ndarray");
    }
    if which == "all" || which == "flex" {
        measure::<Autodiff<Flex>>("flex");
    }
    if which == "all" || which == "wgpu" {
        measure::<Autodiff<Wgpu>>("wgpu");
    }
}
