//! A run's start: the run directory set up, and the model and training state built fresh
//! or loaded from the newest complete checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;

use super::run::RunOptions;
use super::task::TrainTask;
use crate::checkpoint::{
    latest_checkpoint_with, read_training_state, remove_leftovers, TrainingState,
};

/// What every replica starts from: the checkpoint directory, and the model and training
/// state (fresh, or from the newest complete checkpoint).
pub struct Prepared<B: AutodiffBackend, T: TrainTask<B>> {
    /// `OUT/checkpoints`.
    pub root: PathBuf,
    /// The checkpoint resumed from.
    pub resume_from: Option<PathBuf>,
    /// The model.
    pub model: T::Model,
    /// Step, skipped steps, data position, best evaluation loss.
    pub state: TrainingState<T::DataState>,
}

impl<B: AutodiffBackend, T: TrainTask<B>> Prepared<B, T> {
    /// The same start on another device: the weights are copied and keep their parameter
    /// ids, so replicas' gradients line up in the all-reduce.
    pub fn replica_on(&self, device: &B::Device) -> Self {
        Self {
            root: self.root.clone(),
            resume_from: self.resume_from.clone(),
            model: self.model.clone().fork(device),
            state: self.state.clone(),
        }
    }
}

/// Sets up the run directory (leftovers of interrupted checkpoint writes removed, the
/// task's run files written) and builds or loads the model on `device`. `materialize`:
/// draw a fresh model's parameters now, for data-parallel runs that copy it.
pub fn prepare<B: AutodiffBackend, T: TrainTask<B>>(
    task: &mut T,
    opts: &RunOptions,
    device: &B::Device,
    materialize: bool,
) -> anyhow::Result<Prepared<B, T>> {
    let out = &opts.out;
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
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
    let (model, state) = match &resume_from {
        Some(dir) => {
            let state = read_training_state::<T::DataState>(dir)?;
            let model = task.load_model(dir, device)?;
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
            (model, state)
        }
        None => (
            task.init_model(device, materialize),
            TrainingState::fresh(settings.seed),
        ),
    };
    Ok(Prepared {
        root,
        resume_from,
        model,
        state,
    })
}
