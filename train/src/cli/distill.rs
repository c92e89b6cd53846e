//! `transfusion-train distill`: consistency distillation (sCD) of a checkpoint into one
//! that draws images in 1 or 2 steps.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_data::source::SourceSpec;
use transfusion_runtime::device::{dispatch, BackendTask};
use transfusion_train::checkpoint::{read_config, CONFIG_FILE};
use transfusion_train::config::ExperimentConfig;
use transfusion_train::distill::{distill_config, run_distill, DistillSettings, DISTILL_FILE};
use transfusion_train::engine::EngineHooks;
use transfusion_train::RunOptions;

/// Flags of `distill`.
#[derive(Args, Debug, Clone)]
pub struct DistillArgs {
    /// The teacher checkpoint (a v-prediction model, e.g. assets/demo-checkpoint).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Run directory (metrics, plots, checkpoints); its checkpoints are consistency models.
    #[arg(long, default_value = "runs/distill")]
    pub out: PathBuf,
    /// Training data KIND:LOCATION (repeatable) [default: the teacher's own config.json's;
    /// required when the checkpoint has none].
    #[arg(long = "data")]
    pub data: Vec<SourceSpec>,
    /// Optimizer steps planned (the learning-rate schedule's length; 150 distilled the
    /// demo checkpoint, see the README).
    #[arg(long, default_value_t = 150)]
    pub steps: u64,
    /// Stop after this many minutes (with a checkpoint and an evaluation).
    #[arg(long, value_parser = super::parse_minutes)]
    pub minutes: Option<f64>,
    /// Classifier-free guidance scale baked into the student (finite, at least 0).
    #[arg(long, default_value_t = 3.0, value_parser = parse_guidance)]
    pub cfg: f64,
    /// Weight of the consistency loss against the LM loss.
    #[arg(long, default_value_t = transfusion_train::distill::DEFAULT_CONSISTENCY_WEIGHT)]
    pub consistency_weight: f64,
    /// Grid steps either side of the finite difference of the student's derivative.
    #[arg(long, default_value_t = transfusion_train::distill::DEFAULT_DERIVATIVE_SPAN)]
    pub derivative_span: usize,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the data stream and the distillation's draws [default: the teacher run's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Rows per micro-batch [default: the teacher run's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Resume, overwrite and the device.
    #[command(flatten)]
    pub run: super::RunDirFlags,
}

struct DistillJob {
    cfg: ExperimentConfig,
    settings: DistillSettings,
    opts: RunOptions,
}

impl BackendTask for DistillJob {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, _label: &str) -> Self::Output {
        let mut hooks = EngineHooks::default();
        let s = run_distill::<B>(&self.cfg, &self.settings, &self.opts, &mut hooks, &device)?;
        println!(
            "done: {} steps ({} skipped) in {}",
            s.steps,
            s.skipped_steps,
            self.opts.out.display()
        );
        if let Some(dir) = &s.last_checkpoint {
            println!(
                "consistency model: {} (sample it with `transfusion image --checkpoint {}`)",
                dir.display(),
                dir.display()
            );
        }
        Ok(())
    }
}

/// The settings and config of a fresh distillation, or of the one in OUT with --resume.
fn resolve(a: &DistillArgs) -> anyhow::Result<(ExperimentConfig, DistillSettings)> {
    let saved = a.out.join(DISTILL_FILE);
    if a.run.resume && saved.is_file() {
        let text = std::fs::read_to_string(&saved)
            .with_context(|| format!("cannot read {}", saved.display()))?;
        let settings: DistillSettings = serde_json::from_str(&text)
            .with_context(|| format!("{}: bad distillation settings", saved.display()))?;
        let cfg = read_config(&a.out)
            .with_context(|| format!("{}", a.out.join(CONFIG_FILE).display()))?;
        return Ok((cfg, settings));
    }
    let teacher = a
        .teacher
        .clone()
        .context("give the checkpoint to distil with --teacher DIR")?;
    let mut cfg = distill_config(&teacher, a.data.clone(), a.steps)?;
    if let Some(lr) = a.lr {
        cfg.schedule.lr = lr;
        cfg.schedule.min_lr = cfg.schedule.min_lr.min(lr);
    }
    if let Some(seed) = a.seed {
        cfg.seed = seed;
    }
    if let Some(b) = a.batch_size {
        cfg.training.batch_size = b;
    }
    let mut settings = DistillSettings::new(teacher, a.steps);
    settings.guidance = a.cfg;
    settings.consistency_weight = a.consistency_weight;
    settings.derivative_span = a.derivative_span;
    Ok((cfg, settings))
}

/// Distils.
pub fn run(a: DistillArgs) -> anyhow::Result<()> {
    let (cfg, settings) = resolve(&a)?;
    let mut opts = RunOptions::new(&a.out);
    opts.resume = a.run.resume;
    opts.overwrite = a.run.overwrite;
    opts.time_budget = a.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    dispatch(
        a.run.device,
        DistillJob {
            cfg,
            settings,
            opts,
        },
    )?
}

/// A guidance scale: a finite number of at least 0 (an infinite scale makes every
/// teacher target non-finite).
fn parse_guidance(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(g) if g.is_finite() && g >= 0.0 => Ok(g),
        _ => Err(format!(
            "must be a finite number of at least 0, got `{text}`"
        )),
    }
}
