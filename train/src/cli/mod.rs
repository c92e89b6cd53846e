//! The subcommands of `transfusion-train`, one file each: its flags and what it runs.

pub mod bench;
pub mod cache;
pub mod ddp;
pub mod demo;
pub mod distill;
pub mod import_llm;
pub mod inspect;
pub mod plan;
pub mod plot;
pub mod run;
pub mod tokenizer;
pub mod vae;
pub mod vae_bench;

use clap::Args;
use transfusion_runtime::device::DeviceChoice;

/// The flags every training subcommand (`run`, `vae`, `distill`) shares.
#[derive(Args, Debug, Clone)]
pub struct RunDirFlags {
    /// Continue the run in OUT from its newest complete checkpoint (same schedule
    /// position, data order and random streams; without flags that describe a run, with
    /// the run's own config).
    #[arg(long)]
    pub resume: bool,
    /// Start fresh even when OUT holds an earlier run, removing its checkpoints and
    /// metrics (without this or --resume such an OUT is refused).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Device: auto, cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

/// Most minutes a time budget may have (about two years; larger values overflow a duration).
pub const MAX_MINUTES: f64 = 1e6;

/// Parses a `--minutes` budget: a finite number of minutes in (0, [`MAX_MINUTES`]].
pub fn parse_minutes(text: &str) -> Result<f64, String> {
    let m: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of minutes"))?;
    if !(m.is_finite() && m > 0.0 && m <= MAX_MINUTES) {
        return Err(format!(
            "the budget must be a number of minutes > 0 and <= {MAX_MINUTES}, got {text}"
        ));
    }
    Ok(m)
}

/// A count that must be at least 1 (checked when the flags are read, before any work).
pub fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "must be a whole number of at least 1, got `{text}`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_minutes;

    #[test]
    fn minutes_must_be_a_positive_finite_budget() {
        assert_eq!(parse_minutes("8"), Ok(8.0));
        assert_eq!(parse_minutes(" 0.5 "), Ok(0.5));
        // NaN and huge values used to panic converting to a Duration.
        for bad in ["NaN", "inf", "-1", "0", "1e30", "ten"] {
            let err = parse_minutes(bad).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
