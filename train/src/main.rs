//! `transfusion-train`: train Transfusion models, build tokenizers, inspect data, measure
//! throughput, cache latents. Each subcommand lives in its own file under `cli/`.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod cli;

use cli::*;

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
    Run(run::RunArgs),
    /// Train a byte-level BPE tokenizer on text files.
    Tokenizer(tokenizer::TokenizerArgs),
    /// Describe data sources (and optionally measure data throughput).
    Inspect(inspect::InspectArgs),
    /// Measure training throughput: step time, tokens/s, images/s, MFU.
    Bench(bench::BenchArgs),
    Plan(plan::PlanArgs),
    /// Encode every image of a source once and store the latents (with --vae: a VAE;
    /// otherwise the identity pixel encoder).
    CacheLatents(cache::CacheArgs),
    /// Train the image autoencoder (KL VAE): reconstruction + small-weight KL, with
    /// resumable checkpoints, held-out PSNR and reconstruction grids.
    Vae(vae::VaeArgs),
    /// Measure VAE encode and decode throughput (images/s) at a given size.
    VaeBench(vae_bench::VaeBenchArgs),
    /// Redraw a run's loss plot from its metrics.jsonl (Transfusion or VAE run).
    Plot(plot::PlotArgs),
    /// The main job: train the tiny preset on synthetic shapes, then score text-to-image
    /// and image-to-text on held-out samples and write grids and a report.
    Demo(demo::DemoArgs),
    /// Consistency distillation (sCD): turn a checkpoint into one that draws images in 1
    /// or 2 steps, keeping its text and captioning.
    Distill(distill::DistillArgs),
    /// Start from a pretrained language model: a Hugging Face Llama-family folder becomes a
    /// checkpoint (its decoder, the Transfusion special tokens, fresh image adapters).
    ImportLlm(import_llm::ImportLlmArgs),
    /// Serve Burn's global collective orchestrator for a multi-machine data-parallel run
    /// (feature `collective`).
    Orchestrator(ddp::OrchestratorArgs),
}

/// Errors are printed as one `error: ...` line with their causes (never a stack trace, even
/// under `RUST_BACKTRACE`), and the exit status is 1.
fn main() {
    let command = Cli::parse().command;
    if let Err(e) = transfusion_runtime::threads::run_binary(|| dispatch(command)) {
        eprintln!("error: {}", transfusion_runtime::report(e.as_ref()));
        std::process::exit(1);
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(a) => run::run(a),
        Command::Orchestrator(a) => ddp::orchestrator(&a),
        Command::Demo(a) => demo::run(a),
        Command::Distill(a) => distill::run(a),
        Command::ImportLlm(a) => import_llm::run(a),
        Command::Tokenizer(a) => tokenizer::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Plan(a) => plan::run(a),
        Command::CacheLatents(a) => cache::run(a),
        Command::Vae(a) => vae::run(a),
        Command::Plot(a) => plot::run(a),
        Command::VaeBench(a) => vae_bench::run(a),
    }
}
