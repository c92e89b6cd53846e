//! `transfusion-train plot`: redraw a run's loss plot from its metrics.jsonl.

use std::path::PathBuf;

use clap::Args;
use transfusion_train::engine::metrics::MetricsLog;
use transfusion_train::transfusion::metrics::plot_losses;
use transfusion_train::transfusion::metrics::MetricsLine;
use transfusion_train::vae::{plot_vae, VaeMetricsLine, VAE_TRAIN_FILE};

/// Flags of `plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory (holds metrics.jsonl; a VAE run also holds vae_train.json).
    pub run: PathBuf,
    /// Output PNG (default: RUN/loss.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Draws the plot and prints its path.
pub fn run(a: PlotArgs) -> anyhow::Result<()> {
    let metrics = a.run.join(transfusion_train::engine::metrics::METRICS_FILE);
    let out = a.out.unwrap_or_else(|| a.run.join("loss.png"));
    let nothing = || {
        anyhow::anyhow!(
            "{}: no training step or evaluation recorded yet, nothing to plot",
            metrics.display()
        )
    };
    if a.run.join(VAE_TRAIN_FILE).is_file() {
        let lines = MetricsLog::<VaeMetricsLine>::read(&metrics)?;
        if lines.is_empty() {
            return Err(nothing());
        }
        plot_vae(&lines, &out)?;
    } else {
        let lines = MetricsLog::<MetricsLine>::read(&metrics)?;
        if lines.is_empty() {
            return Err(nothing());
        }
        plot_losses(&lines, &out)?;
    }
    println!("{}", out.display());
    Ok(())
}
