//! `transfusion-train`: train Transfusion models, build tokenizers, inspect data, measure
//! throughput, cache latents.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, Parser, Subcommand};
use transfusion_data::encoder::ImageEncoder;
use transfusion_data::source::{SourceOptions, SourceSpec};
use transfusion_infer::autoencoder::{load_vae, VaeImageEncoder};
use transfusion_infer::device::{dispatch, BackendTask, DeviceChoice};
use transfusion_infer::sampler::SamplerKind;
use transfusion_model::vae::{ReconLoss, VaeConfig};
use transfusion_model::{Precision, TransfusionConfig};
use transfusion_train::bench::{run_bench, BenchConfig};
use transfusion_train::checkpoint::{latest_checkpoint, read_config};
use transfusion_train::config::ExperimentConfig;
use transfusion_train::data::resolve_tokenizer;
use transfusion_train::metrics::{MetricsLine, MetricsLog};
use transfusion_train::plot::plot_losses;
use transfusion_train::vae::{
    bench_vae, plot_vae, read_vae_train_config, run_vae_training, VaeMetricsLine, VaeRunOptions,
    VaeTrainConfig, VAE_TRAIN_FILE,
};
use transfusion_train::{run_training, RunOptions, TrainHooks};

mod ddp_cli;

/// Train Transfusion (one transformer: next-token prediction on text, diffusion on image
/// latents) and the tools around it.
#[derive(Parser, Debug)]
#[command(name = "transfusion-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train from a TOML config (or a preset and data specs), with resumable checkpoints.
    Run(RunArgs),
    /// Train a byte-level BPE tokenizer on text files.
    Tokenizer(TokenizerArgs),
    /// Describe data sources (and optionally measure data throughput).
    Inspect(InspectArgs),
    /// Measure training throughput: step time, tokens/s, images/s, MFU.
    Bench(BenchArgs),
    /// Encode every image of a source once and store the latents (with --vae: a VAE;
    /// otherwise the identity pixel encoder).
    CacheLatents(CacheArgs),
    /// Train the image autoencoder (KL VAE): reconstruction + small-weight KL, with
    /// resumable checkpoints, held-out PSNR and reconstruction grids.
    Vae(VaeArgs),
    /// Measure VAE encode and decode throughput (images/s) at a given size.
    VaeBench(VaeBenchArgs),
    /// Redraw a run's loss plot from its metrics.jsonl (Transfusion or VAE run).
    Plot(PlotArgs),
    /// The main job: train the tiny preset on synthetic shapes, then score text-to-image
    /// and image-to-text on held-out samples and write grids and a report.
    Demo(DemoArgs),
    /// Serve Burn's global collective orchestrator for a multi-machine data-parallel run
    /// (feature `collective`).
    Orchestrator(ddp_cli::OrchestratorArgs),
}

