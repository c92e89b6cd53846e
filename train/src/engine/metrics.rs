//! `metrics.jsonl`: one JSON object per logged training step (`"kind": "train"`) and per
//! evaluation (`"kind": "eval"`), appended as the run goes.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use transfusion_data::files::write_file;
use transfusion_data::source::SourceSpec;

/// A line of a JSONL metrics file: any serializable record that knows its step (the
/// Transfusion run's `MetricsLine`, the VAE run's lines).
pub trait LogLine: Serialize + DeserializeOwned {
    /// The step the line belongs to (a resumed run drops lines after its checkpoint).
    fn step(&self) -> u64;
}

/// A training-step or evaluation record of one kind of run: it knows its step and says
/// itself in one line (the progress bar, the console). The engine's [`StepLine`] and
/// [`EvalLine`] are records around any task's [`Figures`].
pub trait Record: Clone + std::fmt::Debug + Serialize + DeserializeOwned {
    /// The step the record belongs to.
    fn step(&self) -> u64;
    /// One human-readable line (`lm 2.31 diff 0.041 | ...`, `perplexity 3.2, ...`).
    fn summary(&self) -> String;
}

/// A task's own figures of a step (its losses) or of an evaluation, written as fields of
/// the line's flat JSON object.
pub trait Figures: Clone + std::fmt::Debug + Serialize + DeserializeOwned {
    /// The figures in one human-readable line (`lm 2.31 diff 0.041`, `perplexity 3.2, ...`).
    fn summary(&self) -> String;
}

/// A line of a metrics file: a training step `S` or an evaluation `E`, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line<S, E> {
    /// A training step.
    Train(S),
    /// An evaluation.
    Eval(E),
}

impl<S, E> Line<S, E> {
    /// The training step, when this line is one.
    pub fn train(&self) -> Option<&S> {
        match self {
            Line::Train(m) => Some(m),
            Line::Eval(_) => None,
        }
    }

    /// The evaluation, when this line is one.
    pub fn eval(&self) -> Option<&E> {
        match self {
            Line::Eval(e) => Some(e),
            Line::Train(_) => None,
        }
    }
}

impl<S: Record, E: Record> Line<S, E> {
    /// The step of the line.
    pub fn step(&self) -> u64 {
        match self {
            Line::Train(m) => m.step(),
            Line::Eval(m) => m.step(),
        }
    }
}

impl<S: Record, E: Record> LogLine for Line<S, E> {
    fn step(&self) -> u64 {
        Line::step(self)
    }
}

/// One logged training step of any task: the engine's figures around the task's losses
/// `L`, whose fields are written into the same flat JSON object.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLine<L> {
    /// Optimizer step (1-based: the number of steps done after this one).
    pub step: u64,
    /// The task's losses of the step.
    #[serde(flatten)]
    pub losses: L,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Non-padding positions per second since the last logged step (text tokens + image
    /// patches; 0 for tasks without sequences).
    #[serde(default)]
    pub tokens_per_s: f64,
    /// Images per second since the last logged step.
    pub images_per_s: f64,
    /// Steps skipped so far (non-finite loss or gradient).
    pub skipped: u64,
    /// Whether this step was skipped.
    pub skipped_this: bool,
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
}

impl<L> StepLine<L> {
    /// The same figures with other losses.
    pub fn with_losses<M>(&self, losses: M) -> StepLine<M> {
        StepLine {
            step: self.step,
            losses,
            grad_norm: self.grad_norm,
            lr: self.lr,
            tokens_per_s: self.tokens_per_s,
            images_per_s: self.images_per_s,
            skipped: self.skipped,
            skipped_this: self.skipped_this,
            elapsed_s: self.elapsed_s,
        }
    }
}

