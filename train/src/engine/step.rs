//! One optimizer step: the micro-batches' gradients ([`accumulate`]), combined with the
//! other replicas' ([`StepSync`]), global-norm clipping and the AdamW update
//! ([`optimizer_step`]).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::task::TaskLoss;
use crate::checkpoint::AdamWOptimizer;
use crate::optim::clip_global_norm;

/// Gradients of one optimizer step over `batches` (micro-batches): each loss is scaled by
/// `1 / batches.len()` and the gradients summed (Burn's `GradientsAccumulator`), so the
/// result is the gradient of the mean of the micro-batch losses. Returns the gradients,
/// the mean `[total, part 0, part 1]` and whether every loss was finite. `poison`
/// multiplies the losses by NaN (fault injection for tests).
pub fn accumulate<B: AutodiffBackend, M: AutodiffModule<B>, I>(
    model: &M,
    batches: Vec<I>,
    poison: bool,
    loss: impl Fn(&M, I) -> TaskLoss<B>,
) -> (GradientsParams, [f64; 3], bool) {
    let accum = batches.len().max(1);
    let mut sums = [0.0f64; 3];
    let mut finite = true;
    let mut accumulator = GradientsAccumulator::<M>::new();
    let mut single: Option<GradientsParams> = None;
    for batch in batches {
        let TaskLoss {
            mut total,
            parts: [a, b],
        } = loss(model, batch);
        if poison {
            total = total.mul_scalar(f32::NAN);
        }
        let vals: Vec<f32> = Tensor::cat(vec![total.clone().detach(), a.detach(), b.detach()], 0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("float data");
        for (s, v) in sums.iter_mut().zip(&vals) {
            *s += *v as f64 / accum as f64;
            finite &= v.is_finite();
        }
        let scaled = if accum > 1 {
            total.div_scalar(accum as f64)
        } else {
            total
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
    /// Mean `[total, part 0, part 1]` over this replica's micro-batches.
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
    fn sync<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
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
    fn sync<M: AutodiffModule<B>>(
        &mut self,
        _model: &M,
        grads: GradientsParams,
        local: LocalStep,
    ) -> anyhow::Result<(GradientsParams, LocalStep)> {
        Ok((grads, local))
    }
}

/// The update of one replica from its micro-batches' gradients: combined with the other
/// replicas' by `sync` (before clipping, so every replica clips and updates identically),
/// global-norm clipping, and the AdamW update when everything is finite. Returns the
/// updated model, the combined step figures and the gradient norm before clipping.
pub fn optimizer_step<B: AutodiffBackend, M: AutodiffModule<B>, S: StepSync<B> + ?Sized>(
    model: M,
    optim: &mut AdamWOptimizer<M, B>,
    grads: GradientsParams,
    local: LocalStep,
    lr: f64,
    grad_clip: f64,
    sync: &mut S,
) -> anyhow::Result<(M, LocalStep, f64)> {
    let (mut grads, mut global) = sync.sync(&model, grads, local)?;
    let grad_norm = clip_global_norm::<B, _>(&model, &mut grads, grad_clip);
    global.finite &= grad_norm.is_finite();
    let model = if global.finite {
        optim.step(lr, model, grads)
    } else {
        model
    };
    Ok((model, global, grad_norm))
}
