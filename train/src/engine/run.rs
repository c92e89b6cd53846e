//! The loop: [`train_loop`] (one replica) and [`run_task`] (one device).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};

use super::budget::{StepPlan, Window};
use super::lead::Lead;
use super::options::RunOptions;
use super::prepare::{prepare, Prepared};
use super::step::{accumulate_with, optimizer_step, LocalStep, SingleDevice, StepSync};
use super::task::{EngineSettings, StepFigures, TrainTask};
use crate::checkpoint::{load_optimizer, AdamWOptimizer, TrainingState};
use crate::engine::metrics::{Line, MetricsLog, Record};
use crate::error::{Result, TrainError};
use crate::lr_schedule::lr_at;
use crate::optim::adamw;

/// Optional callbacks of the loop.
pub struct EngineHooks<'a, S> {
    /// Fault injection for tests: when it returns true for a step (0-based index), that
    /// step's loss is multiplied by NaN before the backward pass.
    pub poison_step: Option<&'a mut dyn FnMut(u64) -> bool>,
    /// Called with every logged step's record.
    pub on_step: Option<&'a mut dyn FnMut(&S)>,
}

impl<S> Default for EngineHooks<'_, S> {
    fn default() -> Self {
        Self {
            poison_step: None,
            on_step: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunOutcome<S, E> {
    /// Steps done in total (including before a resume).
    pub steps: u64,
    /// Steps skipped for non-finite values, in total.
    pub skipped_steps: u64,
    /// The last evaluation, if any.
    pub last_eval: Option<E>,
    /// The last checkpoint written (or resumed from).
    pub last_checkpoint: Option<PathBuf>,
    /// The step this session started from (0, or the resumed checkpoint's step).
    pub started_at: u64,
    /// Every metrics line of the run.
    pub metrics: Vec<Line<S, E>>,
}

impl<S, E: Record> RunOutcome<S, E> {
    /// Prints the last evaluation (its summary names its split) and the last checkpoint,
    /// when there are any.
    pub fn print_outcome(&self) {
        if let Some(e) = &self.last_eval {
            println!("{}", e.summary());
        }
        if let Some(c) = &self.last_checkpoint {
            println!("checkpoint: {}", c.display());
        }
    }
}

/// Runs `task` on one device: [`prepare`], then [`train_loop`].
pub fn run_task<B: AutodiffBackend, T: TrainTask<B>>(
    task: &mut T,
    opts: &RunOptions,
    hooks: &mut EngineHooks<T::Step>,
    device: &B::Device,
) -> Result<RunOutcome<T::Step, T::Eval>> {
    let prepared = prepare::<B, T>(task, opts, device)?;
    train_loop(task, opts, hooks, device, prepared, &mut SingleDevice)
}

/// The training progress bar (`{bar} pos/len [elapsed<eta] message`) at `position` of
/// `total` steps; hidden when `show` is false.
pub fn step_progress_bar(total: u64, position: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    b.set_position(position);
    b
}

/// The training loop of one replica. Rank 0 logs, evaluates and writes checkpoints; every
/// replica reads the same data stream and trains on the micro-batches whose index is its
/// rank modulo the world size, so `world` replicas with `grad_accum` micro-batches each
/// see exactly the batches of one device with `world * grad_accum`.
///
/// Each iteration has three phases: the step ([`train_step`]), its record
/// ([`log_step`]), then on rank 0 the evaluation and checkpoint the cadences call for;
/// [`finish`] saves what the last iteration left unsaved.
pub fn train_loop<B: AutodiffBackend, T: TrainTask<B>, S: StepSync<B> + ?Sized>(
    task: &mut T,
    opts: &RunOptions,
    hooks: &mut EngineHooks<T::Step>,
    device: &B::Device,
    prepared: Prepared<B, T>,
    sync: &mut S,
) -> Result<RunOutcome<T::Step, T::Eval>> {
    let Prepared {
        lock: _lock,
        root,
        resume_from,
        mut model,
        mut state,
        ema,
    } = prepared;
    let settings = task.settings();
    let rank = sync.rank();
    let mut optim: AdamWOptimizer<T::Model, B> = adamw(&settings.optimizer).init();
    if let Some(dir) = &resume_from {
        optim = load_optimizer(dir, &model, optim, device)?;
    }
    let started_at = state.step;
    task.start_data(resume_from.as_ref().map(|_| &state.data))?;
    let mut lead: Option<Lead<B, T>> = if rank == 0 {
        Some(Lead {
            log: MetricsLog::open(&opts.out, resume_from.as_ref().map(|_| state.step))?,
            out: opts.out.clone(),
            root,
            last_ckpt: resume_from.clone(),
            last_ckpt_step: resume_from.as_ref().map(|_| state.step),
            last_eval: None,
            ema,
        })
    } else {
        None
    };
    let mut plan = StepPlan::new(opts, settings.steps, sync.world());
    let bar = step_progress_bar(plan.total, state.step, opts.progress && lead.is_some());
    let started = Instant::now();
    let mut consecutive_bad = 0u32;
    let mut window = Window::start();

    while state.step < plan.end {
        // One device stops before the step; replicas agree through the step's all-reduce
        // (rank 0's clock decides) and stop after it.
        let budget_reached =
            lead.is_some() && opts.time_budget.is_some_and(|b| started.elapsed() >= b);
        if budget_reached && sync.world() == 1 {
            eprintln!("time budget reached at step {}", state.step);
            break;
        }
        let step = state.step;
        let lr = lr_at(&settings.schedule, step, plan.total);
        let (next, done) = train_step(
            task,
            hooks,
            model,
            &mut optim,
            &settings,
            (step, lr, budget_reached),
            device,
            sync,
        )?;
        model = next;
        window.add(&done.global);
        let finite = done.global.finite;
        if let Some(lead) = lead.as_mut().filter(|_| finite) {
            lead.update_ema(&settings, &model, step);
        }
        if finite {
            consecutive_bad = 0;
        } else {
            state.skipped_steps += 1;
            consecutive_bad += 1;
        }
        state.step += 1;
        plan.replan(state.step, state.step - started_at, started.elapsed(), &bar);
        bar.set_position(state.step);

        let logged =
            state.step % settings.log_every.max(1) == 0 || !finite || state.step == plan.end;
        if let Some(lead) = lead.as_mut().filter(|_| logged) {
            let skipped = (state.skipped_steps, !finite);
            let record = log_step(task, &done, state.step, skipped, &mut window, started);
            bar.set_message(record.summary());
            if let Some(f) = hooks.on_step.as_mut() {
                f(&record);
            }
            lead.log.push(Line::Train(record))?;
        }
        if consecutive_bad >= settings.max_consecutive_nonfinite {
            bar.abandon();
            let last = lead.as_ref().and_then(|l| l.last_ckpt.as_ref());
            return Err(nonfinite_stop(consecutive_bad, state.step, lr, last));
        }
        if done.global.stop {
            // Replicas only: the budget ended this step; the final save below follows.
            if lead.is_some() {
                eprintln!("time budget reached at step {}", state.step);
            }
            break;
        }
        let Some(lead) = lead.as_mut().filter(|_| finite) else {
            continue;
        };
        let is_end = state.step == plan.end;
        if (settings.eval_every > 0 && state.step % settings.eval_every == 0)
            || (is_end && settings.eval_at_end)
        {
            lead.evaluate(task, &model, state.step, &bar)?;
        }
        if (settings.checkpoint_every > 0 && state.step % settings.checkpoint_every == 0) || is_end
        {
            lead.checkpoint(task, &settings, &model, &optim, &mut state)?;
        }
    }
    let outcome = match lead {
        Some(lead) => {
            let save = consecutive_bad == 0;
            finish(
                lead,
                task,
                &settings,
                (&model, &optim, save),
                &mut state,
                &bar,
            )?
        }
        // Not rank 0: nothing to save or report beyond the step count.
        None => RunOutcome {
            steps: state.step,
            skipped_steps: state.skipped_steps,
            last_eval: None,
            last_checkpoint: None,
            started_at: 0,
            metrics: Vec::new(),
        },
    };
    bar.finish();
    Ok(RunOutcome {
        started_at,
        ..outcome
    })
}

/// What one optimizer step did, as the phases after it need it.
struct StepDone {
    /// The step's figures over every replica.
    global: LocalStep,
    /// The global gradient norm before clipping.
    grad_norm: f64,
    /// The learning rate of the step.
    lr: f64,
    /// The step's loss units (text targets, image latents) over every replica.
    units: [u64; 2],
    /// The weights of the loss parts in the objective.
    weights: [f64; 2],
}

/// The step phase: this replica's micro-batches, their gradients, the all-reduce and the
/// optimizer update (`at`: the step's index, learning rate, and whether rank 0's time
/// budget ends the run after it).
#[allow(clippy::too_many_arguments)]
fn train_step<B: AutodiffBackend, T: TrainTask<B>, S: StepSync<B> + ?Sized>(
    task: &mut T,
    hooks: &mut EngineHooks<T::Step>,
    model: T::Model,
    optim: &mut AdamWOptimizer<T::Model, B>,
    settings: &EngineSettings,
    (step, lr, stop): (u64, f64, bool),
    device: &B::Device,
    sync: &mut S,
) -> Result<(T::Model, StepDone)> {
    let (rank, world) = (sync.rank(), sync.world());
    let mut batches = Vec::with_capacity(settings.grad_accum);
    let mut local = LocalStep {
        stop,
        ..LocalStep::default()
    };
    let mut units = [0u64; 2];
    for _ in 0..settings.grad_accum {
        for r in 0..world {
            if let Some((batch, work)) = task.next_batch(r == rank, device)? {
                local.tokens += work.tokens;
                local.images += work.images;
                units[0] += work.units[0];
                units[1] += work.units[1];
                batches.push(batch);
            }
        }
    }
    let units = sync.sum_units(units)?;
    let poison = hooks.poison_step.as_mut().is_some_and(|f| f(step));
    let acc = accumulate_with(&model, batches, units, poison, |m, b, objective| {
        task.gradients(m, b, step, objective)
    });
    local.sums = acc.sums;
    local.finite = acc.finite;
    let (model, global, grad_norm) =
        optimizer_step(model, optim, acc.grads, local, lr, settings.grad_clip, sync)?;
    let done = StepDone {
        global,
        grad_norm,
        lr,
        units,
        weights: acc.weights,
    };
    Ok((model, done))
}

/// The record phase: the task's record of the step that brought the run to `step`
/// (`skipped`: the run's skipped steps, and whether this one was), with the throughput
/// since the last record.
fn log_step<B: AutodiffBackend, T: TrainTask<B>>(
    task: &T,
    done: &StepDone,
    step: u64,
    (skipped, skipped_this): (u64, bool),
    window: &mut Window,
    started: Instant,
) -> T::Step {
    let (tokens_per_s, images_per_s) = window.rates();
    *window = Window::start();
    task.step_record(&StepFigures {
        step,
        losses: done.global.losses(done.units, done.weights),
        grad_norm: done.grad_norm,
        lr: done.lr,
        tokens_per_s,
        images_per_s,
        skipped,
        skipped_this,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// The error that stops a run after `bad` non-finite steps in a row, naming the last good
/// checkpoint.
fn nonfinite_stop(bad: u32, step: u64, lr: f64, last: Option<&PathBuf>) -> TrainError {
    let last = last.map_or("none".to_string(), |p| p.display().to_string());
    TrainError::Run(format!(
        "stopping: {bad} consecutive steps had a non-finite loss or gradient (last at step \
         {step}, lr {lr:.3e}); the last good checkpoint is {last}. Lower the learning rate, \
         check the data, or raise the non-finite limit (max_consecutive_nonfinite)"
    ))
}

/// The last phase on rank 0: a run stopped early (time budget) or resumed at its end gets
/// its final evaluation and checkpoint (when `save`: its last step was finite), and the
/// loss plot is drawn.
fn finish<B: AutodiffBackend, T: TrainTask<B>>(
    mut lead: Lead<B, T>,
    task: &mut T,
    settings: &EngineSettings,
    (model, optim, save): (&T::Model, &AdamWOptimizer<T::Model, B>, bool),
    state: &mut TrainingState<T::DataState>,
    bar: &ProgressBar,
) -> Result<RunOutcome<T::Step, T::Eval>> {
    if save && lead.last_ckpt_step != Some(state.step) {
        let evaluated = lead.last_eval.as_ref().map(|e| e.step()) == Some(state.step);
        if settings.eval_at_end && !evaluated {
            lead.evaluate(task, model, state.step, bar)?;
        }
        lead.checkpoint(task, settings, model, optim, state)?;
    }
    if !lead.log.lines.is_empty() {
        task.plot(&lead.log.lines, &lead.out.join("loss.png"))?;
    }
    Ok(RunOutcome {
        steps: state.step,
        skipped_steps: state.skipped_steps,
        last_eval: lead.last_eval,
        last_checkpoint: lead.last_ckpt,
        started_at: 0,
        metrics: lead.log.lines,
    })
}
