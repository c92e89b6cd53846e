//! The `transfusion` binary's subcommands, one file each, and the options and helpers
//! they share.

pub mod bench;
pub mod caption;
pub mod generate;
pub mod image;
pub mod text;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use transfusion_data::image::save_png;
use transfusion_infer::{ImageOptions, Pipeline, SamplerKind, TextOptions};

/// Token sampling flags.
#[derive(Args, Debug, Clone)]
pub struct Sampling {
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to probability P (1: no limit).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Diffusion sampling flags.
#[derive(Args, Debug, Clone)]
pub struct Diffusion {
    /// Sampling steps, respaced over the 1000 training steps [default: 250 for ddpm, 50 for
    /// ddim, the checkpoint's (2) for consistency].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sampler: ddpm (ancestral), ddim (deterministic) or consistency (1 or 2 steps)
    /// [default: consistency for a consistency-distilled checkpoint, else ddpm].
    #[arg(long)]
    pub sampler: Option<SamplerKind>,
    /// Classifier-free guidance scale (0 or 1: no guidance) [default: 1 for a
    /// consistency-distilled checkpoint (its guidance is baked in), else 3].
    #[arg(long)]
    pub cfg: Option<f64>,
}

/// The flags' text options.
pub fn text_opts(max_tokens: usize, s: &Sampling) -> TextOptions {
    TextOptions {
        max_tokens,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
        logit_bias: vec![],
    }
}

/// The flags' image options over the checkpoint's defaults
/// ([`Pipeline::default_image_options`]).
pub fn image_opts<B: burn::prelude::Backend>(
    pipe: &Pipeline<B>,
    num: usize,
    d: &Diffusion,
    seed: u64,
) -> ImageOptions {
    ImageOptions {
        num,
        seed,
        ..pipe
            .default_image_options()
            .with_overrides(d.sampler, d.steps, d.cfg)
    }
}

/// A progress bar of `total` steps labelled `what`.
pub fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})")
            .expect("template should parse")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Writes `img` as a PNG at `path`.
pub fn save(img: &::image::RgbImage, path: &Path) -> Result<()> {
    save_png(img, path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `FILE.png` -> `FILE-k.png`.
pub fn numbered(out: &Path, k: usize) -> PathBuf {
    let stem = out
        .file_stem()
        .map_or("image".into(), |s| s.to_string_lossy());
    let ext = out
        .extension()
        .map_or("png".into(), |s| s.to_string_lossy());
    out.with_file_name(format!("{stem}-{k}.{ext}"))
}

/// A caption on one output line: line breaks a model may produce become spaces.
pub fn one_line(caption: &str) -> String {
    caption.split_whitespace().collect::<Vec<_>>().join(" ")
}
