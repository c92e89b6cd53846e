//! Throughput figures of a pipeline: ms per diffusion step, seconds per image (DDPM and
//! DDIM), images/s at batch N, text tokens/s; with and without CFG; KV cache vs full
//! recomputation. Used by `transfusion bench`.

use std::fmt;
use std::time::Instant;

use crate::error::Result;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use transfusion_runtime::op_count::float_ops;

use crate::context::{CachePolicy, Rows};
use crate::pipeline::{ImageOptions, Pipeline};
use crate::sampler::SamplerKind;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Prompt length in tokens (BOS included) before each image / text continuation.
    pub prompt_tokens: usize,
    /// Steps timed for the per-step figures.
    pub measure_steps: usize,
    /// DDPM steps of the seconds-per-image figure (paper: 250).
    pub ddpm_steps: usize,
    /// DDIM steps of the seconds-per-image figure.
    pub ddim_steps: usize,
    /// Batch size of the images/s figure.
    pub batch: usize,
    /// Text tokens decoded for the tokens/s figure.
    pub text_tokens: usize,
    /// Guidance scale of the "with CFG" figures.
    pub cfg: f64,
    /// Also time full recomputation (slow for long prompts on big models).
    pub recompute: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 64,
            measure_steps: 20,
            ddpm_steps: 250,
            ddim_steps: 50,
            batch: 8,
            text_tokens: 64,
            cfg: 3.0,
            recompute: true,
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<58} {:>12.3} {}", self.name, self.value, self.unit)
    }
}

/// All figures of a run.
#[derive(Default)]
pub struct BenchReport {
    /// In measurement order.
    pub figures: Vec<Figure>,
    on_figure: Option<Box<dyn FnMut(&Figure)>>,
}

impl BenchReport {
    fn push(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        let f = Figure {
            name: name.into(),
            value,
            unit,
        };
        if let Some(cb) = self.on_figure.as_mut() {
            cb(&f);
        }
        self.figures.push(f);
    }

    /// The value of the figure called `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for fig in &self.figures {
            writeln!(f, "{fig}")?;
        }
        Ok(())
    }
}

fn prompt_text<B: Backend>(pipe: &Pipeline<B>, tokens: usize) -> String {
    // Words of one token or so each; the exact length is checked below.
    let words = [
        "a", " red", " circle", " on", " blue", " square", " and", " green",
    ];
    let mut s = String::new();
    let mut i = 0;
    while pipe.tokenizer.encode(&s).len() + 1 < tokens {
        s.push_str(words[i % words.len()]);
        i += 1;
    }
    s
}

/// Seconds to run `f`, after forcing the backend to finish (reads the result back).
fn timed<B: Backend>(f: impl FnOnce() -> Tensor<B, 4>) -> f64 {
    let start = Instant::now();
    let x = f();
    let _ = x.into_data();
    start.elapsed().as_secs_f64()
}

