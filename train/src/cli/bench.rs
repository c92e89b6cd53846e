//! `transfusion-train bench`: training throughput (step time, tokens/s, images/s, MFU).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_model::{Precision, TransfusionConfig};
use transfusion_runtime::device::{dispatch, BackendTask, DeviceChoice};
use transfusion_train::bench::{run_bench, BenchConfig};
use transfusion_train::config::Recompute;
use transfusion_train::data::resolve_path;

/// Flags of `bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Row length.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Decoder layers, replacing the preset's (a shrunk preset for memory and step-time
    /// measurements of its other shapes).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Dense attention at every length (the attention before the blockwise one, for
    /// comparisons); by default passes of 1024 keys or more attend block by block.
    #[arg(long)]
    pub dense_attention: bool,
    /// Recompute each decoder layer's activations in the backward pass
    /// (`training.recompute = "layers"`) instead of keeping them.
    #[arg(long)]
    pub recompute: bool,
    /// Timed steps (at least 1).
    #[arg(long, default_value_t = 10, value_parser = super::parse_positive)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Device: auto, cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Peak dense FLOP/s of the device in TFLOP/s (e.g. 989 for H100 SXM bf16), for MFU.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Type of the decoder's matrix products: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Tokenizer (its vocabulary sizes the model).
    #[arg(long, default_value = "assets/tokenizer.json")]
    pub tokenizer: PathBuf,
    /// Print the memory plan's parts beside the measured memory.
    #[arg(long)]
    pub memory: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

struct BenchTask {
    cfg: BenchConfig,
    tokenizer: Arc<transfusion_data::tokenizer::TextTokenizer>,
    json: bool,
    memory: bool,
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
            "{}: {} params, {} layers, batch {}x{}, {} products",
            r.device,
            r.params,
            self.cfg.model.n_layers,
            self.cfg.batch_size,
            self.cfg.seq_len,
            r.precision
        );
        println!(
            "step time: median {:.1} ms, mean {:.1} ms",
            r.step_ms_median, r.step_ms_mean
        );
        println!(
            "forward pass: {} float tensor ops per step (autodiff graph nodes; integer and \
             mask ops and the backward pass not counted{})",
            r.forward_ops,
            if self.cfg.recompute == Recompute::Layers {
                "; with --recompute the count holds the recomputed layers and their seeds too"
            } else {
                ""
            }
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
                "peak host memory (process resident, during the steps): {:.1} MiB{}",
                b as f64 / (1024.0 * 1024.0),
                if r.device.starts_with("cpu") {
                    ""
                } else {
                    "; device memory not measured (no portable statistic in Burn 0.21)"
                }
            ),
            None => println!("peak memory: not readable on this system"),
        }
        if let Some(step) = r.step_memory.filter(|_| r.device.starts_with("cpu")) {
            println!(
                "step memory (model, optimizer and steps; peak minus before the model): {:.1} MiB, planned {:.1} MiB",
                step as f64 / (1024.0 * 1024.0),
                r.planned_memory.peak() / (1024.0 * 1024.0)
            );
        }
        if self.memory {
            println!("memory plan:\n{}", r.planned_memory);
        }
        Ok(())
    }
}

/// Runs the benchmark and prints the report.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let tok_path = resolve_path(&a.tokenizer, None);
    let tokenizer = Arc::new(
        transfusion_data::tokenizer::TextTokenizer::from_file(&tok_path)
            .with_context(|| format!("tokenizer {}", tok_path.display()))?,
    );
    let mut model =
        TransfusionConfig::preset(&a.preset, tokenizer.vocab_size()).with_context(|| {
            format!(
                "unknown preset `{}` (one of {})",
                a.preset,
                TransfusionConfig::PRESETS.join(", ")
            )
        })?;
    if let Some(layers) = a.layers {
        anyhow::ensure!(layers >= 1, "--layers must be at least 1");
        model.n_layers = layers;
    }
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
        steps: a.steps,
        warmup: a.warmup,
        peak_tflops: a.peak_tflops,
        precision: a.precision,
        blockwise_from: if a.dense_attention {
            usize::MAX
        } else {
            transfusion_model::ops::blockwise::MIN_KEYS
        },
        recompute: if a.recompute {
            Recompute::Layers
        } else {
            Recompute::None
        },
    };
    dispatch(
        a.device,
        BenchTask {
            cfg,
            tokenizer,
            json: a.json,
            memory: a.memory,
        },
    )?
}
