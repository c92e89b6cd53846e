//! One optimizer step: the micro-batches' gradients ([`accumulate`]), combined with the
//! other replicas' ([`StepSync`]), global-norm clipping and the AdamW update
//! ([`optimizer_step`]). The step's objective is the mean over every unit (text target,
//! image) of the global batch, whatever micro-batch or replica holds it.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::task::TaskLoss;
use crate::checkpoint::AdamWOptimizer;
use crate::error::Result;
use crate::optim::clip_global_norm;

/// What one replica's micro-batches of a step add up to.
pub struct Accumulated {
    /// The gradient of this replica's share of the step's objective.
    pub grads: GradientsParams,
    /// Each loss part summed over the micro-batches.
    pub sums: [f64; 2],
    /// The weights of the parts' means in the objective.
    pub weights: [f64; 2],
    /// Whether every loss was finite.
    pub finite: bool,
}

/// How one micro-batch's loss sums become its share of the step's objective:
/// `sum_k weight_k * sums_k / units_k`, where `units` are the step's unit counts over every
/// micro-batch of every replica (see [`TaskLoss`]). `poison` multiplies the losses by NaN
/// (fault injection for tests).
#[derive(Clone, Copy, Debug)]
pub struct Objective {
    /// The step's unit counts of the two loss parts, over every micro-batch and replica.
    pub units: [u64; 2],
    /// Multiply the losses by NaN.
    pub poison: bool,
}

/// One micro-batch's loss sums, as numbers.
#[derive(Clone, Copy, Debug)]
pub struct LossSums {
    /// Each part summed over the micro-batch's units.
    pub sums: [f64; 2],
    /// The weight of each part's mean in the objective.
    pub weights: [f64; 2],
}

/// One micro-batch's gradients of its share of the step's objective, and its losses.
pub struct MicroStep {
    /// The gradients.
    pub grads: GradientsParams,
    /// The losses they are the gradients of.
    pub losses: LossSums,
}

impl Objective {
    /// The micro-batch's share `[1]` of the step's objective (graph kept) and its loss sums.
    pub fn share<B: Backend>(&self, loss: TaskLoss<B>) -> (Tensor<B, 1>, LossSums) {
        let TaskLoss {
            sums: [mut a, mut b],
            weights,
        } = loss;
        if self.poison {
            a = a.mul_scalar(f32::NAN);
            b = b.mul_scalar(f32::NAN);
        }
        let vals: Vec<f32> = Tensor::cat(vec![a.clone().detach(), b.clone().detach()], 0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("float data");
        let share = a.mul_scalar(weights[0] / self.units[0].max(1) as f64)
            + b.mul_scalar(weights[1] / self.units[1].max(1) as f64);
        let sums = [vals[0] as f64, vals[1] as f64];
        (share, LossSums { sums, weights })
    }

    /// The gradients of `loss`'s share, by one backward pass through its graph.
    pub fn backward<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: &M,
        loss: TaskLoss<B>,
    ) -> MicroStep {
        let (share, losses) = self.share(loss);
        let grads = GradientsParams::from_grads(share.backward(), model);
        MicroStep { grads, losses }
    }
}

/// Gradients of this replica's share of one optimizer step over `batches`
/// (micro-batches), each by one backward pass through `loss`'s graph (see
/// [`accumulate_with`]).
pub fn accumulate<B: AutodiffBackend, M: AutodiffModule<B>, I>(
    model: &M,
    batches: Vec<I>,
    units: [u64; 2],
    poison: bool,
    loss: impl Fn(&M, I) -> TaskLoss<B>,
) -> Accumulated {
    accumulate_with(model, batches, units, poison, |m, b, objective| {
        objective.backward(m, loss(m, b))
    })
}

