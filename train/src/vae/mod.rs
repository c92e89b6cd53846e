//! Training the image autoencoder (`transfusion-train vae`) as a task of the training
//! engine ([`VaeTask`]): reconstruction (L1 or L2) + a small-weight KL, on the images of
//! any data source. The engine supplies AdamW with the warmup + cosine schedule,
//! global-norm clipping, atomic checkpoints with keep-last-N and exact resume, the JSONL
//! metrics file, the progress bar and the loss plot.
//!
//! A run directory:
//! ```text
//! OUT/vae_train.json              the run config (VaeTrainConfig)
//! OUT/metrics.jsonl               train lines (loss, recon, kl, grad norm, lr, images/s)
//!                                 and eval lines (held-out PSNR, recon, kl, latent stats)
//! OUT/loss.png                    training loss, recon, held-out recon
//! OUT/recon.png                   the newest reconstruction grid (originals above
//!                                 reconstructions of a fixed held-out set)
//! OUT/recon/step-N.png            the grid of each evaluation
//! OUT/checkpoints/step-N/         vae.safetensors, vae.json (VaeConfig with the latent
//!                                 scale/shift measured at the last evaluation),
//!                                 optimizer.mpk, vae_train.json, training_state.json
//! ```
//! A checkpoint directory (or the run directory: its newest checkpoint) is what
//! `cache-latents --vae` and inference load ([`transfusion_runtime::autoencoder::load_vae`]).
//!
//! Randomness: the model init from the seed; each step's posterior sample from
//! `derive_seed(seed, step)`; the data order from the seed and the epoch. So a resumed run
//! takes exactly the steps an uninterrupted one would.

mod bench;
mod config;
mod eval;
mod stream;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use image::RgbImage;
use transfusion_data::files::{create_dir, write_json};
use transfusion_data::image::save_png;
use transfusion_data::rng::derive_seed;
use transfusion_data::synthetic::shapes::ShapesGenerator;
use transfusion_model::vae::{vae_loss, AutoencoderKl, VaeConfig};
use transfusion_runtime::autoencoder::{load_vae, save_vae, VAE_CONFIG_FILE, VAE_WEIGHTS_FILE};
use transfusion_runtime::image_tensor::images_to_tensor;

pub use bench::{bench_vae, VaeBenchReport};
pub use config::{read_vae_train_config, VaeTrainConfig, VAE_TRAIN_FILE};
pub use eval::{
    evaluate_vae, plot_vae, recon_grid, VaeEvalMetrics, VaeLosses, VaeMetricsLine, VaeStepMetrics,
};
pub use stream::{ImageStream, StreamPos};

use crate::checkpoint::{TrainingState, STATE_FILE};
use crate::engine::metrics::Line;
use crate::engine::{
    run_task, seeded_module, EngineHooks, EngineSettings, RunOptions, RunOutcome, StepFigures,
    TaskLoss, TrainTask, Work,
};
use crate::error::{Result, TrainError};

/// Files of a complete VAE training checkpoint.
pub const VAE_CHECKPOINT_FILES: &[&str] = &[
    VAE_WEIGHTS_FILE,
    VAE_CONFIG_FILE,
    "optimizer.mpk",
    VAE_TRAIN_FILE,
    STATE_FILE,
];

/// How to run a VAE training (the engine's options).
pub type VaeRunOptions = RunOptions;

/// What a VAE run did.
pub type VaeRunSummary = RunOutcome<VaeStepMetrics, VaeEvalMetrics>;

/// A VAE checkpoint's training state (the data position is the image stream's).
pub type VaeTrainingState = TrainingState<StreamPos>;

/// VAE training on the images of the config's sources.
pub struct VaeTask {
    cfg: VaeTrainConfig,
    /// The network config saved with the weights: its latent scale and shift follow the
    /// last evaluation's latent statistics.
    vae_config: VaeConfig,
    out: PathBuf,
    stream: Option<ImageStream>,
    held_out: Vec<RgbImage>,
}