fn image_secs<B: Backend>(pipe: &Pipeline<B>, prompt: &str, opts: &ImageOptions) -> Result<f64> {
    let mut err = None;
    let s = timed(|| match pipe.image_tensor(prompt, opts, |_, _| {}) {
        Ok(x) => x,
        Err(e) => {
            err = Some(e);
            Tensor::zeros([1, 1, 1, 1], pipe.device())
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(s),
    }
}

/// `"with CFG"` when the scale turns guidance on, `"no CFG"` otherwise.
fn cfg_label(cfg: f64) -> &'static str {
    if cfg > 0.0 && cfg != 1.0 {
        "with CFG"
    } else {
        "no CFG"
    }
}

/// Tokens/s of decoding `n` tokens after a prompt (argmax, no early stop).
fn text_rate<B: Backend>(pipe: &Pipeline<B>, prompt: &str, n: usize) -> Result<f64> {
    let start = Instant::now();
    decode_tokens(pipe, prompt, n)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Prefills `prompt` and decodes `n` tokens greedily (no early stop).
fn decode_tokens<B: Backend>(pipe: &Pipeline<B>, prompt: &str, n: usize) -> Result<()> {
    let ids = pipe.encode_prompt(prompt)?;
    let pad = pipe.meta.special_tokens.pad;
    let (mut rows, mut hidden) = Rows::start(&pipe.model, &[ids], pipe.cache_policy, pad, None);
    for _ in 0..n {
        let logits = pipe.logits(hidden);
        let id = logits[0]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        hidden = rows.push_tokens(&pipe.model, &[id], None);
    }
    let _ = pipe.logits(hidden);
    Ok(())
}

/// Float tensor ops (see [`float_ops`](transfusion_runtime::op_count::float_ops)) of one KV-cached diffusion step at `opts.cfg` and
/// of one cached text token after the benchmark's prompt, on a pipeline over an autodiff
/// backend (the same model as the timed one): the difference between two and one step (or
/// token), so the prompt's prefill and the setup are not counted.
pub fn op_counts<B: AutodiffBackend>(
    pipe: &mut Pipeline<B>,
    opts: &BenchOptions,
    report: &mut BenchReport,
) -> Result<()> {
    let prompt = prompt_text(pipe, opts.prompt_tokens);
    pipe.cache_policy = CachePolicy::Cached;
    let image = |steps: usize| {
        let o = ImageOptions {
            num: 1,
            steps,
            sampler: SamplerKind::Ddim,
            cfg: opts.cfg,
            seed: 0,
        };
        float_ops(|| image_secs(pipe, &prompt, &o))
    };
    let ((one, a), (two, b)) = (image(1), image(2));
    one?;
    two?;
    report.push(
        format!(
            "float tensor ops per diffusion step (kv cache, {})",
            cfg_label(opts.cfg)
        ),
        (b - a) as f64,
        "ops",
    );
    let ((one, a), (two, b)) = (
        float_ops(|| decode_tokens(pipe, &prompt, 1)),
        float_ops(|| decode_tokens(pipe, &prompt, 2)),
    );
    one?;
    two?;
    report.push(
        "float tensor ops per text token (kv cache)",
        (b - a) as f64,
        "ops",
    );
    Ok(())
}

/// Runs every measurement, calling `on_figure` with each figure as it is measured.
pub fn run_bench<B: Backend>(
    pipe: &mut Pipeline<B>,
    opts: &BenchOptions,
    on_figure: impl FnMut(&Figure) + 'static,
) -> Result<BenchReport> {
    let prompt = prompt_text(pipe, opts.prompt_tokens);
    let plen = pipe.encode_prompt(&prompt)?.len();
    let mut report = BenchReport {
        figures: vec![],
        on_figure: Some(Box::new(on_figure)),
    };
    let base = ImageOptions {
        num: 1,
        steps: opts.measure_steps,
        sampler: SamplerKind::Ddim,
        cfg: 0.0,
        seed: 0,
    };
    eprintln!(
        "bench: prompt {plen} tokens, {} patches per image, {} layers, d {}",
        pipe.patches_per_image(),
        pipe.meta.model.n_layers,
        pipe.meta.model.d_model
    );
    // Warm-up (kernel compilation, autotune, allocator).
    image_secs(
        pipe,
        &prompt,
        &ImageOptions {
            steps: 2,
            cfg: opts.cfg,
            ..base.clone()
        },
    )?;
    image_secs(
        pipe,
        &prompt,
        &ImageOptions {
            steps: 2,
            ..base.clone()
        },
    )?;

    let per_step = |pipe: &mut Pipeline<B>, policy, cfg: f64, report: &mut BenchReport| {
        pipe.cache_policy = policy;
        let s = image_secs(
            pipe,
            &prompt,
            &ImageOptions {
                cfg,
                ..base.clone()
            },
        )?;
        let ms = 1000.0 * s / opts.measure_steps as f64;
        let label = match policy {
            CachePolicy::Cached => "kv cache",
            CachePolicy::Recompute => "full recompute",
        };
        let g = cfg_label(cfg);
        report.push(format!("ms per diffusion step ({label}, {g})"), ms, "ms");
        Ok::<_, crate::error::InferError>(ms)
    };
    let cached = per_step(pipe, CachePolicy::Cached, 0.0, &mut report)?;
    let cached_cfg = per_step(pipe, CachePolicy::Cached, opts.cfg, &mut report)?;
    if opts.recompute {
        let full = per_step(pipe, CachePolicy::Recompute, 0.0, &mut report)?;
        let full_cfg = per_step(pipe, CachePolicy::Recompute, opts.cfg, &mut report)?;
        report.push(
            "step time ratio full recompute / kv cache (no CFG)",
            full / cached,
            "x",
        );
        report.push(
            "step time ratio full recompute / kv cache (with CFG)",
            full_cfg / cached_cfg,
            "x",
        );
    }
    pipe.cache_policy = CachePolicy::Cached;
    for (sampler, steps) in [
        (SamplerKind::Ddpm, opts.ddpm_steps),
        (SamplerKind::Ddim, opts.ddim_steps),
        (SamplerKind::Consistency, 2),
        (SamplerKind::Consistency, 1),
    ] {
        for cfg in [0.0, opts.cfg] {
            let o = ImageOptions {
                steps,
                sampler,
                cfg,
                ..base.clone()
            };
            let s = image_secs(pipe, &prompt, &o)?;
            let g = cfg_label(cfg);
            let unit = if steps == 1 { "step" } else { "steps" };
            report.push(
                format!("s per image ({sampler} {steps} {unit}, {g}, batch 1)"),
                s,
                "s",
            );
        }
    }
    for cfg in [0.0, opts.cfg] {
        let o = ImageOptions {
            num: opts.batch,
            steps: opts.ddim_steps,
            cfg,
            ..base.clone()
        };
        let s = image_secs(pipe, &prompt, &o)?;
        report.push(
            format!(
                "images/s at batch {} (ddim {} steps, {})",
                opts.batch,
                opts.ddim_steps,
                cfg_label(cfg)
            ),
            opts.batch as f64 / s,
            "img/s",
        );
    }
    let rate = text_rate(pipe, &prompt, opts.text_tokens)?;
    report.push("text tokens/s (kv cache)", rate, "tok/s");
    if opts.recompute {
        pipe.cache_policy = CachePolicy::Recompute;
        let full = text_rate(pipe, &prompt, opts.text_tokens)?;
        pipe.cache_policy = CachePolicy::Cached;
        report.push("text tokens/s (full recompute)", full, "tok/s");
        report.push(
            "text speed ratio kv cache / full recompute",
            rate / full,
            "x",
        );
    }
    Ok(report)
}
