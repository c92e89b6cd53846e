//! The learning-rate schedule: linear warmup, then cosine decay to a floor.

use crate::config::ScheduleSection;

/// Learning rate of optimizer step `step` (0-based) in a run of `total` steps:
/// - warmup (`step < warmup`): `lr * (step + 1) / warmup`;
/// - then `min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2` with
///   `p = (step - warmup) / max(1, total - 1 - warmup)`, clamped to `[0, 1]`, so the last
///   step of the run uses exactly `min_lr`.
pub fn lr_at(s: &ScheduleSection, step: u64, total: u64) -> f64 {
    if step < s.warmup_steps {
        return s.lr * (step + 1) as f64 / s.warmup_steps as f64;
    }
    let span = total
        .saturating_sub(1)
        .saturating_sub(s.warmup_steps)
        .max(1);
    let p = ((step - s.warmup_steps) as f64 / span as f64).clamp(0.0, 1.0);
    s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
}
