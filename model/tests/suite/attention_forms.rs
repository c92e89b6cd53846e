//! The two forms of attention agree: the differentiable composition used under autodiff
//! against Burn's fused attention, and the block-copy head transposes against the strided ones.

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Distribution;
use transfusion_model::attention::{
    differentiable_attention, heads_first, heads_last, AttentionMask,
};

type B = Flex;

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn differentiable_attention_matches_the_fused_kernel_and_zeroes_fully_masked_rows() {
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
    let ours = differentiable_attention(q.clone(), k.clone(), v.clone(), bias.inner());
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
