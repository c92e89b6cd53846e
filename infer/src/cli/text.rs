//! `transfusion text`: continue a prompt, streamed to stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::prelude::Backend;
use clap::Args;
use transfusion_infer::Pipeline;

use super::{text_opts, Sampling};

#[derive(Args, Debug)]
pub struct TextCmd {
    /// Checkpoint directory (model.safetensors, model.json, tokenizer.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: Sampling,
}

/// Runs the subcommand, loading the checkpoint with `load`.
pub fn run<B: Backend>(
    c: TextCmd,
    load: impl Fn(&Path) -> transfusion_infer::Result<Pipeline<B>>,
) -> Result<()> {
    let pipe = load(&c.checkpoint)?;
    let opts = text_opts(c.max_tokens, &c.sampling);
    let mut out = std::io::stdout();
    write!(out, "{}", c.prompt)?;
    pipe.text_stream(&c.prompt, &opts, |piece| {
        let _ = write!(out, "{piece}");
        let _ = out.flush();
    })?;
    writeln!(out)?;
    Ok(())
}
