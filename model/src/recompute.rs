//! Activation recomputation per decoder layer: the gradients of a training objective with
//! only each layer's input kept between the forward and the backward pass.
//!
//! The forward pass runs the decoder with weights that record no autodiff graph (the same
//! operations as a training pass) and keeps the `[b, s, d]` input of every layer. The backward pass then goes segment by segment, from
//! the output back to the input:
//! 1. the heads and the loss, from the last layer's output as a leaf;
//! 2. each layer, re-run from its kept input with the autodiff graph, its backward pass
//!    seeded with the gradient of its output (`sum(out * grad)` has that gradient);
//! 3. the embeddings, whose graph is the one part kept from the forward pass (token
//!    embedding, image adapter encoder: a few `[b, s, d]` tensors).
//!
//! The image adapter's context (timestep embedding, U-Net skips) feeds both the embeddings
//! and the image head; the head segment takes it as leaves and hands its gradient to the
//! embedding segment. Every parameter's gradient is the sum of its segments' (Burn's
//! `GradientsAccumulator`), so the result is the gradient of one backward pass through the
//! whole graph, up to the order of float sums.
//!
//! Peak memory: the layer inputs (`n_layers * b * s * d` values), one layer's activations,
//! and the heads' (see the memory plan in `transfusion-train plan`).

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::batch::TransfusionBatch;
use crate::image_adapter::ImageContext;
use crate::model::Transfusion;

impl<B: AutodiffBackend> Transfusion<B> {
    /// The gradients of `head`'s objective over one packed batch, recomputing each decoder
    /// layer's activations in the backward pass instead of keeping them (see the module
    /// doc). `image` is the batch's noisy latents and timesteps, as for
    /// [`Transfusion::forward_packed`]; `head` receives what `forward_packed` returns (the
    /// flat final-normed hidden states and the image head's output) and returns the scalar
    /// objective and whatever the caller wants back from it (e.g. the loss values).
    ///
    /// # Shapes
    /// - `x_t`: `[N, c, H, W]`, `t`: `[N]`
    /// - `head`: `[b*s, d]`, `[N, c, H, W]` -> `[1]`
    pub fn recomputed_gradients<T>(
        &self,
        batch: &TransfusionBatch<B>,
        image: Option<(Tensor<B, 4>, Tensor<B, 1>)>,
        head: impl FnOnce(Tensor<B, 2>, Option<Tensor<B, 4>>) -> (Tensor<B, 1>, T),
    ) -> (GradientsParams, T) {
        let mut total = GradientsAccumulator::<Self>::new();
        // Embeddings, graph kept: [b, s, d]
        let (x0, ctx) = self.embed_batch(batch, image);

        // Forward through the decoder without a graph (the same operations as a training
        // pass, with weights that record nothing), keeping each layer's input.
        let plan = self.plan_pass(batch.positions.clone(), batch.span_meta(), None);
        let untracked = self.clone().no_grad();
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = x0.clone().detach();
        for block in &untracked.blocks {
            inputs.push(x.clone());
            x = block
                .forward(x, &plan.layer_context(None, self.precision))
                .0;
        }
        drop(untracked);

        // 1. Heads and loss, from leaves: the last output and the image context.
        let last = x.require_grad();
        let ctx_leaves = ctx.as_ref().map(context_leaves);
        let (flat, out) =
            self.packed_outputs(self.final_norm(last.clone()), ctx_leaves.as_ref(), batch);
        let (objective, value) = head(flat, out);
        let mut grads = objective.backward();
        let mut grad = last
            .grad_remove(&mut grads)
            .expect("the objective depends on the last layer's output");
        let ctx_grads = ctx_leaves.map(|c| context_grads(&c, &mut grads));
        total.accumulate(self, GradientsParams::from_grads(grads, self));

        // 2. Each layer, re-run from its input, last to first.
        for (block, input) in self.blocks.iter().zip(inputs).rev() {
            let input = input.require_grad();
            let (out, _) = block.forward(input.clone(), &plan.layer_context(None, self.precision));
            // sum(out * g) has gradient g with respect to `out`.
            let mut grads = (out * Tensor::from_inner(grad)).sum().backward();
            grad = input
                .grad_remove(&mut grads)
                .expect("a layer's output depends on its input");
            total.accumulate(self, GradientsParams::from_module(&mut grads, block));
        }

        // 3. Embeddings, seeded with the gradients of their outputs.
        let mut seed = (x0 * Tensor::from_inner(grad)).sum();
        if let (Some(ctx), Some(g)) = (ctx, ctx_grads) {
            seed = context_seed(seed, ctx, g);
        }
        let grads = seed.backward();
        total.accumulate(self, GradientsParams::from_grads(grads, self));
        (total.grads(), value)
    }
}

/// The image context's values as fresh leaves of the graph.
fn context_leaves<B: AutodiffBackend>(ctx: &ImageContext<B>) -> ImageContext<B> {
    ImageContext {
        temb: ctx.temb.clone().detach().require_grad(),
        skips: ctx
            .skips
            .iter()
            .map(|s| s.clone().detach().require_grad())
            .collect(),
    }
}

/// The gradients of the context leaves (`None` where the head does not use one).
struct ContextGrads<B: AutodiffBackend> {
    temb: Option<Tensor<B::InnerBackend, 2>>,
    skips: Vec<Option<Tensor<B::InnerBackend, 4>>>,
}

fn context_grads<B: AutodiffBackend>(
    leaves: &ImageContext<B>,
    grads: &mut B::Gradients,
) -> ContextGrads<B> {
    ContextGrads {
        temb: leaves.temb.grad_remove(grads),
        skips: leaves.skips.iter().map(|s| s.grad_remove(grads)).collect(),
    }
}

/// `seed + sum_k <ctx_k, grad_k>`: its gradient with respect to each context tensor is
/// that tensor's gradient from the head segment. (No tensor is created here: a new one
/// would take the device's default dtype, which tests on other backends may have set.)
fn context_seed<B: AutodiffBackend>(
    mut seed: Tensor<B, 1>,
    ctx: ImageContext<B>,
    g: ContextGrads<B>,
) -> Tensor<B, 1> {
    if let Some(gt) = g.temb {
        seed = seed + (ctx.temb * Tensor::from_inner(gt)).sum();
    }
    for (skip, gs) in ctx.skips.into_iter().zip(g.skips) {
        if let Some(gs) = gs {
            seed = seed + (skip * Tensor::from_inner(gs)).sum();
        }
    }
    seed
}
