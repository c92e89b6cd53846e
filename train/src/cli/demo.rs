//! `transfusion-train demo`: the main job on its embedded default.

use std::path::PathBuf;
use std::time::Duration;

use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_infer::pipeline::ImageOptions;
use transfusion_infer::sampler::SamplerKind;
use transfusion_runtime::checkpoint::load_meta;
use transfusion_runtime::device::{dispatch, BackendTask, DeviceChoice};
use transfusion_train::config::ConfigOverride;
use transfusion_train::demo::{run_demo, run_digits_demo, DemoDataset, DemoOptions};

/// Flags of `demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Output directory (report.json, grids, loss curves, checkpoints).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// The synthetic set: `shapes` (colour, shape, position, size) or `digits` (ten classes
    /// told apart by outline only: the fine-distinction captioning benchmark).
    #[arg(long, value_enum, default_value_t = DemoDataset::Shapes)]
    pub dataset: DemoDataset,
    /// Training budget in minutes (evaluation comes after it).
    #[arg(long, default_value_t = 8.0, value_parser = super::parse_minutes)]
    pub minutes: f64,
    /// Optimizer steps planned (the learning-rate schedule's length); training stops at the
    /// budget or here [default: as many as fit the budget on this machine, timed before
    /// training].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Held-out prompts and images to score (at least 1).
    #[arg(long, default_value_t = 64, value_parser = super::parse_positive)]
    pub eval_samples: usize,
    /// Sampling steps of the text-to-image evaluation [default: the sampler's: 50 for ddim,
    /// 250 for ddpm, 2 for consistency].
    #[arg(long)]
    pub sampling_steps: Option<usize>,
    /// Classifier-free guidance scale of the evaluation [default: 2 (cleaner drawings than 3
    /// at the demo's budget, README); 1 for a consistency-distilled --checkpoint, whose
    /// guidance is baked in].
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Sampler of the text-to-image evaluation: ddim, ddpm or consistency [default: ddim;
    /// consistency for a consistency-distilled --checkpoint].
    #[arg(long)]
    pub sampler: Option<SamplerKind>,
    /// Cap of the decay of an EMA of the weights, which is then scored (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub ema_decay: f64,
    /// Min-SNR-gamma weighting of the diffusion loss (0: uniform over timesteps).
    #[arg(long, default_value_t = 0.0)]
    pub min_snr_gamma: f64,
    /// Set one key of the demo's experiment config (as `run --print-config` shows it):
    /// KEY=VALUE, e.g. `--set data.noise_limit=250` (repeatable; the recipe ablations).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<ConfigOverride>,
    /// Score this checkpoint (e.g. assets/demo-checkpoint) instead of training one.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Device: auto, cpu, wgpu, cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

struct DemoTask(DemoOptions);

impl BackendTask for DemoTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        Ok(match self.0.dataset {
            DemoDataset::Shapes => run_demo::<B>(&self.0, &device, label).map(|_| ())?,
            DemoDataset::Digits => run_digits_demo::<B>(&self.0, &device, label).map(|_| ())?,
        })
    }
}

/// Trains and scores the demo.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let mut opts = DemoOptions::new(&a.out);
    opts.dataset = a.dataset;
    opts.train_budget = Duration::from_secs_f64(a.minutes * 60.0);
    if let Some(steps) = a.steps {
        opts.steps = steps;
        opts.fit_steps_to_budget = false;
    }
    opts.eval_samples = a.eval_samples;
    // A consistency-distilled checkpoint samples with its own sampler, unguided.
    let demo = ImageOptions {
        steps: opts.sampling_steps,
        sampler: opts.sampler,
        cfg: opts.cfg_scale,
        ..ImageOptions::default()
    };
    let defaults = match &a.checkpoint {
        Some(dir) => ImageOptions::for_model(&load_meta(dir)?, demo),
        None => demo,
    };
    let image = defaults.with_overrides(a.sampler, a.sampling_steps, a.cfg);
    opts.sampler = image.sampler;
    opts.sampling_steps = image.steps;
    opts.cfg_scale = image.cfg;
    opts.checkpoint = a.checkpoint;
    opts.ema_decay = a.ema_decay;
    opts.min_snr_gamma = a.min_snr_gamma;
    opts.overrides = a.set;
    dispatch(a.device, DemoTask(opts))?
}
