//! `transfusion generate`: an interleaved text-and-image document.

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::prelude::Backend;
use clap::Args;
use transfusion_infer::{write_transcript, GenerateOptions, Pipeline};

use super::{image_opts, text_opts, Diffusion, Sampling};

#[derive(Args, Debug)]
pub struct GenerateCmd {
    /// Checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Start of the document.
    #[arg(long)]
    pub prompt: String,
    /// Most text tokens to generate (images not counted).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Most images in the document.
    #[arg(long, default_value_t = 4)]
    pub max_images: usize,
    #[command(flatten)]
    pub sampling: Sampling,
    #[command(flatten)]
    pub diffusion: Diffusion,
    /// Output directory (transcript.md and image-K.png).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs the subcommand, loading the checkpoint with `load`.
pub fn run<B: Backend>(
    c: GenerateCmd,
    load: impl Fn(&Path) -> transfusion_infer::Result<Pipeline<B>>,
) -> Result<()> {
    let pipe = load(&c.checkpoint)?;
    let opts = GenerateOptions {
        text: text_opts(c.max_tokens, &c.sampling),
        image: image_opts(&pipe, 1, &c.diffusion, c.sampling.seed),
        max_images: c.max_images,
    };
    let segments = pipe.generate(&c.prompt, &opts)?;
    let (path, k) = write_transcript(&c.prompt, &segments, &c.out)?;
    println!(
        "{} ({} segments, {k} images)",
        path.display(),
        segments.len()
    );
    Ok(())
}
