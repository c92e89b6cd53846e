//! The training loop: [`run_training`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use transfusion_data::packing::PackedRow;
use transfusion_data::pipeline::{DataPipeline, PipelineState};
use transfusion_data::prefetch::Prefetcher;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_infer::checkpoint::{load_model, ModelMeta};
use transfusion_model::{Transfusion, TransfusionBatch, TransfusionConfig};

use crate::checkpoint::{
    latest_checkpoint, load_optimizer, prune, read_state, remove_leftovers, step_dir_name,
    write_checkpoint, CheckpointParts, TrainOptimizer, TrainingState, BEST_DIR,
};
use crate::config::ExperimentConfig;
use crate::data::{build_pipeline, load_tokenizer, Split};
use crate::metrics::{EvalMetrics, MetricsLine, MetricsLog, StepMetrics};
use crate::optim::{adamw, all_finite, clip_global_norm};
use crate::plot::plot_losses;
use crate::schedule::lr_at;

/// How to run (not part of the experiment).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Run directory: `metrics.jsonl`, `loss.png`, `config.json`, `checkpoints/`.
    pub out: PathBuf,
    /// Continue from the newest complete checkpoint in `out/checkpoints` (fresh start when
    /// there is none).
    pub resume: bool,
    /// Show a progress bar (off in tests).
    pub progress: bool,
    /// Stop (with a checkpoint) once this many steps are done in total, before the
    /// schedule's end: simulates a killed run in tests, or splits a run in sessions.
    pub stop_at_step: Option<u64>,
    /// Stop (with a checkpoint and a final evaluation) after this much wall-clock time.
    pub time_budget: Option<Duration>,
    /// Directory the config file was read from (relative tokenizer paths).
    pub config_dir: Option<PathBuf>,
}

impl RunOptions {
    /// Defaults: no resume, progress bar on, no early stop.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            progress: true,
            stop_at_step: None,
            time_budget: None,
            config_dir: None,
        }
    }
}

/// Called at each evaluation with the current weights (no autodiff graph), the step and
/// the run directory: the inference crate plugs image and caption previews in here.
pub trait PreviewHook<B: Backend> {
    /// Writes previews for `step` (e.g. `out/previews/step-N.png`).
    fn preview(&mut self, model: &Transfusion<B>, step: u64, out: &Path) -> anyhow::Result<()>;
}

impl<B: Backend, F> PreviewHook<B> for F
where
    F: FnMut(&Transfusion<B>, u64, &Path) -> anyhow::Result<()>,
{
    fn preview(&mut self, model: &Transfusion<B>, step: u64, out: &Path) -> anyhow::Result<()> {
        self(model, step, out)
    }
}

/// Optional callbacks of a run.
pub struct TrainHooks<B: AutodiffBackend> {
    /// Previews at evaluation time.
    pub preview: Option<Box<dyn PreviewHook<B::InnerBackend>>>,
    /// Fault injection for tests: when it returns true for a step (0-based index), that
    /// step's loss is multiplied by NaN before the backward pass.
    pub poison_step: Option<Box<dyn FnMut(u64) -> bool>>,
    /// Called after every step with its metrics (the demo's own reporting).
    pub on_step: Option<Box<dyn FnMut(&StepMetrics)>>,
}

