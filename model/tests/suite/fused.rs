//! The fused `flex` kernels against the compositions of Burn operations they replace.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::Param;
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution};
use transfusion_model::ops::fused::{
    attention as training_attention, available, linear, rms_norm, swiglu,
};

use crate::fused_reference as reference;

/// `x` on autodiff backend `A` in `dtype`, tracked for gradients.
fn tracked<A: AutodiffBackend, const D: usize>(x: &Tensor<Flex, D>, dtype: DType) -> Tensor<A, D> {
    Tensor::from_data(x.to_data().convert_dtype(dtype), &Default::default()).require_grad()
}

fn inputs<B: Backend>(dev: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
    // wide enough for several parallel chunks; gates well into both sigmoid branches
    let shape = [3, 37, 500];
    let gate = Tensor::random(shape, Distribution::Normal(0.0, 4.0), dev);
    let up = Tensor::random(shape, Distribution::Normal(0.0, 1.0), dev);
    (gate, up)
}

/// `[output, d gate, d up]` of `sum(w * swiglu(gate, up))` on autodiff backend `A`, as
/// f64 data.
fn swiglu_grads<A: AutodiffBackend>(
    inputs: &[Tensor<Flex, 3>; 3],
    op: fn(Tensor<A, 3>, Tensor<A, 3>) -> Tensor<A, 3>,
) -> [TensorData; 3] {
    let t = |x: &Tensor<Flex, 3>| tracked::<A, 3>(x, DType::F32);
    let [g, u, w] = inputs.each_ref().map(t);
    let y = op(g.clone(), u.clone());
    let out = y.clone().inner();
    let all = (y * w).sum().backward();
    [out, g.grad(&all).unwrap(), u.grad(&all).unwrap()].map(|t| t.into_data().convert::<f64>())
}

/// The fused SwiGLU's output and gradients against an f64 reference (the composition in
/// f64): no further from it than twice the f32 composition's own rounding error (or
/// 1e-6), with gates far into both saturated ends of the sigmoid. Without autodiff the
/// forward pass is the same kernel.
#[test]
fn fused_swiglu_matches_the_composition_forward_and_backward() {
    let dev = Default::default();
    let (gate, up) = inputs::<Flex>(&dev);
    let w = Tensor::<Flex, 3>::random(gate.dims(), Distribution::Normal(0.0, 1.0), &dev);
    let inputs = [gate.clone(), up.clone(), w];
    let fused = swiglu_grads::<Autodiff<Flex>>(&inputs, swiglu);
    let composed = swiglu_grads::<Autodiff<Flex>>(&inputs, |g, u| silu(g) * u);
    let exact = reference::swiglu(&inputs);
    assert_within_composition_error(&["output", "d gate", "d up"], &fused, &composed, &exact);
    let plain = swiglu(gate, up).into_data().convert::<f64>();
    assert_eq!(plain, fused[0]);
}

/// Random `q, k, v` and an additive causal bias whose last query row of batch 1 sees
/// nothing, as `flex` tensors.
fn attention_inputs(dev: &Device<Flex>) -> [Tensor<Flex, 4>; 4] {
    attention_case([2, 3, 9, 9, 8], 3, true, dev)
}

/// Random `q [b, h, s, hd]`, `k, v [b, h, lk, hd]` (each key/value head shared by
/// `share` query heads, as grouped-query attention repeats them) and an additive causal
/// bias over the last `s` of `lk` positions; with `blind`, the last query row of the last
/// batch row sees nothing.
fn attention_case(
    [b, h, s, lk, hd]: [usize; 5],
    share: usize,
    blind: bool,
    dev: &Device<Flex>,
) -> [Tensor<Flex, 4>; 4] {
    let r = |l: usize, heads: usize| {
        Tensor::<Flex, 4>::random([b, heads, l, hd], Distribution::Normal(0.0, 1.0), dev)
    };
    let kv = |t: Tensor<Flex, 4>| {
        t.reshape([b, h / share, 1, lk, hd])
            .repeat_dim(2, share)
            .reshape([b, h, lk, hd])
    };
    let qi = Tensor::<Flex, 1, Int>::arange((lk - s) as i64..lk as i64, dev);
    let ki = Tensor::<Flex, 1, Int>::arange(0..lk as i64, dev);
    let mut masked = qi
        .reshape([s, 1])
        .lower(ki.reshape([1, lk]))
        .reshape([1, 1, s, lk])
        .repeat_dim(0, b)
        .repeat_dim(1, h);
    if blind {
        masked = masked.slice_assign(
            [b - 1..b, 0..h, s - 1..s, 0..lk],
            Tensor::from_data(TensorData::new(vec![true; h * lk], [1, h, 1, lk]), dev),
        );
    }
    let bias = Tensor::zeros([b, h, s, lk], dev).mask_fill(masked, f32::NEG_INFINITY);
    [r(s, h), kv(r(lk, h / share)), kv(r(lk, h / share)), bias]
}

