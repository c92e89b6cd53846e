//! `transfusion image`: images from a caption, one PNG each and a grid.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use burn::prelude::Backend;
use clap::Args;
use transfusion_data::image::image_grid;
use transfusion_infer::Pipeline;

use super::{image_opts, numbered, progress, save, Diffusion};

#[derive(Args, Debug)]
pub struct ImageCmd {
    /// Checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Caption of the images.
    #[arg(long)]
    pub prompt: String,
    /// Images to generate, in one batch.
    #[arg(long, default_value_t = 1)]
    pub num: usize,
    #[command(flatten)]
    pub diffusion: Diffusion,
    /// Image side in pixels; must be the model's image size (default: the model's).
    #[arg(long)]
    pub size: Option<u32>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output PNG. With --num N > 1: FILE-0.png .. FILE-(N-1).png and the grid as FILE.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs the subcommand, loading the checkpoint with `load`.
pub fn run<B: Backend>(
    c: ImageCmd,
    load: impl Fn(&Path) -> transfusion_infer::Result<Pipeline<B>>,
) -> Result<()> {
    let png = c.out.extension().and_then(|e| e.to_str());
    if !png.is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        bail!(
            "--out {}: images are written as PNG; give a FILE.png",
            c.out.display()
        );
    }
    let pipe = load(&c.checkpoint)?;
    if let Some(size) = c.size {
        pipe.check_size(size)?;
    }
    let opts = image_opts(&pipe, c.num, &c.diffusion, c.seed);
    let bar = progress(opts.steps as u64, "denoising");
    let x = pipe.image_tensor(&c.prompt, &opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let images = pipe.to_images(x);
    if images.len() == 1 {
        save(&images[0], &c.out)?;
        println!("{}", c.out.display());
    } else {
        for (k, img) in images.iter().enumerate() {
            let path = numbered(&c.out, k);
            save(img, &path)?;
            println!("{}", path.display());
        }
        let cols = (images.len() as f64).sqrt().ceil() as usize;
        save(&image_grid(&images, cols, 2), &c.out)?;
        println!("{}", c.out.display());
    }
    Ok(())
}
