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
use burn::tensor::DType;
use rayon::prelude::*;

use super::gemm::{matmul, matmul_values};
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
    // [b, h, s, lk]: bias + scale q k^T, in the buffer that becomes P
    let (mut p, shape) = matmul_values(q, &k.transpose(2, 3), scale, Some(dense_values(bias)));
    let lk = shape[3];
    let rows_per_task = (CHUNK / lk.max(1)).max(1);
    p.par_chunks_mut(rows_per_task * lk).for_each(|rows| {
        for row in rows.chunks_mut(lk) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let shift = max.max(-1.0e4);
            for x in row.iter_mut() {
                *x = exp_nonpositive(*x - shift);
            }
            let inv = 1.0 / row.iter().sum::<f32>().max(1.0e-30);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    });
    let p = flex_from(p, shape);
    let out = matmul(&p, v, 1.0);
    (out, p)
}

/// The values of `t`, row-major (a copy).
fn dense_values(t: &FlexTensor) -> Vec<f32> {
    let t = t.to_contiguous();
    let at = t.layout().start_offset();
    t.storage::<f32>()[at..at + t.layout().num_elements()].to_vec()
}

/// `e^x` for `x <= 0` (a score minus its row maximum), within about 2 ulp of the exact
/// value; `0` below `-87` (and for `-inf`), NaN for NaN. Written without calls or
/// branches so that the softmax loop runs in vector registers, where the C library's
/// `expf` takes one call per score.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split in two so that n * LN2_HI is exact for the n used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // n in [-126, 0]: the exponent bits of 2^n
    let two_n =
        f32::from_bits(((shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    // e^r for r = x - n ln 2 in [-ln2/2, ln2/2]
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut poly = 1.987_569_2e-4f32;
    poly = poly * r + 1.398_199_9e-3;
    poly = poly * r + 8.333_452e-3;
    poly = poly * r + 4.166_579_6e-2;
    poly = poly * r + 1.666_666_5e-1;
    poly = poly * r + 5.000_000_1e-1;
    let e_r = poly * r * r + r + 1.0;
    if x < -87.0 {
        0.0
    } else {
        e_r * two_n
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
            for (r, row) in rows.chunks_mut(lk).enumerate() {
                let (row_at, o_at) = ((first + r) * lk, (first + r) * hd);
                let dot: f32 = (0..hd).map(|d| d_out[o_at + d] * out[o_at + d]).sum();
                let p = &p[row_at..row_at + lk];
                for (x, &p) in row.iter_mut().zip(p) {
                    *x = p * (*x - dot);
                }
            }
        });
    flex_from(dp, shape)
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
            grads.register::<Flex>(node.id, matmul(&p.transpose(2, 3), &d_out, 1.0));
        }
        if q_node.is_none() && k_node.is_none() && bias_node.is_none() {
            return;
        }
        // [b, h, s, lk]
        let (dp, _) = matmul_values(&d_out, &v.transpose(2, 3), 1.0, None);
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

#[cfg(test)]
mod tests {
    use super::exp_nonpositive;

    /// Over `[-87, 0]` the fast exponential is within 2 ulp of the exact one (measured
    /// against f64), and it maps the masked and out-of-range inputs as documented.
    #[test]
    fn fast_exponential_is_within_two_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=1_000_000 {
            let x = -87.0 * i as f32 / 1_000_000.0;
            let exact = (x as f64).exp();
            let ulp = (exact as f32).to_bits();
            let ulp = (f32::from_bits(ulp + 1) - exact as f32) as f64;
            worst = worst.max((exp_nonpositive(x) as f64 - exact).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-90.0), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
