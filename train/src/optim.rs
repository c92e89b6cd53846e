//! The update rule's parts that Burn does not provide as the paper needs them: AdamW with
//! the paper's values, and gradient clipping by the *global* norm over all parameters
//! (Burn's `GradientClipping::Norm` clips each parameter by its own norm).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::config::OptimizerSection;

/// Burn's AdamW with the configured betas, epsilon and decoupled weight decay (Burn's own
/// defaults differ from the paper: beta2 0.999, eps 1e-5, weight decay 1e-4).
pub fn adamw(o: &OptimizerSection) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(o.beta1 as f32)
        .with_beta_2(o.beta2 as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(o.weight_decay as f32)
}

/// The ids of a module's float parameters in visiting order (stable across processes for
/// the same config, unlike the ids themselves).
pub fn param_ids<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.id);
        }
    }
    let mut v = Ids(Vec::new());
    module.visit(&mut v);
    v.0
}

struct SquaredNorms<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    acc: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorms<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = g.powi_scalar(2).sum();
            self.acc = Some(match self.acc.take() {
                Some(a) => a + sq,
                None => sq,
            });
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The global L2 norm `sqrt(sum over all parameters of |g|^2)` of `grads` (one device sync).
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut v = SquaredNorms::<B> { grads, acc: None };
    module.visit(&mut v);
    match v.acc {
        Some(a) => (a.into_scalar().elem::<f64>()).sqrt(),
        None => 0.0,
    }
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    let mut v = Scale::<B> {
        grads,
        factor,
        _b: std::marker::PhantomData,
    };
    module.visit(&mut v);
}

/// Clips `grads` to global norm `max_norm` (as PyTorch's `clip_grad_norm_`: scale by
/// `max_norm / (norm + 1e-6)` when that is below 1). Returns the norm before clipping.
/// `max_norm <= 0` disables clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let norm = global_grad_norm::<B, M>(module, grads);
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            scale_grads::<B, M>(module, grads, coef);
        }
    }
    norm
}

/// Whether every float parameter of `module` is finite (one device sync): the sum of
/// `p * 0` is NaN as soon as one entry is infinite or NaN.
pub fn all_finite<B: Backend, M: Module<B>>(module: &M) -> bool {
    struct Probe<B: Backend>(Option<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Probe<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let z = param.val().mul_scalar(0.0).sum();
            self.0 = Some(match self.0.take() {
                Some(a) => a + z,
                None => z,
            });
        }
    }
    let mut p = Probe::<B>(None);
    module.visit(&mut p);
    p.0.map_or(true, |t| t.into_scalar().elem::<f64>().is_finite())
}
