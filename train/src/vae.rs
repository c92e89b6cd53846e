//! Training the image autoencoder (`transfusion-train vae`): reconstruction (L1 or L2) +
//! a small-weight KL, AdamW with the warmup + cosine schedule and global-norm clipping,
//! on the images of any data source, with the Transfusion run's machinery: atomic
//! checkpoints with keep-last-N and exact resume ([`crate::checkpoint`]), a JSONL metrics
//! file ([`crate::metrics::MetricsLog`]), a progress bar and the loss plot
//! ([`crate::plot::plot_series`]).
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
//! `cache-latents --vae` and inference load ([`transfusion_infer::autoencoder::load_vae`]).
//!
//! Randomness: the model init from the seed; each step's posterior sample from
//! `derive_seed(seed, step)`; the data order from the seed and the epoch. So a resumed run
//! takes exactly the steps an uninterrupted one would.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use transfusion_data::datasets::{ImageData, RecordIter, Sample, SampleSource};
use transfusion_data::image::{center_crop_resize, image_grid, save_png};
use transfusion_data::rng::derive_seed;
use transfusion_data::shapes::ShapesGenerator;
use transfusion_data::source::{open_source, SourceOptions, SourceSpec};
use transfusion_infer::autoencoder::{load_vae, save_vae, VAE_CONFIG_FILE, VAE_WEIGHTS_FILE};
use transfusion_infer::image_tensor::{images_to_tensor, tensor_to_images};
use transfusion_model::vae::{vae_loss, AutoencoderKl, ReconLoss, VaeConfig};

use crate::checkpoint::{
    latest_checkpoint_with, load_optimizer, prune_with, remove_leftovers, save_optimizer,
    step_dir_name, write_dir_atomically, AdamWOptimizer, STATE_FILE,
};
use crate::config::{OptimizerSection, ScheduleSection};
use crate::metrics::{LogLine, MetricsLog};
use crate::optim::{adamw, all_finite, clip_global_norm};
use crate::plot::{plot_series, smooth, Series};
use crate::schedule::lr_at;
use crate::trainer::step_progress_bar;

/// The run config file (in the run directory and in every checkpoint).
pub const VAE_TRAIN_FILE: &str = "vae_train.json";

/// Files of a complete VAE training checkpoint.
pub const VAE_CHECKPOINT_FILES: &[&str] = &[
    VAE_WEIGHTS_FILE,
    VAE_CONFIG_FILE,
    "optimizer.mpk",
    VAE_TRAIN_FILE,
    STATE_FILE,
];

