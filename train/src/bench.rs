//! The throughput benchmark of `transfusion-train bench`: timed optimizer steps (forward,
//! backward, global clipping, AdamW) on real packed batches from the shapes set.

use std::sync::Arc;
use std::time::Instant;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use transfusion_data::encoder::{FnEncoder, ImageEncoder, PixelEncoder};
use transfusion_data::mixture::{Mixture, MixtureConfig};
use transfusion_data::packing::PackConfig;
use transfusion_data::pipeline::{DataPipeline, PipelineConfig};
use transfusion_data::rng::Rng64;
use transfusion_data::sequence::{SequenceConfig, TokenSource};
use transfusion_data::source::{open_source, SourceOptions, SourceSpec};
use transfusion_data::synthetic::shapes::ShapesGenerator;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_data::DataError;
use transfusion_model::{Precision, TransfusionConfig};
use transfusion_runtime::op_count::float_ops;

use crate::config::OptimizerSection;
use crate::config::Recompute;
use crate::error::{Result, TrainError};
use crate::memory_plan::{self, MemoryPlan, StepShape};
use crate::optim::{adamw, clip_global_norm};

/// Settings of one benchmark.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The model.
    pub model: TransfusionConfig,
    /// Rows per batch.
    pub batch_size: usize,
    /// Row length.
    pub seq_len: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    /// Untimed warm-up steps (kernel compilation, autotuning).
    pub warmup: usize,
    /// Peak dense FLOP/s of the device in TFLOP/s, for MFU.
    pub peak_tflops: Option<f64>,
    /// Type of the decoder's matrix products.
    pub precision: Precision,
    /// Passes of this many keys or more take the blockwise attention
    /// (`usize::MAX`: dense everywhere).
    pub blockwise_from: usize,
    /// What the backward pass recomputes instead of keeping.
    pub recompute: Recompute,
}

/// What the benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Device label.
    pub device: String,
    /// Type of the decoder's matrix products.
    pub precision: Precision,
    /// Parameters of the model.
    pub params: usize,
    /// Median step time in milliseconds.
    pub step_ms_median: f64,
    /// Mean step time in milliseconds.
    pub step_ms_mean: f64,
    /// Positions per second (`b * s / step time`, padding included).
    pub positions_per_s: f64,
    /// Non-padding positions (text tokens + image patches) per second.
    pub tokens_per_s: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// `6 * params * positions / time`, in TFLOP/s (ignores attention's `s^2` term).
    pub model_tflops: f64,
    /// `model_tflops / peak`, when a peak was given.
    pub mfu: Option<f64>,
    /// Peak resident memory of this process in bytes (Linux `VmHWM`): the whole model,
    /// optimizer and activations on CPU backends; host memory only on GPU backends (Burn
    /// 0.21 exposes no portable peak device-memory statistic).
    pub peak_host_memory: Option<u64>,
    /// The process's peak resident memory during the steps above its resident memory
    /// before the model was built: what the model, optimizer and steps took (CPU
    /// backends).
    pub step_memory: Option<u64>,
    /// The memory plan's estimate of the same ([`crate::memory_plan`]), by part.
    pub planned_memory: MemoryPlan,
    /// The plan's peak ([`MemoryPlan::peak`]).
    pub planned_peak: f64,
    /// Float tensor ops of the forward pass per step (median over the timed steps; see
    /// [`float_ops`]); the backward pass is not counted.
    pub forward_ops: u64,
}

/// Starts a new peak for [`peak_host_memory`] at the current resident size (Linux: writing
/// `5` to `/proc/self/clear_refs`); elsewhere the peak stays the process's.
pub fn reset_peak_host_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process (`VmHWM` in `/proc/self/status`), if readable.
pub fn peak_host_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn encoder(m: &TransfusionConfig) -> Arc<dyn ImageEncoder> {
    if m.latent_channels == 3 {
        return Arc::new(PixelEncoder::new(m.latent_size as u32));
    }
    // Latent-space presets: deterministic pseudo-latents of the right shape (the step
    // time does not depend on their values).
    let shape = [m.latent_channels, m.latent_size, m.latent_size];
    Arc::new(FnEncoder {
        shape,
        description: "bench pseudo-latents".into(),
        f: move |img: &image::RgbImage| -> Result<Vec<f32>, DataError> {
            let mut rng = Rng64::new(img.get_pixel(0, 0).0[0] as u64);
            let mut v = vec![0.0; shape.iter().product()];
            rng.fill_normal(&mut v);
            Ok(v)
        },
    })
}

