//! The training engine with a toy task (a 1-in 1-out linear model fitting y = 3x + 1):
//! evaluation and checkpoint cadence, keep-best, exact resume and the non-finite policy
//! are the engine's, whatever the task.

use std::path::Path;

use burn::module::{AutodiffModule, Param};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};
use transfusion_train::checkpoint::{list_checkpoints_with, read_training_state, BEST_DIR};
use transfusion_train::config::{OptimizerSection, ScheduleSection};
use transfusion_train::engine::metrics::{EvalLine, EvalSplit, Figures, Line, StepLine};
use transfusion_train::engine::{
    ema_decay_at, run_task, seeded_module, EngineHooks, EngineSettings, RunOptions, StepFigures,
    TaskLoss, TrainTask, Work, RAW_WEIGHTS_FILE,
};
use transfusion_train::TrainError;

use super::common::B;

/// The toy's one figure: its loss, of a step or of an evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ToyLoss {
    loss: f64,
}

impl Figures for ToyLoss {
    fn summary(&self) -> String {
        format!("loss {:.4}", self.loss)
    }
}

type ToyStep = StepLine<ToyLoss>;
type ToyEval = EvalLine<ToyLoss>;

const FILES: &[&str] = &["toy.json", "optimizer.mpk", "training_state.json"];

/// Fits y = 3x + 1 on x = (n mod 7) / 7 for the n-th sample of the stream; evaluation
/// losses are scripted (one per evaluation, in order) so keep-best is predictable.
struct Toy {
    settings: EngineSettings,
    next: u64,
    scripted_evals: Vec<f64>,
    evals_done: usize,
    /// Sleep this long per batch made (a slow data pipeline).
    batch_time: std::time::Duration,
}

impl Toy {
    fn new(steps: u64) -> Self {
        Self {
            settings: EngineSettings {
                steps,
                grad_accum: 2,
                grad_clip: 1.0,
                optimizer: OptimizerSection::default(),
                schedule: ScheduleSection {
                    lr: 0.3,
                    min_lr: 0.03,
                    warmup_steps: 1,
                },
                log_every: 1,
                eval_every: 2,
                eval_at_end: true,
                checkpoint_every: 2,
                keep_last: 2,
                keep_best: true,
                max_consecutive_nonfinite: 2,
                seed: 5,
                ema_decay: 0.0,
            },
            next: 0,
            scripted_evals: vec![3.0, 1.0, 2.0, 4.0],
            evals_done: 0,
            batch_time: std::time::Duration::ZERO,
        }
    }
}

impl TrainTask<B> for Toy {
    type Model = Linear<B>;
    type Batch = (Tensor<B, 2>, Tensor<B, 2>);
    type DataState = u64;
    type Step = ToyStep;
    type Eval = ToyEval;