#[derive(Args, Debug, Clone)]
struct DemoArgs {
    /// Output directory (report.json, grids, loss curves, checkpoints).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Training budget in minutes (evaluation comes after it).
    #[arg(long, default_value_t = 8.0)]
    minutes: f64,
    /// Optimizer steps planned; training stops at the budget or here.
    #[arg(long, default_value_t = 1500)]
    steps: u64,
    /// Held-out prompts and images to score.
    #[arg(long, default_value_t = 64)]
    eval_samples: usize,
    /// DDIM steps for the text-to-image evaluation.
    #[arg(long, default_value_t = 50)]
    sampling_steps: usize,
    /// Classifier-free guidance scale of the evaluation.
    #[arg(long, default_value_t = 3.0)]
    cfg: f64,
    /// Sampler of the text-to-image evaluation: ddim or ddpm.
    #[arg(long, default_value = "ddim")]
    sampler: SamplerKind,
    /// Score this checkpoint (e.g. assets/demo-checkpoint) instead of training one.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Device: auto, cpu, wgpu, cuda[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

struct DemoTask(transfusion_train::demo::DemoOptions);

impl BackendTask for DemoTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        transfusion_train::demo::run_demo::<B>(&self.0, &device, label).map(|_| ())
    }
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Experiment config (TOML). Without it, `--preset` and `--data` describe the run.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in OUT/checkpoints (same schedule
    /// position, data order and random streams). Without --config/--preset the
    /// checkpoint's own config is used.
    #[arg(long)]
    resume: bool,
    /// Device: auto, cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Data-parallel training (--devices, multi-node flags; feature `collective`).
    #[command(flatten)]
    ddp: ddp_cli::DdpArgs,
    /// Run directory (metrics, plots, checkpoints).
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Total optimizer steps (overrides training.steps).
    #[arg(long)]
    steps: Option<u64>,
    /// Rows per micro-batch (overrides training.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Row length in positions (overrides training.seq_len).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate (overrides schedule.lr).
    #[arg(long)]
    lr: Option<f64>,
    /// Type of the decoder's matrix products: f32, bf16 or f16 (overrides
    /// training.precision; weights and optimizer state stay f32).
    #[arg(long)]
    precision: Option<Precision>,
    /// Model preset (tiny, paper_160m, paper_370m, paper_760m, paper_1_4b, paper_7b);
    /// overrides model.preset.
    #[arg(long)]
    preset: Option<String>,
    /// Training data source KIND:LOCATION[@WEIGHT] (repeatable; replaces data.train).
    #[arg(long = "data")]
    data: Vec<SourceSpec>,
    /// Tokenizer file (overrides data.tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Stop after this many minutes of training (with a checkpoint and an evaluation).
    #[arg(long)]
    minutes: Option<f64>,
    /// Print the resolved config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args, Debug)]
struct TokenizerArgs {
    /// Text files or directories (.txt, .jsonl), searched recursively.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Vocabulary size (256 bytes + 5 special tokens + merges).
    #[arg(long, default_value_t = 512)]
    vocab_size: usize,
    /// Output file.
    #[arg(long, default_value = "tokenizer.json")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Data source KIND:LOCATION[@WEIGHT] (repeatable).
    #[arg(long = "data", required = true)]
    data: Vec<SourceSpec>,
    /// Records to read (and decode) per source.
    #[arg(long, default_value_t = 100)]
    check: usize,
    /// Tokenizer used for token counts.
    #[arg(long, default_value = "assets/tokenizer.json")]
    tokenizer: PathBuf,
    /// Also measure data throughput (JPEG decoding, batch building) on 1 and N threads.
    #[arg(long)]
    bench: bool,
    /// Worker threads for --bench (besides 1).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Args, Debug, Clone)]
struct BenchArgs {
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Row length.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Device: auto, cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Peak dense FLOP/s of the device in TFLOP/s (e.g. 989 for H100 SXM bf16), for MFU.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Type of the decoder's matrix products: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Tokenizer (its vocabulary sizes the model).
    #[arg(long, default_value = "assets/tokenizer.json")]
    tokenizer: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct CacheArgs {
    /// Source with images (KIND:LOCATION).
    #[arg(long)]
    data: SourceSpec,
    /// Image side in pixels (latent [3, S, S] in pixel space, [c, S/f, S/f] with a VAE).
    #[arg(long, default_value_t = 32)]
    image_size: u32,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Latents per shard file.
    #[arg(long, default_value_t = 4096)]
    per_shard: usize,
    /// Encode with this VAE: a VAE checkpoint or run directory (`transfusion-train vae`),
    /// or a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).
    /// Latents are the posterior mode, scaled by the VAE's scaling factor and shift.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Images per VAE call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Device for the VAE: auto, cpu, wgpu, cuda[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

#[derive(Args, Debug, Clone)]
struct VaeArgs {
    /// Image source KIND:LOCATION (repeatable), e.g. shapes:20000 or imagefolder:pets/.
    #[arg(long = "data")]
    data: Vec<SourceSpec>,
    /// Held-out image source (repeatable); default: the training sources with the held-out
    /// shapes seed (a disjoint set for shapes; give one for real data).
    #[arg(long = "held-out")]
    held_out: Vec<SourceSpec>,
    /// Network preset: tiny (2x, 4 channels; 32px images), sd (8x, 4 channels), paper
    /// (8x, 8 channels).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Run directory (metrics, loss plot, reconstruction grids, checkpoints).
    #[arg(long, default_value = "runs/vae")]
    out: PathBuf,
    /// Optimizer steps (default: the preset's budget).
    #[arg(long)]
    steps: Option<u64>,
    /// Images per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Weight of the per-element KL term (default 1e-4).
    #[arg(long)]
    kl_weight: Option<f64>,
    /// Reconstruction loss: l1 or l2.
    #[arg(long)]
    loss: Option<String>,
    /// Image side in pixels (default: 32 for tiny, 256 otherwise).
    #[arg(long)]
    image_size: Option<u32>,
    /// Evaluate every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Continue from the newest checkpoint in OUT/checkpoints (without --data: with the
    /// run's own config).
    #[arg(long)]
    resume: bool,
    /// Device: auto, cpu, wgpu, cuda[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// Run directory (holds metrics.jsonl; a VAE run also holds vae_train.json).
    run: PathBuf,
    /// Output PNG (default: RUN/loss.png).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct VaeBenchArgs {
    /// Network preset: tiny, sd, paper.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Images per call.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed calls of each of encode and decode.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed warm-up calls.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Device: auto, cpu, wgpu, cuda[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

struct VaeTask {
    cfg: VaeTrainConfig,
    opts: VaeRunOptions,
}

impl BackendTask for VaeTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        eprintln!(
            "training VAE `{}` ({} parameters) on {label}",
            self.cfg.preset,
            self.cfg.vae.param_count()
        );
        let s = run_vae_training::<B>(&self.cfg, &self.opts, &device)?;
        println!("done: {} steps in {}", s.steps, self.opts.out.display());
        if let Some(e) = &s.last_eval {
            println!(
                "held-out ({} images): PSNR {:.2} dB, recon {:.4}, kl {:.3}, latent mean {:.3} std {:.3}",
                e.images, e.psnr, e.recon, e.kl, e.latent_mean, e.latent_std
            );
        }
        if let Some(c) = &s.last_checkpoint {
            println!("checkpoint: {}", c.display());
        }
        Ok(())
    }
}

struct VaeBenchTask(VaeBenchArgs, VaeConfig);

impl BackendTask for VaeBenchTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        let a = &self.0;
        let r = bench_vae::<B::InnerBackend>(
            &self.1, a.size, a.batch, a.iters, a.warmup, &device, label,
        );
        println!(
            "VAE `{}` ({} parameters) on {}, {}px, batch {}:",
            a.preset, r.params, r.device, r.image_size, r.batch
        );
        println!("encode: {:.2} images/s", r.encode_images_per_s);
        println!("decode: {:.2} images/s", r.decode_images_per_s);
        Ok(())
    }
}

struct CacheVaeTask(CacheArgs, PathBuf);

impl BackendTask for CacheVaeTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        let a = &self.0;
        let vae = load_vae::<B::InnerBackend>(&self.1, &device)?;
        let path = std::fs::canonicalize(&self.1).unwrap_or(self.1.clone());
        let enc = VaeImageEncoder::new(vae, a.image_size, a.batch, device.clone(), Some(path))?;
        eprintln!("encoding with {} on {label}", enc.describe());
        write_cache(a, &enc)
    }
}

