//! `transfusion-train demo`: the main job on its embedded default. Trains the `tiny`
//! preset on the synthetic shapes set (captioned images in both orders) for a fixed
//! budget, then scores text-to-image and image-to-text on held-out samples and writes
//! what a person wants to look at (`--dataset digits`, the fine-distinction benchmark,
//! trains and scores on the digits set instead: [`digits`]):
//!
//! ```text
//! OUT/report.json            every figure below
//! OUT/text_to_image.png      row pairs: generated image above the reference rendering
//! OUT/text_to_image.md       the prompts, in grid order, with per-sample scores
//! OUT/image_to_text.png      the held-out images that were captioned
//! OUT/image_to_text.md       reference and generated caption for each
//! OUT/loss.png, metrics.jsonl, checkpoints/   from the training run
//! ```
//!
//! Pixel space is used (no VAE): 32x32 RGB images are the latents, in 4x4 patches. The
//! tiny VAE cannot be trained in the budget on a CPU (one step of 4 images takes seconds:
//! the convolution backward pass), so pixel space gives the better result here. The model
//! predicts `v` rather than `eps` and its patches carry a 2D position embedding (the tiny
//! preset's default); both made the difference between noise and drawings in this budget.

pub mod budget;
pub mod captions;
pub mod digits;
pub mod score;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use transfusion_data::files::{write_file, write_json};
use transfusion_data::image::{image_grid, save_png};
use transfusion_data::source::parse_source_spec;
use transfusion_data::synthetic::shapes::{cleanliness, render, Cleanliness, ShapesGenerator};
use transfusion_infer::pipeline::{ImageOptions, Pipeline};
use transfusion_infer::sampler::SamplerKind;
use transfusion_infer::text::TextOptions;

use crate::config::ConfigOverride;
use crate::engine::RunOptions;
use crate::error::{Result, TrainError};
use crate::held_out::evaluate_held_out;
use crate::held_out::EvalMetrics;
use crate::transfusion::{run_training, TrainHooks};
use crate::ExperimentConfig;
use captions::captioned_grid;
use score::{
    score_captions, score_cleanliness, score_generated_images, AttributeAccuracy,
    CleanlinessSummary,
};

/// The demo tokenizer, embedded so the demo runs from any directory.
const DEMO_TOKENIZER: &[u8] = include_bytes!("../../../assets/tokenizer.json");

/// The synthetic set a demo trains on and is scored on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoDataset {
    /// Coloured shapes: colour, shape, position and size (the main demo).
    #[default]
    Shapes,
    /// White digits: only the outline tells the ten classes apart (fine distinctions).
    Digits,
}

impl DemoDataset {
    /// The set's name, as on the command line.
    fn name(self) -> &'static str {
        match self {
            DemoDataset::Shapes => "shapes",
            DemoDataset::Digits => "digits",
        }
    }

    /// The training source spec.
    fn spec(self) -> &'static str {
        match self {
            DemoDataset::Shapes => "shapes:100000",
            DemoDataset::Digits => "digits:100000",
        }
    }
}

/// The most optimizer steps a demo plans when it fits the plan to its budget (a fast
/// GPU would otherwise plan hundreds of thousands).
pub const MAX_PLANNED_STEPS: u64 = 20_000;

/// Settings of a demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output directory.
    pub out: PathBuf,
    /// The synthetic set trained on and scored.
    pub dataset: DemoDataset,
    /// Wall-clock budget of the training part.
    pub train_budget: Duration,
    /// Optimizer steps planned (the lr schedule's length); training stops at the budget
    /// or here, whichever comes first. With `fit_steps_to_budget`, the most planned.
    pub steps: u64,
    /// Plan as many steps as fit `train_budget` on this machine, measured before training
    /// ([`budget`]); off, `steps` is the plan.
    pub fit_steps_to_budget: bool,
    /// Held-out prompts and images scored.
    pub eval_samples: usize,
    /// DDIM steps used for the text-to-image evaluation.
    pub sampling_steps: usize,
    /// Classifier-free guidance scale of the evaluation.
    pub cfg_scale: f64,
    /// Sampler of the text-to-image evaluation.
    pub sampler: SamplerKind,
    /// Score this checkpoint instead of training one.
    pub checkpoint: Option<PathBuf>,
    /// Model width override (tests use a smaller model).
    pub d_model: Option<usize>,
    /// Cap of the EMA decay of the weights (`training.ema_decay`; 0: none).
    pub ema_decay: f64,
    /// Min-SNR-gamma weighting of the diffusion loss (`training.min_snr_gamma`; 0: uniform).
    pub min_snr_gamma: f64,
    /// `--set KEY=VALUE` overrides of the experiment config, applied last.
    pub overrides: Vec<ConfigOverride>,
    /// Show progress bars.
    pub progress: bool,
}

