//! `transfusion`: text, images, captions and interleaved documents from a checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use transfusion_data::image::{center_crop_resize, image_grid, load_image, save_png};
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_infer::bench::{op_counts, run_bench, BenchOptions};
use transfusion_infer::checkpoint::{AutoencoderRef, ModelMeta};
use transfusion_infer::error::report;
use transfusion_infer::threads::run_binary;
use transfusion_infer::{
    dispatch, write_transcript, BackendTask, DeviceChoice, GenerateOptions, ImageOptions, Pipeline,
    SamplerKind, TextOptions,
};
use transfusion_model::{Precision, TransfusionConfig};

/// Generate text, images, captions and interleaved documents with a Transfusion model.
#[derive(Parser, Debug)]
#[command(name = "transfusion", version, about)]
struct Cli {
    /// Device: auto (a GPU if usable, else the CPU), cpu, wgpu, cuda or cuda:N.
    #[arg(long, global = true, default_value = "auto")]
    device: DeviceChoice,
    /// Type of the decoder's matrix products: f32, bf16 (CUDA, flex) or f16.
    #[arg(long, global = true, default_value = "f32")]
    precision: Precision,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Continue a prompt with text, streamed to stdout.
    Text(TextCmd),
    /// Generate images from a caption (one PNG per image, plus a grid when --num > 1).
    Image(ImageCmd),
    /// Caption images (one line per image, in one batch).
    Caption(CaptionCmd),
    /// Generate an interleaved text-and-image document (Markdown transcript + PNGs).
    Generate(GenerateCmd),
    /// Measure generation speed (diffusion steps, images, text; KV cache vs recompute).
    Bench(BenchCmd),
}

#[derive(Args, Debug, Clone)]
struct Sampling {
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample only among the K most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to probability P (1: no limit).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug, Clone)]
struct Diffusion {
    /// Sampling steps, respaced over the 1000 training steps [default: 250 for ddpm, 50 for
    /// ddim, the checkpoint's (2) for consistency].
    #[arg(long)]
    steps: Option<usize>,
    /// Sampler: ddpm (ancestral), ddim (deterministic) or consistency (1 or 2 steps)
    /// [default: consistency for a consistency-distilled checkpoint, else ddpm].
    #[arg(long)]
    sampler: Option<SamplerKind>,
    /// Classifier-free guidance scale (0 or 1: no guidance) [default: 1 for a
    /// consistency-distilled checkpoint (its guidance is baked in), else 3].
    #[arg(long)]
    cfg: Option<f64>,
}

#[derive(Args, Debug)]
struct TextCmd {
    /// Checkpoint directory (model.safetensors, model.json, tokenizer.json).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: Sampling,
}