impl VaeTask {
    /// Validates `cfg` and reads the held-out images, before anything is written.
    pub fn new(cfg: &VaeTrainConfig, opts: &RunOptions) -> Result<Self> {
        cfg.validate()?;
        let specs = if cfg.held_out.is_empty() {
            &cfg.data
        } else {
            &cfg.held_out
        };
        let held_out = ImageStream::open(
            specs,
            cfg.image_size,
            derive_seed(&[cfg.seed, 0xE7A1]),
            ShapesGenerator::HELD_OUT_SEED,
        )?
        .next_images(cfg.eval_images.max(cfg.grid_images))?;
        Ok(Self {
            cfg: cfg.clone(),
            vae_config: cfg.vae.clone(),
            out: opts.out.clone(),
            stream: None,
            held_out,
        })
    }
}

/// The same network shape (scale and shift aside).
fn same_shape(a: &VaeConfig, b: &VaeConfig) -> bool {
    let mut b = b.clone();
    b.scaling_factor = a.scaling_factor;
    b.shift_factor = a.shift_factor;
    serde_json::to_value(a).ok() == serde_json::to_value(&b).ok()
}

/// A standard normal tensor drawn on the host from `seed`.
fn host_normal<B: Backend>(seed: u64, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    let mut rng = transfusion_data::rng::Rng64::from_parts(&[seed]);
    let mut data = vec![0f32; shape.iter().product()];
    rng.fill_normal(&mut data);
    Tensor::from_data(TensorData::new(data, shape), device)
}

impl<B: AutodiffBackend> TrainTask<B> for VaeTask {
    type Model = AutoencoderKl<B>;
    /// Images `[N, 3, S, S]` in `[-1, 1]`.
    type Batch = Tensor<B, 4>;
    type DataState = StreamPos;
    type Step = VaeStepMetrics;
    type Eval = VaeEvalMetrics;

    fn settings(&self) -> EngineSettings {
        let c = &self.cfg;
        EngineSettings {
            steps: c.steps,
            grad_accum: 1,
            grad_clip: c.grad_clip,
            optimizer: c.optimizer.clone(),
            schedule: c.schedule.clone(),
            log_every: c.log_every,
            eval_every: c.eval_every,
            eval_at_end: true,
            checkpoint_every: c.checkpoint_every,
            keep_last: c.keep_last,
            keep_best: false,
            max_consecutive_nonfinite: c.max_consecutive_nonfinite,
            seed: c.seed,
            ema_decay: c.ema_decay,
        }
    }

