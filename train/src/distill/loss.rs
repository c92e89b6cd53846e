//! The distillation loss of one micro-batch: the student's LM loss on the packed rows and
//! sCD's adaptive-weighted consistency loss on their generation images (see
//! [`transfusion_model::consistency`] for the maths).

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::IndexingUpdateOp;
use transfusion_model::consistency::{
    adaptive_weighted_loss, consistency_tangent, grid_neighbours, normalize_tangent, per_sample,
    AdaptiveWeight,
};
use transfusion_model::trigflow::phi_at;
use transfusion_model::{Transfusion, TransfusionBatch};

use super::batch::DistillBatch;
use crate::engine::TaskLoss;

/// The model a distillation trains: the student network and the log-weight head of the
/// adaptive loss (not used for sampling).
#[derive(Module, Debug)]
pub struct ConsistencyStudent<B: Backend> {
    /// The student (a copy of the teacher at the start).
    pub model: Transfusion<B>,
    /// `w(t)` of the adaptive-weighted loss.
    pub weight: AdaptiveWeight<B>,
}

/// What the loss needs besides the batch.
pub struct DistillLossInputs<'a, B: Backend> {
    /// The teacher (no autodiff).
    pub teacher: &'a Transfusion<B>,
    /// Guidance scale of the teacher's velocity (1: the conditional velocity alone).
    pub guidance: f64,
    /// The tangent warm-up factor `r` in `[0, 1]`.
    pub warmup: f64,
    /// Weight of the consistency part against the LM part.
    pub weight: f64,
    /// Grid steps either side of the derivative's central difference.
    pub derivative_span: usize,
}

/// The loss parts of one micro-batch: `[LM NLL summed over the text targets, consistency
/// loss summed over the generation images]`, weighted `1` and `inputs.weight`.
pub fn distill_loss<B: AutodiffBackend>(
    student: &ConsistencyStudent<B>,
    batch: DistillBatch<B::InnerBackend>,
    inputs: &DistillLossInputs<'_, B::InnerBackend>,
) -> TaskLoss<B> {
    let packed = &batch.packed;
    let device = packed.tokens.device();
    let schedule = inputs.teacher.schedule();
    let n_img = packed.num_images();
    // [N, c, H, W] and [N]: every image at its step (generation images at their proposal).
    let image = (n_img > 0).then(|| {
        let x_t = schedule.q_sample(
            packed.latents.clone(),
            packed.noise.clone(),
            packed.timesteps.clone(),
        );
        (x_t, packed.timesteps.clone().float())
    });
    let lifted = lift_batch::<B>(packed.clone());
    let lifted_image = image
        .clone()
        .map(|(x, t)| (Tensor::from_inner(x), Tensor::from_inner(t)));
    let (hidden, out) = student.model.forward_packed(&lifted, lifted_image);
    let (lm, lm_targets) = student.model.lm_loss(hidden, &lifted);
    let lm_sum = lm * lm_targets;
    let autodiff_device = lm_sum.device();

    let consistency = match (image, out, batch.unconditional) {
        (Some((x_t, t)), Some(out), Some(uncond)) if !batch.generation.is_empty() => {
            let g = batch.generation.len();
            let gen_idx = Tensor::<B::InnerBackend, 1, Int>::from_ints(
                batch
                    .generation
                    .iter()
                    .map(|&i| i as i64)
                    .collect::<Vec<_>>()
                    .as_slice(),
                &device,
            );
            // [G, c, H, W]: the student's velocity at its generation images, and F^-.
            let f_theta = out.select(0, Tensor::from_inner(gen_idx.clone()));
            let f_minus = f_theta.clone().detach().inner();
            let x_g = x_t.clone().select(0, gen_idx.clone());
            let t_g = t.clone().select(0, gen_idx.clone());
            let velocity = teacher_velocity(inputs, packed, &uncond, &x_t, &t, &gen_idx);
            let derivative = student_derivative(
                &student.model.valid(),
                packed,
                (&x_t, &t),
                &gen_idx,
                &velocity,
                (&batch.steps, inputs.derivative_span),
            );
            let phi: Vec<f64> = batch.steps.iter().map(|&s| phi_at(&schedule, s)).collect();
            let tangent = normalize_tangent(consistency_tangent(
                x_g,
                f_minus.clone(),
                velocity,
                derivative,
                &phi,
                inputs.warmup,
            ));
            let target = Tensor::<B, 4>::from_inner(f_minus + tangent);
            let log_weight = student.weight.forward(Tensor::from_inner(t_g));
            debug_assert_eq!(log_weight.dims(), [g]);
            // Summed over the images: the engine divides by the step's image count.
            adaptive_weighted_loss(f_theta, target, log_weight).mul_scalar(g as f64)
        }
        _ => Tensor::zeros([1], &autodiff_device),
    };
    TaskLoss {
        sums: [lm_sum, consistency],
        weights: [1.0, inputs.weight],
    }
}

