//! The two forms of attention agree: the fused kernel used under autodiff and on `flex`
//! against Burn's fused attention, and every head layout change against the strided views.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Distribution;
use transfusion_model::ops::fused::attention as training_attention;
use transfusion_model::ops::head_layout::{heads_first, heads_last, HeadLayout};
use transfusion_model::ops::AttentionMask;
use transfusion_model::rope::rope_tables;

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
    let AttentionMask::Additive(_) = AttentionMask::<B>::for_device(masked.clone(), &dev) else {
        panic!("flex gets the additive form, for the fused kernel")
    };
    let on_ndarray = Tensor::<NdArray, 4, Bool>::from_data(masked.into_data(), &Default::default());
    let AttentionMask::Bool(_) =
        AttentionMask::<NdArray>::for_device(on_ndarray, &Default::default())
    else {
        panic!("a backend without autodiff or fused kernels gets the boolean form")
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

/// `max |a - b|` on any backend.
fn largest_difference<C: Backend, const D: usize>(a: Tensor<C, D>, b: Tensor<C, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem()
}

/// Each layout a CPU forward pass picks (on `ndarray` block copies without gradients and
/// row gathers under autodiff; on `flex` the fused kernels both ways) moves the heads
/// exactly as the strided views do, for query heads and for fewer key/value heads, and
/// under autodiff passes the same gradient back.
#[test]
fn every_head_layout_moves_heads_and_gradients_like_the_views() {
    layouts_move_heads_like_the_views::<NdArray>(
        |l| matches!(l, HeadLayout::BlockCopies),
        |l| matches!(l, HeadLayout::RowGather(_)),
    );
    layouts_move_heads_like_the_views::<Flex>(
        |l| matches!(l, HeadLayout::Fused),
        |l| matches!(l, HeadLayout::Fused),
    );
}

fn layouts_move_heads_like_the_views<C: Backend>(
    plain_is: fn(&HeadLayout<C>) -> bool,
    tracked_is: fn(&HeadLayout<Autodiff<C>>) -> bool,
) {
    type A<C> = Autodiff<C>;
    let dev = Default::default();
    let [b, s, h, h_kv, hd] = [2, 5, 4, 2, 3];
    let x = Tensor::<C, 4>::random([b, s, h, hd], Distribution::Normal(0.0, 1.0), &dev);
    let xkv = Tensor::<C, 4>::random([b, s, h_kv, hd], Distribution::Normal(0.0, 1.0), &dev);
    let plain = HeadLayout::<C>::for_pass(b, s, h, h_kv, &dev);
    assert!(plain_is(&plain));
    let tracked = HeadLayout::<A<C>>::for_pass(b, s, h, h_kv, &dev);
    assert!(tracked_is(&tracked));
    for t in [x.clone(), xkv] {
        let want = t.clone().swap_dims(1, 2);
        assert_eq!(
            largest_difference(plain.heads_first(t.clone()), want.clone()),
            0.0
        );
        let got = tracked.heads_first(Tensor::<A<C>, 4>::from_inner(t));
        assert_eq!(largest_difference(got.inner(), want), 0.0);
    }
    let y = x.clone().swap_dims(1, 2); // [b, h, s, hd]
    let want = x.clone().reshape([b, s, h * hd]);
    assert_eq!(
        largest_difference(plain.heads_last(y.clone()), want.clone()),
        0.0
    );
    assert_eq!(
        largest_difference(tracked.heads_last(Tensor::from_inner(y)).inner(), want),
        0.0
    );
    // d/dx of sum(w * heads_last(heads_first(x) * u)): the layouts' backward passes
    // against the views' (transposes).
    let u = Tensor::<C, 4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &dev);
    let w = Tensor::<C, 3>::random([b, s, h * hd], Distribution::Normal(0.0, 1.0), &dev);
    let grad = |layout: &HeadLayout<A<C>>| {
        let xa = Tensor::<A<C>, 4>::from_inner(x.clone()).require_grad();
        let mid = layout.heads_first(xa.clone()) * Tensor::from_inner(u.clone());
        let loss = (layout.heads_last(mid) * Tensor::from_inner(w.clone())).sum();
        xa.grad(&loss.backward()).expect("x is tracked")
    };
    assert!(largest_difference(grad(&tracked), grad(&HeadLayout::Views)) < 1e-6);
}

/// `[rotated heads-first x, d x]` of `sum(w * rotated_heads_first(x))` with `layout`'s
/// change on autodiff backend `A`, RoPE tables for positions restarting at 0 in the
/// second row (packed documents) and `h` heads.
fn rotated<A: burn::tensor::backend::AutodiffBackend>(
    x: &Tensor<Flex, 4>,
    w: &Tensor<Flex, 4>,
    layout: fn(usize, usize, usize, &A::Device) -> HeadLayout<A>,
) -> [TensorData; 2] {
    let dev = Default::default();
    let [b, s, h, hd] = x.dims();
    let positions: Vec<i64> = (0..b * s).map(|i| (i % 7) as i64 * 3).collect();
    let positions = Tensor::<A, 2, Int>::from_data(TensorData::new(positions, [b, s]), &dev);
    let tables = rope_tables(positions, hd, 10_000.0, h);
    let xa = Tensor::<A, 4>::from_data(x.to_data(), &dev).require_grad();
    let out = layout(b, s, h, &dev).rotated_heads_first(xa.clone(), &tables);
    let loss = (out.clone() * Tensor::from_data(w.to_data(), &dev)).sum();
    let dx = xa.grad(&loss.backward()).expect("x is tracked");
    [out.into_data(), dx.into_data()]
}

/// The fused head layout change of the queries and keys (`flex`) rotates exactly as
/// `apply_rope` before the strided view does (`ndarray`, views), and passes back exactly
/// the composition's gradient (the inverse rotation); without autodiff too.
#[test]
fn fused_rotated_heads_first_equals_rope_then_transpose() {
    let dev = Default::default();
    let [b, s, h, hd] = [2, 9, 3, 8];
    let x = Tensor::<Flex, 4>::random([b, s, h, hd], Distribution::Normal(0.0, 1.0), &dev);
    let w = Tensor::<Flex, 4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &dev);
    let fused = rotated::<Autodiff<Flex>>(&x, &w, |b, s, h, d| HeadLayout::for_pass(b, s, h, h, d));
    let composed = rotated::<Autodiff<NdArray>>(&x, &w, |_, _, _, _| HeadLayout::Views);
    assert_eq!(fused[0], composed[0], "rotated heads");
    assert_eq!(fused[1], composed[1], "gradient");
    let positions: Vec<i64> = (0..b * s).map(|i| (i % 7) as i64 * 3).collect();
    let positions = Tensor::<Flex, 2, Int>::from_data(TensorData::new(positions, [b, s]), &dev);
    let tables = rope_tables(positions, hd, 10_000.0, h);
    let plain = HeadLayout::<Flex>::for_pass(b, s, h, h, &dev).rotated_heads_first(x, &tables);
    assert_eq!(plain.into_data(), fused[0]);
}
