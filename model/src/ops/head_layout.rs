//! How a forward pass moves the heads between the projections' `[b, s, h, hd]` layout and
//! the attention's `[b, h, s, hd]`, chosen once per forward pass for the backend.
//!
//! A transposed view is free to make, but the CPU backends read it (and, under autodiff,
//! the transposed gradient that flows back through it) element by element. So on the CPU
//! backends the heads move by copies of whole `hd`-long rows instead:
//! - on `flex`, by the fused kernels of [`crate::ops::fused::heads_first`] and
//!   [`crate::ops::fused::heads_last`] (one pass forward, one backward; the queries and keys
//!   are rotated on the way);
//! - otherwise without gradients, by block copies of one head at a time ([`heads_first`],
//!   [`heads_last`]);
//! - otherwise with gradients, by one row gather (`select` over `[b·s·h, hd]` rows), whose
//!   backward pass is one row scatter. (The block copies' backward pass would write `h`
//!   zero-filled full-size gradients, one per head.)

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::{Flex, NdArray};
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::ops::autodiff_inner::{self, InnerVisitor};
use crate::ops::fused;
use crate::rope::{apply_rope, RopeTables};

/// The head layout changes of one forward pass.
#[derive(Clone, Debug)]
pub enum HeadLayout<B: Backend> {
    /// Transposed views (GPU backends).
    Views,
    /// Block copies of one head at a time (CPU backends, no gradients).
    BlockCopies,
    /// Row gathers (CPU backends under autodiff).
    RowGather(HeadRows<B>),
    /// The fused kernels (`flex`, with or without autodiff).
    Fused,
}

impl<B: Backend> HeadLayout<B> {
    /// The layout changes for a forward pass of `b` rows of `s` new positions with `h`
    /// query heads and `h_kv` key/value heads on `device`.
    pub fn for_pass(b: usize, s: usize, h: usize, h_kv: usize, device: &B::Device) -> Self {
        if fused::available::<B>() {
            Self::Fused
        } else if !block_copies_pay::<B>() {
            Self::Views
        } else if B::ad_enabled(device) {
            Self::RowGather(HeadRows::new(b, s, h, h_kv, device))
        } else {
            Self::BlockCopies
        }
    }

    /// `[b, s, h, hd] -> [b, h, s, hd]` rotated by `rope` (as [`apply_rope`] before
    /// [`HeadLayout::heads_first`]; one pass with [`HeadLayout::Fused`]).
    pub fn rotated_heads_first(&self, x: Tensor<B, 4>, rope: &RopeTables<B>) -> Tensor<B, 4> {
        match self {
            Self::Fused => fused::heads_first(x, Some(rope)),
            _ => self.heads_first(apply_rope(x, rope)),
        }
    }

    /// `[b, s, h, hd] -> [b, h, s, hd]`, contiguous except for [`HeadLayout::Views`].
    pub fn heads_first(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Views => x.swap_dims(1, 2),
            Self::Fused => fused::heads_first(x, None),
            Self::BlockCopies => heads_first(x),
            Self::RowGather(rows) => {
                let [b, s, h, hd] = x.dims();
                let index = if h == rows.h {
                    rows.first.clone()
                } else {
                    rows.first_kv.clone()
                };
                x.reshape([b * s * h, hd])
                    .select(0, index)
                    .reshape([b, h, s, hd])
            }
        }
    }

    /// `[b, h, s, hd] -> [b, s, h*hd]`, contiguous.
    pub fn heads_last(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, h, s, hd] = x.dims();
        match self {
            // A strided copy forward; free backward.
            Self::Views => x.swap_dims(1, 2).reshape([b, s, h * hd]),
            Self::BlockCopies => heads_last(x),
            Self::Fused => fused::heads_last(x),
            Self::RowGather(rows) => x
                .reshape([b * h * s, hd])
                .select(0, rows.last.clone())
                .reshape([b, s, h * hd]),
        }
    }
}

/// Row indices of the gathers of [`HeadLayout::RowGather`].
#[derive(Clone, Debug)]
pub struct HeadRows<B: Backend> {
    /// Query heads `h`.
    h: usize,
    /// `[b·h·s]`: the `[b, s, h]` row each `[b, h, s]` row of the queries is read from.
    first: Tensor<B, 1, Int>,
    /// The same for the `h_kv` key/value heads.
    first_kv: Tensor<B, 1, Int>,
    /// `[b·s·h]`: the `[b, h, s]` row each `[b, s, h]` row of the output is read from.
    last: Tensor<B, 1, Int>,
}

impl<B: Backend> HeadRows<B> {
    fn new(b: usize, s: usize, h: usize, h_kv: usize, device: &B::Device) -> Self {
        // row (bi, hi, si) of [b, h, s] <- row (bi, si, hi) of [b, s, h]
        let first = |h: usize| {
            let rows = (0..b).flat_map(move |bi| {
                (0..h).flat_map(move |hi| (0..s).map(move |si| ((bi * s + si) * h + hi) as i64))
            });
            index_tensor(rows.collect(), device)
        };
        // row (bi, si, hi) of [b, s, h] <- row (bi, hi, si) of [b, h, s]
        let last = (0..b).flat_map(move |bi| {
            (0..s).flat_map(move |si| (0..h).map(move |hi| ((bi * h + hi) * s + si) as i64))
        });
        Self {
            h,
            first: first(h),
            first_kv: first(h_kv),
            last: index_tensor(last.collect(), device),
        }
    }
}

fn index_tensor<B: Backend>(rows: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = rows.len();
    Tensor::from_data(TensorData::new(rows, [n]), device)
}

/// Whether `B` is one of the CPU backends (`Flex`, `NdArray`, or either inside
/// `Autodiff`), which read transposed views element by element and so move heads by row
/// copies instead. The test is of types, not of names.
pub fn block_copies_pay<B: Backend>() -> bool {
    fn cpu<T: 'static>() -> bool {
        TypeId::of::<T>() == TypeId::of::<Flex>() || TypeId::of::<T>() == TypeId::of::<NdArray>()
    }
    struct InnerIsCpu;
    impl<B: Backend> InnerVisitor<B> for InnerIsCpu {
        type Output = bool;
        fn visit<I: Backend, C: CheckpointStrategy>(self) -> bool {
            cpu::<I>()
        }
    }
    cpu::<B>() || autodiff_inner::visit::<B, _>(InnerIsCpu).unwrap_or(false)
}

/// `[b, s, h, hd] -> [b, h, s, hd]` by one block copy per head (contiguous result).
pub fn heads_first<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, s, h, hd] = x.dims();
    let heads = (0..h)
        .map(|i| x.clone().narrow(2, i, 1).reshape([b, 1, s, hd]))
        .collect();
    Tensor::cat(heads, 1)
}

/// `[b, h, s, hd] -> [b, s, h*hd]` by one block copy per head (contiguous result).
pub fn heads_last<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, hd] = x.dims();
    let heads = (0..h)
        .map(|i| x.clone().narrow(1, i, 1).reshape([b, s, hd]))
        .collect();
    Tensor::cat(heads, 2)
}
