//! Exponential moving average (EMA) of the weights: kept beside the trained ("raw") weights,
//! evaluated and written as the checkpoint's inference weights; the raw weights are saved
//! beside it for resuming ([`RAW_WEIGHTS_FILE`]).
//!
//! After the optimizer update number `n` (0-based, counted in optimizer steps so a resumed
//! run continues the same sequence):
//!
//! ```text
//! d_n = min(ema_decay, (1 + n) / (10 + n))      warm-up: short runs are not dominated by the init
//! ema = d_n * ema + (1 - d_n) * raw
//! ```
//!
//! The average starts at the initial weights (or, when a run without EMA is resumed with it,
//! at the resumed weights). Frozen parameters (no gradient, e.g. `training.freeze_text`)
//! are not blended: their average stays bit-identical to them.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// The raw (trained) weights in a checkpoint written with EMA on; `model.safetensors`
/// holds the average.
pub const RAW_WEIGHTS_FILE: &str = "raw_weights.safetensors";

/// The decay of update number `n` (0-based) for a configured `ema_decay`.
pub fn ema_decay_at(ema_decay: f64, n: u64) -> f64 {
    let n = n as f64;
    ema_decay.min((1.0 + n) / (10.0 + n))
}

/// The moving average of a module's float parameters.
#[derive(Clone, Debug)]
pub struct Ema<M> {
    /// The averaged weights (a module without autodiff).
    pub model: M,
    /// The configured decay (the cap of [`ema_decay_at`]).
    pub decay: f64,
}

impl<M> Ema<M> {
    /// An average starting at `model`.
    pub fn new(model: M, decay: f64) -> Self {
        Self { model, decay }
    }

    /// Folds `raw` (the trained weights after optimizer update number `n`) into the
    /// average.
    pub fn update<B: AutodiffBackend, R: AutodiffModule<B, InnerModule = M>>(
        &mut self,
        raw: &R,
        n: u64,
    ) where
        M: Module<B::InnerBackend>,
    {
        let d = ema_decay_at(self.decay, n);
        let mut collect = FlatParams::<B>(Vec::new());
        raw.visit(&mut collect);
        let mut blend = Blend {
            raw: collect.0.into_iter(),
            decay: d,
        };
        self.model = self.model.clone().map(&mut blend);
        assert!(
            blend.raw.next().is_none(),
            "EMA: the average and the raw weights have different parameters"
        );
    }
}

/// Every float parameter that trains, flattened, in visiting order (`None` for a frozen
/// one).
struct FlatParams<B: AutodiffBackend>(Vec<Option<Tensor<B::InnerBackend, 1>>>);

impl<B: AutodiffBackend> ModuleVisitor<B> for FlatParams<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            self.0.push(None);
            return;
        }
        let n = value.shape().num_elements();
        self.0.push(Some(value.inner().reshape([n])));
    }
}

/// `ema = d * ema + (1 - d) * raw`, parameter by parameter in visiting order.
struct Blend<B: Backend, I: Iterator<Item = Option<Tensor<B, 1>>>> {
    raw: I,
    decay: f64,
}

impl<B: Backend, I: Iterator<Item = Option<Tensor<B, 1>>>> ModuleMapper<B> for Blend<B, I> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let raw = self
            .raw
            .next()
            .expect("EMA: the average has more parameters than the raw weights");
        let Some(raw) = raw else {
            return param;
        };
        let d = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            // [..shape]: the same layout as the raw parameter it was flattened from.
            ema.mul_scalar(d) + raw.reshape(shape).mul_scalar(1.0 - d)
        })
    }
}