    fn settings(&self) -> EngineSettings {
        self.settings.clone()
    }
    fn checkpoint_files(&self) -> &'static [&'static str] {
        FILES
    }
    fn write_run_files(&self, out: &Path) -> transfusion_train::Result<()> {
        transfusion_data::files::create_dir(out)?;
        Ok(())
    }
    fn init_model(&self, device: &burn::tensor::Device<B>) -> transfusion_train::Result<Linear<B>> {
        Ok(seeded_module(device, self.settings.seed, || {
            LinearConfig::new(1, 1).init(device)
        }))
    }
    fn load_model(
        &mut self,
        dir: &Path,
        device: &burn::tensor::Device<B>,
    ) -> transfusion_train::Result<Linear<B>> {
        let path = dir.join("toy.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io("read", &path, e))?;
        let wb: Vec<f32> =
            serde_json::from_str(&text).map_err(|e| TrainError::invalid(&path, e.to_string()))?;
        let w = Tensor::<B, 2>::from_data(TensorData::new(vec![wb[0]], [1, 1]), device);
        let b = Tensor::<B, 1>::from_data(TensorData::new(vec![wb[1]], [1]), device);
        Ok(Linear {
            weight: Param::from_tensor(w),
            bias: Some(Param::from_tensor(b)),
        })
    }
    fn save_model(
        &self,
        dir: &Path,
        model: &<Linear<B> as AutodiffModule<B>>::InnerModule,
        _step: u64,
    ) -> transfusion_train::Result<()> {
        let w: Vec<f32> = model.weight.val().into_data().to_vec().unwrap();
        let b: Vec<f32> = model
            .bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .to_vec()
            .unwrap();
        transfusion_data::files::write_json(&dir.join("toy.json"), &[w[0], b[0]])?;
        Ok(())
    }
    fn start_data(&mut self, resume: Option<&u64>) -> transfusion_train::Result<()> {
        self.next = resume.copied().unwrap_or(0);
        Ok(())
    }
    fn data_state(&self) -> u64 {
        self.next
    }
    fn next_batch(
        &mut self,
        keep: bool,
        device: &burn::tensor::Device<B>,
    ) -> transfusion_train::Result<Option<(Self::Batch, Work)>> {
        std::thread::sleep(self.batch_time);
        let xs: Vec<f32> = (0..4).map(|i| ((self.next + i) % 7) as f32 / 7.0).collect();
        self.next += 4;
        let ys: Vec<f32> = xs.iter().map(|x| 3.0 * x + 1.0).collect();
        let t = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [4, 1]), device);
        Ok(keep.then(|| {
            (
                (t(xs), t(ys)),
                Work {
                    tokens: 4,
                    images: 0,
                    units: [4, 4],
                },
            )
        }))
    }
    fn loss(&self, model: &Linear<B>, (x, y): Self::Batch, _step: u64) -> TaskLoss<B> {
        let err = model.forward(x) - y;
        // Squared and absolute errors summed over the 4 samples; only the first trains.
        TaskLoss {
            sums: [err.clone().powi_scalar(2).sum(), err.abs().sum()],
            weights: [1.0, 0.0],
        }
    }
    fn step_record(&self, f: &StepFigures) -> ToyStep {
        f.with_losses(ToyLoss { loss: f.losses[0] })
    }
    fn evaluate(
        &mut self,
        _model: &<Linear<B> as AutodiffModule<B>>::InnerModule,
        step: u64,
    ) -> transfusion_train::Result<ToyEval> {
        let loss = self.scripted_evals[self.evals_done % self.scripted_evals.len()];
        self.evals_done += 1;
        Ok(EvalLine {
            step,
            split: EvalSplit::HeldOut,
            figures: ToyLoss { loss },
        })
    }
    fn eval_loss(&self, eval: &ToyEval) -> Option<f64> {
        Some(eval.figures.loss)
    }
    fn plot(
        &self,
        _lines: &[Line<ToyStep, ToyEval>],
        path: &Path,
    ) -> transfusion_train::Result<()> {
        transfusion_data::files::write_file(path, b"plot")?;
        Ok(())
    }
}

fn quiet(out: &Path) -> RunOptions {
    let mut o = RunOptions::new(out);
    o.progress = false;
    o
}

fn weights(dir: &Path) -> Vec<f32> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("toy.json")).unwrap()).unwrap()
}

/// `[weight, bias]` of the trained weights the engine writes beside an EMA.
fn raw_weights(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join(RAW_WEIGHTS_FILE)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    ["weight", "bias"]
        .iter()
        .map(|name| {
            let data = file.tensor(name).unwrap().data().to_vec();
            f32::from_le_bytes(data[..4].try_into().unwrap())
        })
        .collect()
}

/// One run of `make()` straight through, and one stopped after step 3 then resumed to the
/// end (its started-at and final steps checked): the two run directories.
fn straight_and_resumed_at_3(make: impl Fn() -> Toy) -> (tempfile::TempDir, tempfile::TempDir) {
    let device = Default::default();
    let run = |o: &RunOptions| run_task(&mut make(), o, &mut EngineHooks::default(), &device);
    let straight = tempfile::tempdir().unwrap();
    let end = run(&quiet(straight.path())).unwrap().steps;
    let split = tempfile::tempdir().unwrap();
    let mut first = quiet(split.path());
    first.stop_at_step = Some(3);
    assert_eq!(run(&first).unwrap().steps, 3);
    let mut second = quiet(split.path());
    second.resume = true;
    let b = run(&second).unwrap();
    assert_eq!((b.started_at, b.steps), (3, end));
    (straight, split)
}

#[test]
fn ema_decay_warms_up_then_holds_its_cap() {
    assert_eq!(ema_decay_at(0.999, 0), 0.1);
    assert_eq!(ema_decay_at(0.999, 10), 11.0 / 20.0);
    assert_eq!(ema_decay_at(0.3, 3), 0.3); // (1 + 3) / 13 = 0.31 > cap
    assert_eq!(ema_decay_at(0.999, 100_000), 0.999);
}

