//! Held-out evaluation of a Transfusion model: [`evaluate`].

use burn::prelude::*;
use std::sync::Arc;
use transfusion_data::pipeline::DataPipeline;

use transfusion_data::tokenizer::TextTokenizer;
use transfusion_model::{Transfusion, TransfusionConfig};

use crate::config::ExperimentConfig;
use crate::data::{build_pipeline, Split};
use crate::error::Result;
use crate::metrics::{EvalLine, EvalMetrics, EvalSplit, TransfusionEval};

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
