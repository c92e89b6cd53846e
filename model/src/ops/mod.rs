//! The one layer that owns the backend-specific speed work. The model ([`crate::model`],
//! [`crate::block`], [`crate::attention`], [`crate::mlp`]) calls the operations below and
//! never asks which backend it runs on; each operation picks its kernel from the backend's
//! type (`TypeId`, never a name) and the tensors' dtype:
//!
//! | operation | `flex` (f32) | every other backend |
//! |---|---|---|
//! | [`linear`], [`rms_norm`], [`swiglu`] | [`fused`] kernels with their own backward | [`reference`] |
//! | [`attention`] | [`fused::attention`] (dense) or [`blockwise`] (long passes) | Burn's fused attention (no gradients), [`reference::attention`], or [`blockwise`] |
//! | head moves ([`HeadLayout`]) | [`fused::heads_first`], [`fused::heads_last`] | views (GPU), block copies or row gathers (CPU) |
//!
//! [`reference`] holds the plain-Burn definition of each operation, which the kernels are
//! tested against. Operations with a backward pass of their own find the inner backend of
//! `Autodiff<I, C>` through [`autodiff_inner`].
//!
//! Checkpointing: the `flex` kernels record their operations for Burn's
//! `NoCheckpointing` strategy, so `Autodiff<Flex, BalancedCheckpointing>` takes the
//! plain-Burn path (the test is of the whole backend type). This crate's own layer
//! recomputation ([`crate::recompute`]) runs on the default strategy.

pub mod attention;
pub mod autodiff_inner;
pub mod blockwise;
pub mod fused;
pub mod head_layout;
pub mod reference;

pub use attention::{attention, AttentionMask};
pub use fused::{linear, rms_norm, swiglu};
pub use head_layout::HeadLayout;
