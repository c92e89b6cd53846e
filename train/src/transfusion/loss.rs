//! The Transfusion task's loss as the engine takes it: the two parts' sums
//! ([`transfusion_loss`], with min-SNR weights [`weighted_transfusion_loss`]), their
//! gradients with layer recomputation ([`recomputed_micro_step`]), and one step's
//! gradients over micro-batches ([`accumulate_grads`]).

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use transfusion_model::{NoiseSchedule, Transfusion, TransfusionBatch, TransfusionLoss};

use crate::engine::{accumulate, LocalStep, MicroStep, Objective, TaskLoss};

/// The training loss of one packed batch as sums: the NLL summed over the text targets and
/// the target MSE summed over the images, weighted `1` and `lambda` (the engine divides by
/// the step's counts, see [`TaskLoss`]).
pub fn transfusion_loss<B: AutodiffBackend>(
    model: &Transfusion<B>,
    batch: TransfusionBatch<B>,
) -> TaskLoss<B> {
    weighted_transfusion_loss(model, batch, None)
}

/// [`transfusion_loss`] with each image's target MSE weighted by `image_weights[t]` of its
/// timestep (e.g. [`transfusion_model::Prediction::min_snr_weights`]); `None`: uniform.
pub fn weighted_transfusion_loss<B: AutodiffBackend>(
    model: &Transfusion<B>,
    batch: TransfusionBatch<B>,
    image_weights: Option<&[f64]>,
) -> TaskLoss<B> {
    let loss = model.forward_loss(batch.clone());
    task_loss_of(model, loss, &batch, image_weights)
}

/// [`weighted_transfusion_loss`] with each decoder layer's activations recomputed in the
/// backward pass ([`Transfusion::recomputed_gradients`]): the same gradients of the
/// micro-batch's share of `objective`.
pub fn recomputed_micro_step<B: AutodiffBackend>(
    model: &Transfusion<B>,
    batch: TransfusionBatch<B>,
    image_weights: Option<&[f64]>,
    objective: &Objective,
) -> MicroStep {
    let image = model.noised_images(&batch);
    let (grads, losses) = model.recomputed_gradients(&batch, image, |flat, out| {
        let loss = model.loss_of_outputs(flat, out, &batch);
        objective.share(task_loss_of(model, loss, &batch, image_weights))
    });
    MicroStep { grads, losses }
}

/// The [`TaskLoss`] of one batch's [`TransfusionLoss`]: the parts' sums, the images'
/// weighted by `image_weights` of their timesteps.
fn task_loss_of<B: AutodiffBackend>(
    model: &Transfusion<B>,
    loss: TransfusionLoss<B>,
    batch: &TransfusionBatch<B>,
    image_weights: Option<&[f64]>,
) -> TaskLoss<B> {
    let timesteps = batch.timesteps.clone();
    // The mean times its count (a constant of the batch) is the sum.
    let lm_sum = loss.lm * loss.lm_targets;
    // [n_img]
    let per_image = loss.diffusion_per_image;
    let diffusion_sum = match image_weights {
        _ if per_image.dims()[0] == 0 => loss.diffusion,
        Some(w) => (per_image * NoiseSchedule::lookup(w, timesteps)).sum(),
        None => per_image.sum(),
    };
    TaskLoss {
        sums: [lm_sum, diffusion_sum],
        weights: [1.0, model.loss_weight],
    }
}

/// The units the two parts of [`transfusion_loss`] sum over: text targets and images.
pub fn batch_units<B: Backend>(batch: &TransfusionBatch<B>) -> [u64; 2] {
    [
        batch.text_targets.dims()[0] as u64,
        batch.num_images() as u64,
    ]
}

/// [`crate::engine::accumulate`] with the Transfusion loss over `batches` (one step on one
/// device): the gradients of the mean over every text target and every image of the
/// batches, the step's `[total, lm, diffusion]`, and whether every loss was finite.
pub fn accumulate_grads<B: AutodiffBackend>(
    model: &Transfusion<B>,
    batches: Vec<TransfusionBatch<B>>,
    poison: bool,
) -> (GradientsParams, [f64; 3], bool) {
    let units = batches
        .iter()
        .map(batch_units)
        .fold([0, 0], |a, u| [a[0] + u[0], a[1] + u[1]]);
    let acc = accumulate(model, batches, units, poison, transfusion_loss);
    let step = LocalStep {
        sums: acc.sums,
        ..LocalStep::default()
    };
    (acc.grads, step.losses(units, acc.weights), acc.finite)
}
