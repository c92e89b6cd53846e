//! `transfusion-train plan`: the memory one training step of a config needs per device,
//! part by part, and whether it fits this machine's CPU memory.

use std::path::PathBuf;

use clap::Args;
use transfusion_model::Precision;
use transfusion_train::config::{ExperimentConfig, Recompute};
use transfusion_train::memory_plan::{available_host_memory, check_fits, plan, step_shape};

/// Flags of `plan`.
#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Experiment config (TOML), e.g. train/configs/paper_160m.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Devices the run would train on (data parallel: one replica each).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Rows per micro-batch on each device, replacing training.batch_size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Positions per row, replacing training.seq_len.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Type of the decoder's products, replacing training.precision.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// What the backward pass recomputes (`none` or `layers`), replacing
    /// training.recompute.
    #[arg(long)]
    pub recompute: Option<Recompute>,
}

/// Prints the plan.
pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.devices >= 1, "--devices must be at least 1");
    let mut cfg = ExperimentConfig::from_toml_file(&a.config)?;
    if let Some(b) = a.batch_size {
        cfg.training.batch_size = b;
    }
    if let Some(s) = a.seq_len {
        cfg.training.seq_len = s;
    }
    if let Some(p) = a.precision {
        cfg.training.precision = p;
    }
    if let Some(r) = a.recompute {
        cfg.training.recompute = r;
    }
    let dir = a.config.parent().map(|p| p.to_path_buf());
    let tok = transfusion_train::data::load_tokenizer(&cfg, dir.as_deref())?;
    let model = cfg.model_config(tok.vocab_size())?;
    let shape = step_shape(&cfg, &model);
    let p = plan(&shape);
    let t = &cfg.training;
    println!(
        "{}: {:.0}M parameters, {} layers; micro-batch {} x {} positions, {} products, \
         recompute {}, EMA {}",
        a.config.display(),
        model.param_count().total() as f64 / 1e6,
        model.n_layers,
        t.batch_size,
        t.seq_len,
        t.precision,
        t.recompute,
        if shape.ema { "on" } else { "off" }
    );
    println!("memory per device:\n{p}");
    if a.devices > 1 {
        println!(
            "{} devices: each holds the whole model, gradients and optimizer state (data \
             parallel, no sharding) and runs its own micro-batches: {} rows per micro-step in all",
            a.devices,
            a.devices * t.batch_size
        );
    }
    match available_host_memory() {
        Some(available) => match check_fits(&shape, available, "this machine's CPU") {
            Ok(()) => println!(
                "fits this machine's CPU ({:.1} GiB available)",
                available / (1u64 << 30) as f64
            ),
            Err(why) => println!("{}", why.lines().next().unwrap_or_default()),
        },
        None => println!("this machine's available memory is not readable"),
    }
    Ok(())
}