#[derive(Args, Debug)]
struct ImageCmd {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Caption of the images.
    #[arg(long)]
    prompt: String,
    /// Images to generate, in one batch.
    #[arg(long, default_value_t = 1)]
    num: usize,
    #[command(flatten)]
    diffusion: Diffusion,
    /// Image side in pixels; must be the model's image size (default: the model's).
    #[arg(long)]
    size: Option<u32>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG. With --num N > 1: FILE-0.png .. FILE-(N-1).png and the grid as FILE.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct CaptionCmd {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Images to caption (PNG, JPEG, WebP, BMP, GIF).
    #[arg(long, num_args = 1.., required = true)]
    image: Vec<PathBuf>,
    /// Most tokens per caption.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: Sampling,
}

#[derive(Args, Debug)]
struct GenerateCmd {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Start of the document.
    #[arg(long)]
    prompt: String,
    /// Most text tokens to generate (images not counted).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Most images in the document.
    #[arg(long, default_value_t = 4)]
    max_images: usize,
    #[command(flatten)]
    sampling: Sampling,
    #[command(flatten)]
    diffusion: Diffusion,
    /// Output directory (transcript.md and image-K.png).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct BenchCmd {
    /// Checkpoint directory to measure.
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    checkpoint: Option<PathBuf>,
    /// Randomly initialised preset instead of a checkpoint (tiny, paper_160m, ...).
    #[arg(long)]
    preset: Option<String>,
    /// Tokenizer for --preset (default: the demo tokenizer built into the binary).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Diffusion steps timed for the ms-per-step figures.
    #[arg(long, default_value_t = 20)]
    measure_steps: usize,
    /// DDPM steps of the seconds-per-image figure.
    #[arg(long, default_value_t = 250)]
    ddpm_steps: usize,
    /// DDIM steps of the seconds-per-image figure.
    #[arg(long, default_value_t = 50)]
    ddim_steps: usize,
    /// Batch size of the images/s figure.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Text tokens decoded for the tokens/s figure.
    #[arg(long, default_value_t = 64)]
    text_tokens: usize,
    /// Guidance scale of the with-CFG figures.
    #[arg(long, default_value_t = 3.0)]
    cfg: f64,
    /// Skip the (slow) full-recompute figures.
    #[arg(long)]
    no_recompute: bool,
}

const DEMO_TOKENIZER: &[u8] = include_bytes!("../../assets/tokenizer.json");

fn text_opts(max_tokens: usize, s: &Sampling) -> TextOptions {
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
fn image_opts<B: burn::prelude::Backend>(
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

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})")
            .expect("template should parse")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn save(img: &image::RgbImage, path: &Path) -> Result<()> {
    save_png(img, path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `FILE.png` -> `FILE-k.png`.
fn numbered(out: &Path, k: usize) -> PathBuf {
    let stem = out
        .file_stem()
        .map_or("image".into(), |s| s.to_string_lossy());
    let ext = out
        .extension()
        .map_or("png".into(), |s| s.to_string_lossy());
    out.with_file_name(format!("{stem}-{k}.{ext}"))
}

struct Task(Command, Precision);

impl BackendTask for Task {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device, _label: &str) -> Result<()> {
        type I<B> = <B as AutodiffBackend>::InnerBackend;
        let precision = self.1;
        let load = |dir: &std::path::Path| {
            Pipeline::<I<B>>::load(dir, &device).and_then(|p| p.with_precision(precision))
        };
        match self.0 {
            Command::Text(c) => {
                let pipe = load(&c.checkpoint)?;
                let opts = text_opts(c.max_tokens, &c.sampling);
                let mut out = std::io::stdout();
                write!(out, "{}", c.prompt)?;
                pipe.text_stream(&c.prompt, &opts, |piece| {
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                })?;
                writeln!(out)?;
            }
            Command::Image(c) => {
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
            }
            Command::Caption(c) => {
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
            }
            Command::Generate(c) => {
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
            }
            Command::Bench(c) => {
                let mut pipe = match (&c.checkpoint, &c.preset) {
                    (Some(dir), _) => load(dir)?,
                    (None, Some(name)) => {
                        preset_pipeline::<I<B>>(name, c.tokenizer.as_deref(), &device)?
                            .with_precision(precision)?
                    }
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
                    (Some(dir), _) => Pipeline::<B>::load(dir, &device)?,
                    (None, Some(name)) => {
                        preset_pipeline::<B>(name, c.tokenizer.as_deref(), &device)?
                    }
                    (None, None) => unreachable!("refused above"),
                }
                .with_precision(precision)?;
                op_counts(&mut counted, &opts, &mut report)?;
            }
        }
        Ok(())
    }
}

/// A randomly initialised preset in pixel space (3 channels, image side = latent side).
fn preset_pipeline<B: burn::prelude::Backend>(
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

fn main() {
    let cli = Cli::parse();
    let result = run_binary(|| dispatch(cli.device, Task(cli.command, cli.precision)))
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    if let Err(e) = result {
        eprintln!("error: {}", report(e.as_ref()));
        std::process::exit(1);
    }
}

/// A caption on one output line: line breaks a model may produce become spaces.
fn one_line(caption: &str) -> String {
    caption.split_whitespace().collect::<Vec<_>>().join(" ")
}
