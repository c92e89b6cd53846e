//! A distillation's loss plot.

use std::path::Path;

use crate::distill::DistillStepMetrics;
use crate::engine::metrics::Line;
use crate::engine::plot::{plot_series, smooth, Series, BLUE, DBLUE, DRED};
use crate::error::Result;
use crate::held_out::{eval_points, EvalMetrics};

/// Draws a distillation's curves into `path` (PNG): the training LM loss and the held-out
/// LM NLL and image-velocity MSE. (The adaptive-weighted consistency loss goes negative
/// and has no place on a log scale; it is in `metrics.jsonl`.)
pub fn plot_distill(lines: &[Line<DistillStepMetrics, EvalMetrics>], path: &Path) -> Result<()> {
    let (mut lm, mut elm, mut ediff) = (vec![], vec![], vec![]);
    for l in lines {
        match l {
            Line::Train(m) if !m.skipped_this => lm.push((m.step, m.losses.lm)),
            Line::Eval(e) => eval_points(e, &mut elm, &mut ediff),
            _ => {}
        }
    }
    let series: Vec<Series> = vec![
        Series::line("train LM", smooth(&lm), BLUE),
        Series::dots("held-out LM NLL", elm, DBLUE),
        Series::dots("held-out velocity MSE", ediff, DRED),
    ];
    plot_series(&series, path)
}
