//! The loop: [`train_loop`] (one replica) and [`run_task`] (one device).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};

use super::budget::{fitted_total, REFIT_EVERY};
use super::lead::Lead;
use super::options::RunOptions;
use super::prepare::{prepare, Prepared};
use super::step::{accumulate_with, optimizer_step, LocalStep, SingleDevice, StepSync};
use super::task::{StepFigures, TrainTask};
use crate::checkpoint::{load_optimizer, AdamWOptimizer};
use crate::error::{Result, TrainError};
use crate::lr_schedule::lr_at;
use crate::metrics::{Line, MetricsLog, Record};
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
pub fn train_loop<B: AutodiffBackend, T: TrainTask<B>, S: StepSync<B> + ?Sized>(
    task: &mut T,
    opts: &RunOptions,
    hooks: &mut EngineHooks<T::Step>,
    device: &B::Device,
    prepared: Prepared<B, T>,
    sync: &mut S,
) -> Result<RunOutcome<T::Step, T::Eval>> {
    let Prepared {
        root,
        resume_from,
        mut model,
        mut state,
        ema,
    } = prepared;
    let settings = task.settings();
    let (rank, world) = (sync.rank(), sync.world());
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

    let mut total = settings.steps;
    let end_of = |total: u64| opts.stop_at_step.map_or(total, |s| s.min(total));
    let mut end = end_of(total);
    // Re-planned from the pace only on one device: replicas must agree on the schedule.
    let refit = match (opts.fit_to_budget, opts.time_budget) {
        (Some(max), Some(budget)) if world == 1 => Some((max, budget)),
        _ => None,
    };
    let bar = step_progress_bar(total, state.step, opts.progress && lead.is_some());
    let started = Instant::now();
    let mut consecutive_bad = 0u32;
    let mut window = (Instant::now(), 0u64, 0u64); // (since, tokens, images)

    while state.step < end {
        // One device stops before the step; replicas agree through the step's all-reduce
        // (rank 0's clock decides) and stop after it.
        let budget_reached =
            lead.is_some() && opts.time_budget.is_some_and(|b| started.elapsed() >= b);
        if budget_reached && world == 1 {
            eprintln!("time budget reached at step {}", state.step);
            break;
        }
        let step = state.step;
        let lr = lr_at(&settings.schedule, step, total);
        let mut batches = Vec::with_capacity(settings.grad_accum);
        let mut local = LocalStep {
            stop: budget_reached,
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
        let (next, global, grad_norm) = optimizer_step(
            model,
            &mut optim,
            acc.grads,
            local,
            lr,
            settings.grad_clip,
            sync,
        )?;
        model = next;
        window.1 += global.tokens;
        window.2 += global.images;
        let finite = global.finite;
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
        if let Some((max, budget)) = refit.filter(|_| state.step % REFIT_EVERY == 0) {
            let done_here = state.step - started_at;
            if let Some(t) = fitted_total(state.step, done_here, started.elapsed(), budget, max) {
                // Only one device refits, so this is rank 0: say so when the plan moves 5%.
                if t.abs_diff(total) * 20 > total {
                    let ms = started.elapsed().as_secs_f64() * 1e3 / done_here as f64;
                    let line = format!("re-planned to {t} steps: {ms:.0} ms per step so far");
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        bar.println(line);
                    }
                }
                total = t;
                end = end_of(total);
                bar.set_length(total);
            }
        }
        bar.set_position(state.step);

        if let Some(lead) = lead
            .as_mut()
            .filter(|_| state.step % settings.log_every.max(1) == 0 || !finite || state.step == end)
        {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let record = task.step_record(&StepFigures {
                step: state.step,
                losses: global.losses(units, acc.weights),
                grad_norm,
                lr,
                tokens_per_s: window.1 as f64 / secs,
                images_per_s: window.2 as f64 / secs,
                skipped: state.skipped_steps,
                skipped_this: !finite,
                elapsed_s: started.elapsed().as_secs_f64(),
            });
            window = (Instant::now(), 0, 0);
            bar.set_message(record.summary());
            if let Some(f) = hooks.on_step.as_mut() {
                f(&record);
            }
            lead.log.push(Line::Train(record))?;
        }
        if consecutive_bad >= settings.max_consecutive_nonfinite {
            bar.abandon();
            let last = lead
                .as_ref()
                .and_then(|l| l.last_ckpt.as_ref())
                .map_or("none".to_string(), |p| p.display().to_string());
            return Err(TrainError::Run(format!(
                "stopping: {consecutive_bad} consecutive steps had a non-finite loss or gradient \
                 (last at step {}, lr {lr:.3e}); the last good checkpoint is {last}. Lower the \
                 learning rate, check the data, or raise the non-finite limit \
                 (max_consecutive_nonfinite)",
                state.step
            )));
        }
        if global.stop {
            // Replicas only: the budget ended this step; the final save below follows.
            if lead.is_some() {
                eprintln!("time budget reached at step {}", state.step);
            }
            break;
        }
        let Some(lead) = lead.as_mut().filter(|_| finite) else {
            continue;
        };
        let is_end = state.step == end;
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
    let Some(mut lead) = lead else {
        // Not rank 0: nothing to save or report beyond the step count.
        return Ok(RunOutcome {
            steps: state.step,
            skipped_steps: state.skipped_steps,
            last_eval: None,
            last_checkpoint: None,
            started_at,
            metrics: Vec::new(),
        });
    };
    // Stopped early (time budget) or resumed at the end: make sure the final state is saved.
    if lead.last_ckpt_step != Some(state.step) && consecutive_bad == 0 {
        let evaluated = lead.last_eval.as_ref().map(|e| e.step()) == Some(state.step);
        if settings.eval_at_end && !evaluated {
            lead.evaluate(task, &model, state.step, &bar)?;
        }
        lead.checkpoint(task, &settings, &model, &optim, &mut state)?;
    }
    if !lead.log.lines.is_empty() {
        task.plot(&lead.log.lines, &lead.out.join("loss.png"))?;
    }
    bar.finish();
    Ok(RunOutcome {
        steps: state.step,
        skipped_steps: state.skipped_steps,
        last_eval: lead.last_eval,
        last_checkpoint: lead.last_ckpt,
        started_at,
        metrics: lead.log.lines,
    })
}
