//! `transfusion bench`: generation speed (diffusion steps, images, text; KV cache against
//! recompute) and op counts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_infer::bench::{op_counts, run_bench, BenchOptions};
use transfusion_infer::Pipeline;
use transfusion_model::{Precision, TransfusionConfig};
use transfusion_runtime::checkpoint::{AutoencoderRef, ModelMeta};

#[derive(Args, Debug)]
pub struct BenchCmd {
    /// Checkpoint directory to measure.
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    pub checkpoint: Option<PathBuf>,
    /// Randomly initialised preset instead of a checkpoint (tiny, paper_160m, ...).
    #[arg(long)]
    pub preset: Option<String>,
    /// Tokenizer for --preset (default: the demo tokenizer built into the binary).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Diffusion steps timed for the ms-per-step figures.
    #[arg(long, default_value_t = 20)]
    pub measure_steps: usize,
    /// DDPM steps of the seconds-per-image figure.
    #[arg(long, default_value_t = 250)]
    pub ddpm_steps: usize,
    /// DDIM steps of the seconds-per-image figure.
    #[arg(long, default_value_t = 50)]
    pub ddim_steps: usize,
    /// Batch size of the images/s figure.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Text tokens decoded for the tokens/s figure.
    #[arg(long, default_value_t = 64)]
    pub text_tokens: usize,
    /// Guidance scale of the with-CFG figures.
    #[arg(long, default_value_t = 3.0)]
    pub cfg: f64,
    /// Skip the (slow) full-recompute figures.
    #[arg(long)]
    pub no_recompute: bool,
}

/// The demo tokenizer, built into the binary (for `--preset` without `--tokenizer`).
const DEMO_TOKENIZER: &[u8] = include_bytes!("../../../assets/tokenizer.json");

/// Runs the benchmark on `device`: timed on `B`'s inner backend, op counts on `B`.
pub fn run<B: AutodiffBackend>(
    c: BenchCmd,
    device: &B::Device,
    precision: Precision,
) -> Result<()> {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let load =
        |dir: &Path| Pipeline::<I<B>>::load(dir, device).and_then(|p| p.with_precision(precision));
    let mut pipe = match (&c.checkpoint, &c.preset) {
        (Some(dir), _) => load(dir)?,
        (None, Some(name)) => preset_pipeline::<I<B>>(name, c.tokenizer.as_deref(), device)?
            .with_precision(precision)?,
        (None, None) => bail!("give --checkpoint DIR or --preset NAME"),
    };
    let opts = BenchOptions {
        prompt_tokens: c.prompt_tokens,
        measure_steps: c.measure_steps,
        ddpm_steps: c.ddpm_steps,
        ddim_steps: c.ddim_steps,
        batch: c.batch,
        text_tokens: c.text_tokens,
        cfg: c.cfg,
        recompute: !c.no_recompute,
    };
    let mut report = run_bench(&mut pipe, &opts, |figure| println!("{figure}"))?;
    drop(pipe);
    // The same model on the autodiff backend, whose graph counts the ops.
    let mut counted = match (&c.checkpoint, &c.preset) {
        (Some(dir), _) => Pipeline::<B>::load(dir, device)?,
        (None, Some(name)) => preset_pipeline::<B>(name, c.tokenizer.as_deref(), device)?,
        (None, None) => unreachable!("refused above"),
    }
    .with_precision(precision)?;
    op_counts(&mut counted, &opts, &mut report)?;
    Ok(())
}

/// A randomly initialised preset in pixel space (3 channels, image side = latent side).
pub fn preset_pipeline<B: burn::prelude::Backend>(
    name: &str,
    tokenizer: Option<&Path>,
    device: &B::Device,
) -> Result<Pipeline<B>> {
    let tokenizer = match tokenizer {
        Some(p) => TextTokenizer::from_file(p).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => TextTokenizer::from_bytes(DEMO_TOKENIZER).map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let mut config =
        TransfusionConfig::preset(name, tokenizer.vocab_size()).with_context(|| {
            format!(
                "unknown preset `{name}` (known: {})",
                TransfusionConfig::PRESETS.join(", ")
            )
        })?;
    config.latent_channels = 3;
    let meta = ModelMeta {
        image_size: config.latent_size as u32,
        special_tokens: *tokenizer.special(),
        autoencoder: AutoencoderRef::Pixel,
        step: 0,
        consistency: None,
        model: config.clone(),
    };
    Ok(Pipeline::from_parts(
        config.init::<B>(device),
        meta,
        tokenizer,
    )?)
}