impl<B: AutodiffBackend> Default for TrainHooks<B> {
    fn default() -> Self {
        Self {
            preview: None,
            poison_step: None,
            on_step: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps done in total (including before a resume).
    pub steps: u64,
    /// Steps skipped for non-finite values, in total.
    pub skipped_steps: u64,
    /// The last evaluation, if any.
    pub last_eval: Option<EvalMetrics>,
    /// The last checkpoint written (or resumed from).
    pub last_checkpoint: Option<PathBuf>,
    /// The step this session started from (0, or the resumed checkpoint's step).
    pub started_at: u64,
    /// Every metrics line of the run.
    pub metrics: Vec<MetricsLine>,
    /// The model config trained.
    pub model: TransfusionConfig,
}

impl RunSummary {
    /// Prints the last held-out evaluation and the last checkpoint, when there are any.
    pub fn print_outcome(&self) {
        if let Some(e) = &self.last_eval {
            println!(
                "held-out: perplexity {:.3}, diffusion {}",
                e.perplexity,
                e.diffusion_summary()
            );
        }
        if let Some(c) = &self.last_checkpoint {
            println!("checkpoint: {}", c.display());
        }
    }
}

enum Feed {
    Direct(DataPipeline),
    Prefetch(Prefetcher),
}

impl Feed {
    fn next_rows(&mut self) -> anyhow::Result<Vec<PackedRow>> {
        Ok(match self {
            Feed::Direct(p) => p.next_rows()?,
            Feed::Prefetch(p) => p.next_rows()?,
        })
    }
    fn batcher(&self) -> &transfusion_data::batcher::TransfusionBatcher {
        match self {
            Feed::Direct(p) => p.batcher(),
            Feed::Prefetch(p) => p.batcher(),
        }
    }
    fn state(&self) -> PipelineState {
        match self {
            Feed::Direct(p) => p.state(),
            Feed::Prefetch(p) => p.state(),
        }
    }
}

/// Loss on the held-out split: LM NLL over all text targets, and the diffusion loss of the
/// same images at each fixed timestep (the batch's timesteps replaced by `t`, its noise
/// kept), so values are comparable across runs and steps.
pub fn evaluate<B: Backend>(
    model: &Transfusion<B>,
    pipeline: &mut DataPipeline,
    batches: usize,
    timesteps: &[u32],
    lambda: f64,
    device: &B::Device,
    step: u64,
) -> anyhow::Result<EvalMetrics> {
    let (mut nll_sum, mut count) = (0.0f64, 0.0f64);
    let mut diff_sum = vec![0.0f64; timesteps.len()];
    let mut images = 0usize;
    for _ in 0..batches {
        let rows = pipeline.next_rows()?;
        let batch = pipeline.batcher().batch::<B>(rows, device)?;
        let n_img = batch.num_images();
        let loss = model.forward_loss(batch.clone());
        let v: Vec<f32> = Tensor::cat(vec![loss.lm, loss.lm_targets], 0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("float data");
        nll_sum += v[0] as f64 * v[1] as f64;
        count += v[1] as f64;
        if n_img > 0 {
            for (i, &t) in timesteps.iter().enumerate() {
                let mut b = batch.clone();
                b.timesteps = Tensor::<B, 1, Int>::full([n_img], t as i64, device);
                let d = model.forward_loss(b).diffusion.into_scalar().elem::<f64>();
                diff_sum[i] += d * n_img as f64;
            }
            images += n_img;
        }
    }
    let lm_nll = if count > 0.0 {
        nll_sum / count
    } else {
        f64::NAN
    };
    let diffusion: Vec<(u32, f64)> = timesteps
        .iter()
        .zip(&diff_sum)
        .map(|(&t, &s)| {
            (
                t,
                if images > 0 {
                    s / images as f64
                } else {
                    f64::NAN
                },
            )
        })
        .collect();
    let mean_diff = if images > 0 && !diffusion.is_empty() {
        diffusion.iter().map(|(_, v)| v).sum::<f64>() / diffusion.len() as f64
    } else {
        0.0
    };
    let lm_part = if count > 0.0 { lm_nll } else { 0.0 };
    Ok(EvalMetrics {
        step,
        lm_nll,
        perplexity: lm_nll.exp(),
        lm_targets: count,
        diffusion,
        images,
        loss: lm_part + lambda * mean_diff,
    })
}

static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `m.init` right after seeding the backend's RNG with `seed`, under a process-wide lock:
/// Burn's backend RNG is global, so two runs initialising at the same time (tests, the
/// demo) would otherwise interleave their draws and get different weights.
pub fn seeded_init<B: Backend>(
    m: &TransfusionConfig,
    device: &B::Device,
    seed: u64,
) -> Transfusion<B> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    B::seed(device, seed);
    m.init::<B>(device)
}

/// [`seeded_init`], then every parameter materialised under the same lock. Burn creates
/// parameters lazily: their random values are drawn at first use, after `seeded_init` has
/// returned. Data-parallel replicas are copies of one model, and a copy of a lazy parameter
/// draws its own values, so the model is materialised before it is copied. The values
/// differ from a lazily initialised model with the same seed (the draws happen in another
/// order), so a fresh data-parallel run does not start from the single-device weights;
/// resumed runs are interchangeable.
#[cfg_attr(not(feature = "collective"), allow(dead_code))]
pub(crate) fn seeded_init_eager<B: Backend>(
    m: &TransfusionConfig,
    device: &B::Device,
    seed: u64,
) -> Transfusion<B> {
    seeded_materialized(device, seed, || m.init::<B>(device))
}

/// Builds a module with `init` from the backend's generator seeded with `seed`, and draws
/// every (lazy) parameter before releasing the init lock, so concurrent runs in one
/// process (tests) cannot interleave their draws.
pub(crate) fn seeded_materialized<B: Backend, M: burn::module::Module<B>>(
    device: &B::Device,
    seed: u64,
    init: impl FnOnce() -> M,
) -> M {
    struct Touch;
    impl<B: Backend> burn::module::ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    B::seed(device, seed);
    let module = init();
    module.visit(&mut Touch);
    module
}

/// Gradients of one optimizer step over `batches` (micro-batches): each loss is scaled by
/// `1 / batches.len()` and the gradients summed (Burn's `GradientsAccumulator`), so the
/// result is the gradient of the mean of the micro-batch losses. Returns the gradients,
/// the mean `[total, lm, diffusion]` and whether every loss was finite. `poison`
/// multiplies the losses by NaN (fault injection for tests).
pub fn accumulate_grads<B: AutodiffBackend>(
    model: &Transfusion<B>,
    batches: Vec<TransfusionBatch<B>>,
    poison: bool,
) -> (GradientsParams, [f64; 3], bool) {
    let accum = batches.len().max(1);
    let mut sums = [0.0f64; 3];
    let mut finite = true;
    let mut accumulator = GradientsAccumulator::<Transfusion<B>>::new();
    let mut single: Option<GradientsParams> = None;
    for batch in batches {
        let loss = model.forward_loss(batch);
        let mut total_loss = loss.total;
        if poison {
            total_loss = total_loss.mul_scalar(f32::NAN);
        }
        let vals: Vec<f32> = Tensor::cat(
            vec![
                total_loss.clone().detach(),
                loss.lm.detach(),
                loss.diffusion.detach(),
            ],
            0,
        )
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("float data");
        for (s, v) in sums.iter_mut().zip(&vals) {
            *s += *v as f64 / accum as f64;
            finite &= v.is_finite();
        }
        let scaled = if accum > 1 {
            total_loss.div_scalar(accum as f64)
        } else {
            total_loss
        };
        let grads = GradientsParams::from_grads(scaled.backward(), model);
        if accum > 1 {
            accumulator.accumulate(model, grads);
        } else {
            single = Some(grads);
        }
    }
    let grads = single.unwrap_or_else(|| accumulator.grads());
    (grads, sums, finite)
}

/// One replica's share of an optimizer step, before combining with the other replicas.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalStep {
    /// Mean `[total, lm, diffusion]` over this replica's micro-batches.
    pub sums: [f64; 3],
    /// Whether every loss of this replica was finite.
    pub finite: bool,
    /// Text and image positions this replica trained on.
    pub tokens: u64,
    /// Images this replica trained on.
    pub images: u64,
    /// This replica asks every replica to stop after this step (rank 0's time budget).
    pub stop: bool,
}

/// How replicas combine their steps. On one device it is the identity ([`SingleDevice`]);
/// data-parallel training (feature `collective`) all-reduces with Burn's collective.
pub trait StepSync<B: AutodiffBackend> {
    /// This replica's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// The number of replicas.
    fn world(&self) -> usize;
    /// Combines this replica's gradients and step figures with the other replicas': the
    /// gradients become the mean over replicas (identical on every replica), `sums` the
    /// mean, `finite` the conjunction, `tokens`/`images` the totals, `stop` the disjunction.
    fn sync(
        &mut self,
        model: &Transfusion<B>,
        grads: GradientsParams,
        local: LocalStep,
    ) -> anyhow::Result<(GradientsParams, LocalStep)>;
}

/// The identity [`StepSync`]: one replica.
pub struct SingleDevice;

impl<B: AutodiffBackend> StepSync<B> for SingleDevice {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn sync(
        &mut self,
        _model: &Transfusion<B>,
        grads: GradientsParams,
        local: LocalStep,
    ) -> anyhow::Result<(GradientsParams, LocalStep)> {
        Ok((grads, local))
    }
}

/// One optimizer step of one replica: its micro-batches' gradients, combined with the other
/// replicas' by `sync` (before clipping, so every replica clips and updates identically),
/// global-norm clipping, and the AdamW update when everything is finite. Returns the
/// updated model, the combined step figures and the gradient norm before clipping.
#[allow(clippy::too_many_arguments)]
pub fn train_step<B: AutodiffBackend, S: StepSync<B> + ?Sized>(
    model: Transfusion<B>,
    optim: &mut TrainOptimizer<B>,
    batches: Vec<TransfusionBatch<B>>,
    poison: bool,
    lr: f64,
    grad_clip: f64,
    mut local: LocalStep,
    sync: &mut S,
) -> anyhow::Result<(Transfusion<B>, LocalStep, f64)> {
    let (grads, sums, finite) = accumulate_grads(&model, batches, poison);
    local.sums = sums;
    local.finite = finite;
    let (mut grads, global) = sync.sync(&model, grads, local)?;
    let grad_norm = clip_global_norm::<B, _>(&model, &mut grads, grad_clip);
    let mut global = global;
    global.finite &= grad_norm.is_finite();
    let model = if global.finite {
        optim.step(lr, model, grads)
    } else {
        model
    };
    Ok((model, global, grad_norm))
}

struct Session<'a, B: AutodiffBackend> {
    cfg: &'a ExperimentConfig,
    m: TransfusionConfig,
    tokenizer: Arc<TextTokenizer>,
    meta: ModelMeta,
    root: PathBuf,
    device: B::Device,
}