fn write_cache(a: &CacheArgs, enc: &dyn ImageEncoder) -> anyhow::Result<()> {
    let opts = SourceOptions {
        shapes_image_size: a.image_size,
        ..Default::default()
    };
    let src = transfusion_data::source::open_source(&a.data, &opts)?;
    let bar = transfusion_train::trainer::step_progress_bar(
        src.num_records().unwrap_or(0) as u64,
        0,
        true,
    );
    let index = transfusion_data::latent_cache::cache_latents(
        src.as_ref(),
        enc,
        &a.out,
        a.per_shard,
        |n, _| bar.set_position(n as u64),
    )?;
    bar.finish();
    println!(
        "wrote {} latents {:?} in {} shard(s) to {} (train on it with --data latents:{})",
        index.count,
        index.shape,
        index.shards.len(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

fn build_vae_config(a: &VaeArgs) -> anyhow::Result<VaeTrainConfig> {
    let mut cfg = if a.resume && a.data.is_empty() {
        read_vae_train_config(&a.out).with_context(|| {
            format!(
                "--resume without --data: no run config in {} to continue",
                a.out.display()
            )
        })?
    } else {
        anyhow::ensure!(
            !a.data.is_empty(),
            "give --data KIND:LOCATION (e.g. --data shapes:20000)"
        );
        VaeTrainConfig::preset(&a.preset, a.data.clone())?
    };
    if !a.held_out.is_empty() {
        cfg.held_out = a.held_out.clone();
    }
    if let Some(s) = a.steps {
        cfg.steps = s;
        cfg.schedule.warmup_steps = cfg.schedule.warmup_steps.min(s / 10);
    }
    if let Some(b) = a.batch {
        cfg.batch_size = b;
    }
    if let Some(lr) = a.lr {
        cfg.schedule.lr = lr;
        cfg.schedule.min_lr = cfg.schedule.min_lr.min(lr);
    }
    if let Some(k) = a.kl_weight {
        cfg.kl_weight = k;
    }
    if let Some(l) = &a.loss {
        cfg.loss = match l.to_ascii_lowercase().as_str() {
            "l1" => ReconLoss::L1,
            "l2" => ReconLoss::L2,
            other => anyhow::bail!("--loss {other}: expected l1 or l2"),
        };
    }
    if let Some(s) = a.image_size {
        cfg.image_size = s;
    }
    if let Some(e) = a.eval_every {
        cfg.eval_every = e;
    }
    cfg.validate()?;
    Ok(cfg)
}

struct RunTask {
    cfg: ExperimentConfig,
    opts: RunOptions,
}

impl BackendTask for RunTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, _label: &str) -> Self::Output {
        let mut hooks = TrainHooks::<B>::default();
        let s = run_training::<B>(&self.cfg, &self.opts, &mut hooks, &device)?;
        println!(
            "done: {} steps ({} skipped) in {}",
            s.steps,
            s.skipped_steps,
            self.opts.out.display()
        );
        s.print_outcome();
        Ok(())
    }
}

struct BenchTask {
    cfg: BenchConfig,
    tokenizer: Arc<transfusion_data::tokenizer::TextTokenizer>,
    json: bool,
}

impl BackendTask for BenchTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        let r = run_bench::<B>(&self.cfg, &self.tokenizer, &device, label)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!(
            "{}: {} params, batch {}x{}, {} products",
            r.device, r.params, self.cfg.batch_size, self.cfg.seq_len, r.precision
        );
        println!(
            "step time: median {:.1} ms, mean {:.1} ms",
            r.step_ms_median, r.step_ms_mean
        );
        println!(
            "throughput: {:.0} positions/s, {:.0} tokens/s (non-padding), {:.1} images/s",
            r.positions_per_s, r.tokens_per_s, r.images_per_s
        );
        match r.mfu {
            Some(m) => println!(
                "model FLOP/s: {:.3} TFLOP/s (6 x params x positions / time), MFU {:.1}%",
                r.model_tflops,
                100.0 * m
            ),
            None => println!(
                "model FLOP/s: {:.4} TFLOP/s (6 x params x positions / time); give --peak-tflops for MFU",
                r.model_tflops
            ),
        }
        match r.peak_host_memory {
            Some(b) => println!(
                "peak host memory (process resident): {:.1} MiB{}",
                b as f64 / (1024.0 * 1024.0),
                if r.device.starts_with("cpu") {
                    ""
                } else {
                    "; device memory not measured (no portable statistic in Burn 0.21)"
                }
            ),
            None => println!("peak memory: not readable on this system"),
        }
        Ok(())
    }
}