/// Gradients of this replica's share of one optimizer step over `batches`
/// (micro-batches), each micro-batch's from `gradients` (a backward pass through the
/// graph, or layer by layer with recomputation). `units` are the step's unit counts over
/// every micro-batch of every replica: each micro-batch contributes
/// `sum_k weight_k * sums_k / units_k` ([`Objective`]) and the gradients are summed
/// (Burn's `GradientsAccumulator`), so the replicas' gradients add up (see
/// [`StepSync::sync`]) to the gradient of the mean over all text targets and all images of
/// the global batch (see [`TaskLoss`]). `poison` multiplies the losses by NaN (fault
/// injection for tests).
pub fn accumulate_with<B: AutodiffBackend, M: AutodiffModule<B>, I>(
    model: &M,
    batches: Vec<I>,
    units: [u64; 2],
    poison: bool,
    gradients: impl Fn(&M, I, &Objective) -> MicroStep,
) -> Accumulated {
    let objective = Objective { units, poison };
    let mut sums = [0.0f64; 2];
    let mut weights = [1.0f64; 2];
    let mut finite = true;
    let many = batches.len() > 1;
    let mut accumulator = GradientsAccumulator::<M>::new();
    let mut single: Option<GradientsParams> = None;
    for batch in batches {
        let MicroStep { grads, losses } = gradients(model, batch, &objective);
        weights = losses.weights;
        for (s, v) in sums.iter_mut().zip(losses.sums) {
            *s += v;
            finite &= v.is_finite();
        }
        if many {
            accumulator.accumulate(model, grads);
        } else {
            single = Some(grads);
        }
    }
    let grads = single.unwrap_or_else(|| accumulator.grads());
    Accumulated {
        grads,
        sums,
        weights,
        finite,
    }
}

/// One replica's share of an optimizer step, before combining with the other replicas.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalStep {
    /// Each loss part summed over this replica's micro-batches.
    pub sums: [f64; 2],
    /// Whether every loss of this replica was finite.
    pub finite: bool,
    /// Text and image positions this replica trained on.
    pub tokens: u64,
    /// Images this replica trained on.
    pub images: u64,
    /// This replica asks every replica to stop after this step (rank 0's time budget).
    pub stop: bool,
}

impl LocalStep {
    /// `[total, part 0, part 1]`: each part's sum over its `units` (at least 1), and the
    /// total weighted by `weights`.
    pub fn losses(&self, units: [u64; 2], weights: [f64; 2]) -> [f64; 3] {
        let a = self.sums[0] / units[0].max(1) as f64;
        let b = self.sums[1] / units[1].max(1) as f64;
        [weights[0] * a + weights[1] * b, a, b]
    }
}

/// How replicas combine their steps. On one device it is the identity ([`SingleDevice`]);
/// data-parallel training (feature `collective`) all-reduces with Burn's collective.
pub trait StepSync<B: AutodiffBackend> {
    /// This replica's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// The number of replicas.
    fn world(&self) -> usize;
    /// The step's loss unit counts ([`super::Work::units`]) summed over the replicas:
    /// called before the forward passes, since every replica divides by the global counts.
    fn sum_units(&mut self, units: [u64; 2]) -> Result<[u64; 2]>;
    /// Combines this replica's gradients and step figures with the other replicas': the
    /// gradients become the sum over replicas (each is a share of one objective, see
    /// [`accumulate`]; identical on every replica), `sums`, `tokens` and `images` the
    /// totals, `finite` the conjunction, `stop` the disjunction.
    fn sync<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        grads: GradientsParams,
        local: LocalStep,
    ) -> Result<(GradientsParams, LocalStep)>;
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
    fn sum_units(&mut self, units: [u64; 2]) -> Result<[u64; 2]> {
        Ok(units)
    }
    fn sync<M: AutodiffModule<B>>(
        &mut self,
        _model: &M,
        grads: GradientsParams,
        local: LocalStep,
    ) -> Result<(GradientsParams, LocalStep)> {
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
) -> Result<(M, LocalStep, f64)> {
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
