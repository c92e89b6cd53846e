//! The blockwise attention's forward and backward passes as Burn tensor operations on any
//! backend: one query block at a time against the keys it may see, so no tensor larger
//! than one block's scores (`[b, h, rows, keys]`) exists.
//!
//! Forward: `S = (q s) k^T` masked, `P = softmax(S)`, `O = P v`, and each row's
//! log-sum-exp `L = max S + ln Σ exp(S - max S)`. Backward, from `O` and `L` alone:
//! `P = exp(S - L)` again, `dV += P^T dO`, `dP = dO v^T`, `dS = P (dP - rowsum(dO O))`,
//! `dq = dS k s`, `dk += dS^T q s`. Scores, statistics and gradients' sums run in f32
//! whatever the inputs' type (bf16 products stay bf16).

use burn::prelude::*;
use burn::tensor::DType;

use super::plan::{BlockPlan, QueryBlock};

/// The score given to masked keys before the softmax (finite, so a fully masked row
/// stays NaN-free; its probabilities are zeroed by the mask).
const MASKED: f32 = -1.0e30;

/// A block's masked scores in f32 and its `[b, h, rows, keys]` mask.
///
/// # Shapes
/// - `q`: `[b, h, rows, hd]` (already scaled), `k`: `[b, h, keys, hd]`
/// - output: `[b, h, rows, keys]` twice
fn scores<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    plan: &BlockPlan<B>,
    block: &QueryBlock,
) -> (Tensor<B, 4>, Tensor<B, 4, Bool>) {
    let [b, h, n, _] = q.dims();
    let m = block.keys.len();
    // [b, rows, keys] -> [b, h, rows, keys]
    let masked = plan
        .masked(block)
        .reshape([b, 1, n, m])
        .expand([b, h, n, m]);
    let s = q.matmul(k.swap_dims(2, 3)).cast(DType::F32);
    (s.mask_fill(masked.clone(), MASKED), masked)
}

/// The rows `rows` of `t` along dimension 2.
fn rows<B: Backend>(t: &Tensor<B, 4>, r: &std::ops::Range<usize>) -> Tensor<B, 4> {
    t.clone().narrow(2, r.start, r.len())
}

/// `(O, L)`: the attention output (in `q`'s type) and each row's log-sum-exp (f32).
///
/// # Shapes
/// - `q`: `[b, h, s, hd]`, `k`, `v`: `[b, h, lk, hd]`
/// - output: `[b, h, s, hd]`, `[b, h, s, 1]`
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    plan: &BlockPlan<B>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, _, hd] = q.dims();
    let dtype = q.dtype();
    let device = q.device();
    let q = q.mul_scalar(scale);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for block in plan.blocks.iter() {
        let n = block.rows.len();
        if block.keys.is_empty() {
            outs.push(Tensor::<B, 4>::zeros([b, h, n, hd], (&device, dtype)));
            lses.push(Tensor::full([b, h, n, 1], MASKED, (&device, DType::F32)));
            continue;
        }
        let (s, masked) = scores(rows(&q, &block.rows), rows(&k, &block.keys), plan, block);
        // [b, h, rows, 1]
        let max = s.clone().max_dim(3);
        let p = (s - max.clone()).exp().mask_fill(masked, 0.0);
        let sum = p.clone().sum_dim(3).clamp_min(1.0e-30);
        let out = p.cast(dtype).matmul(rows(&v, &block.keys)).cast(DType::F32) / sum.clone();
        outs.push(out.cast(dtype));
        lses.push(max + sum.log());
    }
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// The gradients `(dq, dk, dv)` of the attention, each in its input's type, recomputing
/// the probabilities block by block from the saved output `out` and log-sum-exp `lse`.
///
/// # Shapes
/// - `q`, `out`, `d_out`: `[b, h, s, hd]`, `k`, `v`: `[b, h, lk, hd]`, `lse`: `[b, h, s, 1]`
/// - output: the shapes of `q`, `k`, `v`
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    d_out: Tensor<B, 4>,
    plan: &BlockPlan<B>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let dtype = q.dtype();
    let device = q.device();
    let d_out = d_out.cast(dtype);
    // [b, h, s, 1]: rowsum(dO O)
    let delta = (d_out.clone().cast(DType::F32) * out.cast(DType::F32)).sum_dim(3);
    let q = q.mul_scalar(scale);
    let mut dk = Tensor::<B, 4>::zeros(k.dims(), (&device, DType::F32));
    let mut dv = Tensor::<B, 4>::zeros(v.dims(), (&device, DType::F32));
    let mut dqs = Vec::new();
    for block in plan.blocks.iter() {
        let keys = block.keys.clone();
        if keys.is_empty() {
            dqs.push(Tensor::zeros(
                rows(&q, &block.rows).dims(),
                (&device, DType::F32),
            ));
            continue;
        }
        let (q_b, d_out_b) = (rows(&q, &block.rows), rows(&d_out, &block.rows));
        let (k_b, v_b) = (rows(&k, &keys), rows(&v, &keys));
        let (s, masked) = scores(q_b.clone(), k_b.clone(), plan, block);
        // [b, h, rows, keys]
        let p = (s - rows(&lse, &block.rows)).exp().mask_fill(masked, 0.0);
        let dv_b = p
            .clone()
            .cast(dtype)
            .swap_dims(2, 3)
            .matmul(d_out_b.clone());
        let dp = d_out_b.matmul(v_b.swap_dims(2, 3)).cast(DType::F32);
        let ds = (p * (dp - rows(&delta, &block.rows))).cast(dtype);
        dqs.push(ds.clone().matmul(k_b).cast(DType::F32).mul_scalar(scale));
        let dk_b = ds.swap_dims(2, 3).matmul(q_b).cast(DType::F32);
        let add = |acc: Tensor<B, 4>, part: Tensor<B, 4>| {
            let [b, h, _, hd] = acc.dims();
            let range = [0..b, 0..h, keys.clone(), 0..hd];
            let sum = acc.clone().slice(range.clone()) + part;
            acc.slice_assign(range, sum)
        };
        dk = add(dk, dk_b);
        dv = add(dv, dv_b.cast(DType::F32));
    }
    let dq = Tensor::cat(dqs, 2);
    (dq.cast(dtype), dk.cast(dtype), dv.cast(dtype))
}
