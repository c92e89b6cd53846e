//! A pipeline with a VAE: images -> latents [N, c, H/f, W/f] -> images, checkpoints that
//! name their VAE, and a clear error when that VAE is missing.

use crate::common::{tiny_config, tokenizer, B};
use transfusion_data::synthetic::shapes::ShapesGenerator;
use transfusion_infer::pipeline::ImageOptions;
use transfusion_infer::sampler::SamplerKind;
use transfusion_infer::Pipeline;
use transfusion_model::vae::VaeConfig;
use transfusion_model::Prediction;
use transfusion_runtime::autoencoder::{load_vae, save_vae, Autoencoder, Vae};
use transfusion_runtime::checkpoint::{save_model, AutoencoderRef, ModelMeta};

/// 2x down-sampling, 4 latent channels, 8 base channels: 16px images -> [4, 8, 8].
fn tiny_vae_config() -> VaeConfig {
    VaeConfig::new(8, vec![1, 2], 1, 4)
        .with_norm_groups(4)
        .with_scaling_factor(0.5)
        .with_shift_factor(0.1)
}

/// The test checkpoint's model with 4-channel 8x8 latents of 16px images.
fn latent_meta() -> ModelMeta {
    let tok = tokenizer();
    let mut model = tiny_config(tok.vocab_size());
    model.latent_channels = 4;
    // eps: the unclipped-latents test needs the large x_0 an eps head implies at t = 999.
    model.prediction = Some(Prediction::Epsilon);
    ModelMeta {
        image_size: 16,
        special_tokens: *tok.special(),
        autoencoder: AutoencoderRef::Pixel,
        step: 0,
        consistency: None,
        model,
    }
}

fn shapes(n: usize) -> Vec<image::RgbImage> {
    let g = ShapesGenerator::new(3).with_image_size(16);
    (0..n as u64).map(|i| g.sample(i).image).collect()
}

#[test]
fn vae_pipeline_round_trips_images_through_latents() {
    let device = Default::default();
    let config = tiny_vae_config();
    let vae = Vae::<B> {
        model: config.init(&device),
        config: config.clone(),
    };
    let meta = latent_meta();
    let model = meta.model.init::<B>(&device);
    let pipe =
        Pipeline::from_parts_with_autoencoder(model, meta, tokenizer(), Autoencoder::Vae(vae))
            .unwrap();
    let images = shapes(3);
    // [3, 3, 16, 16] -> [3, 4, 8, 8]
    let z = pipe.from_images(&images);
    assert_eq!(z.dims(), [3, 4, 8, 8]);
    // The latents are the VAE's scaled posterior mode.
    let x = transfusion_runtime::autoencoder::Autoencoder::<B>::Pixel
        .encode_images(&images, 16, &device);
    // (The pipeline's own copy: Burn initialises parameters lazily, so a clone taken
    // before first use would draw its own weights.)
    let Autoencoder::Vae(vae) = &pipe.autoencoder else {
        panic!("the pipeline should hold the VAE")
    };
    let want = config.scale_latent(vae.model.encode(x).mode());
    let diff: f32 = (z.clone() - want).abs().max().into_scalar();
    assert!(diff < 1e-5, "latents differ by {diff}");
    let back = pipe.to_images(z);
    assert_eq!(back.len(), 3);
    assert!(back.iter().all(|i| i.dimensions() == (16, 16)));

    // Generation yields latents of the VAE's shape, decoded to 16px images.
    let x = pipe
        .image_tensor(
            "a red circle",
            &ImageOptions {
                num: 2,
                steps: 2,
                sampler: SamplerKind::Ddim,
                cfg: 1.0,
                seed: 0,
            },
            |_, _| {},
        )
        .unwrap();
    assert_eq!(x.dims(), [2, 4, 8, 8]);
    assert!(pipe.to_images(x).iter().all(|i| i.dimensions() == (16, 16)));

    // Latents are not clipped to [-1, 1]: one DDIM step returns the predicted x_0 itself,
    // which for unit-variance noise exceeds 1 somewhere among 512 values.
    let opts = ImageOptions {
        num: 2,
        steps: 1,
        sampler: SamplerKind::Ddim,
        cfg: 1.0,
        seed: 3,
    };
    let x0 = pipe.image_tensor("a red circle", &opts, |_, _| {}).unwrap();
    let peak: f32 = x0.abs().max().into_scalar();
    assert!(peak > 1.5, "latent x_0 was clipped: max |x_0| = {peak}");

    // A VAE whose latents do not fit the model is refused.
    let wrong = VaeConfig::new(8, vec![1, 2, 2], 1, 4).with_norm_groups(4);
    let err = Pipeline::from_parts_with_autoencoder(
        latent_meta().model.init::<B>(&device),
        latent_meta(),
        tokenizer(),
        Autoencoder::Vae(Vae {
            model: wrong.init(&device),
            config: wrong,
        }),
    )
    .err()
    .expect("a 4x VAE cannot feed 8x8 latents of 16px images");
    assert!(err.to_string().contains("[4, 8, 8]"), "{err}");
}