/// `[output, dq, dk, dv, dbias]` of `sum(w * attention(q, k, v, bias))` on autodiff
/// backend `A`, as f64 data; bias gradients on visible keys only (masked ones: any value
/// times 0).
fn attention_grads<A: AutodiffBackend>(
    inputs: &[Tensor<Flex, 4>; 4],
    w: &Tensor<Flex, 4>,
    op: fn(Tensor<A, 4>, Tensor<A, 4>, Tensor<A, 4>, Tensor<A, 4>) -> Tensor<A, 4>,
) -> [TensorData; 5] {
    let t = |x: &Tensor<Flex, 4>| tracked::<A, 4>(x, DType::F32);
    let [q, k, v, bias] = inputs.each_ref().map(t);
    let visible = bias.clone().inner().equal_elem(0.0).float();
    let y = op(q.clone(), k.clone(), v.clone(), bias.clone());
    let out = y.clone().inner();
    let g = (y * t(w)).sum().backward();
    let grad = |x: &Tensor<A, 4>| x.grad(&g).unwrap();
    [out, grad(&q), grad(&k), grad(&v), grad(&bias) * visible]
        .map(|t| t.into_data().convert::<f64>())
}

/// The attention as plain Burn operations (no fused kernel on any backend).
fn composed_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    // [b, h, s, lk]
    let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3)) + bias;
    let shift = scores.clone().detach().max_dim(3).clamp_min(-1.0e4);
    let weights = (scores - shift).exp();
    let sum = weights.clone().sum_dim(3).clamp_min(1.0e-30);
    weights.matmul(v) / sum
}