impl<L: Figures> Record for StepLine<L> {
    fn step(&self) -> u64 {
        self.step
    }
    fn summary(&self) -> String {
        let pace = if self.tokens_per_s > 0.0 {
            format!("{:.0} tok/s", self.tokens_per_s)
        } else {
            format!("{:.1} img/s", self.images_per_s)
        };
        let skipped = match self.skipped {
            0 => String::new(),
            n => format!(" | skipped {n}"),
        };
        let losses = self.losses.summary();
        format!("{losses} | {pace} | lr {:.2e}{skipped}", self.lr)
    }
}

/// One evaluation of any task: the step and split around the task's figures `M`, whose
/// fields are written into the same flat JSON object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalLine<M> {
    /// Step evaluated.
    pub step: u64,
    /// Held-out data, or the training sources when none is configured.
    #[serde(default)]
    pub split: EvalSplit,
    /// The task's figures.
    #[serde(flatten)]
    pub figures: M,
}

impl<M: Figures> Record for EvalLine<M> {
    fn step(&self) -> u64 {
        self.step
    }
    fn summary(&self) -> String {
        format!("{}: {}", self.split.label(), self.figures.summary())
    }
}

/// What an evaluation ran on, so that no figure on training data is called held-out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSplit {
    /// Data never trained on: the configured held-out sources, or generated sets (shapes,
    /// digits) alone (drawn with the held-out seed). Metrics files written before this field read as it.
    #[default]
    HeldOut,
    /// The training sources, because no held-out source is configured: generated sets
    /// switch to the held-out seed, but every other source's records are trained on.
    Training,
}

impl EvalSplit {
    /// The split an evaluation over `held_out` (or, when empty, `train` with the held-out
    /// shapes seed) actually reads.
    pub fn of(held_out: &[SourceSpec], train: &[SourceSpec]) -> Self {
        if !held_out.is_empty() || train.iter().all(|s| s.kind.is_generated()) {
            Self::HeldOut
        } else {
            Self::Training
        }
    }

    /// `held-out` or `training-set`, for the console.
    pub fn label(self) -> &'static str {
        match self {
            Self::HeldOut => "held-out",
            Self::Training => "training-set",
        }
    }
}

/// The metrics file's name in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends lines to `metrics.jsonl` and keeps them for the plot.
pub struct MetricsLog<L> {
    path: PathBuf,
    file: File,
    /// Every line so far.
    pub lines: Vec<L>,
}

impl<L: LogLine> MetricsLog<L> {
    /// Opens `dir/metrics.jsonl`: fresh (truncated) unless `keep_until` is given, in which
    /// case the lines up to that step are kept (a resumed run rewrites what came after).
    pub fn open(dir: &Path, keep_until: Option<u64>) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let mut lines = vec![];
        if let (Some(until), Ok(f)) = (keep_until, File::open(&path)) {
            for l in BufReader::new(f).lines() {
                let l = l.map_err(|e| TrainError::io("read", &path, e))?;
                if let Ok(m) = serde_json::from_str::<L>(&l) {
                    if m.step() <= until {
                        lines.push(m);
                    }
                }
            }
        }
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l).expect("a metrics line serialises"));
            text.push('\n');
        }
        write_file(&path, text)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io("write", &path, e))?;
        Ok(Self { path, file, lines })
    }

    /// Appends one line (flushed).
    pub fn push(&mut self, line: L) -> Result<()> {
        let text = serde_json::to_string(&line).expect("a metrics line serialises");
        writeln!(self.file, "{text}")
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainError::io("write", &self.path, e))?;
        self.lines.push(line);
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every line of a metrics file.
    pub fn read(path: &Path) -> Result<Vec<L>> {
        let f = File::open(path).map_err(|e| TrainError::io("open", path, e))?;
        let mut v = vec![];
        for (i, l) in BufReader::new(f).lines().enumerate() {
            let l = l.map_err(|e| TrainError::io("read", path, e))?;
            v.push(serde_json::from_str(&l).map_err(|e| {
                TrainError::invalid(path, format!("line {}: not a metrics line: {e}", i + 1))
            })?);
        }
        Ok(v)
    }
}