/// Everything that defines a VAE training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaeTrainConfig {
    /// The preset the network came from (informational).
    pub preset: String,
    /// The network.
    pub vae: VaeConfig,
    /// Image sources (`KIND:LOCATION`; text-only records are skipped).
    pub data: Vec<SourceSpec>,
    /// Held-out image sources; empty: the training sources with the held-out shapes seed
    /// (for `shapes:` a disjoint set; for other sources give this explicitly).
    pub held_out: Vec<SourceSpec>,
    /// Side of the square training images in pixels (center-crop + resize).
    pub image_size: u32,
    /// Optimizer steps.
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW betas, epsilon, weight decay.
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule.
    pub schedule: ScheduleSection,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// Weight of the per-element KL term.
    pub kl_weight: f64,
    /// Reconstruction distance.
    pub loss: ReconLoss,
    /// Evaluate (PSNR, grid, latent statistics) every this many steps (0: at the end only).
    pub eval_every: u64,
    /// Held-out images for PSNR and latent statistics.
    pub eval_images: usize,
    /// Held-out images in the reconstruction grid (one row of originals, one of
    /// reconstructions).
    pub grid_images: usize,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Step checkpoints kept.
    pub keep_last: usize,
    /// Log a train line every this many steps.
    pub log_every: u64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl VaeTrainConfig {
    /// The VAE presets by name.
    pub const PRESETS: [&'static str; 3] = ["tiny", "sd", "paper"];

    /// The network of preset `name`.
    pub fn preset_vae(name: &str) -> Option<VaeConfig> {
        match name {
            "tiny" => Some(VaeConfig::tiny()),
            "sd" => Some(VaeConfig::sd()),
            "paper" => Some(VaeConfig::paper()),
            _ => None,
        }
    }

    /// A run of preset `name` on `data` with the preset's default budget: `tiny` trains on
    /// 32px images (1500 steps of 16, lr 1e-3, a few CPU minutes); `sd` and `paper` on
    /// 256px images (20000 steps of 8, lr 1e-4: a GPU job).
    pub fn preset(name: &str, data: Vec<SourceSpec>) -> anyhow::Result<Self> {
        let vae = Self::preset_vae(name).with_context(|| {
            format!(
                "unknown VAE preset `{name}` (one of {})",
                Self::PRESETS.join(", ")
            )
        })?;
        let tiny = name == "tiny";
        Ok(Self {
            preset: name.to_string(),
            vae,
            data,
            held_out: vec![],
            image_size: if tiny { 32 } else { 256 },
            steps: if tiny { 1500 } else { 20_000 },
            batch_size: if tiny { 16 } else { 8 },
            optimizer: OptimizerSection {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            schedule: ScheduleSection {
                lr: if tiny { 1e-3 } else { 1e-4 },
                min_lr: if tiny { 1e-4 } else { 1e-5 },
                warmup_steps: if tiny { 50 } else { 500 },
            },
            grad_clip: 1.0,
            kl_weight: 1e-4,
            loss: ReconLoss::L1,
            eval_every: if tiny { 250 } else { 2000 },
            eval_images: 64,
            grid_images: 8,
            checkpoint_every: if tiny { 500 } else { 2000 },
            keep_last: 3,
            log_every: 10,
            seed: 0,
        })
    }

    /// Checks the config; errors name the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.data.is_empty(), "VAE training: no --data source");
        let f = self.vae.down_factor() as u32;
        ensure!(
            self.image_size > 0 && self.image_size % f == 0,
            "image_size {} should be a positive multiple of the VAE's down-sampling factor {f}",
            self.image_size
        );
        ensure!(self.batch_size > 0, "batch_size should be positive");
        ensure!(self.eval_images > 0, "eval_images should be positive");
        ensure!(
            self.kl_weight >= 0.0 && self.kl_weight.is_finite(),
            "kl_weight should be finite and >= 0, got {}",
            self.kl_weight
        );
        Ok(())
    }
}

/// Position in the image stream: epoch, source, record within the source's epoch order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPos {
    /// Pass over all sources.
    pub epoch: u64,
    /// Source index.
    pub source: usize,
    /// Records of that source consumed in this epoch.
    pub record: usize,
}

/// Everything besides weights and optimizer moments needed to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeTrainingState {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// The image stream after the last batch used.
    pub data: StreamPos,
    /// Held-out PSNR at this checkpoint's step, if measured there.
    pub eval_psnr: Option<f64>,
}

/// Images of a list of sources, cycled epoch after epoch; indexed sources are shuffled per
/// epoch (seeded), streamed ones read in order.
pub struct ImageStream {
    sources: Vec<Box<dyn SampleSource>>,
    specs: Vec<String>,
    image_size: u32,
    seed: u64,
    pos: StreamPos,
    order: Option<Vec<usize>>,
    iter: Option<RecordIter>,
}

