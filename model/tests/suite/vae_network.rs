//! The KL autoencoder: shapes for every down-sampling factor and latent width, parameter
//! counts of the presets, the posterior, the loss and PSNR, and a one-batch overfit.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::{Distribution, Tolerance};
use transfusion_model::vae::{psnr, vae_loss, DiagonalGaussian, ReconLoss, VaeConfig};

type B = NdArray;
type AB = Autodiff<NdArray>;

/// NdArray keeps one random generator for the whole process, so this file's tests that
/// draw from it (module init, random inputs, posterior samples) hold this lock. Tests of
/// other files in this binary may still draw in between, so the seeded overfit test is
/// not bitwise reproducible; its bars hold for any seed (see the test).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the generator lock, surviving a poisoned lock left by another failing test.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A small config with `factor`x down-sampling and `c` latent channels.
fn small(factor: usize, c: usize) -> VaeConfig {
    VaeConfig::new(16, vec![1, 2], 1, c)
        .with_norm_groups(8)
        .with_down_factor(factor)
}

#[test]
fn shapes_for_every_factor_and_latent_width() {
    let _rng = rng_lock();
    let device = Default::default();
    for factor in [4, 8, 16] {
        for c in [4, 8, 16] {
            let cfg = small(factor, c);
            assert_eq!(cfg.down_factor(), factor);
            assert_eq!(cfg.levels(), factor.trailing_zeros() as usize + 1);
            let vae = cfg.init::<B>(&device);
            let x =
                Tensor::<B, 4>::random([2, 3, 32, 32], Distribution::Uniform(-1.0, 1.0), &device);
            let posterior = vae.encode(x.clone());
            let s = 32 / factor;
            assert_eq!(
                posterior.mean.dims(),
                [2, c, s, s],
                "factor {factor}, c {c}"
            );
            assert_eq!(posterior.logvar.dims(), [2, c, s, s]);
            let out = vae.forward(x, true);
            assert_eq!(out.recon.dims(), [2, 3, 32, 32], "factor {factor}, c {c}");
            assert_eq!(out.kl.dims(), [2]);
            // Non-square images work too.
            let y = vae.decode(Tensor::zeros([1, c, 2, 3], &device));
            assert_eq!(y.dims(), [1, 3, 2 * factor, 3 * factor]);
        }
    }
}

#[test]
fn preset_shapes() {
    assert_eq!(VaeConfig::paper().down_factor(), 8);
    assert_eq!(VaeConfig::paper().latent_channels, 8);
    assert_eq!(VaeConfig::sd().down_factor(), 8);
    assert_eq!(VaeConfig::sd().latent_channels, 4);
    assert_eq!(VaeConfig::sd().scaling_factor, 0.18215);
    assert_eq!(
        VaeConfig::sd().block_out_channels(),
        vec![128, 256, 512, 512]
    );
    assert_eq!(VaeConfig::tiny().down_factor(), 2);
}

#[test]
fn parameter_counts() {
    let _rng = rng_lock();
    let device = Default::default();
    // The Stable Diffusion VAE has exactly 83,653,863 parameters.
    let sd = VaeConfig::sd();
    assert_eq!(sd.param_count(), 83_653_863);
    assert_eq!(sd.init::<B>(&device).num_params(), 83_653_863);
    // The paper's "86M": our 8-channel SD-shaped VAE has 83,709,419 (2.7% below).
    let paper = VaeConfig::paper().param_count();
    assert_eq!(paper, 83_709_419);
    assert!(
        (paper as f64 / 86e6 - 1.0).abs() < 0.03,
        "paper preset {paper}"
    );
    // The analytic count matches the built modules across options.
    for cfg in [
        VaeConfig::tiny(),
        small(4, 8),
        small(16, 16),
        small(8, 4).with_mid_attention(false),
        small(8, 4)
            .with_use_quant_conv(false)
            .with_use_post_quant_conv(false),
        VaeConfig::new(32, vec![1, 2, 2], 2, 4),
    ] {
        assert_eq!(
            cfg.param_count(),
            cfg.init::<B>(&device).num_params(),
            "{cfg}"
        );
    }
}

