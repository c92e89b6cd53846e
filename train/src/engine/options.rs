//! [`RunOptions`]: how to run (resume, overwrite, early stops, the time budget), apart from
//! the experiment's config.

use std::path::PathBuf;
use std::time::Duration;

/// How to run (not part of the experiment).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Run directory: `metrics.jsonl`, `loss.png`, the run config, `checkpoints/`.
    pub out: PathBuf,
    /// Continue from the newest complete checkpoint in `out/checkpoints` (fresh start when
    /// there is none).
    pub resume: bool,
    /// Start fresh even when `out` holds an earlier run: its `checkpoints/` and
    /// `metrics.jsonl` are removed first. Without it (and without `resume`) a run
    /// directory that holds a run is refused, so a typo cannot destroy a finished run.
    pub overwrite: bool,
    /// Show a progress bar (off in tests).
    pub progress: bool,
    /// Stop (with a checkpoint) once this many steps are done in total, before the
    /// schedule's end: simulates a killed run in tests, or splits a run in sessions.
    pub stop_at_step: Option<u64>,
    /// Stop (with a checkpoint and a final evaluation) after this much wall-clock time.
    pub time_budget: Option<Duration>,
    /// With a `time_budget`, on one device: re-plan the run's length (the schedule's end)
    /// from the pace it keeps, so its learning-rate decay ends when the budget does, at
    /// most this many steps ([`super::budget`]). The plan then depends on the machine's
    /// speed; without it the config's `steps` is the plan and the budget only cuts it.
    pub fit_to_budget: Option<u64>,
    /// Directory the config file was read from (relative paths in it).
    pub config_dir: Option<PathBuf>,
}

impl RunOptions {
    /// Defaults: no resume, no overwrite, progress bar on, no early stop.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            overwrite: false,
            progress: true,
            stop_at_step: None,
            time_budget: None,
            fit_to_budget: None,
            config_dir: None,
        }
    }
}