impl ImageStream {
    /// Opens `specs` (shapes drawn with `shapes_seed`) at `image_size` pixels.
    pub fn open(
        specs: &[SourceSpec],
        image_size: u32,
        seed: u64,
        shapes_seed: u64,
    ) -> anyhow::Result<Self> {
        let opts = SourceOptions {
            seed,
            shapes_image_size: image_size,
            shapes_seed,
            ..SourceOptions::default()
        };
        let sources = specs
            .iter()
            .map(|s| open_source(s, &opts).with_context(|| format!("opening --data {s}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            sources,
            specs: specs.iter().map(|s| s.to_string()).collect(),
            image_size,
            seed,
            pos: StreamPos::default(),
            order: None,
            iter: None,
        })
    }

    /// The position after the last image returned.
    pub fn pos(&self) -> StreamPos {
        self.pos
    }

    /// Continues from `pos` (a resumed run).
    pub fn seek(&mut self, pos: StreamPos) {
        self.pos = pos;
        self.order = None;
        self.iter = None;
    }

    fn next_record(&mut self) -> anyhow::Result<Option<Sample>> {
        let src = &self.sources[self.pos.source];
        if src.is_indexed() {
            let n = src.num_records().unwrap_or(0);
            if self.order.is_none() {
                let mut order: Vec<usize> = (0..n).collect();
                let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(&[
                    self.seed,
                    self.pos.epoch,
                    self.pos.source as u64,
                ]));
                order.shuffle(&mut rng);
                self.order = Some(order);
            }
            let order = self.order.as_ref().expect("set above");
            if self.pos.record >= order.len() {
                return Ok(None);
            }
            let idx = order[self.pos.record];
            self.pos.record += 1;
            Ok(src.get(self.pos.epoch, idx)?)
        } else {
            if self.iter.is_none() {
                self.iter = Some(src.iter_epoch(self.pos.epoch, self.pos.record)?);
            }
            match self.iter.as_mut().expect("set above").next() {
                None => Ok(None),
                Some(r) => {
                    self.pos.record += 1;
                    Ok(r?)
                }
            }
        }
    }

    /// The next image (center-cropped and resized), moving to the next source / epoch at
    /// the end of one. Errors when a whole pass over every source yields no image.
    pub fn next_image(&mut self) -> anyhow::Result<RgbImage> {
        let mut empty_sources = 0;
        loop {
            match self.next_record()? {
                Some(Sample::Pair {
                    image: ImageData::Pixels(img),
                    ..
                }) => return Ok(center_crop_resize(&img, self.image_size)),
                Some(Sample::Pair {
                    image: ImageData::Latent { .. },
                    ..
                }) => bail!(
                    "{}: holds latents, not images; a VAE trains on images",
                    self.specs[self.pos.source]
                ),
                Some(Sample::Text(_)) => {}
                None if self.pos.record == 0 => {
                    empty_sources += 1;
                    if empty_sources > self.sources.len() {
                        bail!("no images in {}", self.specs.join(", "));
                    }
                    self.advance_source();
                }
                None => {
                    empty_sources = 0;
                    self.advance_source();
                }
            }
        }
    }

    fn advance_source(&mut self) {
        self.pos.record = 0;
        self.pos.source += 1;
        if self.pos.source == self.sources.len() {
            self.pos.source = 0;
            self.pos.epoch += 1;
        }
        self.order = None;
        self.iter = None;
    }

    /// The next `n` images.
    pub fn next_images(&mut self, n: usize) -> anyhow::Result<Vec<RgbImage>> {
        (0..n).map(|_| self.next_image()).collect()
    }
}

/// One logged VAE training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeStepMetrics {
    /// Steps done after this one.
    pub step: u64,
    /// `recon + kl_weight * kl`.
    pub loss: f64,
    /// Reconstruction loss (mean per pixel element).
    pub recon: f64,
    /// KL per latent element.
    pub kl: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Training images per second (since the last line).
    pub images_per_s: f64,
    /// Steps skipped so far.
    pub skipped: u64,
    /// Whether this step was skipped.
    pub skipped_this: bool,
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
}

/// One evaluation on the held-out images (posterior mode, no sampling).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeEvalMetrics {
    /// Step evaluated.
    pub step: u64,
    /// Reconstruction PSNR in dB (images on the `[0, 1]` scale).
    pub psnr: f64,
    /// Reconstruction loss of the config's kind.
    pub recon: f64,
    /// KL per latent element.
    pub kl: f64,
    /// Mean of the unscaled latents (posterior mode).
    pub latent_mean: f64,
    /// Standard deviation of the unscaled latents: the checkpoint's scaling factor is its
    /// inverse, the shift its mean.
    pub latent_std: f64,
    /// Images evaluated.
    pub images: usize,
}

