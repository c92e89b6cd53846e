//! VAE training (loss falls, PSNR rises, files written), exact resume, latent caching with
//! the VAE, and a Transfusion run on VAE latents recording its VAE.

mod common;

use std::path::Path;

use burn::backend::NdArray;
use common::{tiny_cfg, train, B};
use transfusion_data::datasets::synthetic::ShapesSource;
use transfusion_data::datasets::{ImageData, Sample, SampleSource};
use transfusion_data::latent_cache::cache_latents;
use transfusion_data::synthetic::shapes::ShapesGenerator;
use transfusion_model::vae::VaeConfig;
use transfusion_runtime::autoencoder::{load_vae, Autoencoder, VaeImageEncoder};
use transfusion_runtime::checkpoint::{load_meta, AutoencoderRef};
use transfusion_train::engine::metrics::Line;
use transfusion_train::vae::{
    run_vae_training, VaeMetricsLine, VaeRunOptions, VaeTrainConfig, VAE_TRAIN_FILE,
};
use transfusion_train::RunOptions;

/// A very small VAE (8 base channels, 2x, 4 latent channels) on 16px shapes: the CPU
/// backend's convolution backward is slow, so the test network is tiny.
fn small_cfg(steps: u64) -> VaeTrainConfig {
    let mut c = VaeTrainConfig::preset("tiny", vec!["shapes:2000".parse().unwrap()]).unwrap();
    c.vae = VaeConfig::new(8, vec![1, 2], 1, 4).with_norm_groups(4);
    c.image_size = 16;
    c.steps = steps;
    c.batch_size = 4;
    c.schedule.lr = 3e-3;
    c.schedule.min_lr = 1e-3;
    c.schedule.warmup_steps = 2;
    c.eval_every = 10;
    c.eval_images = 8;
    c.grid_images = 4;
    c.checkpoint_every = 10;
    c.keep_last = 2;
    c.log_every = 1;
    c
}

fn quiet(out: &Path) -> VaeRunOptions {
    let mut o = VaeRunOptions::new(out);
    o.progress = false;
    o
}

fn train_losses(lines: &[VaeMetricsLine]) -> Vec<(u64, f64)> {
    lines
        .iter()
        .filter_map(Line::train)
        .map(|m| (m.step, m.losses.loss))
        .collect()
}

#[test]
fn vae_training_lowers_loss_raises_psnr_and_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vae");
    let cfg = small_cfg(40);
    let s = run_vae_training::<B>(&cfg, &quiet(&out), &Default::default()).unwrap();
    assert_eq!(s.steps, 40);
    let losses = train_losses(&s.metrics);
    let first: f64 = losses[..5].iter().map(|l| l.1).sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().map(|l| l.1).sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    let evals: Vec<_> = s.metrics.iter().filter_map(Line::eval).cloned().collect();
    assert_eq!(
        evals.iter().map(|e| e.step).collect::<Vec<_>>(),
        vec![10, 20, 30, 40]
    );
    assert!(
        evals[3].figures.psnr > evals[0].figures.psnr + 1.0,
        "PSNR {} -> {}",
        evals[0].figures.psnr,
        evals[3].figures.psnr
    );
    for f in ["metrics.jsonl", "loss.png", "recon.png", VAE_TRAIN_FILE] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(out.join("recon/step-00000040.png").is_file());
    let grid = image::open(out.join("recon.png")).unwrap();
    // 4 columns of 16px + 2px padding, 2 rows (originals above reconstructions).
    assert_eq!(grid.height(), 2 * 16 + 3 * 2);
    // keep_last = 2: steps 30 and 40.
    let ckpts: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    // The checkpoint loads as a VAE; its scale/shift come from the last evaluation.
    let vae = load_vae::<NdArray>(&out, &Default::default()).unwrap();
    let e = &evals[3];
    assert!((vae.config.scaling_factor - 1.0 / e.figures.latent_std).abs() < 1e-9);
    assert!((vae.config.shift_factor - e.figures.latent_mean).abs() < 1e-9);
}