impl DemoOptions {
    /// The README's defaults: 8 minutes of training (as many steps as fit), 64 held-out
    /// samples each way.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            dataset: DemoDataset::Shapes,
            train_budget: Duration::from_secs(8 * 60),
            steps: MAX_PLANNED_STEPS,
            fit_steps_to_budget: true,
            eval_samples: 64,
            sampling_steps: 50,
            cfg_scale: 2.0,
            sampler: SamplerKind::Ddim,
            checkpoint: None,
            d_model: None,
            ema_decay: 0.0,
            min_snr_gamma: 0.0,
            overrides: Vec::new(),
            progress: true,
        }
    }
}

/// Everything the demo measured.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    /// Device label.
    pub device: String,
    /// Optimizer steps done.
    pub steps: u64,
    /// Training wall-clock seconds.
    pub train_seconds: f64,
    /// Model parameters.
    pub parameters: usize,
    /// Text-to-image: attributes of generated images (read back by the analyzer).
    pub text_to_image: AttributeAccuracy,
    /// Text-to-image: how clean the generated images are (background, one component).
    pub text_to_image_cleanliness: CleanlinessSummary,
    /// Image-to-text: attributes of generated captions (parsed).
    pub image_to_text: AttributeAccuracy,
    /// Image-to-text: generated caption equals the reference.
    pub caption_exact_match: f64,
    /// Held-out perplexity of caption text (LM loss of the held-out split).
    pub held_out_perplexity: f64,
    /// Held-out diffusion loss at fixed timesteps `(t, loss)`.
    pub held_out_diffusion: Vec<(u32, f64)>,
    /// Sampler used for text-to-image.
    pub sampler: String,
    /// Guidance scale used for text-to-image.
    pub cfg_scale: f64,
    /// The checkpoint the evaluation used.
    pub checkpoint: PathBuf,
}

/// The demo's experiment: the `tiny` preset's recipe (exactly what `run --preset tiny`
/// trains, see [`ExperimentConfig::quick`]) on the chosen synthetic set (100000 generated
/// pairs), with the demo's cadence.
pub fn demo_config(opts: &DemoOptions, tokenizer: &Path) -> Result<ExperimentConfig> {
    let data = vec![parse_source_spec(opts.dataset.spec())?];
    let mut cfg = ExperimentConfig::quick("tiny", data, opts.steps);
    cfg.data.tokenizer = tokenizer.to_path_buf();
    cfg.training.log_every = 10;
    cfg.checkpoint.every = (opts.steps / 3).max(1);
    cfg.eval.every = (opts.steps / 3).max(1);
    cfg.eval.batches = 2;
    cfg.training.ema_decay = opts.ema_decay;
    cfg.training.min_snr_gamma = opts.min_snr_gamma;
    if let Some(d) = opts.d_model {
        let mut model = cfg.model_config(512)?;
        model.d_model = d;
        model.d_hidden = 3 * d;
        model.n_layers = 2;
        cfg.model.preset = None;
        cfg.model.config = Some(model);
    }
    Ok(cfg.with_overrides(&opts.overrides)?)
}

/// What the training part of a demo left (or, for `--checkpoint`, what was loaded).
pub(crate) struct Trained {
    /// Optimizer steps done (0 for a loaded checkpoint).
    steps: u64,
    /// Training wall-clock seconds.
    train_seconds: f64,
    /// The checkpoint scored.
    checkpoint: PathBuf,
    /// Its held-out evaluation.
    eval: EvalMetrics,
}

/// Trains the demo's model (or takes `opts.checkpoint`), loads it for inference and
/// measures its held-out losses.
fn train_or_load<B: AutodiffBackend>(
    opts: &DemoOptions,
    device: &B::Device,
) -> Result<(Pipeline<B::InnerBackend>, Trained)> {
    let tokenizer = opts.out.join("tokenizer.json");
    write_file(&tokenizer, DEMO_TOKENIZER)?;
    let (steps, train_seconds, checkpoint, eval) = match &opts.checkpoint {
        Some(dir) => (0, 0.0, dir.clone(), None),
        None => {
            let steps = if opts.fit_steps_to_budget {
                budget::planned_steps::<B>(opts, &tokenizer, device)?
            } else {
                opts.steps
            };
            let cfg = demo_config(
                &DemoOptions {
                    steps,
                    ..opts.clone()
                },
                &tokenizer,
            )?;
            eprintln!(
                "demo: training the tiny preset on synthetic {} for at most {:.1} min",
                opts.dataset.name(),
                opts.train_budget.as_secs_f64() / 60.0
            );
            let start = Instant::now();
            let mut run = RunOptions::new(&opts.out);
            run.progress = opts.progress;
            run.time_budget = Some(opts.train_budget);
            // The plan above is a guess from a few steps: re-planned while training.
            run.fit_to_budget = opts.fit_steps_to_budget.then_some(opts.steps);
            // The demo's OUT is its own: running it again trains afresh.
            run.overwrite = true;
            let summary = run_training::<B>(&cfg, &run, &mut TrainHooks::default(), device)?;
            let checkpoint = summary
                .last_checkpoint
                .clone()
                .ok_or_else(|| TrainError::Run("training ended without a checkpoint".into()))?;
            (
                summary.steps,
                start.elapsed().as_secs_f64(),
                checkpoint,
                summary.last_eval.clone(),
            )
        }
    };

    let pipeline = Pipeline::<B::InnerBackend>::load(&checkpoint, &device.clone())?;
    // A checkpoint scored without training: its held-out figures are measured here.
    let eval = match eval {
        Some(e) => e,
        None => held_out_eval(opts, &tokenizer, &pipeline, device)?,
    };
    let trained = Trained {
        steps,
        train_seconds,
        checkpoint,
        eval,
    };
    Ok((pipeline, trained))
}

