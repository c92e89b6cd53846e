//! The fused `flex` kernels against the compositions of Burn operations they replace.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::Distribution;
use transfusion_model::fused::swiglu;

fn inputs<B: Backend>(dev: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
    // wide enough for several parallel chunks; gates well into both sigmoid branches
    let shape = [3, 37, 500];
    let gate = Tensor::random(shape, Distribution::Normal(0.0, 4.0), dev);
    let up = Tensor::random(shape, Distribution::Normal(0.0, 1.0), dev);
    (gate, up)
}

/// Forward: bit-identical to `silu(gate) * up` on `flex`, with and without autodiff.
/// Backward: the gradients of `sum(w * swiglu(gate, up))` match the composition's
/// within f32 rounding of a few products.
#[test]
fn fused_swiglu_matches_the_composition_forward_and_backward() {
    let dev = Default::default();
    let (gate, up) = inputs::<Flex>(&dev);
    let composed = silu(gate.clone()) * up.clone();
    let fused = swiglu(gate.clone(), up.clone());
    assert_eq!(fused.to_data(), composed.to_data());

    type A = Autodiff<Flex>;
    let w = Tensor::<Flex, 3>::random(gate.dims(), Distribution::Normal(0.0, 1.0), &dev);
    let grads = |fuse: bool| {
        let g = Tensor::<A, 3>::from_inner(gate.clone()).require_grad();
        let u = Tensor::<A, 3>::from_inner(up.clone()).require_grad();
        let y = if fuse {
            swiglu(g.clone(), u.clone())
        } else {
            silu(g.clone()) * u.clone()
        };
        let forward = y.clone().inner();
        let all = (y * Tensor::from_inner(w.clone())).sum().backward();
        (forward, g.grad(&all).unwrap(), u.grad(&all).unwrap())
    };
    let (y_fused, dg_fused, du_fused) = grads(true);
    let (y_comp, dg_comp, du_comp) = grads(false);
    assert_eq!(y_fused.to_data(), y_comp.to_data());
    // d up = w * silu(g): the same products in the same order
    assert_eq!(du_fused.to_data(), du_comp.to_data());
    // d gate: s + g s (1 - s) regrouped; |dg| <= ~4 |w u|, so 1e-5 absolute is a few ulps
    let diff = (dg_fused - dg_comp).abs().max().into_scalar();
    assert!(diff < 1e-5, "d gate differs by {diff}");
}

/// Another backend takes the composition, unchanged.
#[test]
fn swiglu_on_other_backends_is_the_composition() {
    let dev = Default::default();
    let (gate, up) = inputs::<NdArray>(&dev);
    let composed = silu(gate.clone()) * up.clone();
    assert_eq!(swiglu(gate, up).to_data(), composed.to_data());
}