    fn checkpoint_files(&self) -> &'static [&'static str] {
        VAE_CHECKPOINT_FILES
    }

    fn write_run_files(&self, out: &Path) -> Result<()> {
        create_dir(&out.join("recon"))?;
        Ok(write_json(&out.join(VAE_TRAIN_FILE), &self.cfg)?)
    }

    fn init_model(&self, device: &B::Device) -> Result<AutoencoderKl<B>> {
        Ok(seeded_module(device, self.cfg.seed, || {
            self.cfg.vae.init::<B>(device)
        }))
    }

    fn load_model(&mut self, dir: &Path, device: &B::Device) -> Result<AutoencoderKl<B>> {
        let vae = load_vae::<B>(dir, device)?;
        if !same_shape(&vae.config, &self.cfg.vae) {
            return Err(TrainError::invalid(
                dir,
                "the checkpoint's VAE config differs from this run's; resume with the \
                 same preset (or without --preset to use the checkpoint's)",
            ));
        }
        self.vae_config = vae.config;
        Ok(vae.model)
    }

    fn save_model(
        &self,
        dir: &Path,
        model: &AutoencoderKl<B::InnerBackend>,
        _step: u64,
    ) -> Result<()> {
        save_vae(dir, model, &self.vae_config)?;
        Ok(write_json(&dir.join(VAE_TRAIN_FILE), &self.cfg)?)
    }

    fn start_data(&mut self, resume: Option<&StreamPos>) -> Result<()> {
        let c = &self.cfg;
        let mut stream =
            ImageStream::open(&c.data, c.image_size, c.seed, ShapesGenerator::TRAIN_SEED)?;
        stream.seek(resume.copied().unwrap_or_default());
        self.stream = Some(stream);
        Ok(())
    }

    fn data_state(&self) -> StreamPos {
        self.stream
            .as_ref()
            .map(ImageStream::pos)
            .unwrap_or_default()
    }

    fn next_batch(
        &mut self,
        keep: bool,
        device: &B::Device,
    ) -> Result<Option<(Tensor<B, 4>, Work)>> {
        let stream = self
            .stream
            .as_mut()
            .expect("the engine starts the data stream before it asks for batches");
        let images = stream.next_images(self.cfg.batch_size)?;
        let n = images.len() as u64;
        let work = Work {
            tokens: 0,
            images: n,
            units: [n, n],
        };
        Ok(keep.then(|| (images_to_tensor::<B>(&images, device), work)))
    }

    fn loss(&self, model: &AutoencoderKl<B>, x: Tensor<B, 4>, step: u64) -> TaskLoss<B> {
        let [n, _, h, w] = x.dims();
        let f = self.vae_config.down_factor();
        // Posterior noise from a host stream of (seed, step): no global RNG involved.
        let eps = host_normal::<B>(
            derive_seed(&[self.cfg.seed, 0x5A3B, step]),
            [n, self.vae_config.latent_channels, h / f, w / f],
            &x.device(),
        );
        let out = model.forward_with_noise(x.clone(), eps);
        let l = vae_loss(
            x,
            out.recon,
            &out.posterior,
            self.cfg.kl_weight,
            self.cfg.loss,
        );
        // Both parts are means over the images (of equal size): times n, sums.
        TaskLoss {
            sums: [l.recon.mul_scalar(n as f64), l.kl.mul_scalar(n as f64)],
            weights: [1.0, self.cfg.kl_weight],
        }
    }

    fn step_record(&self, f: &StepFigures) -> VaeStepMetrics {
        f.with_losses(VaeLosses {
            loss: f.losses[0],
            recon: f.losses[1],
            kl: f.losses[2],
        })
    }

    fn evaluate(
        &mut self,
        model: &AutoencoderKl<B::InnerBackend>,
        step: u64,
    ) -> Result<VaeEvalMetrics> {
        let grid = self.cfg.grid_images;
        let device = model.devices().into_iter().next().unwrap_or_default();
        let (e, recons) = evaluate_vae(model, &self.cfg, &self.held_out, grid, step, &device);
        let originals: Vec<RgbImage> = self.held_out.iter().take(grid).cloned().collect();
        let grid = recon_grid(&originals, &recons);
        let dir = self.out.join("recon");
        save_png(&grid, &dir.join(format!("step-{step:08}.png")))?;
        save_png(&grid, &self.out.join("recon.png"))?;
        if e.figures.latent_std > 1e-8 && e.figures.latent_std.is_finite() {
            self.vae_config.scaling_factor = 1.0 / e.figures.latent_std;
            self.vae_config.shift_factor = e.figures.latent_mean;
        }
        Ok(e)
    }

    fn eval_loss(&self, eval: &VaeEvalMetrics) -> Option<f64> {
        Some(eval.figures.recon)
    }

    fn plot(&self, lines: &[Line<VaeStepMetrics, VaeEvalMetrics>], path: &Path) -> Result<()> {
        plot_vae(lines, path)
    }
}

/// Trains the VAE of `cfg` on `device` (see the module docs for the files written).
pub fn run_vae_training<B: AutodiffBackend>(
    cfg: &VaeTrainConfig,
    opts: &VaeRunOptions,
    device: &B::Device,
) -> Result<VaeRunSummary> {
    let mut task = VaeTask::new(cfg, opts)?;
    run_task::<B, _>(&mut task, opts, &mut EngineHooks::default(), device)
}
