//! The training attention `softmax(q k^T / sqrt(hd) + bias) v` as one operation with its
//! own backward pass on `flex`.
//!
//! The composition records eleven operations; its backward pass computes the exponentials
//! again, divides by the row sums twice and broadcasts them back over the `[.., lk]`
//! scores. Here the forward pass keeps what the blockwise attention keeps
//! ([`crate::ops::blockwise`]): the output and each row's log-sum-exp `L`, no `[.., s, lk]`
//! tensor per layer. The backward pass recomputes `P = exp(S - L)` from one product and
//! one pass over the scores, then four products and one more pass: `dV = P^T dO`,
//! `dP = dO V^T`, `dS = P (dP - rowsum(dO O))`, `dq = dS k / sqrt(hd)`,
//! `dk = dS^T q / sqrt(hd)`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use super::gemm::{matmul, matmul_values};
use super::math::{exp_nonpositive, max_of, multiversion, sum_of};
use super::{
    contiguous, dense, flex_from, path, primitive, record, tensor, AutodiffFlexTensor, Path, CHUNK,
};

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
        None => crate::ops::reference::attention(q, k, v, bias),
    }
}

/// `(O, L)`: the output `[b, h, s, hd]` and each row's log-sum-exp `[b * h * s]` of the
/// scaled, biased scores.
fn attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
    scale: f32,
) -> (FlexTensor, Vec<f32>) {
    // [b, h, s, lk]: scale q k^T, in the buffer that becomes P
    let (mut p, shape) = matmul_values(q, &k.transpose(2, 3), scale);
    let lk = shape[3];
    let [bias] = contiguous([bias]);
    let bias = dense(&bias);
    assert_eq!(bias.len(), p.len(), "attention: a bias for every score");
    let rows_per_task = (CHUNK / lk.max(1)).max(1);
    let mut lse = vec![0.0f32; p.len() / lk.max(1)];
    p.par_chunks_mut(rows_per_task * lk)
        .zip(bias.par_chunks(rows_per_task * lk))
        .zip(lse.par_chunks_mut(rows_per_task))
        .for_each(|((rows, bias), lse)| softmax_rows(rows, bias, lse, lk));
    let p = flex_from(p, shape);
    let out = matmul(&p, v, 1.0);
    (out, lse)
}

/// `P = exp(q k^T scale + bias - L)`, `[b, h, s, lk]`: the probabilities of the forward
/// pass from its row log-sum-exps.
fn probabilities(
    q: &FlexTensor,
    k: &FlexTensor,
    bias: &FlexTensor,
    lse: &[f32],
    scale: f32,
) -> FlexTensor {
    let (mut p, shape) = matmul_values(q, &k.transpose(2, 3), scale);
    let lk = shape[3];
    let [bias] = contiguous([bias]);
    let bias = dense(&bias);
    let rows_per_task = (CHUNK / lk.max(1)).max(1);
    p.par_chunks_mut(rows_per_task * lk)
        .zip(bias.par_chunks(rows_per_task * lk))
        .zip(lse.par_chunks(rows_per_task))
        .for_each(|((rows, bias), lse)| probability_rows(rows, bias, lse, lk));
    flex_from(p, shape)
}

multiversion! {
    /// Each row of `lk` scores in `rows`, plus the same row of `bias`, replaced by its
    /// softmax, and its log-sum-exp written to `lse`; the shift before the exponential is
    /// the row maximum (clamped to at least `-1e4`).
    fn softmax_rows(rows: &mut [f32], bias: &[f32], lse: &mut [f32], lk: usize) {
        for ((row, bias), lse) in rows.chunks_mut(lk).zip(bias.chunks(lk)).zip(lse) {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x += b;
            }
            let shift = max_of(row).max(-1.0e4);
            for x in row.iter_mut() {
                *x = exp_nonpositive(*x - shift);
            }
            let sum = sum_of(row).max(1.0e-30);
            let inv = 1.0 / sum;
            for x in row.iter_mut() {
                *x *= inv;
            }
            *lse = shift + sum.ln();
        }
    }
}

