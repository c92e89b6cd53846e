//! A run's start: the run directory set up, and the model and training state built fresh
//! or loaded from the newest complete checkpoint.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use transfusion_data::files::create_dir;
use transfusion_runtime::checkpoint::load_weights;

use super::ema::{Ema, RAW_WEIGHTS_FILE};
use super::options::RunOptions;
use super::run_lock::RunLock;
use super::task::TrainTask;
use crate::checkpoint::{
    latest_checkpoint_with, read_training_state, remove_leftovers, TrainingState,
};
use crate::engine::metrics::METRICS_FILE;
use crate::error::{Result, TrainError};

/// What every replica starts from: the checkpoint directory, and the model and training
/// state (fresh, or from the newest complete checkpoint).
pub struct Prepared<B: AutodiffBackend, T: TrainTask<B>> {
    /// The run directory's lock, held until the loop ends (rank 0 only; `None` on the
    /// other replicas).
    pub lock: Option<RunLock>,
    /// `OUT/checkpoints`.
    pub root: PathBuf,
    /// The checkpoint resumed from.
    pub resume_from: Option<PathBuf>,
    /// The model.
    pub model: T::Model,
    /// Step, skipped steps, data position, best evaluation loss.
    pub state: TrainingState<T::DataState>,
    /// The moving average resumed from the checkpoint (a run with EMA on resuming a
    /// checkpoint written with EMA on); a fresh average starts after the first step.
    pub ema: Option<Ema<<T::Model as AutodiffModule<B>>::InnerModule>>,
}

impl<B: AutodiffBackend, T: TrainTask<B>> Prepared<B, T> {
    /// The same start on another device: the weights are copied and keep their parameter
    /// ids, so replicas' gradients line up in the all-reduce.
    pub fn replica_on(&self, device: &B::Device) -> Self {
        Self {
            lock: None,
            root: self.root.clone(),
            resume_from: self.resume_from.clone(),
            model: self.model.clone().fork(device),
            state: self.state.clone(),
            // Only rank 0 keeps the average.
            ema: None,
        }
    }
}

/// Sets up the run directory (locked for this process, leftovers of interrupted
/// checkpoint writes removed, the task's run files written) and builds or loads the model
/// on `device`.
pub fn prepare<B: AutodiffBackend, T: TrainTask<B>>(
    task: &mut T,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<Prepared<B, T>> {
    let out = &opts.out;
    let root = out.join("checkpoints");
    if out.exists() && !out.is_dir() {
        return Err(TrainError::Run(format!(
            "--out {} is a file, not a run directory",
            out.display()
        )));
    }
    let lock = RunLock::acquire(out)?;
    guard_earlier_run(out, &root, opts)?;
    create_dir(&root)?;
    let leftovers = remove_leftovers(&root);
    if leftovers > 0 {
        eprintln!(
            "removed {leftovers} incomplete checkpoint write(s) in {}",
            root.display()
        );
    }
    task.write_run_files(out)?;
    let resume_from = if opts.resume {
        let l = latest_checkpoint_with(&root, task.checkpoint_files());
        if l.is_none() {
            eprintln!(
                "--resume: no complete checkpoint in {}; starting fresh",
                root.display()
            );
        }
        l
    } else {
        None
    };
    let settings = task.settings();
    let mut ema = None;
    let (model, state) = match &resume_from {
        Some(dir) => {
            let state = read_training_state::<T::DataState>(dir)?;
            let mut model = task.load_model(dir, device)?;
            // Written with EMA on: the task's weights are the average, the trained ones
            // are beside them.
            let raw = dir.join(RAW_WEIGHTS_FILE);
            if raw.is_file() {
                if settings.ema_decay > 0.0 {
                    ema = Some(Ema::new(model.valid(), settings.ema_decay));
                }
                model = load_weights(model, &raw, "the checkpoint's model")?;
            }
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
            (model, state)
        }
        None => (
            task.init_model(device)?,
            TrainingState::fresh(settings.seed),
        ),
    };
    Ok(Prepared {
        lock: Some(lock),
        root,
        resume_from,
        model,
        state,
        ema,
    })
}

/// Refuses to start a fresh run in a directory that holds one (a metrics file or any
/// checkpoint), unless `resume` continues it or `overwrite` clears it first: otherwise the
/// new run would truncate the old metrics, replace `best/` and prune the old checkpoints.
fn guard_earlier_run(out: &Path, root: &Path, opts: &RunOptions) -> Result<()> {
    let metrics = out.join(METRICS_FILE);
    let has_checkpoints = std::fs::read_dir(root)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if opts.resume || !(metrics.exists() || has_checkpoints) {
        return Ok(());
    }
    if !opts.overwrite {
        return Err(TrainError::Run(format!(
            "{} already holds a run (metrics.jsonl or checkpoints/): pass --resume to continue \
             it, --overwrite to replace it, or choose another --out",
            out.display()
        )));
    }
    eprintln!("--overwrite: removing the earlier run in {}", out.display());
    if has_checkpoints {
        std::fs::remove_dir_all(root).map_err(|e| TrainError::io("remove", root, e))?;
    }
    if metrics.exists() {
        std::fs::remove_file(&metrics).map_err(|e| TrainError::io("remove", &metrics, e))?;
    }
    Ok(())
}
