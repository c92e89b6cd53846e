//! The training attention `softmax(q k^T / sqrt(hd) + bias) v` as one operation with its
//! own backward pass on `flex`.
//!
//! The composition records eleven operations; its backward pass computes the exponentials
//! again, divides by the row sums twice and broadcasts them back over the `[.., lk]`
//! scores. Here the forward pass keeps the probabilities `P`, and the backward pass is
//! four products and one pass over `P`: `dV = P^T dO`, `dP = dO V^T`,
//! `dS = P (dP - rowsum(dO O))`, `dq = dS k / sqrt(hd)`, `dk = dS^T q / sqrt(hd)`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::DType;
use rayon::prelude::*;

use super::{contiguous, flex_from, path, primitive, tensor, AutodiffFlexTensor, Path, CHUNK};

/// `softmax(q k^T / sqrt(hd) + bias) v`, the attention of a pass that records gradients
/// (`bias`: `0` where a key is visible, `-inf` where masked).
///
/// A row whose keys are all masked gives zeros. The shift before the exponential is the
/// row maximum (clamped to at least `-1e4`), which the softmax does not depend on.
///
/// # Shapes
/// - `q`: `[b, h, s, hd]`, `k`, `v`: `[b, h, lk, hd]`, `bias`: `[b, h, s, lk]`
/// - output: `[b, h, s, hd]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let f32s = [&q, &k, &v, &bias].iter().all(|t| t.dtype() == DType::F32);
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    match path::<B>().filter(|_| f32s) {
        Some(Path::Flex) => {
            let (q, k, v, bias) = (primitive(q), primitive(k), primitive(v), primitive(bias));
            tensor(attention_forward(&q, &k, &v, &bias, scale as f32).0)
        }
        Some(Path::AutodiffFlex) => tensor(attention_autodiff(
            primitive(q),
            primitive(k),
            primitive(v),
            primitive(bias),
            scale as f32,
        )),
        None => composed(q, k, v, bias, scale),
    }
}

/// The same attention as Burn operations, for every other backend.
fn composed<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let q = q.mul_scalar(scale);
    // [b, h, s, lk]
    let scores = q.matmul(k.swap_dims(2, 3)) + bias;
    // [b, h, s, 1]; detached: any shift gives the same softmax
    let shift = scores.clone().detach().max_dim(3).clamp_min(-1.0e4);
    let weights = (scores - shift).exp();
    let sum = weights.clone().sum_dim(3).clamp_min(1.0e-30);
    // normalising the [.., hd] output rather than the [.., lk] weights
    weights.matmul(v) / sum
}

/// `(O, P)`: the output `[b, h, s, hd]` and the probabilities `[b, h, s, lk]`.
fn attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
    scale: f32,
) -> (FlexTensor, FlexTensor) {
    // [b, h, s, lk]
    let raw = Flex::float_matmul(q.clone(), k.transpose(2, 3)).to_contiguous();
    let shape = raw.layout().shape().clone();
    let lk = shape[3];
    let bias = bias.to_contiguous();
    let (raw, bias) = (raw.storage::<f32>(), bias.storage::<f32>());
    let mut p = vec![0.0f32; raw.len()];
    let rows_per_task = (CHUNK / lk.max(1)).max(1);
    p.par_chunks_mut(rows_per_task * lk)
        .enumerate()
        .for_each(|(task, rows)| {
            let at = task * rows_per_task * lk;
            for (r, row) in rows.chunks_mut(lk).enumerate() {
                let base = at + r * lk;
                let mut max = f32::NEG_INFINITY;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = raw[base + j] * scale + bias[base + j];
                    max = max.max(*x);
                }
                let shift = max.max(-1.0e4);
                let mut sum = 0.0f32;
                for x in row.iter_mut() {
                    *x = (*x - shift).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum.max(1.0e-30);
                for x in row.iter_mut() {
                    *x *= inv;
                }
            }
        });
    let p = flex_from(p, shape);
    let out = Flex::float_matmul(p.clone(), v.clone());
    (out, p)
}

/// `dS = P (dP - rowsum(dO O))`, `[b, h, s, lk]`.
fn score_gradient(
    p: &FlexTensor,
    dp: &FlexTensor,
    d_out: &FlexTensor,
    out: &FlexTensor,
) -> FlexTensor {
    let shape = p.layout().shape().clone();
    let (lk, hd) = (shape[3], d_out.layout().shape()[3]);
    let [p, dp, d_out, out] = contiguous([p, dp, d_out, out]);
    let [p, dp, d_out, out] = [&p, &dp, &d_out, &out].map(|t| t.storage::<f32>());
    let mut ds = vec![0.0f32; p.len()];
    let rows_per_task = (CHUNK / lk.max(1)).max(1);
    ds.par_chunks_mut(rows_per_task * lk)
        .enumerate()
        .for_each(|(task, rows)| {
            let first = task * rows_per_task;
            for (r, row) in rows.chunks_mut(lk).enumerate() {
                let (row_at, o_at) = ((first + r) * lk, (first + r) * hd);
                let dot: f32 = (0..hd).map(|d| d_out[o_at + d] * out[o_at + d]).sum();
                for (j, x) in row.iter_mut().enumerate() {
                    *x = p[row_at + j] * (dp[row_at + j] - dot);
                }
            }
        });
    flex_from(ds, shape)
}

#[derive(Debug)]
struct AttentionBackward;

/// What the backward pass needs.
#[derive(Clone, Debug)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    p: FlexTensor,
    out: FlexTensor,
    scale: f32,
}

impl Backward<Flex, 4> for AttentionBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            q,
            k,
            v,
            p,
            out,
            scale,
        } = ops.state;
        let d_out = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [q_node, k_node, v_node, bias_node] = ops.parents;
        if let Some(node) = v_node {
            // [b, h, lk, hd]
            let dv = Flex::float_matmul(p.transpose(2, 3), d_out.clone());
            grads.register::<Flex>(node.id, dv);
        }
        if q_node.is_none() && k_node.is_none() && bias_node.is_none() {
            return;
        }
        let dp = Flex::float_matmul(d_out.clone(), v.transpose(2, 3));
        let ds = score_gradient(&p, &dp, &d_out, &out);
        if let Some(node) = bias_node {
            grads.register::<Flex>(node.id, ds.clone());
        }
        let ds = Flex::float_mul_scalar(ds, (scale as f64).into());
        if let Some(node) = q_node {
            // [b, h, s, hd]
            grads.register::<Flex>(node.id, Flex::float_matmul(ds.clone(), k));
        }
        if let Some(node) = k_node {
            // [b, h, lk, hd]
            grads.register::<Flex>(node.id, Flex::float_matmul(ds.transpose(2, 3), q));
        }
    }
}

fn attention_autodiff(
    q: AutodiffFlexTensor,
    k: AutodiffFlexTensor,
    v: AutodiffFlexTensor,
    bias: AutodiffFlexTensor,
    scale: f32,
) -> AutodiffFlexTensor {
    let (out, p) = attention_forward(
        &q.primitive,
        &k.primitive,
        &v.primitive,
        &bias.primitive,
        scale,
    );
    match AttentionBackward
        .prepare::<NoCheckpointing>([
            q.node.clone(),
            k.node.clone(),
            v.node.clone(),
            bias.node.clone(),
        ])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                p,
                out: out.clone(),
                scale,
            };
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
