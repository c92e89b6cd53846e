//! Attention whose memory is linear in the sequence: the scores exist one block of
//! queries at a time, the Transfusion mask is computed per block from the positions'
//! metadata (no `[b, h, s, lk]` tensor), and the training pass keeps only the output and
//! each row's log-sum-exp for its backward pass, which recomputes the scores block by
//! block.
//!
//! The passes are Burn tensor operations ([`kernel`]), so every backend runs them. Under
//! autodiff they are one operation with its own backward pass, recorded on the backend
//! inside `Autodiff` (see [`crate::ops::autodiff_inner`]); on an autodiff backend this crate
//! does not know, the blocks are recorded op by op (same values, memory not linear).

pub mod kernel;
pub mod plan;

pub use plan::{BlockPlan, QueryBlock};

use crate::ops::autodiff_inner::AutodiffTensor;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use crate::ops::autodiff_inner::{self, cast, InnerVisitor};

/// Passes over this many keys or more take the blockwise attention by default
/// ([`crate::Transfusion::with_blockwise_from`]); shorter ones keep the dense mask, faster
/// there.
pub const MIN_KEYS: usize = 1024;

/// Whether a pass of `new` query positions per row over `keys` keys takes the blockwise
/// attention when passes from `from` keys on do: decoding (one query) never does.
pub fn takes_blockwise(new: usize, keys: usize, from: usize) -> bool {
    new > 1 && keys >= from
}

/// `softmax(q k^T / sqrt(hd) + mask) v` over the plan's blocks; a query that may see no
/// key gives zeros.
///
/// # Shapes
/// - `q`: `[b, h, s, hd]`, `k`, `v`: `[b, h, lk, hd]`; `plan` over `s` queries, `lk` keys
/// - output: `[b, h, s, hd]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    plan: &BlockPlan<B>,
) -> Tensor<B, 4> {
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    if !B::ad_enabled(&q.device()) {
        return kernel::forward(q, k, v, plan, scale).0;
    }
    let op = Recorded {
        q,
        k,
        v,
        plan: plan.clone(),
        scale,
    };
    match autodiff_inner::visit(op) {
        Ok(out) => out,
        Err(op) => kernel::forward(op.q, op.k, op.v, &op.plan, scale).0,
    }
}

/// The inputs of a pass recorded as one autodiff operation.
struct Recorded<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    plan: BlockPlan<B>,
    scale: f64,
}

impl<B: Backend> InnerVisitor<B> for Recorded<B> {
    type Output = Tensor<B, 4>;

    fn visit<I: Backend, C: CheckpointStrategy>(self) -> Tensor<B, 4> {
        let ad = |t: Tensor<B, 4>| -> AutodiffTensor<I> { cast(t.into_primitive().tensor()) };
        let (q, k, v) = (ad(self.q), ad(self.k), ad(self.v));
        let inner = |t: &AutodiffTensor<I>| -> Tensor<I, 4> {
            Tensor::from_primitive(TensorPrimitive::Float(t.primitive.clone()))
        };
        let plan: BlockPlan<I> = self
            .plan
            .map_backend(|t| Tensor::from_primitive(cast(t.into_primitive())));
        let (out, lse) = kernel::forward(inner(&q), inner(&k), inner(&v), &plan, self.scale);
        let state = Saved {
            q: inner(&q),
            k: inner(&k),
            v: inner(&v),
            out: out.clone(),
            lse,
            plan,
            scale: self.scale,
        };
        let out = out.into_primitive().tensor();
        let nodes = [&q, &k, &v].map(|t| t.node.clone());
        let out: AutodiffTensor<I> = match BlockwiseBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        let out: <Autodiff<I, C> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive =
            out;
        Tensor::from_primitive(TensorPrimitive::Float(cast(out)))
    }
}

/// The recorded operation.
#[derive(Debug)]
struct BlockwiseBackward;

/// What the backward pass recomputes the scores from.
#[derive(Clone, Debug)]
struct Saved<I: Backend> {
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    out: Tensor<I, 4>,
    lse: Tensor<I, 4>,
    plan: BlockPlan<I>,
    scale: f64,
}

impl<I: Backend> Backward<I, 3> for BlockwiseBackward {
    type State = Saved<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            q,
            k,
            v,
            out,
            lse,
            plan,
            scale,
        } = ops.state;
        let d_out =
            Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let (dq, dk, dv) = kernel::backward(q, k, v, out, lse, d_out, &plan, scale);
        for (parent, grad) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}
