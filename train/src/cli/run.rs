//! `transfusion-train run`: train from a TOML config (or a preset and data specs).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_data::source::SourceSpec;
use transfusion_model::Precision;
use transfusion_runtime::device::{dispatch, BackendTask, DeviceChoice};
use transfusion_train::checkpoint::{latest_checkpoint, read_config};
use transfusion_train::config::{ConfigOverride, ExperimentConfig, Recompute};
use transfusion_train::memory_plan::{
    available_gpu_memory, available_host_memory, check_fits, step_shape, StepShape,
};
use transfusion_train::{run_training, RunOptions, TrainHooks};

use super::ddp;

/// Flags of `run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Experiment config (TOML). Without it, `--preset` and `--data` describe the run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Resume, overwrite and the device.
    #[command(flatten)]
    pub run: super::RunDirFlags,
    /// Data-parallel training (--devices, multi-node flags; feature `collective`).
    #[command(flatten)]
    pub ddp: ddp::DdpArgs,
    /// Run directory (metrics, plots, checkpoints).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Total optimizer steps (overrides training.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Rows per micro-batch (overrides training.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Row length in positions (overrides training.seq_len).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak learning rate (overrides schedule.lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Type of the decoder's matrix products: f32, bf16 or f16 (overrides
    /// training.precision; weights and optimizer state stay f32).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping
    /// them (training.recompute = "layers"): the same gradients, far less activation
    /// memory, about one more forward pass of compute.
    #[arg(long)]
    pub recompute: bool,
    /// Model preset (tiny, paper_160m, paper_370m, paper_760m, paper_1_4b, paper_7b);
    /// overrides model.preset.
    #[arg(long)]
    pub preset: Option<String>,
    /// Training data source KIND:LOCATION[@WEIGHT] (repeatable; replaces data.train).
    #[arg(long = "data")]
    pub data: Vec<SourceSpec>,
    /// Tokenizer file (overrides data.tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Stop after this many minutes of training (with a checkpoint and an evaluation).
    #[arg(long, value_parser = super::parse_minutes)]
    pub minutes: Option<f64>,
    /// With --minutes: shorten the run while it trains so the learning-rate decay ends
    /// with the budget, from the pace the steps keep (at most training.steps).
    #[arg(long, requires = "minutes")]
    pub fit_to_minutes: bool,
    /// Start from this checkpoint's weights (e.g. one `import-llm` wrote); its model config,
    /// tokenizer and image size are used (sets model.init).
    #[arg(long, conflicts_with = "preset")]
    pub init: Option<PathBuf>,
    /// Keep the text weights fixed (needs untied modality weights; sets
    /// training.freeze_text).
    #[arg(long)]
    pub freeze_text: bool,
    /// Set one config key, after the file and the other flags: KEY=VALUE with a dotted
    /// TOML key and a TOML value, e.g. `--set data.noise_limit=250` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<ConfigOverride>,
    /// Print the resolved config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
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

/// The experiment config the flags describe, and the directory relative paths in it
/// are resolved against.
pub fn build_run_config(a: &RunArgs) -> anyhow::Result<(ExperimentConfig, Option<PathBuf>)> {
    let (mut cfg, dir) = if let Some(path) = &a.config {
        (
            ExperimentConfig::from_toml_file(path)?,
            path.parent().map(|p| p.to_path_buf()),
        )
    } else if a.run.resume && a.preset.is_none() && a.data.is_empty() {
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
    if a.recompute {
        cfg.training.recompute = Recompute::Layers;
    }
    if let Some(t) = &a.tokenizer {
        cfg.data.tokenizer = t.clone();
    }
    if a.freeze_text {
        cfg.training.freeze_text = true;
    }
    if let Some(i) = &a.init {
        cfg.model.init = Some(i.clone());
    }
    let mut cfg = cfg.with_overrides(&a.set)?;
    cfg.apply_init(dir.as_deref())?;
    Ok((cfg, dir))
}

/// Refuses, before anything is written, a run whose step cannot fit the memory of the
/// device it trains on: the CPU's available memory, or an NVIDIA GPU's free memory as
/// `nvidia-smi` reports it (Burn 0.21's GPU backends report no capacity; where nothing
/// reports one, the config check's bound holds).
fn check_memory(
    cfg: &ExperimentConfig,
    model: &transfusion_model::TransfusionConfig,
    device: DeviceChoice,
    replicas: bool,
) -> anyhow::Result<()> {
    if replicas {
        return Ok(());
    }
    // the CPU trains on flex, whose fused attention keeps no probabilities in f32
    let (available, name, fused_attention) = match device.resolve() {
        DeviceChoice::Cpu => (
            available_host_memory(),
            "the CPU".to_string(),
            cfg.training.precision == Precision::F32,
        ),
        DeviceChoice::Cuda(i) => (available_gpu_memory(i), format!("CUDA device {i}"), false),
        _ => return Ok(()),
    };
    let shape = StepShape {
        fused_attention,
        ..step_shape(cfg, model)
    };
    if let Some(available) = available {
        check_fits(&shape, available, &name).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Trains (on one device, or data-parallel with `--devices`).
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let (cfg, dir) = build_run_config(&a)?;
    if a.print_config {
        println!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let tok = transfusion_train::data::load_tokenizer(&cfg, dir.as_deref())?;
    let model = cfg.validate(tok.vocab_size())?;
    check_memory(&cfg, &model, a.run.device, a.ddp.requested())?;
    let mut opts = RunOptions::new(&a.out);
    opts.resume = a.run.resume;
    opts.overwrite = a.run.overwrite;
    opts.config_dir = dir;
    opts.time_budget = a.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    opts.fit_to_budget = a.fit_to_minutes.then_some(cfg.training.steps);
    if a.ddp.requested() {
        return ddp::run(&a.ddp, cfg, opts);
    }
    dispatch(a.run.device, RunTask { cfg, opts })?
}
