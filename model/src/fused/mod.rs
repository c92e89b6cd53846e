//! Fused kernels for the `flex` CPU backend, with and without autodiff.
//!
//! The model is generic over Burn backends; a fused kernel is taken when the backend is
//! `Flex` or `Autodiff<Flex>` (recognised at run time from the tensor primitive's type) and
//! the tensors are f32. Every other backend runs the same maths as a composition of
//! Burn's tensor operations.
//!
//! - [`swiglu`]: `silu(gate) * up` (see [`swiglu`]'s module).
//! - [`attention`]: the training attention `softmax(q k^T / sqrt(hd) + bias) v`.
//! - [`linear`]: the linear layer `x w (+ bias)`.
//!
//! Their matrix products share one entry to the `gemm` crate (`fused/gemm.rs`).

mod attention;
mod gemm;
mod linear;
mod swiglu;

pub use attention::attention;
pub use linear::linear;
pub use swiglu::swiglu;

use std::any::{Any, TypeId};

use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};
use rayon::prelude::*;

/// The float primitive of `Autodiff<Flex>`.
type AutodiffFlexTensor =
    <Autodiff<Flex> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

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
fn path<B: Backend>() -> Option<Path> {
    let primitive = TypeId::of::<B::FloatTensorPrimitive>();
    if primitive == TypeId::of::<FlexTensor>() {
        Some(Path::Flex)
    } else if primitive == TypeId::of::<AutodiffFlexTensor>() {
        Some(Path::AutodiffFlex)
    } else {
        None
    }
}

/// `t` as a `U`; the caller has checked that `T` is `U` (with [`path`]).
fn cast<T: 'static, U: 'static>(t: T) -> U {
    let mut slot = Some(t);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take)
        .expect("the caller checked the type")
}

/// The float primitive of a tensor of backend `B`, as a `U`.
fn primitive<B: Backend, const D: usize, U: 'static>(t: Tensor<B, D>) -> U {
    cast(t.into_primitive().tensor())
}

/// A tensor of backend `B` from a primitive `U` that is `B`'s.
fn tensor<B: Backend, const D: usize, U: 'static>(t: U) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(cast(t)))
}

/// The tensors, each contiguous (itself when it already is, a copy otherwise).
fn contiguous<const N: usize>(tensors: [&FlexTensor; N]) -> [FlexTensor; N] {
    tensors.map(FlexTensor::to_contiguous)
}

/// Two f32 tensors of `shape`, filled in parallel chunks: `f(i)` gives both values at flat
/// index `i`.
fn fill_pair(
    shape: burn::tensor::Shape,
    f: impl Fn(usize) -> (f32, f32) + Sync,
) -> (FlexTensor, FlexTensor) {
    let n = shape.num_elements();
    let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (a, b))| {
            for (i, (a, b)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                (*a, *b) = f(c * CHUNK + i);
            }
        });
    (flex_from(a, shape.clone()), flex_from(b, shape))
}

/// A contiguous f32 `flex` tensor from `values` laid out row-major in `shape`.
fn flex_from(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}