impl<B: AutodiffBackend> Session<'_, B> {
    fn eval(
        &self,
        model: &Transfusion<B>,
        step: u64,
        hooks: &mut TrainHooks<B>,
        out: &Path,
    ) -> anyhow::Result<EvalMetrics> {
        let valid = model.valid();
        let mut pipe = build_pipeline(
            self.cfg,
            &self.m,
            &self.tokenizer,
            Split::HeldOut,
            self.cfg.training.batch_size,
        )?;
        let e = evaluate::<B::InnerBackend>(
            &valid,
            &mut pipe,
            self.cfg.eval.batches,
            &self.cfg.eval.timesteps,
            self.m.diffusion_loss_weight,
            &self.device,
            step,
        )?;
        if let Some(p) = hooks.preview.as_mut() {
            p.preview(&valid, step, out).context("preview hook")?;
        }
        Ok(e)
    }

    fn save(
        &self,
        name: &str,
        model: &Transfusion<B>,
        optim: &TrainOptimizer<B>,
        state: &TrainingState,
    ) -> anyhow::Result<PathBuf> {
        let mut meta = self.meta.clone();
        meta.step = state.step;
        write_checkpoint(
            &self.root,
            name,
            &CheckpointParts {
                model,
                optim,
                meta: &meta,
                tokenizer: &self.tokenizer,
                config: self.cfg,
                state,
            },
        )
    }
}

