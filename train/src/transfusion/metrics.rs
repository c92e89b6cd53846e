//! The records of a Transfusion run's `metrics.jsonl` and its loss plot.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::metrics::{Figures, Line, StepLine};
use crate::engine::plot::{plot_series, smooth, Series, BLUE, DBLUE, DRED, GREY, RED_};
use crate::error::Result;
use crate::held_out::{eval_points, EvalMetrics};

/// The losses of a Transfusion step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransfusionLosses {
    /// `L_LM + lambda * L_DDPM`, mean over the step's micro-batches.
    pub total: f64,
    /// LM cross-entropy.
    pub lm: f64,
    /// Diffusion noise MSE.
    pub diffusion: f64,
}

impl Figures for TransfusionLosses {
    fn summary(&self) -> String {
        format!("lm {:.3} diff {:.4}", self.lm, self.diffusion)
    }
}

/// One logged Transfusion training step.
pub type StepMetrics = StepLine<TransfusionLosses>;

/// A line of a Transfusion run's metrics file.
pub type MetricsLine = Line<StepMetrics, EvalMetrics>;

/// Draws the curves of `lines` into `path` (PNG).
pub fn plot_losses(lines: &[MetricsLine], path: &Path) -> Result<()> {
    let (mut total, mut lm, mut diff, mut elm, mut ediff) =
        (vec![], vec![], vec![], vec![], vec![]);
    for l in lines {
        match l {
            MetricsLine::Train(m) if !m.skipped_this => {
                total.push((m.step, m.losses.total));
                lm.push((m.step, m.losses.lm));
                diff.push((m.step, m.losses.diffusion));
            }
            MetricsLine::Eval(e) => eval_points(e, &mut elm, &mut ediff),
            _ => {}
        }
    }
    let series: Vec<Series> = vec![
        Series::line("train total", smooth(&total), GREY),
        Series::line("train LM", smooth(&lm), BLUE),
        Series::line("train diffusion", smooth(&diff), RED_),
        Series::dots("held-out LM NLL", elm, DBLUE),
        Series::dots("held-out diffusion", ediff, DRED),
    ];
    plot_series(&series, path)
}
