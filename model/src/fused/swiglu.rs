//! `silu(gate) * up` in one pass over the data forward (bit-identical to the composition:
//! the same sigmoid, the same two products in the same order) and one pass backward, where
//! the composition records three operations whose backward passes walk the data nine
//! times and compute the sigmoid again.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::DType;

use super::{contiguous, fill_pair, path, primitive, tensor, AutodiffFlexTensor, Path};

/// `silu(gate) * up`, the gated product of a SwiGLU block.
///
/// # Shapes
/// `gate`, `up`: the same shape; output that shape
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let fusable =
        gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.dims() == up.dims();
    match path::<B>().filter(|_| fusable) {
        Some(Path::Flex) => {
            let (g, u) = (primitive(gate), primitive(up));
            tensor(swiglu_forward(&g, &u).0)
        }
        Some(Path::AutodiffFlex) => tensor(swiglu_autodiff(primitive(gate), primitive(up))),
        None => silu(gate) * up,
    }
}

/// Burn `flex`'s sigmoid, so that the fused forward pass is bit-identical.
#[inline]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `(silu(g) * u, sigmoid(g))`.
fn swiglu_forward(g: &FlexTensor, u: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = g.layout().shape().clone();
    let [g, u] = contiguous([g, u]);
    let (g, u) = (g.storage::<f32>(), u.storage::<f32>());
    fill_pair(shape, |i| {
        let (x, s) = (g[i], sigmoid(g[i]));
        ((x * s) * u[i], s)
    })
}

/// `(d gate, d up)` from the output's gradient `dy`:
/// `d up = dy silu(g)`, `d gate = dy u s (1 + g (1 - s))` with `s = sigmoid(g)`.
fn swiglu_backward(
    dy: &FlexTensor,
    g: &FlexTensor,
    u: &FlexTensor,
    s: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let shape = g.layout().shape().clone();
    let [dy, g, u, s] = contiguous([dy, g, u, s]);
    let [dy, g, u, s] = [&dy, &g, &u, &s].map(|t| t.storage::<f32>());
    fill_pair(shape, |i| {
        let (d, x, v, s) = (dy[i], g[i], u[i], s[i]);
        (d * v * s * (1.0 + x * (1.0 - s)), d * (x * s))
    })
}

#[derive(Debug)]
struct SwiGluBackward;

impl Backward<Flex, 2> for SwiGluBackward {
    /// `(gate, up, sigmoid(gate))`.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, u, s) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let (dg, du) = swiglu_backward(&dy, &g, &u, &s);
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, dg);
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, du);
        }
    }
}

fn swiglu_autodiff(g: AutodiffFlexTensor, u: AutodiffFlexTensor) -> AutodiffFlexTensor {
    let (out, s) = swiglu_forward(&g.primitive, &u.primitive);
    match SwiGluBackward
        .prepare::<NoCheckpointing>([g.node.clone(), u.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((g.primitive, u.primitive, s), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