/// Trains `cfg` on `device` (see the crate docs for the loop and the files it writes).
pub fn run_training<B: AutodiffBackend>(
    cfg: &ExperimentConfig,
    opts: &RunOptions,
    hooks: &mut TrainHooks<B>,
    device: &B::Device,
) -> anyhow::Result<RunSummary> {
    let prepared = prepare::<B>(cfg, opts, device, false)?;
    train_loop(cfg, opts, hooks, device, prepared, &mut SingleDevice)
}

/// What every replica starts from: the run's tokenizer, model config and directories, and
/// the model and training state (fresh, or from the newest complete checkpoint).
pub(crate) struct Prepared<B: AutodiffBackend> {
    pub tokenizer: Arc<TextTokenizer>,
    pub m: TransfusionConfig,
    pub meta: ModelMeta,
    pub root: PathBuf,
    pub resume_from: Option<PathBuf>,
    pub model: Transfusion<B>,
    pub state: TrainingState,
}

impl<B: AutodiffBackend> Prepared<B> {
    /// The same start on another device: the weights are copied and keep their parameter
    /// ids, so replicas' gradients line up in the all-reduce.
    #[cfg_attr(not(feature = "collective"), allow(dead_code))]
    pub fn replica_on(&self, device: &B::Device) -> Self {
        Self {
            tokenizer: self.tokenizer.clone(),
            m: self.m.clone(),
            meta: self.meta.clone(),
            root: self.root.clone(),
            resume_from: self.resume_from.clone(),
            model: self.model.clone().fork(device),
            state: self.state.clone(),
        }
    }
}

