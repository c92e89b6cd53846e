//! Fused kernels for the `flex` CPU backend, with and without autodiff.
//!
//! The model is generic over Burn backends; a fused kernel is taken when the backend is
//! `Flex` or `Autodiff<Flex>` (recognised at run time by its `TypeId`) and the tensors are
//! f32. Every other backend runs the same maths as a composition of Burn's tensor
//! operations ([`crate::ops::reference`]).
//!
//! - [`swiglu`]: `silu(gate) * up` (see [`swiglu`]'s module).
//! - [`attention`]: the training attention `softmax(q k^T / sqrt(hd) + bias) v`.
//! - [`linear`]: the linear layer `x w (+ bias)`.
//! - [`rms_norm`]: RMSNorm over the last dimension.
//! - [`heads_first`], [`heads_last`]: the attention's head layout changes, the rotary
//!   embedding applied on the way in.
//!
//! Their matrix products share one entry to the `gemm` crate (`fused/gemm.rs`).

mod attention;
mod gemm;
mod heads;
mod linear;
mod math;
mod rms_norm;
mod swiglu;

pub use attention::attention;
pub use heads::{heads_first, heads_last};
pub use linear::linear;
pub use rms_norm::rms_norm;
pub use swiglu::swiglu;

use std::any::TypeId;
use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};
use rayon::prelude::*;

use crate::ops::autodiff_inner::cast;

/// The float primitive of `Autodiff<Flex>`.
type AutodiffFlexTensor = crate::ops::autodiff_inner::AutodiffTensor<Flex>;

/// Elements per parallel work item of the elementwise kernels.
const CHUNK: usize = 16 * 1024;

/// Which fused path a backend's float primitive takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// `Flex` without autodiff.
    Flex,
    /// `Autodiff<Flex>`.
    AutodiffFlex,
}

/// The fused path of backend `B`, if it has one.
///
/// Decided on the backend type itself, not on its float primitive: the primitive of
/// `Autodiff<Flex, BalancedCheckpointing>` is that of `Autodiff<Flex>`, but the kernels
/// record their operations for [`NoCheckpointing`], so a checkpointing backend takes the
/// plain-Burn path ([`crate::ops::reference`]) instead.
fn path<B: Backend>() -> Option<Path> {
    let backend = TypeId::of::<B>();
    if backend == TypeId::of::<Flex>() {
        Some(Path::Flex)
    } else if backend == TypeId::of::<Autodiff<Flex, NoCheckpointing>>() {
        Some(Path::AutodiffFlex)
    } else {
        None
    }
}

/// Whether backend `B` takes the fused kernels (`Flex` or `Autodiff<Flex>` without
/// checkpointing; for f32 tensors).
pub fn available<B: Backend>() -> bool {
    path::<B>().is_some()
}

/// The float primitive of a tensor of backend `B`, as a `U`.
fn primitive<B: Backend, const D: usize, U: 'static>(t: Tensor<B, D>) -> U {
    cast(t.into_primitive().tensor())
}

/// A tensor of backend `B` from a primitive `U` that is `B`'s.
fn tensor<B: Backend, const D: usize, U: 'static>(t: U) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(cast(t)))
}

/// `out`, computed by the operation `op` from `parents`, as an autodiff tensor: recorded
/// with `state` for `op`'s backward pass when a parent is tracked.
fn record<O: Backward<Flex, N>, const N: usize>(
    op: O,
    parents: [&AutodiffFlexTensor; N],
    state: O::State,
    out: FlexTensor,
) -> AutodiffFlexTensor {
    match op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Adds each of `grads_out` to the gradient of the matching parent of an op, where the
/// parent is tracked.
fn register_parents<S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    grads_out: [FlexTensor; N],
) {
    for (parent, grad) in ops.parents.iter().zip(grads_out) {
        if let Some(node) = parent {
            grads.register::<Flex>(node.id, grad);
        }
    }
}

/// The tensors, each contiguous (itself when it already is, a copy otherwise).
fn contiguous<const N: usize>(tensors: [&FlexTensor; N]) -> [FlexTensor; N] {
    tensors.map(FlexTensor::to_contiguous)
}

/// `len` f32 values written in parallel chunks of about [`CHUNK`] values, each a whole
/// number of rows of `row` values: `fill(start, chunk)` writes the values at
/// `start..start + chunk.len()`.
///
/// # Safety
/// `fill` writes every element of each chunk it is given (the buffer is not zeroed first).
unsafe fn filled(
    len: usize,
    row: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let chunk = (CHUNK / row.max(1)).max(1) * row.max(1);
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(c, values)| fill(c * chunk, values));
    // SAFETY: `fill` wrote all `len` values (the caller's promise).
    unsafe { values.set_len(len) };
    values
}

/// Two sets of `len` f32 values written together in parallel chunks, as in [`filled`].
///
/// # Safety
/// `fill` writes every element of both chunks it is given.
unsafe fn filled_pair(
    len: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]) + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b) = (Vec::with_capacity(len), Vec::with_capacity(len));
    a.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .zip(b.spare_capacity_mut()[..len].par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (a, b))| fill(c * CHUNK, a, b));
    // SAFETY: `fill` wrote all `len` values of both (the caller's promise).
    unsafe {
        a.set_len(len);
        b.set_len(len);
    }
    (a, b)
}

/// The values of a contiguous f32 tensor, row-major.
fn dense(t: &FlexTensor) -> &[f32] {
    let at = t.layout().start_offset();
    &t.storage::<f32>()[at..at + t.layout().num_elements()]
}

/// A contiguous f32 `flex` tensor from `values` laid out row-major in `shape`.
fn flex_from(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}
