//! The two forms of attention agree: the differentiable composition used under autodiff
//! against Burn's fused attention, and every head layout change against the strided views.

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Distribution;
use transfusion_model::attention::AttentionMask;
use transfusion_model::fused::attention as training_attention;
use transfusion_model::head_layout::{heads_first, heads_last, HeadLayout};

type B = Flex;

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn training_attention_matches_the_fused_kernel_and_zeroes_fully_masked_rows() {
    let dev = Default::default();
    let [b, h, s, hd] = [2, 3, 7, 8];
    let r = || Tensor::<B, 4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &dev);
    let (q, k, v) = (r(), r(), r());
    // causal, and the last query row of batch 1 sees nothing
    let i = Tensor::<B, 1, Int>::arange(0..s as i64, &dev);
    let causal = i.clone().reshape([s, 1]).lower(i.reshape([1, s]));
    let mut masked = causal
        .reshape([1, 1, s, s])
        .repeat_dim(0, b)
        .repeat_dim(1, h);
    masked = masked.slice_assign(
        [1..2, 0..h, s - 1..s, 0..s],
        Tensor::<B, 4, Bool>::from_data(TensorData::new(vec![true; h * s], [1, h, 1, s]), &dev),
    );
    let AttentionMask::Additive(bias) =
        AttentionMask::<Autodiff<B>>::for_device(Tensor::from_inner(masked.clone()), &dev)
    else {
        panic!("an autodiff backend gets the additive form")
    };
    let ours = training_attention(q.clone(), k.clone(), v.clone(), bias.inner());
    let fused = attention(
        q,
        k,
        v,
        Some(masked.clone()),
        None,
        AttentionModuleOptions::default(),
    );
    // Rows with at least one visible key: the same softmax in another order of f32 sums.
    let seen = |t: Tensor<B, 4>| t.slice([0..b, 0..h, 0..s - 1, 0..hd]);
    assert!(max_diff(seen(ours.clone()), seen(fused)) < 1e-5);
    let blind = ours.slice([1..2, 0..h, s - 1..s, 0..hd]);
    assert_eq!(blind.abs().max().into_scalar(), 0.0);
    let AttentionMask::Bool(_) = AttentionMask::<B>::for_device(masked, &dev) else {
        panic!("a backend without autodiff gets the boolean form")
    };
}

#[test]
fn block_copy_head_transposes_equal_the_strided_ones() {
    let dev = Default::default();
    let x = Tensor::<B, 4>::random([2, 5, 3, 4], Distribution::Normal(0.0, 1.0), &dev);
    assert_eq!(
        max_diff(heads_first(x.clone()), x.clone().swap_dims(1, 2)),
        0.0
    );
    let y = x.clone().swap_dims(1, 2); // [2, 3, 5, 4]
    assert_eq!(max_diff(heads_last(y), x.reshape([2, 5, 12])), 0.0);
}

/// Each layout a CPU forward pass picks (block copies without gradients, row gathers under
/// autodiff) moves the heads exactly as the strided views do, for query heads and for
/// fewer key/value heads, and under autodiff passes the same gradient back.
#[test]
fn every_head_layout_moves_heads_and_gradients_like_the_views() {
    type A = Autodiff<B>;
    let dev = Default::default();
    let [b, s, h, h_kv, hd] = [2, 5, 4, 2, 3];
    let x = Tensor::<B, 4>::random([b, s, h, hd], Distribution::Normal(0.0, 1.0), &dev);
    let xkv = Tensor::<B, 4>::random([b, s, h_kv, hd], Distribution::Normal(0.0, 1.0), &dev);
    let plain = HeadLayout::<B>::for_pass(b, s, h, h_kv, &dev);
    assert!(matches!(plain, HeadLayout::BlockCopies));
    let tracked = HeadLayout::<A>::for_pass(b, s, h, h_kv, &dev);
    assert!(matches!(tracked, HeadLayout::RowGather(_)));
    for t in [x.clone(), xkv] {
        let want = t.clone().swap_dims(1, 2);
        assert_eq!(max_diff(plain.heads_first(t.clone()), want.clone()), 0.0);
        let got = tracked.heads_first(Tensor::<A, 4>::from_inner(t));
        assert_eq!(max_diff(got.inner(), want), 0.0);
    }
    let y = x.clone().swap_dims(1, 2); // [b, h, s, hd]
    let want = x.clone().reshape([b, s, h * hd]);
    assert_eq!(max_diff(plain.heads_last(y.clone()), want.clone()), 0.0);
    assert_eq!(
        max_diff(tracked.heads_last(Tensor::from_inner(y)).inner(), want),
        0.0
    );
    // d/dx of sum(w * heads_last(heads_first(x) * u)): the gathers' backward passes (row
    // scatters) against the views' (transposes).
    let u = Tensor::<B, 4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &dev);
    let w = Tensor::<B, 3>::random([b, s, h * hd], Distribution::Normal(0.0, 1.0), &dev);
    let grad = |layout: &HeadLayout<A>| {
        let xa = Tensor::<A, 4>::from_inner(x.clone()).require_grad();
        let mid = layout.heads_first(xa.clone()) * Tensor::from_inner(u.clone());
        let loss = (layout.heads_last(mid) * Tensor::from_inner(w.clone())).sum();
        xa.grad(&loss.backward()).expect("x is tracked")
    };
    assert!(max_diff(grad(&tracked), grad(&HeadLayout::Views)) < 1e-6);
}