#[test]
fn the_checkpoint_holds_the_ema_of_the_trained_weights() {
    let device = Default::default();
    let out = tempfile::tempdir().unwrap();
    let mut toy = Toy::new(8);
    toy.settings.ema_decay = 0.3;
    toy.settings.checkpoint_every = 1;
    toy.settings.keep_last = 100;
    run_task(
        &mut toy,
        &quiet(out.path()),
        &mut EngineHooks::default(),
        &device,
    )
    .unwrap();
    let dir = |step: u64| out.path().join(format!("checkpoints/step-{step:08}"));
    // The average starts at the weights after the first step, then folds in each step's.
    let mut ema: Vec<f64> = raw_weights(&dir(1)).iter().map(|&v| v as f64).collect();
    for n in 1..8u64 {
        let d = ema_decay_at(0.3, n);
        for (e, r) in ema.iter_mut().zip(raw_weights(&dir(n + 1))) {
            *e = d * *e + (1.0 - d) * r as f64;
        }
    }
    let saved = weights(&dir(8));
    let raw = raw_weights(&dir(8));
    for i in 0..2 {
        // f32 arithmetic in the engine vs f64 here: a few ulps of values of order 1.
        assert!(
            (saved[i] as f64 - ema[i]).abs() < 2e-6,
            "{saved:?} vs {ema:?}"
        );
        // The average lags the trained weights: the test can tell them apart.
        assert!((saved[i] - raw[i]).abs() > 1e-3, "{saved:?} vs {raw:?}");
    }
}

#[test]
fn a_run_with_ema_resumes_exactly() {
    let (straight, split) = straight_and_resumed_at_3(|| {
        let mut toy = Toy::new(8);
        toy.settings.ema_decay = 0.5;
        toy
    });
    let name = "checkpoints/step-00000008";
    let (a, b) = (straight.path().join(name), split.path().join(name));
    assert_eq!(weights(&a), weights(&b));
    assert_eq!(raw_weights(&a), raw_weights(&b));
    assert_ne!(weights(&a), raw_weights(&a));
}

#[test]
fn engine_evaluates_checkpoints_and_keeps_the_best_on_its_cadence() {
    let out = tempfile::tempdir().unwrap();
    let device = Default::default();
    let s = run_task(
        &mut Toy::new(8),
        &quiet(out.path()),
        &mut EngineHooks::default(),
        &device,
    )
    .unwrap();
    assert_eq!((s.steps, s.skipped_steps, s.started_at), (8, 0, 0));
    let evals: Vec<(u64, f64)> = s
        .metrics
        .iter()
        .filter_map(Line::eval)
        .map(|e| (e.step, e.figures.loss))
        .collect();
    assert_eq!(evals, vec![(2, 3.0), (4, 1.0), (6, 2.0), (8, 4.0)]);
    let root = out.path().join("checkpoints");
    let kept: Vec<u64> = list_checkpoints_with(&root, FILES)
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(kept, vec![6, 8], "keep_last = 2");
    // best/ is the step-4 checkpoint (eval loss 1.0), not the newest.
    let best = read_training_state::<u64>(&root.join(BEST_DIR)).unwrap();
    assert_eq!(
        (best.step, best.eval_loss, best.best_eval_loss),
        (4, Some(1.0), Some(1.0))
    );
    assert_eq!(
        best.data,
        4 * 2 * 4,
        "4 steps x 2 micro-batches x 4 samples"
    );
    let last = read_training_state::<u64>(&root.join("step-00000008")).unwrap();
    assert_eq!(
        (last.eval_loss, last.best_eval_loss),
        (Some(4.0), Some(1.0))
    );
    // The toy model learned: its loss fell.
    let train: Vec<f64> = s
        .metrics
        .iter()
        .filter_map(Line::train)
        .map(|m| m.losses.loss)
        .collect();
    assert_eq!(train.len(), 8);
    assert!(train[7] < train[0] / 2.0, "{train:?}");
    assert!(out.path().join("loss.png").is_file());
}

#[test]
fn engine_resume_continues_exactly() {
    let device = Default::default();
    let (straight, split) = straight_and_resumed_at_3(|| Toy::new(8));
    let name = "checkpoints/step-00000008";
    assert_eq!(
        weights(&straight.path().join(name)),
        weights(&split.path().join(name))
    );

    // A damaged optimizer state is named, with what to do, and nothing is written.
    let optimizer = split.path().join(name).join("optimizer.mpk");
    let bytes = std::fs::read(&optimizer).unwrap();
    std::fs::write(&optimizer, &bytes[..bytes.len() / 2]).unwrap();
    let mut third = quiet(split.path());
    third.resume = true;
    let err = run_task(
        &mut Toy::new(10),
        &third,
        &mut EngineHooks::default(),
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&optimizer.display().to_string())
            && err.contains("damaged")
            && !err.contains("version"),
        "{err}"
    );
    assert!(!split.path().join("checkpoints/step-00000009").exists());
}

#[test]
fn engine_skips_non_finite_steps_and_stops_at_the_limit() {
    let device = Default::default();
    let out = tempfile::tempdir().unwrap();
    let mut poison = |s: u64| s >= 4;
    let mut hooks = EngineHooks {
        poison_step: Some(&mut poison),
        on_step: None,
    };
    let err = run_task(&mut Toy::new(8), &quiet(out.path()), &mut hooks, &device).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("2 consecutive steps had a non-finite"),
        "{msg}"
    );
    assert!(
        msg.contains("step-00000004"),
        "names the last good checkpoint: {msg}"
    );
    let kept: Vec<u64> = list_checkpoints_with(&out.path().join("checkpoints"), FILES)
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(kept, vec![2, 4]);
}