#[test]
fn checkpoint_loads_its_vae_and_names_a_missing_one() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let vae_dir = dir.path().join("my-vae");
    let config = tiny_vae_config();
    let vae_model = config.init::<B>(&device);
    save_vae(&vae_dir, &vae_model, &config).unwrap();
    let back = load_vae::<B>(&vae_dir, &device).unwrap();
    assert_eq!(back.config.scaling_factor, 0.5);

    // Relative path: resolved against the checkpoint directory.
    let ckpt = dir.path().join("ckpt");
    let mut meta = latent_meta();
    meta.autoencoder = AutoencoderRef::Vae {
        path: "../my-vae".into(),
    };
    let model = meta.model.init::<B>(&device);
    save_model(&ckpt, &model, &meta, &tokenizer()).unwrap();
    let pipe = Pipeline::<B>::load(&ckpt, &device).unwrap();
    assert!(matches!(pipe.autoencoder, Autoencoder::Vae(_)));
    let images = shapes(2);
    assert_eq!(pipe.from_images(&images).dims(), [2, 4, 8, 8]);

    // Missing VAE directory: the error names the path.
    let missing = dir.path().join("gone-vae");
    let ckpt2 = dir.path().join("ckpt2");
    meta.autoencoder = AutoencoderRef::Vae {
        path: missing.clone(),
    };
    save_model(&ckpt2, &model, &meta, &tokenizer()).unwrap();
    let err = Pipeline::<B>::load(&ckpt2, &device)
        .err()
        .expect("a missing VAE should fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&missing.display().to_string()) && msg.contains("does not exist"),
        "{msg}"
    );
}

/// The VAE shipped in `assets/vae-tiny` (trained with `transfusion-train vae --preset tiny`
/// on the default budget) loads and reconstructs held-out shapes images it never saw.
#[test]
fn the_shipped_tiny_vae_reconstructs_held_out_shapes() {
    use transfusion_model::vae::loss::psnr;
    use transfusion_runtime::image_tensor::images_to_tensor;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/vae-tiny");
    let device = Default::default();
    let vae = load_vae::<B>(&dir, &device).unwrap();
    assert_eq!(
        (vae.config.latent_channels, vae.config.down_factor()),
        (4, 2)
    );
    let g = ShapesGenerator::new(ShapesGenerator::HELD_OUT_SEED);
    let images: Vec<image::RgbImage> = (0..16u64).map(|i| g.sample(i).image).collect();
    // [16, 3, 32, 32] in [-1, 1]
    let x = images_to_tensor::<B>(&images, &device);
    let z = vae.encode(x.clone());
    assert_eq!(z.dims(), [16, 4, 16, 16]);
    let p = psnr(x, vae.decode(z).clamp(-1.0, 1.0));
    // 28.9 dB on 64 held-out images at the end of its training; an untrained VAE scores
    // about 13 dB.
    assert!(p > 25.0, "held-out PSNR {p} dB");
}
