//! `transfusion-train vae`: train the image autoencoder.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_data::source::SourceSpec;
use transfusion_model::vae::ReconLoss;
use transfusion_runtime::device::{dispatch, BackendTask};
use transfusion_train::vae::{
    read_vae_train_config, run_vae_training, VaeRunOptions, VaeTrainConfig,
};

/// Flags of `vae`.
#[derive(Args, Debug, Clone)]
pub struct VaeArgs {
    /// Image source KIND:LOCATION (repeatable), e.g. shapes:20000 or imagefolder:pets/.
    #[arg(long = "data")]
    pub data: Vec<SourceSpec>,
    /// Held-out image source (repeatable); default: the training sources with the held-out
    /// shapes seed (a disjoint set for shapes; give one for real data).
    #[arg(long = "held-out")]
    pub held_out: Vec<SourceSpec>,
    /// Network preset: tiny (2x, 4 channels; 32px images), sd (8x, 4 channels), paper
    /// (8x, 8 channels).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Run directory (metrics, loss plot, reconstruction grids, checkpoints).
    #[arg(long, default_value = "runs/vae")]
    pub out: PathBuf,
    /// Optimizer steps (default: the preset's budget).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight of the per-element KL term (default 1e-4).
    #[arg(long)]
    pub kl_weight: Option<f64>,
    /// Reconstruction loss: l1 or l2.
    #[arg(long)]
    pub loss: Option<String>,
    /// Image side in pixels (default: 32 for tiny, 256 otherwise).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Evaluate every N steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Resume, overwrite and the device.
    #[command(flatten)]
    pub run: super::RunDirFlags,
}

struct VaeRun {
    cfg: VaeTrainConfig,
    opts: VaeRunOptions,
}

impl BackendTask for VaeRun {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        eprintln!(
            "training VAE `{}` ({} parameters) on {label}",
            self.cfg.preset,
            self.cfg.vae.param_count()
        );
        let s = run_vae_training::<B>(&self.cfg, &self.opts, &device)?;
        println!("done: {} steps in {}", s.steps, self.opts.out.display());
        if let Some(e) = &s.last_eval {
            println!(
                "{} ({} images): PSNR {:.2} dB, recon {:.4}, kl {:.3}, latent mean {:.3} std {:.3}",
                e.split.label(),
                e.figures.images,
                e.figures.psnr,
                e.figures.recon,
                e.figures.kl,
                e.figures.latent_mean,
                e.figures.latent_std
            );
        }
        if let Some(c) = &s.last_checkpoint {
            println!("checkpoint: {}", c.display());
        }
        Ok(())
    }
}

fn build_vae_config(a: &VaeArgs) -> anyhow::Result<VaeTrainConfig> {
    let mut cfg = if a.run.resume && a.data.is_empty() {
        read_vae_train_config(&a.out).with_context(|| {
            format!(
                "--resume without --data: no run config in {} to continue",
                a.out.display()
            )
        })?
    } else {
        anyhow::ensure!(
            !a.data.is_empty(),
            "give --data KIND:LOCATION (e.g. --data shapes:20000)"
        );
        VaeTrainConfig::preset(&a.preset, a.data.clone())?
    };
    if !a.held_out.is_empty() {
        cfg.held_out = a.held_out.clone();
    }
    if let Some(s) = a.steps {
        cfg.steps = s;
        cfg.schedule.warmup_steps = cfg.schedule.warmup_steps.min(s / 10);
    }
    if let Some(b) = a.batch {
        cfg.batch_size = b;
    }
    if let Some(lr) = a.lr {
        cfg.schedule.lr = lr;
        cfg.schedule.min_lr = cfg.schedule.min_lr.min(lr);
    }
    if let Some(k) = a.kl_weight {
        cfg.kl_weight = k;
    }
    if let Some(l) = &a.loss {
        cfg.loss = match l.to_ascii_lowercase().as_str() {
            "l1" => ReconLoss::L1,
            "l2" => ReconLoss::L2,
            other => anyhow::bail!("--loss {other}: expected l1 or l2"),
        };
    }
    if let Some(s) = a.image_size {
        cfg.image_size = s;
    }
    if let Some(e) = a.eval_every {
        cfg.eval_every = e;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Trains the VAE.
pub fn run(a: VaeArgs) -> anyhow::Result<()> {
    let cfg = build_vae_config(&a)?;
    let mut opts = VaeRunOptions::new(&a.out);
    opts.resume = a.run.resume;
    opts.overwrite = a.run.overwrite;
    dispatch(a.run.device, VaeRun { cfg, opts })?
}