/// A line of a VAE run's `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VaeMetricsLine {
    /// A training step.
    Train(VaeStepMetrics),
    /// An evaluation.
    Eval(VaeEvalMetrics),
}

impl LogLine for VaeMetricsLine {
    fn step(&self) -> u64 {
        match self {
            VaeMetricsLine::Train(m) => m.step,
            VaeMetricsLine::Eval(m) => m.step,
        }
    }
}

/// How to run (not part of the config).
#[derive(Clone, Debug)]
pub struct VaeRunOptions {
    /// Run directory.
    pub out: PathBuf,
    /// Continue from the newest complete checkpoint in `out/checkpoints`.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (with a checkpoint) once this many steps are done (tests: a killed run).
    pub stop_at_step: Option<u64>,
}

impl VaeRunOptions {
    /// No resume, progress bar on.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            progress: true,
            stop_at_step: None,
        }
    }
}

/// What a VAE run did.
#[derive(Clone, Debug)]
pub struct VaeRunSummary {
    /// Steps done in total.
    pub steps: u64,
    /// The step this session started from.
    pub started_at: u64,
    /// Every metrics line of the run.
    pub metrics: Vec<VaeMetricsLine>,
    /// The last evaluation.
    pub last_eval: Option<VaeEvalMetrics>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
}

/// Reads the run config stored in a VAE checkpoint or run directory.
pub fn read_vae_train_config(dir: &Path) -> anyhow::Result<VaeTrainConfig> {
    let path = dir.join(VAE_TRAIN_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: bad VAE run config", path.display()))
}

/// The held-out set: fixed images, read once.
fn held_out_images(cfg: &VaeTrainConfig) -> anyhow::Result<Vec<RgbImage>> {
    let specs = if cfg.held_out.is_empty() {
        &cfg.data
    } else {
        &cfg.held_out
    };
    let mut s = ImageStream::open(
        specs,
        cfg.image_size,
        derive_seed(&[cfg.seed, 0xE7A1]),
        ShapesGenerator::HELD_OUT_SEED,
    )?;
    s.next_images(cfg.eval_images.max(cfg.grid_images))
}

/// Evaluates `model` on `images` in batches: PSNR, losses, latent statistics; the
/// reconstructions of the first `grid` images are returned too.
pub fn evaluate_vae<B: Backend>(
    model: &AutoencoderKl<B>,
    cfg: &VaeTrainConfig,
    images: &[RgbImage],
    grid: usize,
    step: u64,
    device: &B::Device,
) -> (VaeEvalMetrics, Vec<RgbImage>) {
    let n = images.len().min(cfg.eval_images).max(1);
    let (mut sq, mut recon, mut kl, mut zs, mut zsq, mut zn) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut recon_images = vec![];
    for chunk in images.chunks(cfg.batch_size.max(1)) {
        let x = images_to_tensor::<B>(chunk, device);
        let out = model.forward(x.clone(), false);
        let l = vae_loss(x.clone(), out.recon.clone(), &out.posterior, 0.0, cfg.loss);
        let k = chunk.len() as f64;
        recon += l.recon.into_scalar().elem::<f64>() * k;
        kl += l.kl.into_scalar().elem::<f64>() * k;
        let mse: f64 = (out.recon.clone() - x)
            .powi_scalar(2)
            .mean()
            .into_scalar()
            .elem();
        sq += mse * k;
        let z = out.posterior.mean;
        let numel = z.shape().num_elements() as f64;
        zs += z.clone().sum().into_scalar().elem::<f64>();
        zsq += z.powi_scalar(2).sum().into_scalar().elem::<f64>();
        zn += numel;
        if recon_images.len() < grid {
            recon_images.extend(tensor_to_images(out.recon.clamp(-1.0, 1.0)));
        }
    }
    // PSNR as `transfusion_model::vae::psnr`, over all images: [-1, 1] -> [0, 1] quarters
    // the squared error.
    let mse = sq / n as f64 / 4.0;
    let mean = zs / zn.max(1.0);
    let var = (zsq / zn.max(1.0) - mean * mean).max(0.0);
    recon_images.truncate(grid);
    (
        VaeEvalMetrics {
            step,
            psnr: if mse > 0.0 {
                -10.0 * mse.log10()
            } else {
                f64::INFINITY
            },
            recon: recon / n as f64,
            kl: kl / n as f64,
            latent_mean: mean,
            latent_std: var.sqrt(),
            images: n,
        },
        recon_images,
    )
}

/// The reconstruction grid: `originals` in the top row, `recons` below.
pub fn recon_grid(originals: &[RgbImage], recons: &[RgbImage]) -> RgbImage {
    let cols = originals.len().max(1);
    let mut all: Vec<RgbImage> = originals.to_vec();
    all.extend(recons.iter().cloned());
    image_grid(&all, cols, 2)
}

/// Draws a VAE run's loss curves (train loss and reconstruction, held-out reconstruction).
pub fn plot_vae(lines: &[VaeMetricsLine], path: &Path) -> anyhow::Result<()> {
    use plotters::style::RGBColor;
    let (mut loss, mut recon, mut erecon) = (vec![], vec![], vec![]);
    for l in lines {
        match l {
            VaeMetricsLine::Train(m) if !m.skipped_this => {
                loss.push((m.step, m.loss));
                recon.push((m.step, m.recon));
            }
            VaeMetricsLine::Eval(e) => erecon.push((e.step, e.recon)),
            _ => {}
        }
    }
    let series: Vec<Series> = vec![
        Series::line("train loss", smooth(&loss), RGBColor(130, 130, 130)),
        Series::line(
            "train reconstruction",
            smooth(&recon),
            RGBColor(60, 110, 230),
        ),
        Series::dots("held-out reconstruction", erecon, RGBColor(140, 10, 10)),
    ];
    plot_series(&series, path)
}

struct Saver<'a> {
    cfg: &'a VaeTrainConfig,
    root: PathBuf,
}

