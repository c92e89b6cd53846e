//! `transfusion caption`: one caption per image, in one batch.

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::prelude::Backend;
use clap::Args;
use transfusion_data::image::{center_crop_resize, load_image};
use transfusion_infer::Pipeline;

use super::{one_line, text_opts, Sampling};

#[derive(Args, Debug)]
pub struct CaptionCmd {
    /// Checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images to caption (PNG, JPEG, WebP, BMP, GIF).
    #[arg(long, num_args = 1.., required = true)]
    pub image: Vec<PathBuf>,
    /// Most tokens per caption.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: Sampling,
}

/// Runs the subcommand, loading the checkpoint with `load`.
pub fn run<B: Backend>(
    c: CaptionCmd,
    load: impl Fn(&Path) -> transfusion_infer::Result<Pipeline<B>>,
) -> Result<()> {
    let pipe = load(&c.checkpoint)?;
    // One image decoded at a time and shrunk to the model's size at once, so
    // many large inputs never sit in memory together at full resolution.
    let size = pipe.meta.image_size;
    let images = c
        .image
        .iter()
        .map(|p| {
            load_image(p)
                .map(|img| center_crop_resize(&img, size))
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = text_opts(c.max_tokens, &c.sampling);
    for (path, caption) in c.image.iter().zip(pipe.caption(&images, &opts)?) {
        println!("{}\t{}", path.display(), one_line(&caption));
    }
    Ok(())
}