#[test]
fn kl_is_zero_for_the_prior_and_positive_otherwise() {
    let _rng = rng_lock();
    let device = Default::default();
    let zeros = Tensor::<B, 4>::zeros([2, 4, 3, 3], &device);
    let prior = DiagonalGaussian::new(zeros.clone(), zeros.clone());
    prior
        .kl()
        .into_data()
        .assert_approx_eq::<f32>(&TensorData::from([0.0f32, 0.0]), Tolerance::default());
    // mean 1, logvar 0: 0.5 * 36 elements * 1 = 18 per image.
    let shifted = DiagonalGaussian::new(zeros.clone() + 1.0, zeros.clone());
    shifted
        .kl()
        .into_data()
        .assert_approx_eq::<f32>(&TensorData::from([18.0f32, 18.0]), Tolerance::default());
    // Moments split as [mean | logvar]; logvar is clamped to [-30, 20].
    let moments = Tensor::cat(vec![zeros.clone() + 2.0, zeros.clone() + 100.0], 1);
    let post = DiagonalGaussian::from_moments(moments);
    assert_eq!(post.mean.dims(), [2, 4, 3, 3]);
    assert_eq!(post.mode().into_scalar_index(), 2.0);
    assert_eq!(post.logvar.max().into_scalar(), 20.0);
    // sample_with(eps) = mean + exp(logvar / 2) * eps.
    let post = DiagonalGaussian::new(zeros.clone() + 1.0, zeros.clone() + 2.0f32.ln() * 2.0);
    let s = post.sample_with(zeros.clone() + 0.5);
    assert!((s.mean().into_scalar() - 2.0).abs() < 1e-5);
    // A random sample has about the right spread.
    let wide = DiagonalGaussian::new(
        Tensor::<B, 4>::zeros([4, 4, 16, 16], &device),
        Tensor::zeros([4, 4, 16, 16], &device),
    );
    let var = wide.sample().powi_scalar(2).mean().into_scalar();
    assert!((var - 1.0).abs() < 0.15, "sample variance {var}");
}

trait First {
    fn into_scalar_index(self) -> f32;
}

impl First for Tensor<B, 4> {
    fn into_scalar_index(self) -> f32 {
        self.slice([0..1, 0..1, 0..1, 0..1]).into_scalar()
    }
}

#[test]
fn loss_and_psnr() {
    let device = Default::default();
    let x = Tensor::<B, 4>::zeros([1, 3, 4, 4], &device);
    let y = x.clone() + 0.2;
    let zeros = Tensor::<B, 4>::zeros([1, 2, 2, 2], &device);
    let post = DiagonalGaussian::new(zeros.clone() + 1.0, zeros);
    let l1 = vae_loss(x.clone(), y.clone(), &post, 0.5, ReconLoss::L1);
    assert!((l1.recon.into_scalar() - 0.2).abs() < 1e-6);
    // KL per latent element: 0.5 * 1.
    assert!((l1.kl.into_scalar() - 0.5).abs() < 1e-6);
    assert!((l1.loss.into_scalar() - 0.45).abs() < 1e-6);
    let l2 = vae_loss(x.clone(), y.clone(), &post, 0.0, ReconLoss::L2);
    assert!((l2.loss.into_scalar() - 0.04).abs() < 1e-6);
    // Difference 0.2 on [-1, 1] is 0.1 on [0, 1]: PSNR 20 dB.
    assert!((psnr(x.clone(), y) - 20.0).abs() < 1e-3);
    assert_eq!(psnr(x.clone(), x), f32::INFINITY);
}