/// Runs the digits demo (`opts.dataset` is taken as [`DemoDataset::Digits`]) on backend `B`.
pub fn run_digits_demo<B: AutodiffBackend>(
    opts: &DemoOptions,
    device: &B::Device,
    label: &str,
) -> Result<digits::DigitsReport> {
    let opts = DemoOptions {
        dataset: DemoDataset::Digits,
        ..opts.clone()
    };
    let (pipeline, trained) = train_or_load::<B>(&opts, device)?;
    eprintln!(
        "demo: evaluating {} held-out prompts and images",
        opts.eval_samples
    );
    digits::evaluate_digits(&opts, &pipeline, trained, label)
}

/// Runs the whole shapes demo (`opts.dataset` is taken as [`DemoDataset::Shapes`]; see
/// [`run_digits_demo`] for the other set) on backend `B`.
pub fn run_demo<B: AutodiffBackend>(
    opts: &DemoOptions,
    device: &B::Device,
    label: &str,
) -> Result<DemoReport> {
    let opts = &DemoOptions {
        dataset: DemoDataset::Shapes,
        ..opts.clone()
    };
    let (pipeline, trained) = train_or_load::<B>(opts, device)?;
    let Trained {
        steps,
        train_seconds,
        checkpoint,
        eval,
    } = trained;
    eprintln!(
        "demo: evaluating {} held-out prompts and images",
        opts.eval_samples
    );
    let held_out = ShapesGenerator::held_out();
    let samples: Vec<_> = (0..opts.eval_samples as u64)
        .map(|i| held_out.sample(i))
        .collect();
    let expected: Vec<_> = samples.iter().map(|s| s.attributes.clone()).collect();

    // Text to image: one prompt at a time (each its own CFG batch of 2).
    let image_opts = ImageOptions {
        num: 1,
        steps: opts.sampling_steps,
        sampler: opts.sampler,
        cfg: opts.cfg_scale,
        seed: 7,
    };
    let mut generated = Vec::with_capacity(samples.len());
    for s in &samples {
        generated.extend(pipeline.image(&s.caption, &image_opts)?);
    }
    let t2i = score_generated_images(&expected, &generated);
    let each_clean: Vec<_> = generated.iter().map(cleanliness).collect();
    let clean = score_cleanliness(&each_clean);

    // Image to text: all held-out images captioned in one batch, greedy.
    let images: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
    let greedy = TextOptions {
        max_tokens: 24,
        temperature: 0.0,
        ..TextOptions::default()
    };
    let captions = pipeline.caption(&images, &greedy)?;
    let references: Vec<_> = samples.iter().map(|s| s.caption.clone()).collect();
    let (i2t, exact) = score_captions(&expected, &references, &captions);

    write_outputs(&opts.out, &samples, &generated, &each_clean, &captions)?;
    let report = DemoReport {
        device: label.to_string(),
        steps,
        train_seconds,
        parameters: pipeline.meta.model.param_count().total(),
        text_to_image: t2i,
        text_to_image_cleanliness: clean,
        image_to_text: i2t,
        caption_exact_match: exact,
        held_out_perplexity: eval.figures.perplexity,
        held_out_diffusion: eval.figures.diffusion,
        sampler: format!("{} {} steps", opts.sampler, opts.sampling_steps),
        cfg_scale: opts.cfg_scale,
        checkpoint,
    };
    let path = opts.out.join("report.json");
    write_json(&path, &report)?;
    print_report(&report, &opts.out);
    Ok(report)
}

