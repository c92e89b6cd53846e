//! `demo --dataset digits`: the fine-distinction benchmark. The same recipe and budget as
//! the shapes demo, trained on the synthetic digits set (`transfusion_data::digits`: one
//! white digit per image, only its outline tells the ten classes apart), then scored on
//! held-out samples:
//!
//! - image to text: the greedy caption names the right digit (and, to tell a model that
//!   ignores the image from one that memorises, the same on training images, and how many
//!   different digits the captions name at all);
//! - text to image: the image generated for "the digit seven" is read back as a seven by
//!   template matching, overlapping its best template by at least `MIN_READ_IOU` (a blob
//!   or speckles read as nothing).
//!
//! Files: `report.json`, `text_to_image.png` (generated row above the reference row),
//! `image_to_text.png` (each image above its caption, wrong words in red), and the
//! training run's own.

use std::path::{Path, PathBuf};

use burn::prelude::Backend;
use serde::Serialize;
use transfusion_data::files::write_json;
use transfusion_data::image::{image_grid, save_png};
use transfusion_data::synthetic::digits::{
    classify_digit, parse_digit_caption, render_digit, DigitSample, DigitsGenerator,
};
use transfusion_data::synthetic::shapes::ShapesGenerator;
use transfusion_infer::pipeline::{ImageOptions, Pipeline};
use transfusion_infer::text::TextOptions;

use super::{save_image_to_text, DemoOptions, Trained};
use crate::error::Result;

/// How well digits were named or drawn.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DigitScores {
    /// Samples scored.
    pub count: usize,
    /// Share with the right digit, in `[0, 1]`.
    pub accuracy: f64,
    /// Accuracy per true digit (index = digit; NaN for a digit with no sample).
    pub per_digit: Vec<f64>,
    /// How many different digits the outputs name (1: the same answer for everything).
    pub distinct: usize,
}

impl DigitScores {
    /// Scores `predicted` (None: no digit read) against `expected`.
    pub fn new(expected: &[u8], predicted: &[Option<u8>]) -> Self {
        let mut right = [0usize; 10];
        let mut seen = [0usize; 10];
        let mut named = [false; 10];
        for (&want, got) in expected.iter().zip(predicted) {
            seen[want as usize] += 1;
            right[want as usize] += (*got == Some(want)) as usize;
            if let Some(d) = got {
                named[*d as usize] = true;
            }
        }
        let count = expected.len().min(predicted.len());
        Self {
            count,
            accuracy: right.iter().sum::<usize>() as f64 / count.max(1) as f64,
            per_digit: (0..10).map(|d| right[d] as f64 / seen[d] as f64).collect(),
            distinct: named.iter().filter(|&&n| n).count(),
        }
    }
}

/// Everything `demo --dataset digits` measured.
#[derive(Clone, Debug, Serialize)]
pub struct DigitsReport {
    /// Device label.
    pub device: String,
    /// Optimizer steps done.
    pub steps: u64,
    /// Training wall-clock seconds.
    pub train_seconds: f64,
    /// Model parameters.
    pub parameters: usize,
    /// Image to text on held-out images: the caption names the digit shown.
    pub image_to_text: DigitScores,
    /// Image to text on as many training images.
    pub image_to_text_training: DigitScores,
    /// Text to image: the generated image reads back (template matching) as the digit asked.
    pub text_to_image: DigitScores,
    /// Mean intersection over union of generated images with their best-matching template
    /// (1: clean renderings).
    pub text_to_image_iou: f64,
    /// Held-out perplexity of caption text.
    pub held_out_perplexity: f64,
    /// Held-out diffusion loss at fixed timesteps `(t, loss)`.
    pub held_out_diffusion: Vec<(u32, f64)>,
    /// Sampler used for text to image.
    pub sampler: String,
    /// Guidance scale used for text to image.
    pub cfg_scale: f64,
    /// The checkpoint scored.
    pub checkpoint: PathBuf,
}

