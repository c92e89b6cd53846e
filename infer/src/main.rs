//! `transfusion`: text, images, captions and interleaved documents from a checkpoint. Each
//! subcommand lives in its own file under `cli/`.

#![forbid(unsafe_code)]

use std::path::Path;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};
use transfusion_infer::Pipeline;
use transfusion_model::Precision;
use transfusion_runtime::report;
use transfusion_runtime::threads::run_binary;
use transfusion_runtime::{dispatch, BackendTask, DeviceChoice};

mod cli;

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
    Text(cli::text::TextCmd),
    /// Generate images from a caption (one PNG per image, plus a grid when --num > 1).
    Image(cli::image::ImageCmd),
    /// Caption images (one line per image, in one batch).
    Caption(cli::caption::CaptionCmd),
    /// Generate an interleaved text-and-image document (Markdown transcript + PNGs).
    Generate(cli::generate::GenerateCmd),
    /// Measure generation speed (diffusion steps, images, text; KV cache vs recompute).
    Bench(cli::bench::BenchCmd),
}

struct Task(Command, Precision);

impl BackendTask for Task {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device, _label: &str) -> Result<()> {
        type I<B> = <B as AutodiffBackend>::InnerBackend;
        let precision = self.1;
        let load = |dir: &Path| {
            Pipeline::<I<B>>::load(dir, &device).and_then(|p| p.with_precision(precision))
        };
        match self.0 {
            Command::Text(c) => cli::text::run(c, load),
            Command::Image(c) => cli::image::run(c, load),
            Command::Caption(c) => cli::caption::run(c, load),
            Command::Generate(c) => cli::generate::run(c, load),
            Command::Bench(c) => cli::bench::run::<B>(c, &device, precision),
        }
    }
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
