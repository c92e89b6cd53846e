//! The held-out evaluation of a Transfusion model, shared by pretraining and distillation:
//! [`evaluate`], its figures ([`TransfusionEval`]) and their points on the loss plot.

use burn::prelude::*;
use std::sync::Arc;
use transfusion_data::pipeline::DataPipeline;

use transfusion_data::tokenizer::TextTokenizer;
use transfusion_model::{Transfusion, TransfusionConfig};

use crate::config::ExperimentConfig;
use crate::data::{build_pipeline, Split};
use crate::engine::metrics::{EvalLine, EvalSplit, Figures};
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// [`evaluate`] on the held-out split `cfg` describes (its eval batches and timesteps),
/// for the model of config `m` after `step` steps.
pub fn evaluate_held_out<B: Backend>(
    cfg: &ExperimentConfig,
    m: &TransfusionConfig,
    tokenizer: &Arc<TextTokenizer>,
    model: &Transfusion<B>,
    device: &B::Device,
    step: u64,
) -> Result<EvalMetrics> {
    let mut held_out = build_pipeline(cfg, m, tokenizer, Split::HeldOut, cfg.training.batch_size)?;
    evaluate(
        model,
        &mut held_out,
        cfg.eval.batches,
        &cfg.eval.timesteps,
        m.diffusion_loss_weight,
        device,
        step,
        EvalSplit::of(&cfg.data.held_out, &cfg.data.train),
    )
}

/// Loss on the evaluation split (`split` says which it is): LM NLL over all text targets, and the diffusion loss of the
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
    split: EvalSplit,
) -> Result<EvalMetrics> {
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
    let mean_or_nan = |sum: f64, n: f64| if n > 0.0 { sum / n } else { f64::NAN };
    let lm_nll = mean_or_nan(nll_sum, count);
    let diffusion: Vec<(u32, f64)> = timesteps
        .iter()
        .zip(&diff_sum)
        .map(|(&t, &s)| (t, mean_or_nan(s, images as f64)))
        .collect();
    let mean_diff = if images > 0 && !diffusion.is_empty() {
        diffusion.iter().map(|(_, v)| v).sum::<f64>() / diffusion.len() as f64
    } else {
        0.0
    };
    let lm_part = if count > 0.0 { lm_nll } else { 0.0 };
    Ok(EvalLine {
        step,
        split,
        figures: TransfusionEval {
            lm_nll,
            perplexity: lm_nll.exp(),
            lm_targets: count,
            diffusion,
            images,
            loss: lm_part + lambda * mean_diff,
        },
    })
}

/// The figures of one Transfusion evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransfusionEval {
    /// Mean LM negative log-likelihood per text target (nats).
    pub lm_nll: f64,
    /// `exp(lm_nll)`.
    pub perplexity: f64,
    /// Text targets counted.
    pub lm_targets: f64,
    /// `(t, mean diffusion loss at t)` for each fixed timestep.
    pub diffusion: Vec<(u32, f64)>,
    /// Images per timestep.
    pub images: usize,
    /// `lm_nll + lambda * mean over t of the diffusion loss`: the "best" criterion.
    pub loss: f64,
}

impl Figures for TransfusionEval {
    fn summary(&self) -> String {
        let (perplexity, diffusion) = (self.perplexity, self.diffusion_summary());
        format!("perplexity {perplexity:.3}, diffusion {diffusion}")
    }
}

/// One Transfusion evaluation (see [`EvalLine::split`] for what it ran on).
pub type EvalMetrics = EvalLine<TransfusionEval>;

impl TransfusionEval {
    /// The evaluated diffusion losses as `t=100: 0.0123, t=500: ...`.
    pub fn diffusion_summary(&self) -> String {
        self.diffusion
            .iter()
            .map(|(t, v)| format!("t={t}: {v:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An evaluation's points: its LM NLL, and the mean of its per-timestep image losses.
pub fn eval_points(e: &EvalMetrics, lm: &mut Vec<(u64, f64)>, image: &mut Vec<(u64, f64)>) {
    let diffusion = &e.figures.diffusion;
    lm.push((e.step, e.figures.lm_nll));
    if !diffusion.is_empty() {
        let mean = diffusion.iter().map(|(_, v)| v).sum::<f64>() / diffusion.len() as f64;
        image.push((e.step, mean));
    }
}
