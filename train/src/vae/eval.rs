//! The VAE's metrics records, held-out evaluation, reconstruction grid and loss plot.

use std::path::Path;

use burn::prelude::*;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use transfusion_data::image::image_grid;
use transfusion_model::vae::{vae_loss, AutoencoderKl};
use transfusion_runtime::image_tensor::{images_to_tensor, tensor_to_images};

use super::config::VaeTrainConfig;
use crate::engine::metrics::{EvalLine, EvalSplit, Figures, Line, StepLine};
use crate::engine::plot::{plot_series, smooth, Series};
use crate::error::Result;

/// The losses of a VAE step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeLosses {
    /// `recon + kl_weight * kl`.
    pub loss: f64,
    /// Reconstruction loss (mean per pixel element).
    pub recon: f64,
    /// KL per latent element.
    pub kl: f64,
}

impl Figures for VaeLosses {
    fn summary(&self) -> String {
        format!("recon {:.4} kl {:.3}", self.recon, self.kl)
    }
}

/// One logged VAE training step.
pub type VaeStepMetrics = StepLine<VaeLosses>;

/// The figures of one evaluation on the evaluation images (posterior mode, no sampling).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeEval {
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

impl Figures for VaeEval {
    fn summary(&self) -> String {
        let (psnr, recon) = (self.psnr, self.recon);
        let (mean, std) = (self.latent_mean, self.latent_std);
        format!("PSNR {psnr:.2} dB, recon {recon:.4}, latent mean {mean:.3} std {std:.3}")
    }
}

/// One VAE evaluation (see [`EvalLine::split`] for what it ran on).
pub type VaeEvalMetrics = EvalLine<VaeEval>;

/// A line of a VAE run's `metrics.jsonl`.
pub type VaeMetricsLine = Line<VaeStepMetrics, VaeEvalMetrics>;

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
        EvalLine {
            step,
            split: EvalSplit::of(&cfg.held_out, &cfg.data),
            figures: VaeEval {
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
pub fn plot_vae(lines: &[VaeMetricsLine], path: &Path) -> Result<()> {
    use plotters::style::RGBColor;
    let (mut loss, mut recon, mut erecon) = (vec![], vec![], vec![]);
    for l in lines {
        match l {
            VaeMetricsLine::Train(m) if !m.skipped_this => {
                loss.push((m.step, m.losses.loss));
                recon.push((m.step, m.losses.recon));
            }
            VaeMetricsLine::Eval(e) => erecon.push((e.step, e.figures.recon)),
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