/// Scores a trained (or loaded) model on the digits set and writes the report and grids.
pub(super) fn evaluate_digits<B: Backend>(
    opts: &DemoOptions,
    pipeline: &Pipeline<B>,
    trained: Trained,
    label: &str,
) -> Result<DigitsReport> {
    let n = opts.eval_samples as u64;
    let held_out = DigitsGenerator::new(ShapesGenerator::HELD_OUT_SEED);
    let training = DigitsGenerator::new(ShapesGenerator::TRAIN_SEED);
    let samples: Vec<DigitSample> = (0..n).map(|i| held_out.sample(i)).collect();
    let train_samples: Vec<DigitSample> = (0..n).map(|i| training.sample(i)).collect();
    let digits = |s: &[DigitSample]| s.iter().map(|s| s.placement.digit).collect::<Vec<_>>();

    let greedy = TextOptions {
        max_tokens: 12,
        temperature: 0.0,
        ..TextOptions::default()
    };
    let caption_scores = |s: &[DigitSample]| -> Result<(DigitScores, Vec<String>)> {
        let images: Vec<_> = s.iter().map(|s| s.image.clone()).collect();
        let captions = pipeline.caption(&images, &greedy)?;
        let read: Vec<_> = captions.iter().map(|c| parse_digit_caption(c)).collect();
        Ok((DigitScores::new(&digits(s), &read), captions))
    };
    let (i2t, captions) = caption_scores(&samples)?;
    let (i2t_training, _) = caption_scores(&train_samples)?;

    // Ten prompts only: each sample gets its own noise seed, so a digit is drawn several
    // times from different noise.
    let mut generated = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        let image_opts = ImageOptions {
            num: 1,
            steps: opts.sampling_steps,
            sampler: opts.sampler,
            cfg: opts.cfg_scale,
            seed: 7 + i as u64,
        };
        generated.extend(pipeline.image(&s.caption, &image_opts)?);
    }
    let matches: Vec<_> = generated.iter().map(classify_digit).collect();
    // The rule of `read_digit`: a match counts only if it is legible.
    let read: Vec<_> = matches
        .iter()
        .map(|m| m.and_then(|m| m.legible_digit()))
        .collect();
    let t2i = DigitScores::new(&digits(&samples), &read);
    let iou = matches
        .iter()
        .map(|m| m.map_or(0.0, |m| m.iou))
        .sum::<f64>()
        / matches.len().max(1) as f64;

    write_grids(&opts.out, &samples, &generated, &captions)?;
    let report = DigitsReport {
        device: label.to_string(),
        steps: trained.steps,
        train_seconds: trained.train_seconds,
        parameters: pipeline.meta.model.param_count().total(),
        image_to_text: i2t,
        image_to_text_training: i2t_training,
        text_to_image: t2i,
        text_to_image_iou: iou,
        held_out_perplexity: trained.eval.figures.perplexity,
        held_out_diffusion: trained.eval.figures.diffusion.clone(),
        sampler: format!("{} {} steps", opts.sampler, opts.sampling_steps),
        cfg_scale: opts.cfg_scale,
        checkpoint: trained.checkpoint,
    };
    write_json(&opts.out.join("report.json"), &report)?;
    print_report(&report, &opts.out);
    Ok(report)
}

fn write_grids(
    out: &Path,
    samples: &[DigitSample],
    generated: &[image::RgbImage],
    captions: &[String],
) -> Result<()> {
    let size = generated.first().map_or(32, |g| g.width());
    let cols = samples.len().clamp(1, 8);
    let mut tiles = Vec::with_capacity(2 * samples.len());
    for (s, g) in samples.chunks(cols).zip(generated.chunks(cols)) {
        tiles.extend(g.iter().cloned());
        // The reference: the asked digit at the placement of the held-out sample.
        tiles.extend(s.iter().map(|s| render_digit(&s.placement, size)));
    }
    save_png(&image_grid(&tiles, cols, 2), &out.join("text_to_image.png"))?;
    let images: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
    let references: Vec<_> = samples.iter().map(|s| s.caption.clone()).collect();
    save_image_to_text(out, &images, captions, &references)
}

fn print_report(r: &DigitsReport, out: &Path) {
    let row = |name: &str, s: &DigitScores| {
        println!(
            "{name:<22} {:5.1}% right, {} different digits named (n = {})",
            100.0 * s.accuracy,
            s.distinct,
            s.count
        );
    };
    println!(
        "\nTransfusion digits demo: {} steps in {:.0} s on {} ({} parameters)",
        r.steps, r.train_seconds, r.device, r.parameters
    );
    row("image->text held-out", &r.image_to_text);
    row("image->text training", &r.image_to_text_training);
    row("text->image", &r.text_to_image);
    println!(
        "{:<22} template IoU {:.2}; held-out caption perplexity {:.2}",
        "", r.text_to_image_iou, r.held_out_perplexity
    );
    println!(
        "files: {}/{{report.json, text_to_image.png, image_to_text.png, loss.png}}",
        out.display()
    );
}
