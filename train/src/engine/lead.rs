//! Rank 0's part of the loop: the metrics log, the moving average of the weights,
//! evaluations and checkpoints.

use std::path::PathBuf;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use indicatif::ProgressBar;
use transfusion_data::files::write_json;
use transfusion_runtime::checkpoint::save_weights;

use super::ema::{Ema, RAW_WEIGHTS_FILE};
use super::task::{EngineSettings, TrainTask};
use crate::checkpoint::{
    prune_with, save_optimizer, step_dir_name, write_dir_atomically, AdamWOptimizer, TrainingState,
    BEST_DIR, STATE_FILE,
};
use crate::engine::metrics::{Line, MetricsLog, Record};
use crate::error::Result;
use crate::optim::all_finite;

/// The module without autodiff that evaluations score and checkpoints hold.
type Inner<B, T> = <<T as TrainTask<B>>::Model as AutodiffModule<B>>::InnerModule;

/// Rank 0's bookkeeping: the metrics log, the EMA, the checkpoints written.
pub(super) struct Lead<B: AutodiffBackend, T: TrainTask<B>> {
    pub log: MetricsLog<Line<T::Step, T::Eval>>,
    pub out: PathBuf,
    pub root: PathBuf,
    pub last_ckpt: Option<PathBuf>,
    pub last_ckpt_step: Option<u64>,
    pub last_eval: Option<T::Eval>,
    /// The moving average of the weights (EMA on, after the first step or a resume).
    pub ema: Option<Ema<Inner<B, T>>>,
}

impl<B: AutodiffBackend, T: TrainTask<B>> Lead<B, T> {
    /// Folds the weights after optimizer update `step` (0-based) into the average; the
    /// first update of a run starts it.
    pub fn update_ema(&mut self, settings: &EngineSettings, model: &T::Model, step: u64) {
        if settings.ema_decay <= 0.0 {
            return;
        }
        match self.ema.as_mut() {
            Some(ema) => ema.update::<B, _>(model, step),
            None => self.ema = Some(Ema::new(model.valid(), settings.ema_decay)),
        }
    }

    /// The weights evaluations score and inference reads: the average when there is one.
    fn inference_weights(&self, model: &T::Model) -> Inner<B, T> {
        match &self.ema {
            Some(ema) => ema.model.clone(),
            None => model.valid(),
        }
    }

    pub fn evaluate(
        &mut self,
        task: &mut T,
        model: &T::Model,
        step: u64,
        bar: &ProgressBar,
    ) -> Result<()> {
        let e = task.evaluate(&self.inference_weights(model), step)?;
        bar.println(format!("eval @ {step}: {}", e.summary()));
        self.log.push(Line::Eval(e.clone()))?;
        task.plot(&self.log.lines, &self.out.join("loss.png"))?;
        self.last_eval = Some(e);
        Ok(())
    }

    /// Writes a step checkpoint (and `best/` when the evaluation of this very step is the
    /// lowest so far), then prunes old ones. Never from non-finite weights. With an EMA the
    /// task writes the average and the trained weights go to [`RAW_WEIGHTS_FILE`].
    pub fn checkpoint(
        &mut self,
        task: &T,
        settings: &EngineSettings,
        model: &T::Model,
        optim: &AdamWOptimizer<T::Model, B>,
        state: &mut TrainingState<T::DataState>,
    ) -> Result<()> {
        if !all_finite(model) {
            eprintln!(
                "step {}: the weights hold non-finite values; no checkpoint written",
                state.step
            );
            return Ok(());
        }
        state.data = task.data_state();
        state.eval_loss = self
            .last_eval
            .as_ref()
            .filter(|e| e.step() == state.step)
            .and_then(|e| task.eval_loss(e))
            .filter(|l| l.is_finite());
        let improved = match (state.eval_loss, state.best_eval_loss) {
            (Some(l), Some(best)) => l < best,
            (Some(_), None) => true,
            _ => false,
        };
        if improved {
            state.best_eval_loss = state.eval_loss;
        }
        let weights = self.inference_weights(model);
        let with_ema = self.ema.is_some();
        let save = |name: &str| {
            write_dir_atomically(&self.root, name, |tmp| {
                task.save_model(tmp, &weights, state.step)?;
                if with_ema {
                    save_weights(model, &tmp.join(RAW_WEIGHTS_FILE))?;
                }
                save_optimizer(tmp, model, optim)?;
                // Last: its presence marks the directory complete.
                write_json(&tmp.join(STATE_FILE), state)?;
                Ok(())
            })
        };
        let dir = save(&step_dir_name(state.step))?;
        if improved && settings.keep_best {
            save(BEST_DIR)?;
        }
        prune_with(
            &self.root,
            settings.keep_last.max(1),
            task.checkpoint_files(),
        )?;
        self.last_ckpt = Some(dir);
        self.last_ckpt_step = Some(state.step);
        Ok(())
    }
}