/// Builds `n` batches of `cfg`'s shape from the shapes set (images sized to the model).
pub fn bench_batches(
    cfg: &BenchConfig,
    tokenizer: &Arc<TextTokenizer>,
    n: usize,
) -> Result<(DataPipeline, Vec<Vec<transfusion_data::packing::PackedRow>>)> {
    let m = &cfg.model;
    let opts = SourceOptions {
        shapes_image_size: if m.latent_channels == 3 {
            m.latent_size as u32
        } else {
            32
        },
        shapes_seed: ShapesGenerator::TRAIN_SEED,
        ..Default::default()
    };
    let spec: SourceSpec = "shapes:100000".parse()?;
    let src = open_source(&spec, &opts)?;
    let mix = Mixture::new(vec![(src, 1.0)], &MixtureConfig::default())?;
    let tok: Arc<dyn TokenSource> = tokenizer.clone();
    let mut pipe = DataPipeline::new(
        mix,
        tok,
        encoder(m),
        PipelineConfig {
            batch_size: cfg.batch_size,
            pack: PackConfig::new(cfg.seq_len),
            sequence: SequenceConfig {
                patch_size: m.patch_size,
                max_timestep: m.timesteps as u32,
                ..Default::default()
            },
            seed: 0,
        },
    )?;
    let rows = (0..n)
        .map(|_| pipe.next_rows())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((pipe, rows))
}

/// Runs the benchmark on `B`.
pub fn run_bench<B: AutodiffBackend>(
    cfg: &BenchConfig,
    tokenizer: &Arc<TextTokenizer>,
    device: &B::Device,
    label: &str,
) -> Result<BenchReport> {
    let m = &cfg.model;
    m.validate()?;
    let n = cfg.steps + cfg.warmup;
    let (pipe, all_rows) = bench_batches(cfg, tokenizer, n)?;
    cfg.precision
        .check_backend::<B>(device)
        .map_err(|e| TrainError::Setting(format!("{label}: {e}")))?;
    // the peak of the model, optimizer and steps, not of building the batches
    reset_peak_host_memory();
    let before_model = peak_host_memory();
    let mut model = crate::transfusion::seeded_init::<B>(m, device, 0)
        .with_precision(cfg.precision)
        .with_blockwise_from(cfg.blockwise_from);
    let mut optim = adamw(&OptimizerSection::default()).init::<B, _>();
    let mut times = vec![];
    let mut ops = vec![];
    let (mut tokens, mut images) = (0u64, 0u64);
    for (i, rows) in all_rows.into_iter().enumerate() {
        let used: u64 = rows.iter().map(|r| r.used() as u64).sum();
        let imgs: u64 = rows.iter().map(|r| r.images.len() as u64).sum();
        let batch = pipe.batcher().batch::<B>(rows, device)?;
        let start = Instant::now();
        let (mut grads, forward_ops) = match cfg.recompute {
            Recompute::None => {
                let (loss, ops) = float_ops(|| model.forward_loss(batch));
                (
                    GradientsParams::from_grads(loss.total.backward(), &model),
                    ops,
                )
            }
            // the operations of the forward pass, the heads' backward and the recomputed layers
            Recompute::Layers => float_ops(|| {
                let image = model.noised_images(&batch);
                let (grads, ()) = model.recomputed_gradients(&batch, image, |flat, out| {
                    (model.loss_of_outputs(flat, out, &batch).total, ())
                });
                grads
            }),
        };
        clip_global_norm::<B, _>(&model, &mut grads, 1.0);
        model = optim.step(1e-4, model, grads);
        // Wait for the device: read one value of the updated weights.
        let _ = model.lm_head.weight.val().slice([0..1, 0..1]).into_scalar();
        let t = start.elapsed().as_secs_f64();
        if i >= cfg.warmup {
            times.push(t);
            ops.push(forward_ops);
            tokens += used;
            images += imgs;
        }
    }
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    let median = sorted[sorted.len() / 2];
    let params = m.param_count().total();
    let positions = (cfg.batch_size * cfg.seq_len) as f64;
    let model_tflops = 6.0 * params as f64 * positions / median / 1e12;
    let planned = memory_plan::plan(&StepShape {
        model: m.clone(),
        batch_size: cfg.batch_size,
        seq_len: cfg.seq_len,
        precision: cfg.precision,
        ema: false,
        blockwise_from: cfg.blockwise_from,
        recompute: cfg.recompute,
        fused_attention: transfusion_model::ops::fused::available::<B>()
            && cfg.precision == Precision::F32,
    });
    Ok(BenchReport {
        device: label.to_string(),
        precision: cfg.precision,
        params,
        step_ms_median: median * 1e3,
        step_ms_mean: total / times.len() as f64 * 1e3,
        positions_per_s: positions / median,
        tokens_per_s: tokens as f64 / total,
        images_per_s: images as f64 / total,
        model_tflops,
        mfu: cfg.peak_tflops.map(|p| model_tflops / p),
        peak_host_memory: peak_host_memory(),
        step_memory: peak_host_memory()
            .zip(before_model)
            .map(|(peak, before)| peak.saturating_sub(before)),
        planned_peak: planned.peak(),
        planned_memory: planned,
        forward_ops: {
            ops.sort_unstable();
            ops[ops.len() / 2]
        },
    })
}
