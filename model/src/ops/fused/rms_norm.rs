//! RMSNorm, `y = x / sqrt(mean(x^2) + eps) * gamma` over the last dimension, in one pass
//! forward and one backward on `flex`.
//!
//! Burn's module records six operations (a cast, the square, the mean, the shift, the root,
//! a broadcast division and a broadcast product); their backward passes walk the rows about
//! a dozen times. Here the forward pass keeps the inverse root `r` of each row, and the
//! backward pass is `dx = r (g - x r mean(g x r))` with `g = dy gamma`, and
//! `d gamma = sum over rows of dy x r`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::{DType, Shape};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::math::{multiversion, sum_of};
use super::{
    contiguous, dense, filled, flex_from, path, primitive, record, register_parents, tensor,
    AutodiffFlexTensor, Path, CHUNK,
};

/// `norm.forward(x)`: RMSNorm over the last dimension with `norm`'s gain and epsilon.
///
/// # Shapes
/// - `x`: `[.., d]`; `norm.gamma`: `[d]`; output `[.., d]`
pub fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let gamma = norm.gamma.val();
    let fusable = x.dtype() == DType::F32 && gamma.dtype() == DType::F32;
    let eps = norm.epsilon as f32;
    match path::<B>().filter(|_| fusable) {
        Some(Path::Flex) => {
            let (x, gamma) = (primitive(x), primitive(gamma));
            tensor(norm_forward(&x, &gamma, eps).0)
        }
        Some(Path::AutodiffFlex) => tensor(norm_autodiff(primitive(x), primitive(gamma), eps)),
        None => crate::ops::reference::rms_norm(norm, x),
    }
}

/// `(y, r)`: the normed rows and each row's inverse root `1 / sqrt(mean(x^2) + eps)`.
fn norm_forward(x: &FlexTensor, gamma: &FlexTensor, eps: f32) -> (FlexTensor, Vec<f32>) {
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1];
    let [x, gamma] = contiguous([x, gamma]);
    let (x, gamma) = (dense(&x), dense(&gamma));
    assert_eq!(
        gamma.len(),
        d,
        "RMSNorm: gain of {} for rows of {d}",
        gamma.len()
    );
    let mut inverse_roots = vec![0.0f32; x.len() / d.max(1)];
    let roots = Roots(inverse_roots.as_mut_ptr());
    // SAFETY: every element of every row is written; each task writes the roots of its
    // own rows only.
    let y = unsafe {
        filled(x.len(), d, |at, y| {
            let first = at / d;
            for (i, y) in y.chunks_mut(d).enumerate() {
                let row = &x[(first + i) * d..(first + i + 1) * d];
                let r = normed_row(y, row, gamma, eps);
                roots.set(first + i, r);
            }
        })
    };
    (flex_from(y, shape), inverse_roots)
}

/// The per-row roots, written by the tasks that own the rows.
struct Roots(*mut f32);

// SAFETY: tasks write disjoint rows' roots (see `norm_forward`).
unsafe impl Sync for Roots {}

impl Roots {
    /// # Safety
    /// `row` is inside the buffer and written by one task only.
    unsafe fn set(&self, row: usize, value: f32) {
        unsafe { *self.0.add(row) = value };
    }
}

multiversion! {
    /// One row normed into `y`; returns its inverse root.
    fn normed_row(y: &mut [MaybeUninit<f32>], x: &[f32], gamma: &[f32], eps: f32) -> f32 {
        let mut squares = [0.0f32; 128];
        let mut sum = 0.0f32;
        for chunk in x.chunks(squares.len()) {
            for (s, &v) in squares.iter_mut().zip(chunk) {
                *s = v * v;
            }
            sum += sum_of(&squares[..chunk.len()]);
        }
        let root = (sum / x.len() as f32 + eps).sqrt();
        for ((y, &v), &g) in y.iter_mut().zip(x).zip(gamma) {
            y.write(v / root * g);
        }
        1.0 / root
    }
}

multiversion! {
    /// One row's input gradient `dx = r (g - x r mean(g x r))`, `g = dy gamma`, and its
    /// share of the gain's gradient added to `d_gamma` (`+= dy x r`).
    fn gradient_row(
        dx: &mut [MaybeUninit<f32>],
        dy: &[f32],
        x: &[f32],
        gamma: &[f32],
        r: f32,
        d_gamma: &mut [f32],
    ) {
        let mut dot = 0.0f32;
        let mut terms = [0.0f32; 128];
        for ((dy, x), g) in dy.chunks(terms.len()).zip(x.chunks(terms.len())).zip(gamma.chunks(terms.len())) {
            for (((t, &dy), &x), &g) in terms.iter_mut().zip(dy).zip(x).zip(g) {
                *t = dy * g * x;
            }
            dot += sum_of(&terms[..dy.len()]);
        }
        // mean(g x r) r = dot r^2 / d
        let k = dot * r * r / x.len() as f32;
        for ((((dx, &dy), &x), &g), dg) in dx.iter_mut().zip(dy).zip(x).zip(gamma).zip(d_gamma.iter_mut()) {
            dx.write(r * (dy * g - x * k));
            *dg += dy * x * r;
        }
    }
}

/// `(dx, d gamma)` from the output's gradient `dy`.
fn norm_backward(
    dy: &FlexTensor,
    x: &FlexTensor,
    gamma: &FlexTensor,
    inverse_roots: &[f32],
) -> (FlexTensor, FlexTensor) {
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1];
    let [dy, x, gamma] = contiguous([dy, x, gamma]);
    let [dy, x, gamma] = [&dy, &x, &gamma].map(dense);
    let rows = x.len() / d.max(1);
    let rows_per_task = (CHUNK / d.max(1)).max(1);
    let mut dx: Vec<f32> = Vec::with_capacity(x.len());
    // [tasks, d]: each task's share of d gamma
    let shares: Vec<Vec<f32>> = dx.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(rows_per_task * d)
        .enumerate()
        .map(|(task, dx)| {
            let mut d_gamma = vec![0.0f32; d];
            let first = task * rows_per_task;
            for (i, dx) in dx.chunks_mut(d).enumerate() {
                let at = (first + i) * d..(first + i + 1) * d;
                let r = inverse_roots[first + i];
                gradient_row(dx, &dy[at.clone()], &x[at], gamma, r, &mut d_gamma);
            }
            d_gamma
        })
        .collect();
    // SAFETY: every row of `dx` was written above.
    unsafe { dx.set_len(rows * d) };
    let mut d_gamma = vec![0.0f32; d];
    for share in shares {
        for (total, v) in d_gamma.iter_mut().zip(share) {
            *total += v;
        }
    }
    (
        flex_from(dx, shape),
        flex_from(d_gamma, Shape::from(vec![d])),
    )
}

#[derive(Debug)]
struct RmsNormBackward;

/// What the backward pass needs: `(x, gamma, inverse roots)`.
type Saved = (FlexTensor, FlexTensor, Vec<f32>);

impl Backward<Flex, 2> for RmsNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, inverse_roots) = &ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let (dx, d_gamma) = norm_backward(&dy, x, gamma, inverse_roots);
        register_parents(grads, &ops, [dx, d_gamma]);
    }
}

fn norm_autodiff(x: AutodiffFlexTensor, gamma: AutodiffFlexTensor, eps: f32) -> AutodiffFlexTensor {
    let (out, inverse_roots) = norm_forward(&x.primitive, &gamma.primitive, eps);
    let state = (x.primitive.clone(), gamma.primitive.clone(), inverse_roots);
    record(RmsNormBackward, [&x, &gamma], state, out)
}
