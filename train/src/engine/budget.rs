//! Fitting a run's length to its time budget while it trains.
//!
//! A run with a time budget whose plan was guessed before training (the demo times a few
//! steps of its model, [`crate::demo::budget`]) can be cut off by the budget with its
//! learning rate still high when the machine turns out slower than the guess (a shared
//! host, the data pipeline's thread, evaluations), or end early when it is faster. With
//! [`crate::engine::RunOptions::fit_to_budget`] the loop re-plans its length every
//! [`REFIT_EVERY`] steps from the pace it has actually kept, so the schedule's cosine decay
//! ends when the budget does.

use std::time::Duration;

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
