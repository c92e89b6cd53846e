//! The attention of one pass: the mask in the form the backend computes fastest
//! ([`AttentionMask`], chosen once per pass) and the kernel that form goes with
//! ([`attention`]).

use burn::prelude::*;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::blockwise::{self, BlockPlan};
use super::fused;
use crate::mask::{transfusion_mask_heads, SpanMeta};
use crate::precision::Precision;

/// The Transfusion mask in the form the attention of one forward pass uses.
#[derive(Clone, Debug)]
pub enum AttentionMask<B: Backend> {
    /// `[b, h, s, lk]`, `true` = masked: for Burn's fused attention (inference off `flex`).
    /// Its autodiff form is a generic decomposition (a max with indices and its scatter,
    /// masking and two broadcast divisions in the backward pass), so training uses the
    /// other form.
    Bool(Tensor<B, 4, Bool>),
    /// `[b, h, s, lk]`, `0` where visible and `-inf` where masked: added to the scores of
    /// [`fused::attention`] (training, and inference on `flex`, whose own fused attention
    /// is a scalar loop: 18% of a `perf` profile of `transfusion bench` running cached
    /// diffusion steps).
    Additive(Tensor<B, 4>),
    /// No dense mask: the blockwise attention ([`blockwise`]) computes it per block of
    /// queries from the positions' metadata (long passes, whose dense mask and scores
    /// would grow with the square of the sequence).
    Blockwise(BlockPlan<B>),
}

impl<B: Backend> AttentionMask<B> {
    /// The mask of a pass of the new positions `new` over `keys` (the cached positions'
    /// metadata followed by `new`) with `h` heads: blockwise when the pass has at least
    /// `blockwise_from` keys (see [`blockwise::takes_blockwise`]), dense otherwise.
    ///
    /// # Shapes
    /// `new`: `[b, s]` tensors, `keys`: `[b, lk]` tensors
    pub fn for_pass(new: SpanMeta<B>, keys: SpanMeta<B>, h: usize, blockwise_from: usize) -> Self {
        let device = new.index.device();
        if blockwise::takes_blockwise(new.len(), keys.len(), blockwise_from) {
            Self::Blockwise(BlockPlan::new(new, keys, h))
        } else {
            Self::for_device(transfusion_mask_heads(&new, &keys, h), &device)
        }
    }

    /// The dense form for a forward pass on `device`: additive when the backend records
    /// gradients or has the fused kernels (`flex`), boolean otherwise.
    ///
    /// # Shapes
    /// `masked`: `[b, h, s, lk]`, `true` = masked
    pub fn for_device(masked: Tensor<B, 4, Bool>, device: &B::Device) -> Self {
        if B::ad_enabled(device) || fused::available::<B>() {
            let zeros = Tensor::zeros(masked.dims(), device);
            Self::Additive(zeros.mask_fill(masked, f32::NEG_INFINITY))
        } else {
            Self::Bool(masked)
        }
    }
}

/// `softmax(q k^T / sqrt(hd) + mask) v` by the kernel of the mask's form: Burn's fused
/// attention for [`AttentionMask::Bool`], [`fused::attention`] for
/// [`AttentionMask::Additive`], [`blockwise::attention`] for [`AttentionMask::Blockwise`].
///
/// `q`, `k` and `v` are in `precision`'s compute type; an additive mask is cast to it.
///
/// # Shapes
/// - `q`: `[b, h, s, hd]`, `k`, `v`: `[b, h, lk, hd]` (heads already repeated for GQA)
/// - output: `[b, h, s, hd]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
    precision: Precision,
) -> Tensor<B, 4> {
    match mask {
        AttentionMask::Bool(masked) => burn_attention(
            q,
            k,
            v,
            Some(masked.clone()),
            None,
            AttentionModuleOptions::default(),
        ),
        AttentionMask::Additive(bias) => {
            fused::attention(q, k, v, precision.to_compute(bias.clone()))
        }
        AttentionMask::Blockwise(plan) => blockwise::attention(q, k, v, plan),
    }
}