#[test]
fn vae_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    let cfg = small_cfg(12);
    let a = run_vae_training::<B>(&cfg, &quiet(&straight), &Default::default()).unwrap();

    let mut first = quiet(&split);
    first.stop_at_step = Some(6);
    let b1 = run_vae_training::<B>(&cfg, &first, &Default::default()).unwrap();
    assert_eq!(b1.steps, 6);
    let mut second = quiet(&split);
    second.resume = true;
    let b2 = run_vae_training::<B>(&cfg, &second, &Default::default()).unwrap();
    assert_eq!((b2.started_at, b2.steps), (6, 12));

    let la = train_losses(&a.metrics);
    let lb = train_losses(&b2.metrics);
    assert_eq!(la.len(), lb.len(), "the resumed log keeps steps 1..6");
    for ((sa, va), (sb, vb)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        assert!(
            (va - vb).abs() < 1e-4 * va.abs().max(1.0),
            "step {sa}: {va} vs {vb}"
        );
    }
    let (ea, eb) = (a.last_eval.unwrap(), b2.last_eval.unwrap());
    assert!(
        (ea.figures.psnr - eb.figures.psnr).abs() < 1e-3,
        "{} vs {}",
        ea.figures.psnr,
        eb.figures.psnr
    );
}

#[test]
fn cached_latents_are_the_vae_encoding_and_a_run_on_them_records_the_vae() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let vae_dir = dir.path().join("vae");
    // A VAE checkpoint: two steps of training are enough to have one.
    run_vae_training::<B>(&small_cfg(2), &quiet(&vae_dir), &device).unwrap();
    let vae = load_vae::<NdArray>(&vae_dir, &device).unwrap();
    assert_ne!(vae.config.scaling_factor, 1.0);

    let src = ShapesSource::new(ShapesGenerator::new(5).with_image_size(16), 7);
    let enc = VaeImageEncoder::new(vae.clone(), 16, 3, device, Some(vae_dir.clone())).unwrap();
    let cache = dir.path().join("latents");
    let index = cache_latents(&src, &enc, &cache, 4, |_, _| {}).unwrap();
    assert_eq!((index.count, index.shape), (7, [4, 8, 8]));
    assert_eq!(index.vae.as_deref(), Some(vae_dir.as_path()));

    // Each cached latent equals the VAE's (scaled) encoding of that image alone.
    let cached = transfusion_data::latent_cache::LatentCacheSource::open(&cache).unwrap();
    let ae = Autoencoder::Vae(vae);
    for i in [0usize, 3, 6] {
        let Some(Sample::Pair {
            image: ImageData::Pixels(img),
            ..
        }) = src.get(0, i).unwrap()
        else {
            panic!("shapes yield pairs")
        };
        let want: Vec<f32> = ae
            .encode_images(&[img], 16, &device)
            .into_data()
            .to_vec()
            .unwrap();
        let Some(Sample::Pair {
            image: ImageData::Latent { data, .. },
            ..
        }) = cached.get(0, i).unwrap()
        else {
            panic!("caches yield latents")
        };
        let diff = want
            .iter()
            .zip(&data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "latent {i} differs by {diff}");
    }

    // A Transfusion run on the cache writes the VAE into its checkpoint's model.json.
    let mut cfg = tiny_cfg(1);
    cfg.data.train = vec![format!("latents:{}", cache.display()).parse().unwrap()];
    let mut m = cfg.model.config.clone().unwrap();
    m.latent_channels = 4;
    m.latent_size = 8;
    cfg.model.config = Some(m);
    cfg.eval.at_end = false;
    let run = dir.path().join("run");
    let mut opts = RunOptions::new(&run);
    opts.progress = false;
    let s = train(&cfg, &opts).unwrap();
    let meta = load_meta(&s.last_checkpoint.unwrap()).unwrap();
    assert_eq!(meta.autoencoder, AutoencoderRef::Vae { path: vae_dir });
}
