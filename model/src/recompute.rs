//! Activation recomputation per decoder layer: the forward pass runs a layer without
//! recording it and keeps only the layer's input; the backward pass runs the layer again,
//! recorded, and back-propagates through it. The gradients are the same; the memory kept
//! for the backward pass is one `[b, s, d]` input per layer plus one layer's activations at
//! a time, for about a third more compute.
//!
//! It is one autodiff operation per layer, on the backends [`crate::autodiff_inner`]
//! knows; elsewhere layers are recorded as usual.

use std::fmt;
use std::str::FromStr;

use crate::autodiff_inner::AutodiffTensor;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use serde::{Deserialize, Serialize};

use crate::autodiff_inner::{self, cast, InnerVisitor};
use crate::block::DecoderBlock;
use crate::pass::PassPlan;
use crate::precision::Precision;

/// What the backward pass recomputes instead of keeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation (fastest).
    #[default]
    None,
    /// Keep each decoder layer's input only; run the layer again in the backward pass.
    Layers,
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Layers => "layers",
        })
    }
}

impl FromStr for Recompute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "layers" => Ok(Self::Layers),
            other => Err(format!(
                "unknown recompute `{other}` (expected none or layers)"
            )),
        }
    }
}

/// `block` over `x` planned by `plan` (no cache), recorded as one operation that keeps
/// only `x`; `None` when the backend has no such operation (the caller records the layer
/// as usual).
///
/// # Shapes
/// `x`: `[b, s, d]` -> `[b, s, d]`
pub fn recomputed_layer<B: Backend>(
    block: &DecoderBlock<B>,
    x: Tensor<B, 3>,
    plan: &PassPlan<B>,
    precision: Precision,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let layer = Layer {
        block: block.clone(),
        x,
        plan: plan.clone(),
        precision,
    };
    autodiff_inner::visit(layer).map_err(|layer| layer.x)
}

/// One layer's forward pass to record.
struct Layer<B: Backend> {
    block: DecoderBlock<B>,
    x: Tensor<B, 3>,
    plan: PassPlan<B>,
    precision: Precision,
}

impl<B: Backend> InnerVisitor<B> for Layer<B> {
    type Output = Tensor<B, 3>;

    fn visit<I: Backend, C: CheckpointStrategy>(self) -> Tensor<B, 3> {
        let block: DecoderBlock<Autodiff<I, C>> = cast(self.block);
        let plan: PassPlan<Autodiff<I, C>> = cast(self.plan);
        let x: Tensor<Autodiff<I, C>, 3> = cast(self.x);
        // Without a tracked parent the op would not be recorded, and the layer's weights
        // would get no gradient: an untracked input becomes a leaf of its own.
        let x = if x.is_require_grad() {
            x
        } else {
            x.require_grad()
        };
        let x_node: AutodiffTensor<I> = x.clone().into_primitive().tensor();
        // run without recording: untracked weights and input
        let out = block
            .clone()
            .no_grad()
            .forward(
                x.clone().detach(),
                &plan.layer_context(None, self.precision),
            )
            .0;
        let out: AutodiffTensor<I> = out.into_primitive().tensor();
        let state = Saved {
            block,
            plan,
            precision: self.precision,
            x: x.inner(),
        };
        let out = match LayerBackward(std::marker::PhantomData)
            .prepare::<C>([x_node.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out.primitive),
            OpsKind::UnTracked(prep) => prep.finish(out.primitive),
        };
        cast(Tensor::<Autodiff<I, C>, 3>::from_primitive(
            TensorPrimitive::Float(out),
        ))
    }
}

/// The recorded operation of one layer.
#[derive(Debug)]
struct LayerBackward<C>(std::marker::PhantomData<C>);

/// What the backward pass runs the layer again from.
#[derive(Clone, Debug)]
struct Saved<I: Backend, C: CheckpointStrategy> {
    block: DecoderBlock<Autodiff<I, C>>,
    plan: PassPlan<Autodiff<I, C>>,
    precision: Precision,
    x: Tensor<I, 3>,
}

impl<I: Backend, C: CheckpointStrategy> Backward<I, 1> for LayerBackward<C> {
    type State = Saved<I, C>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            block,
            plan,
            precision,
            x,
        } = ops.state;
        let d_out: Tensor<I, 3> =
            Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        // The layer again, recorded in a graph of its own: its weights as fresh leaves
        // (the originals' nodes belong to the graph being walked now).
        let mut fresh = FreshLeaves::default();
        let block = block.map(&mut fresh);
        let x = Tensor::<Autodiff<I, C>, 3>::from_inner(x).require_grad();
        let out = block
            .forward(x.clone(), &plan.layer_context(None, precision))
            .0;
        let layer_grads = (out * Tensor::from_inner(d_out)).sum().backward();
        if let [Some(node)] = &ops.parents {
            if let Some(g) = x.grad(&layer_grads) {
                grads.register::<I>(node.id, g.into_primitive().tensor());
            }
        }
        let mut found = LeafGradients {
            grads: &layer_grads,
            out: Vec::new(),
        };
        block.visit(&mut found);
        for (original, grad) in fresh.originals.into_iter().zip(found.out) {
            if let (Some(id), Some(grad)) = (original, grad) {
                grads.register::<I>(id, grad);
            }
        }
    }
}

/// Replaces each weight by a fresh leaf of the same value (tracked where the weight is),
/// noting the original's node, in visiting order.
#[derive(Default)]
struct FreshLeaves {
    originals: Vec<Option<NodeId>>,
}

impl<I: Backend, C: CheckpointStrategy> ModuleMapper<Autodiff<I, C>> for FreshLeaves {
    fn map_float<const D: usize>(
        &mut self,
        param: Param<Tensor<Autodiff<I, C>, D>>,
    ) -> Param<Tensor<Autodiff<I, C>, D>> {
        let (id, tensor, mapper) = param.consume();
        let tracked = tensor.is_require_grad();
        let node: AutodiffTensor<I> = tensor.clone().into_primitive().tensor();
        self.originals.push(tracked.then_some(node.node.id));
        let fresh = Tensor::from_inner(tensor.inner());
        let fresh = if tracked { fresh.require_grad() } else { fresh };
        Param::from_mapped_value(id, fresh, mapper)
    }
}

/// The gradient of each weight in `grads`, in visiting order.
struct LeafGradients<'a, I: Backend> {
    grads: &'a Gradients,
    out: Vec<Option<I::FloatTensorPrimitive>>,
}

impl<I: Backend, C: CheckpointStrategy> ModuleVisitor<Autodiff<I, C>> for LeafGradients<'_, I> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Autodiff<I, C>, D>>) {
        let grad = param.val().grad(self.grads);
        self.out.push(grad.map(|g| g.into_primitive().tensor()));
    }
}