#[test]
fn latent_scale_and_shift_round_trip() {
    let device = Default::default();
    let cfg = VaeConfig::tiny()
        .with_scaling_factor(0.5)
        .with_shift_factor(0.25);
    let z = Tensor::<B, 4>::ones([1, 1, 1, 1], &device);
    let latent = cfg.scale_latent(z.clone());
    assert!((latent.clone().into_scalar() - 0.375).abs() < 1e-6);
    assert!((cfg.unscale_latent(latent).into_scalar() - 1.0).abs() < 1e-6);
}

#[test]
fn tiny_vae_overfits_one_batch() {
    // Measured over seeds 0..12 with the lock held: the MSE falls 35x to 140x in 60 steps
    // (13x to 58x in 40), PSNR 27 to 33 dB, so the bars below hold for any seed.
    let _rng = rng_lock();
    let device = Default::default();
    <AB as Backend>::seed(&device, 7);
    let cfg = VaeConfig::tiny();
    let mut vae = cfg.init::<AB>(&device);
    // Two 8x8 images: a horizontal and a vertical gradient with a colour tint.
    let ramp = Tensor::<AB, 1, Int>::arange(0..8, &device).float() / 3.5 - 1.0;
    let h = ramp.clone().reshape([1, 1, 1, 8]).expand([1, 3, 8, 8]);
    let v = ramp.reshape([1, 1, 8, 1]).expand([1, 3, 8, 8]);
    let tint = Tensor::<AB, 1>::from_floats([1.0, 0.5, -0.5], &device).reshape([1, 3, 1, 1]);
    let x = Tensor::cat(vec![h * tint.clone(), v * tint.neg()], 0);

    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..60 {
        let out = vae.forward(x.clone(), true);
        let loss = vae_loss(x.clone(), out.recon, &out.posterior, 1e-4, ReconLoss::L2);
        let recon: f32 = loss.recon.clone().into_scalar();
        first.get_or_insert(recon);
        last = recon;
        let grads = GradientsParams::from_grads(loss.loss.backward(), &vae);
        vae = optim.step(3e-3, vae, grads);
    }
    let first = first.unwrap();
    assert!(
        last < 0.1 * first,
        "reconstruction MSE should fall at least 10x: {first} -> {last}"
    );
    let recon = vae.forward(x.clone(), false).recon;
    let db = psnr(x, recon);
    assert!(db > 20.0, "PSNR after overfitting {db}");
}

#[test]
fn downsampling_pads_bottom_right_like_diffusers() {
    // diffusers: F.pad(x, (0, 1, 0, 1)) then a stride-2 3x3 conv without padding, so
    // kernel tap (0, 0) of output (i, j) reads input (2i, 2j).
    let _rng = rng_lock();
    let device = Default::default();
    let vae = VaeConfig::new(8, vec![1, 1], 1, 4)
        .with_norm_groups(4)
        .init::<B>(&device);
    let mut down = vae.encoder.down_blocks[0].downsampler.clone().unwrap();
    let mut w = vec![0.0f32; 8 * 8 * 9];
    for c in 0..8 {
        w[(c * 8 + c) * 9] = 1.0; // out c, in c, tap (0, 0)
    }
    down.conv.weight = burn::module::Param::from_tensor(Tensor::from_data(
        TensorData::new(w, [8, 8, 3, 3]),
        &device,
    ));
    down.conv.bias = None;
    let x = Tensor::<B, 1, Int>::arange(0..8 * 16, &device)
        .float()
        .reshape([1, 8, 4, 4]);
    let y = down.forward(x.clone());
    assert_eq!(y.dims(), [1, 8, 2, 2]);
    let picked = x
        .slice([0..1, 0..8, 0..4, 0..4])
        .reshape([1, 8, 2, 2, 2, 2]);
    // x[.., 2i, 2j] as [1, 8, 2, 2]
    let expect = picked
        .slice([0..1, 0..8, 0..2, 0..1, 0..2, 0..1])
        .reshape([1, 8, 2, 2]);
    y.into_data()
        .assert_approx_eq::<f32>(&expect.into_data(), Tolerance::default());
}