fn build_run_config(a: &RunArgs) -> anyhow::Result<(ExperimentConfig, Option<PathBuf>)> {
    let (mut cfg, dir) = if let Some(path) = &a.config {
        (
            ExperimentConfig::from_toml_file(path)?,
            path.parent().map(|p| p.to_path_buf()),
        )
    } else if a.resume && a.preset.is_none() && a.data.is_empty() {
        let root = a.out.join("checkpoints");
        let dir = latest_checkpoint(&root).with_context(|| {
            format!(
                "--resume without --config: no complete checkpoint in {} to take the config from",
                root.display()
            )
        })?;
        (read_config(&dir)?, None)
    } else {
        let preset = a.preset.clone().unwrap_or_else(|| "tiny".into());
        anyhow::ensure!(
            !a.data.is_empty(),
            "give --config FILE, or --data KIND:LOCATION (e.g. --data shapes:2000) to train without one"
        );
        (
            ExperimentConfig::quick(&preset, a.data.clone(), a.steps.unwrap_or(1000)),
            None,
        )
    };
    if let Some(p) = &a.preset {
        cfg.model.preset = Some(p.clone());
        cfg.model.config = None;
    }
    if !a.data.is_empty() {
        cfg.data.train = a.data.clone();
    }
    if let Some(s) = a.steps {
        cfg.training.steps = s;
        cfg.schedule.warmup_steps = cfg.schedule.warmup_steps.min(s);
    }
    if let Some(b) = a.batch_size {
        cfg.training.batch_size = b;
    }
    if let Some(s) = a.seq_len {
        cfg.training.seq_len = s;
    }
    if let Some(lr) = a.lr {
        cfg.schedule.lr = lr;
        cfg.schedule.min_lr = cfg.schedule.min_lr.min(lr);
    }
    if let Some(p) = a.precision {
        cfg.training.precision = p;
    }
    if let Some(t) = &a.tokenizer {
        cfg.data.tokenizer = t.clone();
    }
    Ok((cfg, dir))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            let (cfg, dir) = build_run_config(&a)?;
            if a.print_config {
                println!("{}", toml::to_string_pretty(&cfg)?);
                return Ok(());
            }
            let tok = transfusion_train::data::load_tokenizer(&cfg, dir.as_deref())?;
            cfg.validate(tok.vocab_size())?;
            let mut opts = RunOptions::new(&a.out);
            opts.resume = a.resume;
            opts.config_dir = dir;
            opts.time_budget = a.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
            if a.ddp.requested() {
                return ddp_cli::run(&a.ddp, cfg, opts);
            }
            dispatch(a.device, RunTask { cfg, opts })?
        }
        Command::Orchestrator(a) => ddp_cli::orchestrator(&a),
        Command::Demo(a) => {
            let mut opts = transfusion_train::demo::DemoOptions::new(&a.out);
            opts.train_budget = Duration::from_secs_f64(a.minutes * 60.0);
            opts.steps = a.steps;
            opts.eval_samples = a.eval_samples;
            opts.sampling_steps = a.sampling_steps;
            opts.cfg_scale = a.cfg;
            opts.sampler = a.sampler;
            opts.checkpoint = a.checkpoint;
            dispatch(a.device, DemoTask(opts))?
        }
        Command::Tokenizer(a) => {
            let tok = transfusion_data::tokenizer::train_bpe(&a.input, a.vocab_size)?;
            tok.save(&a.out)?;
            println!("wrote {} ({} ids)", a.out.display(), tok.vocab_size());
            Ok(())
        }
        Command::Inspect(a) => {
            let tok_path = resolve_tokenizer(&a.tokenizer, None);
            let tok = transfusion_data::tokenizer::TextTokenizer::from_file(&tok_path).ok();
            if tok.is_none() {
                eprintln!(
                    "(no tokenizer at {}: token counts left out)",
                    tok_path.display()
                );
            }
            let report = transfusion_data::inspect::describe_sources(
                &a.data,
                &SourceOptions::default(),
                a.check,
                tok.as_ref()
                    .map(|t| t as &dyn transfusion_data::sequence::TokenSource),
            )?;
            println!("{report}");
            if a.bench {
                let threads = [1, a.threads.max(1)];
                for r in transfusion_data::bench::bench_decode(64, 256, 32, &threads)? {
                    println!("{r}");
                }
                if let Some(t) = tok {
                    let t: Arc<dyn transfusion_data::sequence::TokenSource> = Arc::new(t);
                    let cfg = transfusion_data::bench::BatchBench {
                        image_size: 32,
                        patch_size: 4,
                        seq_len: 128,
                        batch_size: 8,
                        batches: 20,
                    };
                    for r in transfusion_data::bench::bench_batches(t, &cfg, &threads)? {
                        println!("{r}");
                    }
                }
            }
            Ok(())
        }
        Command::Bench(a) => {
            let tok_path = resolve_tokenizer(&a.tokenizer, None);
            let tokenizer = Arc::new(
                transfusion_data::tokenizer::TextTokenizer::from_file(&tok_path)
                    .with_context(|| format!("tokenizer {}", tok_path.display()))?,
            );
            let model = TransfusionConfig::preset(&a.preset, tokenizer.vocab_size()).with_context(
                || {
                    format!(
                        "unknown preset `{}` (one of {})",
                        a.preset,
                        TransfusionConfig::PRESETS.join(", ")
                    )
                },
            )?;
            let need = model.patches_per_image() + 4;
            anyhow::ensure!(
                a.seq_len >= need,
                "--seq-len {} cannot hold one image of {} ({need} positions)",
                a.seq_len,
                a.preset
            );
            let cfg = BenchConfig {
                model,
                batch_size: a.batch,
                seq_len: a.seq_len,
                steps: a.steps.max(1),
                warmup: a.warmup,
                peak_tflops: a.peak_tflops,
                precision: a.precision,
            };
            dispatch(
                a.device,
                BenchTask {
                    cfg,
                    tokenizer,
                    json: a.json,
                },
            )?
        }
        Command::CacheLatents(a) => match a.vae.clone() {
            Some(vae) => {
                let device = a.device;
                dispatch(device, CacheVaeTask(a, vae))?
            }
            None => {
                let enc = transfusion_data::encoder::PixelEncoder::new(a.image_size);
                write_cache(&a, &enc)
            }
        },
        Command::Vae(a) => {
            let cfg = build_vae_config(&a)?;
            let mut opts = VaeRunOptions::new(&a.out);
            opts.resume = a.resume;
            dispatch(a.device, VaeTask { cfg, opts })?
        }
        Command::Plot(a) => {
            let metrics = a.run.join("metrics.jsonl");
            let out = a.out.unwrap_or_else(|| a.run.join("loss.png"));
            if a.run.join(VAE_TRAIN_FILE).is_file() {
                plot_vae(&MetricsLog::<VaeMetricsLine>::read(&metrics)?, &out)?;
            } else {
                plot_losses(&MetricsLog::<MetricsLine>::read(&metrics)?, &out)?;
            }
            println!("{}", out.display());
            Ok(())
        }
        Command::VaeBench(a) => {
            let config = VaeTrainConfig::preset_vae(&a.preset).with_context(|| {
                format!(
                    "unknown VAE preset `{}` (one of {})",
                    a.preset,
                    VaeTrainConfig::PRESETS.join(", ")
                )
            })?;
            let f = config.down_factor();
            anyhow::ensure!(
                a.size % f == 0,
                "--size {} should be a multiple of the preset's down-sampling factor {f}",
                a.size
            );
            dispatch(a.device, VaeBenchTask(a, config))?
        }
    }
}