fn max_abs_diff(a: &TensorData, b: &TensorData) -> f64 {
    a.iter::<f64>()
        .zip(b.iter::<f64>())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Each fused result is finite and no further from the f64 reference than twice the f32
/// composition's own error (or 1e-6).
fn assert_within_composition_error(
    names: &[&str],
    fused: &[TensorData],
    composed: &[TensorData],
    exact: &[TensorData],
) {
    for (i, name) in names.iter().enumerate() {
        let (ours, theirs) = (
            max_abs_diff(&fused[i], &exact[i]),
            max_abs_diff(&composed[i], &exact[i]),
        );
        assert!(
            ours <= (2.0 * theirs).max(1e-6),
            "{name}: fused is {ours:e} from f64, the f32 composition {theirs:e}"
        );
        assert!(
            fused[i].iter::<f64>().all(f64::is_finite),
            "{name} not finite"
        );
    }
}

/// The fused attention's output and gradients (q, k, v, and a tracked bias) against an f64
/// reference (the composition in f64): no further from it than twice the f32
/// composition's own rounding error (or 1e-6). The fully masked row gives zeros and passes
/// no gradient to its query.
#[test]
fn fused_attention_gradients_match_the_composition() {
    let dev = Default::default();
    let inputs = attention_inputs(&dev);
    let w = Tensor::<Flex, 4>::random(inputs[0].dims(), Distribution::Normal(0.0, 1.0), &dev);
    let fused = attention_grads::<Autodiff<Flex>>(&inputs, &w, training_attention);
    let composed = attention_grads::<Autodiff<Flex>>(&inputs, &w, composed_attention);
    let exact = reference::attention(&inputs, &w);
    assert_within_composition_error(
        &["output", "dq", "dk", "dv", "dbias"],
        &fused,
        &composed,
        &exact,
    );
    // the blind row: zero output and no gradient to its query
    let [_, h, s, hd] = inputs[0].dims();
    let blind = |d: &TensorData| {
        Tensor::<Flex, 4>::from_data(d.clone().convert::<f32>(), &dev)
            .slice([1..2, 0..h, s - 1..s, 0..hd])
            .abs()
            .max()
            .into_scalar()
    };
    assert_eq!(blind(&fused[0]), 0.0);
    assert_eq!(blind(&fused[1]), 0.0);
}

/// The fused attention against the f64 composition at the shapes the model gives it
/// besides a training batch: one row and one query over cached keys (decoding), grouped
/// key/value heads, and scores enough for several parallel tasks of rows.
#[test]
fn fused_attention_matches_at_decoding_grouped_and_parallel_shapes() {
    let dev = Default::default();
    let cases = [
        (
            "batch 1, one query over 7 keys (decoding)",
            [1, 4, 1, 7, 8],
            1,
        ),
        (
            "grouped key/value heads (8 query heads, 2 key/value heads)",
            [2, 8, 5, 5, 8],
            4,
        ),
        ("several parallel tasks (72k scores)", [2, 4, 96, 96, 8], 1),
    ];
    for (label, shape, share) in cases {
        let inputs = attention_case(shape, share, false, &dev);
        let w = Tensor::<Flex, 4>::random(inputs[0].dims(), Distribution::Normal(0.0, 1.0), &dev);
        let fused = attention_grads::<Autodiff<Flex>>(&inputs, &w, training_attention);
        let composed = attention_grads::<Autodiff<Flex>>(&inputs, &w, composed_attention);
        let exact = reference::attention(&inputs, &w);
        eprintln!("{label}");
        assert_within_composition_error(
            &["output", "dq", "dk", "dv", "dbias"],
            &fused,
            &composed,
            &exact,
        );
        // without autodiff: the same forward kernel
        let [q, k, v, bias] = inputs;
        let plain = training_attention(q, k, v, bias)
            .into_data()
            .convert::<f64>();
        assert!(
            max_abs_diff(&plain, &fused[0]) == 0.0,
            "{label}: inference output"
        );
    }
}

/// `[output, dx, dw, dbias]` of `sum(g * linear(x, w, bias))` on autodiff backend `A`, as
/// f64 data, with `x` read through a transposed view (`x` given as `[d_in, rows]`).
fn linear_grads<A: AutodiffBackend>(
    [x_t, w, bias, g]: &[Tensor<Flex, 2>; 4],
    op: fn(Tensor<A, 2>, Tensor<A, 2>, Option<Tensor<A, 1>>) -> Tensor<A, 2>,
) -> [TensorData; 4] {
    let t = |x: &Tensor<Flex, 2>| tracked::<A, 2>(x, DType::F32);
    let b = tracked::<A, 1>(&bias.clone().reshape([-1]), DType::F32);
    let (x_t, w) = (t(x_t), t(w));
    let y = op(x_t.clone().transpose(), w.clone(), Some(b.clone()));
    let out = y.clone().inner().into_data();
    let grads = (y * t(g)).sum().backward();
    [
        out,
        x_t.grad(&grads).unwrap().into_data(),
        w.grad(&grads).unwrap().into_data(),
        b.grad(&grads).unwrap().into_data(),
    ]
    .map(|d| d.convert::<f64>())
}

/// The fused linear layer (a transposed input view, a bias) against the f64 composition:
/// output and the gradients of input, weight and bias no further from it than twice the
/// f32 composition's own rounding error (or 1e-6).
#[test]
fn fused_linear_gradients_match_the_composition() {
    let dev = Default::default();
    let [rows, d_in, d_out] = [37, 24, 19];
    let r =
        |shape: [usize; 2]| Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let inputs = [
        r([d_in, rows]),
        r([d_in, d_out]),
        r([1, d_out]),
        r([rows, d_out]),
    ];
    let fused = linear_grads::<Autodiff<Flex>>(&inputs, linear);
    let composed = linear_grads::<Autodiff<Flex>>(&inputs, |x, w, b| {
        x.matmul(w) + b.expect("a bias").unsqueeze_dim(0)
    });
    let exact = reference::linear(&inputs);
    assert_within_composition_error(&["output", "dx", "dw", "dbias"], &fused, &composed, &exact);
    // without autodiff: the same product
    let plain = linear(inputs[0].clone().transpose(), inputs[1].clone(), None);
    let composed = inputs[0].clone().transpose().matmul(inputs[1].clone());
    assert!(
        max_abs_diff(
            &plain.into_data().convert::<f64>(),
            &composed.into_data().convert::<f64>()
        ) < 1e-5
    );
}

/// `[output, dx, d gamma]` of `sum(g * rms_norm(x))` on autodiff backend `A`, as f64 data,
/// with rows of `x` of very different scales.
fn rms_norm_grads<A: AutodiffBackend>(
    [x, gamma, g]: &[Tensor<Flex, 3>; 3],
    op: fn(&RmsNorm<A>, Tensor<A, 3>) -> Tensor<A, 3>,
) -> [TensorData; 3] {
    let t = |x: &Tensor<Flex, 3>| tracked::<A, 3>(x, DType::F32);
    let gain = tracked::<A, 1>(&gamma.clone().reshape([-1]), DType::F32);
    let norm = RmsNorm {
        gamma: Param::from_tensor(gain),
        epsilon: 1e-5,
    };
    let x = t(x);
    let y = op(&norm, x.clone());
    let out = y.clone().inner().into_data();
    let grads = (y * t(g)).sum().backward();
    [
        out,
        x.grad(&grads).unwrap().into_data(),
        norm.gamma.val().grad(&grads).unwrap().into_data(),
    ]
    .map(|d| d.convert::<f64>())
}

/// The fused RMSNorm against the f64 composition (Burn's module): output and the gradients
/// of input and gain no further from it than twice the f32 composition's own rounding
/// error (or 1e-6), over rows wide enough for several parallel chunks and of scales from
/// 1e-3 to 1e2; without autodiff, the same forward pass.
#[test]
fn fused_rms_norm_matches_the_composition() {
    let dev = Default::default();
    let [b, s, d] = [3, 97, 160];
    let scales: Vec<f32> = (0..b * s).map(|i| 10f32.powi(i as i32 % 6 - 3)).collect();
    let scales = Tensor::<Flex, 1>::from_floats(scales.as_slice(), &dev).reshape([b, s, 1]);
    let x = Tensor::<Flex, 3>::random([b, s, d], Distribution::Normal(0.0, 1.0), &dev) * scales;
    let gamma = Tensor::<Flex, 3>::random([1, 1, d], Distribution::Normal(1.0, 0.5), &dev);
    let g = Tensor::<Flex, 3>::random([b, s, d], Distribution::Normal(0.0, 1.0), &dev);
    let inputs = [x.clone(), gamma.clone(), g];
    let fused = rms_norm_grads::<Autodiff<Flex>>(&inputs, rms_norm);
    let composed = rms_norm_grads::<Autodiff<Flex>>(&inputs, |norm, x| norm.forward(x));
    let exact = reference::rms_norm(&inputs);
    assert_within_composition_error(&["output", "dx", "d gamma"], &fused, &composed, &exact);
    let norm = RmsNorm {
        gamma: Param::from_tensor(gamma.reshape([d])),
        epsilon: 1e-5,
    };
    assert_eq!(rms_norm(&norm, x).into_data().convert::<f64>(), fused[0]);
}

/// `ndarray` under autodiff: no kernel of its own, so the plain-Burn reference path.
type NdArrayAd = Autodiff<NdArray>;
/// `flex` under Burn's balanced checkpointing: its float primitive is `Autodiff<Flex>`'s,
/// but the kernels record for no checkpointing, so it must take the reference path too.
type FlexBalanced = Autodiff<Flex, BalancedCheckpointing>;

/// The backends without a kernel (`ndarray`, and `flex` under checkpointing) take the
/// plain-Burn path of [`transfusion_model::ops::reference`]: for each operation, output
/// and gradients no further from the f64 reference than twice the `flex` f32
/// composition's own error (or 1e-6; `ndarray`'s RMSNorm and attention: 1e-3, see
/// below). A broken reference path fails here; the kernels' own tests above never run
/// it.
#[test]
fn other_backends_take_the_reference_path_within_f32_error() {
    assert!(available::<Autodiff<Flex>>() && available::<Flex>());
    assert!(!available::<NdArrayAd>() && !available::<FlexBalanced>());
    let dev = Default::default();
    let normal = |shape: Vec<usize>, sd: f64| {
        Tensor::<Flex, 1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Normal(0.0, sd),
            &dev,
        )
    };
    let shaped3 = |t: Tensor<Flex, 1>, s: [usize; 3]| t.reshape(s);

    let (gate, up) = inputs::<Flex>(&dev);
    let w = shaped3(normal(gate.dims().to_vec(), 1.0), gate.dims());
    let three = [gate, up, w];
    let composed = swiglu_grads::<Autodiff<Flex>>(&three, |g, u| silu(g) * u);
    let exact = reference::swiglu(&three);
    for ours in [
        swiglu_grads::<NdArrayAd>(&three, swiglu),
        swiglu_grads::<FlexBalanced>(&three, swiglu),
    ] {
        assert_within_composition_error(&["output", "d gate", "d up"], &ours, &composed, &exact);
    }

    let [rows, d_in, d_out] = [37, 24, 19];
    let r2 = |s: [usize; 2]| normal(s.to_vec(), 1.0).reshape(s);
    let four = [
        r2([d_in, rows]),
        r2([d_in, d_out]),
        r2([1, d_out]),
        r2([rows, d_out]),
    ];
    let composed = linear_grads::<Autodiff<Flex>>(&four, |x, w, b| {
        x.matmul(w) + b.expect("a bias").unsqueeze_dim(0)
    });
    let exact = reference::linear(&four);
    for ours in [
        linear_grads::<NdArrayAd>(&four, linear),
        linear_grads::<FlexBalanced>(&four, linear),
    ] {
        assert_within_composition_error(&["output", "dx", "dw", "dbias"], &ours, &composed, &exact);
    }

    let [b, s, d] = [3, 17, 40];
    let norm_inputs = [
        shaped3(normal(vec![b, s, d], 1.0), [b, s, d]),
        shaped3(normal(vec![d], 0.5), [1, 1, d]) + 1.0,
        shaped3(normal(vec![b, s, d], 1.0), [b, s, d]),
    ];
    let composed = rms_norm_grads::<Autodiff<Flex>>(&norm_inputs, |norm, x| norm.forward(x));
    let exact = reference::rms_norm(&norm_inputs);
    let names = ["output", "dx", "d gamma"];
    let balanced = rms_norm_grads::<FlexBalanced>(&norm_inputs, rms_norm);
    assert_within_composition_error(&names, &balanced, &composed, &exact);
    // Burn's backward passes on `ndarray` are less exact here: the RMSNorm's input
    // gradient was measured 1.5e-4 to 2e-4 from f64 (the same composition on `flex`:
    // 5e-7), so the bound is 1e-3; a wrong epsilon, gain or scale misses it by far.
    let ours = rms_norm_grads::<NdArrayAd>(&norm_inputs, rms_norm);
    assert_near_f64("ndarray", &names, &ours, &exact, 1e-3);

    let attention_in = attention_inputs(&dev);
    let w = Tensor::<Flex, 4>::random(attention_in[0].dims(), Distribution::Normal(0.0, 1.0), &dev);
    let composed = attention_grads::<Autodiff<Flex>>(&attention_in, &w, composed_attention);
    let exact = reference::attention(&attention_in, &w);
    let names = ["output", "dq", "dk", "dv", "dbias"];
    let balanced = attention_grads::<FlexBalanced>(&attention_in, &w, training_attention);
    assert_within_composition_error(&names, &balanced, &composed, &exact);
    // `ndarray`: the query gradient measured 4.5e-5 to 9e-5 from f64 (on `flex`: 2e-7 to
    // 6e-7); the same bound as the RMSNorm's.
    let ours = attention_grads::<NdArrayAd>(&attention_in, &w, training_attention);
    assert_near_f64("ndarray", &names, &ours, &exact, 1e-3);
}

/// Each result is finite and within `bound` of the f64 reference.
fn assert_near_f64(
    backend: &str,
    names: &[&str],
    ours: &[TensorData],
    exact: &[TensorData],
    bound: f64,
) {
    for (i, name) in names.iter().enumerate() {
        let diff = max_abs_diff(&ours[i], &exact[i]);
        assert!(diff <= bound, "{backend} {name}: {diff:e} from f64");
        assert!(
            ours[i].iter::<f64>().all(f64::is_finite),
            "{backend} {name} not finite"
        );
    }
}
