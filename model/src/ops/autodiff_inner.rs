//! Operations with their own backward pass, for any backend this crate knows inside
//! `Autodiff`: a [`InnerVisitor`] is called with the inner backend `I` and the
//! checkpointing strategy `C` when the model's backend `B` is `Autodiff<I, C>`.
//!
//! The model is generic over `B: Backend`, which says nothing of autodiff; so the inner
//! backend is found by comparing `B` with the backends compiled in (`Flex`, `NdArray`,
//! `Wgpu`, and `Cuda` with the `cuda` feature), each under both of Burn's checkpointing
//! strategies. The comparison is of types (`TypeId`), not of names.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::{Autodiff, Flex, NdArray, Wgpu};
use burn::prelude::*;

/// The float primitive of `Autodiff<I>` (the same under every checkpointing strategy).
pub type AutodiffTensor<I> =
    <Autodiff<I> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// Work to do with the inner backend of an autodiff backend `B`.
pub trait InnerVisitor<B: Backend>: Sized {
    /// What the work gives.
    type Output;
    /// Does the work; `B` is `Autodiff<I, C>`.
    fn visit<I: Backend, C: CheckpointStrategy>(self) -> Self::Output;
}

/// Calls `visitor` with `B`'s inner backend, or gives it back when `B` is not
/// `Autodiff<I, C>` for a backend and strategy compiled in.
pub fn visit<B: Backend, V: InnerVisitor<B>>(visitor: V) -> Result<V::Output, V> {
    macro_rules! try_inner {
        ($inner:ty) => {
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$inner, NoCheckpointing>>() {
                return Ok(visitor.visit::<$inner, NoCheckpointing>());
            }
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$inner, BalancedCheckpointing>>() {
                return Ok(visitor.visit::<$inner, BalancedCheckpointing>());
            }
        };
    }
    try_inner!(Flex);
    try_inner!(NdArray);
    try_inner!(Wgpu);
    #[cfg(feature = "cuda")]
    try_inner!(burn::backend::Cuda);
    Err(visitor)
}

/// `t` as a `U`; the caller has checked that `T` is `U` (by [`visit`]).
///
/// # Panics
/// When `T` is not `U`.
pub fn cast<T: 'static, U: 'static>(t: T) -> U {
    let mut slot = Some(t);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take)
        .expect("the caller checked the type")
}