/// The held-out evaluation the demo's training ends with, of a loaded checkpoint.
fn held_out_eval<B: burn::prelude::Backend>(
    opts: &DemoOptions,
    tokenizer: &Path,
    pipeline: &Pipeline<B>,
    device: &B::Device,
) -> Result<EvalMetrics> {
    let cfg = demo_config(opts, tokenizer)?;
    let tok = std::sync::Arc::new(pipeline.tokenizer.clone());
    evaluate_held_out(
        &cfg,
        &pipeline.meta.model,
        &tok,
        &pipeline.model,
        device,
        pipeline.meta.step,
    )
}

fn write_outputs(
    out: &Path,
    samples: &[transfusion_data::synthetic::shapes::ShapeSample],
    generated: &[image::RgbImage],
    clean: &[Cleanliness],
    captions: &[String],
) -> Result<()> {
    let size = samples.first().map_or(32, |s| s.image.width());
    // Text to image: 8 per row, generated row above its reference row.
    let mut tiles = vec![];
    let mut md = String::from("# Text to image\n\nGrid rows alternate: generated, then the reference rendering of the same prompts, up to 8 per row.\n\n| # | prompt | analyzer reads | clean background | lit groups |\n|---|---|---|---|---|\n");
    let cols = samples.len().clamp(1, 8);
    let blank = image::RgbImage::new(size, size);
    for (chunk_s, chunk_g) in samples.chunks(cols).zip(generated.chunks(cols)) {
        // Pad a short last chunk so generated and reference rows stay aligned.
        let pad = cols - chunk_s.len();
        tiles.extend(
            chunk_g
                .iter()
                .cloned()
                .chain(std::iter::repeat_n(blank.clone(), pad)),
        );
        tiles.extend(
            chunk_s
                .iter()
                .map(|s| render(&s.attributes, size))
                .chain(std::iter::repeat_n(blank.clone(), pad)),
        );
    }
    for (i, ((s, g), c)) in samples.iter().zip(generated).zip(clean).enumerate() {
        let seen = transfusion_data::synthetic::shapes::analyze(g);
        let seen = seen
            .first()
            .map_or("nothing".to_string(), |a| a.to_string());
        let (bg, groups) = (100.0 * c.background, c.components);
        let _ = writeln!(md, "| {i} | {} | {seen} | {bg:.1}% | {groups} |", s.caption);
    }
    save_png(&image_grid(&tiles, cols, 2), &out.join("text_to_image.png"))?;
    write_file(&out.join("text_to_image.md"), md)?;

    let images: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
    let references: Vec<String> = samples.iter().map(|s| s.caption.clone()).collect();
    save_image_to_text(out, &images, captions, &references)?;
    let mut md = String::from("# Image to text\n\nImages in `image_to_text.png`, row-major, 8 per row, each above its generated caption (words not in the reference caption in red).\n\n| # | reference | generated |\n|---|---|---|\n");
    for (i, (s, c)) in samples.iter().zip(captions).enumerate() {
        let _ = writeln!(md, "| {i} | {} | {} |", s.caption, c.trim());
    }
    write_file(&out.join("image_to_text.md"), md)?;
    Ok(())
}

/// Writes `OUT/image_to_text.png`: each image above its generated caption, 8 per row,
/// scaled so a caption wraps into a few lines under its image.
pub(crate) fn save_image_to_text(
    out: &Path,
    images: &[image::RgbImage],
    captions: &[String],
    references: &[String],
) -> Result<()> {
    let size = images.first().map_or(32, |i| i.width());
    let scale = (96 / size).max(1);
    let grid = captioned_grid(images, captions, references, 8, scale);
    Ok(save_png(&grid, &out.join("image_to_text.png"))?)
}

fn print_report(r: &DemoReport, out: &Path) {
    let row = |name: &str, a: &AttributeAccuracy| {
        println!(
            "{name:<14} colour {:5.1}%  shape {:5.1}%  position {:5.1}%  size {:5.1}%  all {:5.1}%  (n = {})",
            100.0 * a.color,
            100.0 * a.shape,
            100.0 * a.position,
            100.0 * a.size,
            100.0 * a.all,
            a.count
        );
    };
    println!(
        "\nTransfusion demo: {} steps in {:.0} s on {} ({} parameters)",
        r.steps, r.train_seconds, r.device, r.parameters
    );
    row("text->image", &r.text_to_image);
    println!(
        "{:<14} clean background {:5.1}%  one component {:5.1}%",
        "",
        100.0 * r.text_to_image_cleanliness.background,
        100.0 * r.text_to_image_cleanliness.one_component
    );
    row("image->text", &r.image_to_text);
    println!(
        "caption exact match {:.1}%, held-out caption perplexity {:.2}",
        100.0 * r.caption_exact_match,
        r.held_out_perplexity
    );
    println!(
        "files: {}/{{report.json, text_to_image.png, image_to_text.png, loss.png}}",
        out.display()
    );
}