multiversion! {
    /// Each row of `lk` scores in `rows`, plus the same row of `bias`, replaced by
    /// `exp(score - lse)` of its row's log-sum-exp (at most 1: a probability).
    fn probability_rows(rows: &mut [f32], bias: &[f32], lse: &[f32], lk: usize) {
        for ((row, bias), &lse) in rows.chunks_mut(lk).zip(bias.chunks(lk)).zip(lse) {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x = exp_nonpositive((*x + b - lse).min(0.0));
            }
        }
    }
}

multiversion! {
    /// `dS = P (dP - rowsum(dO O))` over rows of `lk` scores: `rows` holds `dP` and
    /// becomes `dS`; `p` holds the same rows of `P`, `d_out` and `out` start at their
    /// first row of `hd` values.
    fn score_gradient_rows(
        rows: &mut [f32],
        p: &[f32],
        d_out: &[f32],
        out: &[f32],
        lk: usize,
        hd: usize,
    ) {
        let rows = rows.chunks_mut(lk).zip(p.chunks(lk));
        for ((row, p), (d_out, out)) in rows.zip(d_out.chunks(hd).zip(out.chunks(hd))) {
            let dot: f32 = d_out.iter().zip(out).map(|(a, b)| a * b).sum();
            for (x, &p) in row.iter_mut().zip(p) {
                *x = p * (*x - dot);
            }
        }
    }
}

/// `dS = P (dP - rowsum(dO O))`, `[b, h, s, lk]`, computed in `dp`'s buffer.
fn score_gradient(
    p: &FlexTensor,
    mut dp: Vec<f32>,
    d_out: &FlexTensor,
    out: &FlexTensor,
) -> FlexTensor {
    let shape = p.layout().shape().clone();
    let (lk, hd) = (shape[3], d_out.layout().shape()[3]);
    let [p, d_out, out] = contiguous([p, d_out, out]);
    let [p, d_out, out] = [&p, &d_out, &out].map(|t| t.storage::<f32>());
    let rows_per_task = (CHUNK / lk.max(1)).max(1);
    dp.par_chunks_mut(rows_per_task * lk)
        .enumerate()
        .for_each(|(task, rows)| {
            let first = task * rows_per_task;
            let (p, d_out, out) = (
                &p[first * lk..first * lk + rows.len()],
                &d_out[first * hd..],
                &out[first * hd..],
            );
            score_gradient_rows(rows, p, d_out, out, lk, hd);
        });
    flex_from(dp, shape)
}

#[derive(Debug)]
struct AttentionBackward;

/// What the backward pass needs: the inputs (the bias is the pass's mask, shared by every
/// layer), the output and the row log-sum-exps.
#[derive(Clone, Debug)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    bias: FlexTensor,
    lse: Vec<f32>,
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
            bias,
            lse,
            out,
            scale,
        } = ops.state;
        let d_out = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [q_node, k_node, v_node, bias_node] = ops.parents;
        // [b, h, s, lk]
        let p = probabilities(&q, &k, &bias, &lse, scale);
        drop((bias, lse));
        if let Some(node) = v_node {
            // [b, h, lk, hd]
            grads.register::<Flex>(node.id, matmul(&p.transpose(2, 3), &d_out, 1.0));
        }
        if q_node.is_none() && k_node.is_none() && bias_node.is_none() {
            return;
        }
        // [b, h, s, lk]
        let (dp, _) = matmul_values(&d_out, &v.transpose(2, 3), 1.0);
        let ds = score_gradient(&p, dp, &d_out, &out);
        if let Some(node) = q_node {
            // [b, h, s, hd]
            grads.register::<Flex>(node.id, matmul(&ds, &k, scale));
        }
        if let Some(node) = k_node {
            // [b, h, lk, hd]
            grads.register::<Flex>(node.id, matmul(&ds.transpose(2, 3), &q, scale));
        }
        if let Some(node) = bias_node {
            grads.register::<Flex>(node.id, ds);
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
    let (out, lse) = attention_forward(
        &q.primitive,
        &k.primitive,
        &v.primitive,
        &bias.primitive,
        scale,
    );
    let saved = Saved {
        q: q.primitive.clone(),
        k: k.primitive.clone(),
        v: v.primitive.clone(),
        bias: bias.primitive.clone(),
        lse,
        out: out.clone(),
        scale,
    };
    record(AttentionBackward, [&q, &k, &v, &bias], saved, out)
}