/// The teacher's probability-flow velocity `dx/dphi` at the generation images, guided:
/// `v_u + w (v_c - v_u)` (the samplers' formula; `w = 1`: `v_c` alone).
///
/// # Shapes
/// - `x_t`: `[N, c, H, W]`, `t`: `[N]`, `gen_idx`: `[G]`; output `[G, c, H, W]`
fn teacher_velocity<B: Backend>(
    inputs: &DistillLossInputs<'_, B>,
    packed: &TransfusionBatch<B>,
    uncond: &TransfusionBatch<B>,
    x_t: &Tensor<B, 4>,
    t: &Tensor<B, 1>,
    gen_idx: &Tensor<B, 1, Int>,
) -> Tensor<B, 4> {
    let teacher = inputs.teacher;
    let (_, out) = teacher.forward_packed(packed, Some((x_t.clone(), t.clone())));
    let conditional = out
        .expect("the batch has images")
        .select(0, gen_idx.clone());
    if (inputs.guidance - 1.0).abs() < f64::EPSILON {
        return conditional;
    }
    let x_g = x_t.clone().select(0, gen_idx.clone());
    let t_g = t.clone().select(0, gen_idx.clone());
    let (_, out) = teacher.forward_packed(uncond, Some((x_g, t_g)));
    let unconditional = out.expect("the rows hold images");
    unconditional.clone() + (conditional - unconditional).mul_scalar(inputs.guidance)
}

/// `dF^-/dphi` of the student (without gradient) along the teacher's trajectory at the
/// generation images, by a central difference over the grid steps `span` either side:
/// `(F(x + d_+ v, phi_{t+k}) - F(x + d_- v, phi_{t-k})) / (d_+ - d_-)` with
/// `d_± = phi_{t±k} - phi_t`. The other images stay as they are.
///
/// # Shapes
/// - `x_t`: `[N, c, H, W]`, `t`: `[N]`, `gen_idx`: `[G]`, `velocity`: `[G, c, H, W]`;
///   output `[G, c, H, W]`
fn student_derivative<B: Backend>(
    student: &Transfusion<B>,
    packed: &TransfusionBatch<B>,
    (x_t, t): (&Tensor<B, 4>, &Tensor<B, 1>),
    gen_idx: &Tensor<B, 1, Int>,
    velocity: &Tensor<B, 4>,
    (steps, span): (&[usize], usize),
) -> Tensor<B, 4> {
    let schedule = student.schedule();
    let device = x_t.device();
    let near: Vec<_> = steps
        .iter()
        .map(|&s| grid_neighbours(&schedule, s, span))
        .collect();
    let shape = velocity.dims();
    let at = |offset: &dyn Fn(usize) -> (f64, usize)| {
        let phi_shift: Vec<f64> = (0..steps.len()).map(|i| offset(i).0).collect();
        let step: Vec<f32> = (0..steps.len()).map(|i| offset(i).1 as f32).collect();
        // [G, c, H, W]: each generation image moved along the velocity by its angle shift.
        let moved = velocity.clone() * per_sample::<B, 4>(&phi_shift, |d| d, shape, &device);
        let x = x_t
            .clone()
            .select_assign(0, gen_idx.clone(), moved, IndexingUpdateOp::Add);
        // [G]: from each generation image's step to its neighbour's.
        let to_step = Tensor::<B, 1>::from_floats(step.as_slice(), &device)
            - t.clone().select(0, gen_idx.clone());
        let t = t
            .clone()
            .select_assign(0, gen_idx.clone(), to_step, IndexingUpdateOp::Add);
        let (_, out) = student.forward_packed(packed, Some((x, t)));
        out.expect("the batch has images")
            .select(0, gen_idx.clone())
    };
    let ahead = at(&|i| (near[i].to_ahead, near[i].ahead));
    let behind = at(&|i| (near[i].to_behind, near[i].behind));
    let span: Vec<f64> = near.iter().map(|n| n.to_ahead - n.to_behind).collect();
    (ahead - behind) / per_sample::<B, 4>(&span, |d| d, shape, &device)
}

/// The packed batch on the autodiff backend (constants: no gradient flows into it).
fn lift_batch<B: AutodiffBackend>(b: TransfusionBatch<B::InnerBackend>) -> TransfusionBatch<B> {
    TransfusionBatch {
        tokens: Tensor::from_inner(b.tokens),
        targets: Tensor::from_inner(b.targets),
        text_targets: Tensor::from_inner(b.text_targets),
        positions: Tensor::from_inner(b.positions),
        span_ids: Tensor::from_inner(b.span_ids),
        doc_ids: Tensor::from_inner(b.doc_ids),
        latents: Tensor::from_inner(b.latents),
        noise: Tensor::from_inner(b.noise),
        timesteps: Tensor::from_inner(b.timesteps),
        source_index: Tensor::from_inner(b.source_index),
        patch_positions: Tensor::from_inner(b.patch_positions),
    }
}