impl Saver<'_> {
    fn save<B: AutodiffBackend>(
        &self,
        model: &AutoencoderKl<B>,
        optim: &AdamWOptimizer<AutoencoderKl<B>, B>,
        vae_config: &VaeConfig,
        state: &VaeTrainingState,
    ) -> anyhow::Result<PathBuf> {
        let dir = write_dir_atomically(&self.root, &step_dir_name(state.step), |tmp| {
            save_vae(tmp, model, vae_config)?;
            save_optimizer(tmp, model, optim)?;
            std::fs::write(
                tmp.join(VAE_TRAIN_FILE),
                serde_json::to_string_pretty(self.cfg)?,
            )?;
            // Last: marks the directory complete.
            std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
            Ok(())
        })?;
        prune_with(&self.root, self.cfg.keep_last.max(1), VAE_CHECKPOINT_FILES)?;
        Ok(dir)
    }
}

/// The same network shape (scale and shift aside).
fn same_shape(a: &VaeConfig, b: &VaeConfig) -> bool {
    let mut b = b.clone();
    b.scaling_factor = a.scaling_factor;
    b.shift_factor = a.shift_factor;
    serde_json::to_value(a).ok() == serde_json::to_value(&b).ok()
}

/// Trains the VAE of `cfg` on `device` (see the module docs for the files written).
pub fn run_vae_training<B: AutodiffBackend>(
    cfg: &VaeTrainConfig,
    opts: &VaeRunOptions,
    device: &B::Device,
) -> anyhow::Result<VaeRunSummary> {
    cfg.validate()?;
    let out = opts.out.clone();
    std::fs::create_dir_all(out.join("recon"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root)?;
    remove_leftovers(&root);
    std::fs::write(out.join(VAE_TRAIN_FILE), serde_json::to_string_pretty(cfg)?)?;
    let saver = Saver {
        cfg,
        root: root.clone(),
    };

    let mut optim: AdamWOptimizer<AutoencoderKl<B>, B> = adamw(&cfg.optimizer).init();
    let resume_from = if opts.resume {
        let l = latest_checkpoint_with(&root, VAE_CHECKPOINT_FILES);
        if l.is_none() {
            eprintln!(
                "--resume: no complete VAE checkpoint in {}; starting fresh",
                root.display()
            );
        }
        l
    } else {
        None
    };
    let mut vae_config = cfg.vae.clone();
    let (mut model, mut state) = match &resume_from {
        Some(dir) => {
            let text = std::fs::read_to_string(dir.join(STATE_FILE))
                .with_context(|| format!("cannot read {}", dir.join(STATE_FILE).display()))?;
            let state: VaeTrainingState = serde_json::from_str(&text)
                .with_context(|| format!("{}: bad training state", dir.display()))?;
            let vae = load_vae::<B>(dir, device)?;
            if !same_shape(&vae.config, &cfg.vae) {
                bail!(
                    "{}: the checkpoint's VAE config differs from this run's; resume with the \
                     same preset (or without --preset to use the checkpoint's)",
                    dir.display()
                );
            }
            vae_config = vae.config;
            optim = load_optimizer(dir, &vae.model, optim, device)?;
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
            (vae.model, state)
        }
        None => (
            crate::trainer::seeded_materialized(device, cfg.seed, || cfg.vae.init::<B>(device)),
            VaeTrainingState {
                step: 0,
                skipped_steps: 0,
                data: StreamPos::default(),
                eval_psnr: None,
            },
        ),
    };
    let started_at = state.step;
    let mut stream = ImageStream::open(
        &cfg.data,
        cfg.image_size,
        cfg.seed,
        ShapesGenerator::TRAIN_SEED,
    )?;
    stream.seek(state.data);
    let held_out = held_out_images(cfg)?;
    let grid_originals: Vec<RgbImage> = held_out.iter().take(cfg.grid_images).cloned().collect();
    let mut log: MetricsLog<VaeMetricsLine> =
        MetricsLog::open(&out, resume_from.as_ref().map(|_| state.step))?;

    let total = cfg.steps;
    let end = opts.stop_at_step.map_or(total, |s| s.min(total));
    let bar = step_progress_bar(total, state.step, opts.progress);
    let started = Instant::now();
    let mut window = (Instant::now(), 0u64);
    let mut last_ckpt = resume_from.clone();
    let mut last_ckpt_step = resume_from.as_ref().map(|_| state.step);
    let mut last_eval: Option<VaeEvalMetrics> = None;
    let mut consecutive_bad = 0u32;

    while state.step < end {
        let step = state.step;
        let lr = lr_at(&cfg.schedule, step, total);
        let images = stream.next_images(cfg.batch_size)?;
        window.1 += images.len() as u64;
        // [N, 3, S, S]
        let x = images_to_tensor::<B>(&images, device);
        // Posterior noise from a host stream of (seed, step): no global RNG involved.
        let eps = host_normal::<B>(
            derive_seed(&[cfg.seed, 0x5A3B, step]),
            {
                let [n, _, h, w] = x.dims();
                let f = vae_config.down_factor();
                [n, vae_config.latent_channels, h / f, w / f]
            },
            device,
        );
        let out_ = model.forward_with_noise(x.clone(), eps);
        let l = vae_loss(x, out_.recon, &out_.posterior, cfg.kl_weight, cfg.loss);
        let vals: Vec<f64> = Tensor::cat(vec![l.loss.clone(), l.recon, l.kl], 0)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("losses should convert");
        let mut grads = GradientsParams::from_grads(l.loss.backward(), &model);
        let grad_norm = clip_global_norm::<B, _>(&model, &mut grads, cfg.grad_clip);
        let finite = vals.iter().all(|v| v.is_finite()) && grad_norm.is_finite();
        if finite {
            model = optim.step(lr, model, grads);
            consecutive_bad = 0;
        } else {
            state.skipped_steps += 1;
            consecutive_bad += 1;
        }
        state.step += 1;
        state.data = stream.pos();
        bar.set_position(state.step);
        if state.step % cfg.log_every.max(1) == 0 || !finite || state.step == end {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let m = VaeStepMetrics {
                step: state.step,
                loss: vals[0],
                recon: vals[1],
                kl: vals[2],
                grad_norm,
                lr,
                images_per_s: window.1 as f64 / secs,
                skipped: state.skipped_steps,
                skipped_this: !finite,
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            window = (Instant::now(), 0);
            bar.set_message(format!(
                "recon {:.4} kl {:.3} | {:.1} img/s | lr {:.2e}",
                m.recon, m.kl, m.images_per_s, m.lr
            ));
            log.push(VaeMetricsLine::Train(m))?;
        }
        if consecutive_bad >= 20 {
            bar.abandon();
            bail!(
                "stopping: {consecutive_bad} consecutive steps had a non-finite loss or gradient \
                 (step {}); lower --lr",
                state.step
            );
        }
        let is_end = state.step == end;
        let eval_due = (cfg.eval_every > 0 && state.step % cfg.eval_every == 0) || is_end;
        if eval_due && finite {
            let valid = model.valid();
            let (e, recons) = evaluate_vae::<B::InnerBackend>(
                &valid,
                cfg,
                &held_out,
                cfg.grid_images,
                state.step,
                device,
            );
            bar.println(format!(
                "eval @ {}: held-out PSNR {:.2} dB, recon {:.4}, latent mean {:.3} std {:.3}",
                state.step, e.psnr, e.recon, e.latent_mean, e.latent_std
            ));
            let grid = recon_grid(&grid_originals, &recons);
            save_png(
                &grid,
                &out.join("recon")
                    .join(format!("step-{:08}.png", state.step)),
            )?;
            save_png(&grid, &out.join("recon.png"))?;
            if e.latent_std > 1e-8 && e.latent_std.is_finite() {
                vae_config.scaling_factor = 1.0 / e.latent_std;
                vae_config.shift_factor = e.latent_mean;
            }
            log.push(VaeMetricsLine::Eval(e.clone()))?;
            plot_vae(&log.lines, &out.join("loss.png"))?;
            last_eval = Some(e);
        }
        let ckpt_due =
            (cfg.checkpoint_every > 0 && state.step % cfg.checkpoint_every == 0) || is_end;
        if ckpt_due && finite && all_finite(&model) {
            state.eval_psnr = last_eval
                .as_ref()
                .filter(|e| e.step == state.step)
                .map(|e| e.psnr);
            let dir = saver.save(&model, &optim, &vae_config, &state)?;
            last_ckpt = Some(dir);
            last_ckpt_step = Some(state.step);
        }
    }
    if last_ckpt_step != Some(state.step) && consecutive_bad == 0 && all_finite(&model) {
        let dir = saver.save(&model, &optim, &vae_config, &state)?;
        last_ckpt = Some(dir);
    }
    if !log.lines.is_empty() {
        plot_vae(&log.lines, &out.join("loss.png"))?;
    }
    bar.finish();
    Ok(VaeRunSummary {
        steps: state.step,
        started_at,
        metrics: log.lines.clone(),
        last_eval,
        last_checkpoint: last_ckpt,
    })
}

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
    let model = config.init::<B>(device);
    // [N, 3, S, S]
    let x = Tensor::<B, 4>::random(
        [batch, 3, size, size],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        device,
    );
    let f = config.down_factor();
    // [N, c, S/f, S/f]
    let z = Tensor::<B, 4>::random(
        [batch, config.latent_channels, size / f, size / f],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
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

/// A standard normal tensor drawn on the host from `seed`.
fn host_normal<B: Backend>(seed: u64, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    let mut rng = transfusion_data::rng::Rng64::from_parts(&[seed]);
    let mut data = vec![0f32; shape.iter().product()];
    rng.fill_normal(&mut data);
    Tensor::from_data(TensorData::new(data, shape), device)
}
