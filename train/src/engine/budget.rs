//! Fitting a run's length to its time budget while it trains ([`StepPlan`]), and the
//! throughput window of the logged steps ([`Window`]).
//!
//! A run with a time budget whose plan was guessed before training (the demo times a few
//! steps of its model, [`crate::demo::budget`]) can be cut off by the budget with its
//! learning rate still high when the machine turns out slower than the guess (a shared
//! host, the data pipeline's thread, evaluations), or end early when it is faster. With
//! [`crate::engine::RunOptions::fit_to_budget`] the loop re-plans its length every
//! [`REFIT_EVERY`] steps from the pace it has actually kept, so the schedule's cosine decay
//! ends when the budget does.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use super::options::RunOptions;
use super::step::LocalStep;

/// Steps between two re-plans (and done before the first one).
pub const REFIT_EVERY: u64 = 50;

/// The share of the time budget the re-planned run fills: the rest is for the final
/// evaluation and checkpoint, and for a pace that slows down after the last re-plan.
pub const REFIT_SHARE: f64 = 0.97;

/// The total steps of a run that is at `step` (done) after `done_here` steps in `elapsed`
/// of this session (the rest of the steps were done before a resume), when its session
/// has `budget` in all: the steps already done plus as many as fit the rest of
/// [`REFIT_SHARE`] of the budget at the session's mean pace so far (evaluations and
/// checkpoints included), kept within `[step, max]`. `None` before [`REFIT_EVERY`] steps
/// of this session, when the pace is not yet known.
pub fn fitted_total(
    step: u64,
    done_here: u64,
    elapsed: Duration,
    budget: Duration,
    max: u64,
) -> Option<u64> {
    if done_here < REFIT_EVERY {
        return None;
    }
    let pace = elapsed.as_secs_f64() / done_here as f64;
    let left = (REFIT_SHARE * budget.as_secs_f64() - elapsed.as_secs_f64()).max(0.0);
    let more = (left / pace.max(1e-12)).floor() as u64;
    Some(step.saturating_add(more).clamp(step, max.max(step)))
}

/// How many steps the run takes: the schedule's total, cut at `--stop-at-step`, and
/// re-planned from the pace under a time budget (`fit_to_budget`).
pub struct StepPlan {
    /// Steps of the learning-rate schedule.
    pub total: u64,
    /// The step the loop stops at.
    pub end: u64,
    /// `--stop-at-step`.
    stop_at: Option<u64>,
    /// The most steps and the budget to fit them in (one device only: replicas must agree
    /// on the schedule).
    refit: Option<(u64, Duration)>,
}

impl StepPlan {
    /// The plan of a run with `opts`, `total` scheduled steps and `world` replicas.
    pub fn new(opts: &RunOptions, total: u64, world: usize) -> Self {
        let refit = match (opts.fit_to_budget, opts.time_budget) {
            (Some(max), Some(budget)) if world == 1 => Some((max, budget)),
            _ => None,
        };
        let stop_at = opts.stop_at_step;
        Self {
            total,
            end: stop_at.map_or(total, |s| s.min(total)),
            stop_at,
            refit,
        }
    }

    /// Re-plans the total every [`REFIT_EVERY`] steps from the pace so far (`done_here`
    /// steps in `elapsed`), saying so when the plan moves 5%.
    pub fn replan(&mut self, step: u64, done_here: u64, elapsed: Duration, bar: &ProgressBar) {
        let Some((max, budget)) = self.refit.filter(|_| step % REFIT_EVERY == 0) else {
            return;
        };
        let Some(t) = fitted_total(step, done_here, elapsed, budget, max) else {
            return;
        };
        if t.abs_diff(self.total) * 20 > self.total {
            let ms = elapsed.as_secs_f64() * 1e3 / done_here as f64;
            let line = format!("re-planned to {t} steps: {ms:.0} ms per step so far");
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
        self.total = t;
        self.end = self.stop_at.map_or(t, |s| s.min(t));
        bar.set_length(t);
    }
}

/// Positions and images trained since the last logged step, for its throughput.
pub struct Window {
    since: Instant,
    tokens: u64,
    images: u64,
}

impl Window {
    /// An empty window starting now.
    pub fn start() -> Self {
        Self {
            since: Instant::now(),
            tokens: 0,
            images: 0,
        }
    }

    /// Counts one step's positions and images.
    pub fn add(&mut self, step: &LocalStep) {
        self.tokens += step.tokens;
        self.images += step.images;
    }

    /// `(positions/s, images/s)` since the window started.
    pub fn rates(&self) -> (f64, f64) {
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        (self.tokens as f64 / secs, self.images as f64 / secs)
    }
}