#[test]
fn a_fresh_run_refuses_a_directory_holding_a_run_unless_told_to_overwrite() {
    let out = tempfile::tempdir().unwrap();
    let device = Default::default();
    let run = |o: &RunOptions| run_task(&mut Toy::new(4), o, &mut EngineHooks::default(), &device);
    run(&quiet(out.path())).unwrap();
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let checkpoints = std::fs::read_dir(out.path().join("checkpoints"))
        .unwrap()
        .count();

    // A second fresh run is refused, naming the directory, and touches nothing.
    let err = run(&quiet(out.path())).unwrap_err().to_string();
    assert!(
        err.contains(&out.path().display().to_string()) && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap(),
        metrics
    );
    assert_eq!(
        std::fs::read_dir(out.path().join("checkpoints"))
            .unwrap()
            .count(),
        checkpoints
    );

    // --overwrite replaces it: the old checkpoints are gone, the new run's are complete.
    std::fs::create_dir_all(out.path().join("checkpoints/step-00000099")).unwrap();
    let mut o = quiet(out.path());
    o.overwrite = true;
    let s = run(&o).unwrap();
    assert_eq!((s.started_at, s.steps), (0, 4));
    assert!(!out.path().join("checkpoints/step-00000099").exists());
    assert!(s.last_checkpoint.unwrap().ends_with("step-00000004"));

    // A file given as the run directory is named as such.
    let file = out.path().join("metrics.jsonl");
    let err = run(&quiet(&file)).unwrap_err().to_string();
    assert!(err.contains("is a file"), "{err}");
}

#[test]
fn fitted_total_fills_the_rest_of_the_budget_at_the_pace_kept() {
    use std::time::Duration;
    use transfusion_train::engine::budget::{fitted_total, REFIT_EVERY, REFIT_SHARE};
    let s = Duration::from_secs_f64;
    // Not before REFIT_EVERY steps of this session.
    assert_eq!(
        fitted_total(10, REFIT_EVERY - 1, s(1.0), s(100.0), 10_000),
        None
    );
    // 100 steps in 10 s of a 100 s budget: 0.1 s a step, (97 - 10) / 0.1 = 870 more.
    assert_eq!(REFIT_SHARE, 0.97);
    assert_eq!(fitted_total(100, 100, s(10.0), s(100.0), 10_000), Some(970));
    // Resumed at step 500: only this session's 100 steps set the pace.
    assert_eq!(
        fitted_total(600, 100, s(10.0), s(100.0), 10_000),
        Some(1470)
    );
    // Kept within [step, max]: a spent budget ends the run at this step.
    assert_eq!(fitted_total(100, 100, s(10.0), s(100.0), 500), Some(500));
    assert_eq!(fitted_total(100, 100, s(99.0), s(100.0), 10_000), Some(100));
}

#[test]
fn a_run_fitted_to_its_budget_decays_its_learning_rate_before_the_budget_ends() {
    use std::time::Duration;
    let device = Default::default();
    let out = tempfile::tempdir().unwrap();
    // Planned for a million steps of at least 2 ms (two 1 ms batches): the budget
    // of 1.5 s fits a few hundred, and the plan is fitted to them while training.
    let mut toy = Toy::new(1_000_000);
    toy.batch_time = Duration::from_millis(1);
    toy.settings.eval_every = 0;
    toy.settings.checkpoint_every = 0;
    let mut opts = quiet(out.path());
    opts.time_budget = Some(Duration::from_millis(1500));
    opts.fit_to_budget = Some(1_000_000);
    let mut lrs = Vec::new();
    let mut record = |r: &ToyStep| lrs.push(r.lr);
    let mut hooks = EngineHooks {
        poison_step: None,
        on_step: Some(&mut record),
    };
    let outcome = run_task(&mut toy, &opts, &mut hooks, &device).unwrap();
    assert!(
        outcome.steps > 50 && outcome.steps < 1_000_000,
        "{}",
        outcome.steps
    );
    // Budget-cut at the million-step plan, the rate would still be at its peak (0.3);
    // fitted, the cosine has (nearly) reached its floor 0.03 by the last step.
    let last = *lrs.last().unwrap();
    assert!(
        last < 0.03 + 0.1 * 0.27,
        "last lr {last}, {} steps",
        outcome.steps
    );
    assert!(outcome.last_checkpoint.is_some() && outcome.last_eval.is_some());
}