/// Validates the config, sets up the run directory (leftovers of interrupted checkpoint
/// writes removed, `config.json` written) and builds or loads the model on `device`.
/// `eager_init`: materialise a fresh model's parameters now ([`seeded_init_eager`]), for
/// data-parallel runs that copy it.
pub(crate) fn prepare<B: AutodiffBackend>(
    cfg: &ExperimentConfig,
    opts: &RunOptions,
    device: &B::Device,
    eager_init: bool,
) -> anyhow::Result<Prepared<B>> {
    let tokenizer = Arc::new(load_tokenizer(cfg, opts.config_dir.as_deref())?);
    let m = cfg.validate(tokenizer.vocab_size())?;
    let precision = cfg.training.precision;
    precision
        .check_backend::<B>(device)
        .map_err(|e| anyhow::anyhow!("training.precision: {e}"))?;
    let out = opts.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root)?;
    let leftovers = remove_leftovers(&root);
    if leftovers > 0 {
        eprintln!(
            "removed {leftovers} incomplete checkpoint write(s) in {}",
            root.display()
        );
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    let meta = ModelMeta {
        model: m.clone(),
        special_tokens: *tokenizer.special(),
        image_size: cfg.data.image_size,
        autoencoder: crate::data::autoencoder_for(cfg)?,
        step: 0,
    };
    let resume_from = if opts.resume {
        let l = latest_checkpoint(&root);
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
    let (model, state) = match &resume_from {
        Some(dir) => {
            let state = read_state(dir)?;
            let (model, saved_meta, _) = load_model::<B>(dir, device)?;
            if saved_meta.model != m {
                bail!(
                    "{}: the checkpoint's model config differs from this run's; resume with the \
                     same config (or without --config to use the checkpoint's)",
                    dir.display()
                );
            }
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
            (model, state)
        }
        None => (
            if eager_init {
                seeded_init_eager::<B>(&m, device, cfg.seed)
            } else {
                seeded_init::<B>(&m, device, cfg.seed)
            },
            TrainingState {
                step: 0,
                skipped_steps: 0,
                pipeline: PipelineState::default(),
                seed: cfg.seed,
                best_eval_loss: None,
                eval_loss: None,
            },
        ),
    };
    Ok(Prepared {
        tokenizer,
        m,
        meta,
        root,
        resume_from,
        model: model.with_precision(precision),
        state,
    })
}

/// The training loop of one replica. Rank 0 logs, evaluates, previews and writes
/// checkpoints; every replica reads the same data stream and trains on the micro-batches
/// whose index is its rank modulo the world size, so `world` replicas with `grad_accum`
/// micro-batches each see exactly the batches of one device with `world * grad_accum`.
pub(crate) fn train_loop<B: AutodiffBackend, S: StepSync<B> + ?Sized>(
    cfg: &ExperimentConfig,
    opts: &RunOptions,
    hooks: &mut TrainHooks<B>,
    device: &B::Device,
    prepared: Prepared<B>,
    sync: &mut S,
) -> anyhow::Result<RunSummary> {
    let Prepared {
        tokenizer,
        m,
        meta,
        root,
        resume_from,
        mut model,
        mut state,
    } = prepared;
    let (rank, world) = (sync.rank(), sync.world());
    let lead = rank == 0;
    let out = opts.out.clone();
    let session = Session::<B> {
        cfg,
        m: m.clone(),
        tokenizer: tokenizer.clone(),
        meta,
        root: root.clone(),
        device: device.clone(),
    };
    let mut optim: TrainOptimizer<B> = adamw(&cfg.optimizer).init();
    if let Some(dir) = &resume_from {
        optim = load_optimizer(dir, &model, optim, device)?;
    }
    let started_at = state.step;
    let mut pipeline = build_pipeline(cfg, &m, &tokenizer, Split::Train, cfg.training.batch_size)?;
    if resume_from.is_some() {
        pipeline.restore(&state.pipeline)?;
    }
    let mut feed = if cfg.data.prefetch > 0 {
        Feed::Prefetch(Prefetcher::spawn(pipeline, cfg.data.prefetch)?)
    } else {
        Feed::Direct(pipeline)
    };
    let mut log = if lead {
        Some(MetricsLog::open(
            &out,
            resume_from.as_ref().map(|_| state.step),
        )?)
    } else {
        None
    };

    let total = cfg.training.steps;
    let end = opts.stop_at_step.map_or(total, |s| s.min(total));
    let bar = step_progress_bar(total, state.step, opts.progress && lead);
    let started = Instant::now();
    let mut consecutive_bad = 0u32;
    let mut last_ckpt = resume_from.clone();
    let mut last_ckpt_step = resume_from.as_ref().map(|_| state.step);
    let mut last_eval: Option<EvalMetrics> = None;
    let mut last_eval_step: Option<u64> = None;
    let mut window = (Instant::now(), 0u64, 0u64); // (since, tokens, images)
    let accum = cfg.training.grad_accum;

    while state.step < end {
        // One device stops before the step; replicas agree through the step's all-reduce
        // (rank 0's clock decides) and stop after it.
        let budget_reached = lead && opts.time_budget.is_some_and(|b| started.elapsed() >= b);
        if budget_reached && world == 1 {
            eprintln!("time budget reached at step {}", state.step);
            break;
        }
        let step = state.step;
        let lr = lr_at(&cfg.schedule, step, total);
        let mut batches = Vec::with_capacity(accum);
        let mut local = LocalStep {
            stop: budget_reached,
            ..LocalStep::default()
        };
        for _ in 0..accum {
            for r in 0..world {
                let rows = feed.next_rows()?;
                if r != rank {
                    continue;
                }
                local.tokens += rows.iter().map(|r| r.used() as u64).sum::<u64>();
                local.images += rows.iter().map(|r| r.images.len() as u64).sum::<u64>();
                batches.push(feed.batcher().batch::<B>(rows, device)?);
            }
        }
        let poison = hooks.poison_step.as_mut().is_some_and(|f| f(step));
        let (next, global, grad_norm) = train_step(
            model,
            &mut optim,
            batches,
            poison,
            lr,
            cfg.training.grad_clip,
            local,
            sync,
        )?;
        model = next;
        window.1 += global.tokens;
        window.2 += global.images;
        let (sums, finite) = (global.sums, global.finite);
        if finite {
            consecutive_bad = 0;
        } else {
            state.skipped_steps += 1;
            consecutive_bad += 1;
        }
        state.step += 1;
        bar.set_position(state.step);

        if let Some(log) = log
            .as_mut()
            .filter(|_| state.step % cfg.training.log_every == 0 || !finite || state.step == end)
        {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let sm = StepMetrics {
                step: state.step,
                total: sums[0],
                lm: sums[1],
                diffusion: sums[2],
                grad_norm,
                lr,
                tokens_per_s: window.1 as f64 / secs,
                images_per_s: window.2 as f64 / secs,
                skipped: state.skipped_steps,
                skipped_this: !finite,
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            window = (Instant::now(), 0, 0);
            bar.set_message(format!(
                "lm {:.3} diff {:.4} | {:.0} tok/s | lr {:.2e}{}",
                sm.lm,
                sm.diffusion,
                sm.tokens_per_s,
                sm.lr,
                if state.skipped_steps > 0 {
                    format!(" | skipped {}", state.skipped_steps)
                } else {
                    String::new()
                }
            ));
            if let Some(f) = hooks.on_step.as_mut() {
                f(&sm);
            }
            log.push(MetricsLine::Train(sm))?;
        }
        if consecutive_bad >= cfg.training.max_consecutive_nonfinite {
            bar.abandon();
            bail!(
                "stopping: {consecutive_bad} consecutive steps had a non-finite loss or gradient \
                 (last at step {}, lr {lr:.3e}); the last good checkpoint is {}. Lower \
                 schedule.lr, check the data, or raise training.max_consecutive_nonfinite",
                state.step,
                last_ckpt
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string())
            );
        }
        if global.stop {
            // Replicas only: the budget ended this step; the final save below follows.
            if lead {
                eprintln!("time budget reached at step {}", state.step);
            }
            break;
        }
        if !finite {
            continue;
        }
        let Some(log) = log.as_mut() else {
            continue;
        };

        let is_end = state.step == end;
        let eval_due =
            (cfg.eval.every > 0 && state.step % cfg.eval.every == 0) || (is_end && cfg.eval.at_end);
        if eval_due {
            let e = session.eval(&model, state.step, hooks, &out)?;
            bar.println(format!(
                "eval @ {}: ppl {:.3}, diffusion {}",
                state.step,
                e.perplexity,
                e.diffusion_summary()
            ));
            log.push(MetricsLine::Eval(e.clone()))?;
            plot_losses(&log.lines, &out.join("loss.png"))?;
            last_eval = Some(e);
            last_eval_step = Some(state.step);
        }
        let ckpt_due =
            (cfg.checkpoint.every > 0 && state.step % cfg.checkpoint.every == 0) || is_end;
        if ckpt_due {
            maybe_checkpoint(
                &session,
                &model,
                &optim,
                &mut state,
                &feed,
                last_eval
                    .as_ref()
                    .filter(|_| last_eval_step == Some(step + 1)),
                &mut last_ckpt,
                &mut last_ckpt_step,
            )?;
        }
    }
    let Some(mut log) = log else {
        // Not rank 0: nothing to save or report beyond the step count.
        return Ok(RunSummary {
            steps: state.step,
            skipped_steps: state.skipped_steps,
            last_eval: None,
            last_checkpoint: None,
            started_at,
            metrics: Vec::new(),
            model: m,
        });
    };
    // Stopped early (time budget) or resumed at the end: make sure the final state is saved.
    if last_ckpt_step != Some(state.step) && consecutive_bad == 0 {
        let now = state.step;
        if cfg.eval.at_end && last_eval_step != Some(state.step) {
            let e = session.eval(&model, state.step, hooks, &out)?;
            log.push(MetricsLine::Eval(e.clone()))?;
            plot_losses(&log.lines, &out.join("loss.png"))?;
            last_eval = Some(e);
            last_eval_step = Some(state.step);
        }
        maybe_checkpoint(
            &session,
            &model,
            &optim,
            &mut state,
            &feed,
            last_eval.as_ref().filter(|_| last_eval_step == Some(now)),
            &mut last_ckpt,
            &mut last_ckpt_step,
        )?;
    }
    if !log.lines.is_empty() {
        plot_losses(&log.lines, &out.join("loss.png"))?;
    }
    bar.finish();
    Ok(RunSummary {
        steps: state.step,
        skipped_steps: state.skipped_steps,
        last_eval,
        last_checkpoint: last_ckpt,
        started_at,
        metrics: log.lines.clone(),
        model: m,
    })
}

/// The training progress bar (`{bar} pos/len [elapsed<eta] message`) at `position` of
/// `total` steps; hidden when `show` is false. Shared by every training loop.
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

#[allow(clippy::too_many_arguments)]
fn maybe_checkpoint<B: AutodiffBackend>(
    session: &Session<B>,
    model: &Transfusion<B>,
    optim: &TrainOptimizer<B>,
    state: &mut TrainingState,
    feed: &Feed,
    eval: Option<&EvalMetrics>,
    last_ckpt: &mut Option<PathBuf>,
    last_ckpt_step: &mut Option<u64>,
) -> anyhow::Result<()> {
    if !all_finite(model) {
        eprintln!(
            "step {}: the weights hold non-finite values; no checkpoint written",
            state.step
        );
        return Ok(());
    }
    state.pipeline = feed.state();
    state.eval_loss = eval.map(|e| e.loss).filter(|l| l.is_finite());
    let improved = match (state.eval_loss, state.best_eval_loss) {
        (Some(l), Some(best)) => l < best,
        (Some(_), None) => true,
        _ => false,
    };
    if improved {
        state.best_eval_loss = state.eval_loss;
    }
    let dir = session.save(&step_dir_name(state.step), model, optim, state)?;
    if improved && session.cfg.checkpoint.keep_best {
        session.save(BEST_DIR, model, optim, state)?;
    }
    prune(&session.root, session.cfg.checkpoint.keep_last)?;
    *last_ckpt = Some(dir);
    *last_ckpt_step = Some(state.step);
    Ok(())
}
