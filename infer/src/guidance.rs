//! Classifier-free guidance.
//!
//! The conditional branch is `BOS caption BOI`, the unconditional one `BOS BOI` (the
//! caption dropped, as in training with caption dropout). Both run as **one batch**: rows
//! `0..N` are conditional, rows `N..2N` unconditional, each with its own prefix cache
//! (left-padded to one length, see [`crate::context`]). The prediction is
//! `eps = eps_u + s (eps_c - eps_u)`. A scale of 1 is the conditional prediction alone and
//! a scale of 0 (or below) means "guidance off": both skip the unconditional branch.

use burn::prelude::*;
use transfusion_data::tokenizer::SpecialTokens;

/// Guidance scale `s` (the paper: 3 in ablations, 5 against Chameleon).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    /// `s`.
    pub scale: f64,
}

impl Guidance {
    /// Guidance with scale `s`.
    pub fn new(scale: f64) -> Self {
        Self { scale }
    }

    /// Whether the unconditional branch runs (`s` not 0 and not 1).
    pub fn active(&self) -> bool {
        self.scale > 0.0 && (self.scale - 1.0).abs() > f64::EPSILON
    }

    /// Rows per image: 2 when guided, else 1.
    pub fn branches(&self) -> usize {
        if self.active() {
            2
        } else {
            1
        }
    }

    /// Mixes the branches of `eps [2N, ..]` into `[N, ..]` when guided; otherwise returns
    /// `eps` unchanged.
    pub fn combine<B: Backend>(&self, eps: Tensor<B, 4>) -> Tensor<B, 4> {
        if !self.active() {
            return eps;
        }
        let n = eps.dims()[0] / 2;
        let cond = eps.clone().narrow(0, 0, n);
        let uncond = eps.narrow(0, n, n);
        uncond.clone() + (cond - uncond) * self.scale
    }
}

/// The unconditional prompt: `BOS BOI`.
pub fn unconditional_prompt(special: &SpecialTokens) -> Vec<u32> {
    vec![special.bos, special.boi]
}

/// Duplicates `x [N, ..]` into `[2N, ..]` for the two branches.
pub fn duplicate<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    Tensor::cat(vec![x.clone(), x], 0)
}
