//! Fused kernels for the `flex` CPU backend, with and without autodiff.
//!
//! The model is generic over Burn backends; a fused kernel is taken when the backend is
//! `Flex` or `Autodiff<Flex>` (recognised at run time from the tensor primitive's type) and
//! the tensors are f32. Every other backend runs the same maths as a composition of
//! Burn's tensor operations.
//!
//! - [`swiglu`]: `silu(gate) * up` in one pass over the data forward (bit-identical to the
//!   composition: the same sigmoid, the same two products in the same order) and one pass
//!   backward, where the composition records three operations whose backward passes walk
//!   the data nine times and compute the sigmoid again.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use rayon::prelude::*;

/// The float primitive of `Autodiff<Flex>`.
type AutodiffFlexTensor =
    <Autodiff<Flex> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// Elements per parallel work item of the elementwise kernels.
const CHUNK: usize = 16 * 1024;

/// `silu(gate) * up`, the gated product of a SwiGLU block.
///
/// # Shapes
/// `gate`, `up`: the same shape; output that shape
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let fusable =
        gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.dims() == up.dims();
    let primitive = TypeId::of::<B::FloatTensorPrimitive>();
    if !fusable
        || ![
            TypeId::of::<FlexTensor>(),
            TypeId::of::<AutodiffFlexTensor>(),
        ]
        .contains(&primitive)
    {
        return silu(gate) * up;
    }
    let (g, u) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let out = if primitive == TypeId::of::<FlexTensor>() {
        cast(swiglu_forward(&cast(g), &cast(u)).0)
    } else {
        cast(swiglu_autodiff(cast(g), cast(u)))
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `t` as a `U`; the caller has checked that `T` is `U`.
fn cast<T: 'static, U: 'static>(t: T) -> U {
    let mut slot = Some(t);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take)
        .expect("the caller checked the type")
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

fn contiguous_f32(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn flex_from(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `(silu(g) * u, sigmoid(g))`.
fn swiglu_forward(g: &FlexTensor, u: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = g.layout().shape().clone();
    let (g, u) = (contiguous_f32(g), contiguous_f32(u));
    let (g, u) = (g.storage::<f32>(), u.storage::<f32>());
    let n = g.len();
    let mut out = vec![0.0f32; n];
    let mut sig = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK)
        .zip(sig.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (out, sig))| {
            let at = c * CHUNK;
            for i in 0..out.len() {
                let (x, s) = (g[at + i], sigmoid(g[at + i]));
                sig[i] = s;
                out[i] = (x * s) * u[at + i];
            }
        });
    (flex_from(out, shape.clone()), flex_from(sig, shape))
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
    let (dy, g, u, s) = (
        contiguous_f32(dy),
        contiguous_f32(g),
        contiguous_f32(u),
        contiguous_f32(s),
    );
    let (dy, g, u, s) = (
        dy.storage::<f32>(),
        g.storage::<f32>(),
        u.storage::<f32>(),
        s.storage::<f32>(),
    );
    let n = g.len();
    let mut dg = vec![0.0f32; n];
    let mut du = vec![0.0f32; n];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let at = c * CHUNK;
            for i in 0..dg.len() {
                let (d, x, v, s) = (dy[at + i], g[at + i], u[at + i], s[at + i]);
                du[i] = d * (x * s);
                dg[i] = d * v * s * (1.0 + x * (1.0 - s));
            }
        });
    (flex_from(dg, shape.clone()), flex_from(du, shape))
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
        .prepare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>([
            g.node.clone(),
            u.node.clone(),
        ])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((g.primitive, u.primitive, s), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
