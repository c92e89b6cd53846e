//! The blockwise attention (memory linear in the sequence) against the dense composition
//! computed in f64: outputs and the gradients of queries, keys and values, on `flex`,
//! `ndarray` and `wgpu`, with packed documents, images, GQA, one row of one position, a
//! cached prefix, and blocks that do not divide the sequence.

use burn::backend::ndarray::NdArray;
use burn::backend::{Autodiff, Flex, Wgpu};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use transfusion_model::mask::{allowed_reference, SpanMeta};
use transfusion_model::ops::blockwise::{self, BlockPlan};

type Reference = Autodiff<NdArray<f64>>;

/// One row's positions: `(index, image span, document)` each.
type Row = Vec<(i64, i64, i64)>;

/// Documents laid out in a row of `len` positions: each `(text, image, text)` lengths
/// (image 0: none), padding after.
fn row(docs: &[(usize, usize, usize)], len: usize) -> Row {
    let mut out = Vec::new();
    let mut image = 0;
    for (d, &(a, img, c)) in docs.iter().enumerate() {
        let doc = d as i64 + 1;
        let mut spans = vec![0; a];
        if img > 0 {
            image += 1;
            spans.extend(std::iter::repeat_n(image, img));
        }
        spans.extend(std::iter::repeat_n(0, c));
        out.extend(spans.into_iter().map(|s| (0, s, doc)));
    }
    out.resize(len, (0, 0, 0));
    for (i, p) in out.iter_mut().enumerate() {
        p.0 = i as i64;
    }
    out
}

/// A test case: rows of positions, of which the last `queries` are queries (all are keys).
struct Case {
    rows: Vec<Row>,
    queries: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    block_rows: usize,
}

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        (
            "packed documents and images, blocks of 5 over 23",
            Case {
                rows: vec![
                    row(&[(4, 6, 3), (2, 4, 2)], 23),
                    row(&[(1, 8, 1), (3, 0, 0), (0, 4, 3)], 23),
                ],
                queries: 23,
                heads: 2,
                kv_heads: 2,
                hd: 8,
                block_rows: 5,
            },
        ),
        (
            "grouped-query attention, blocks of 4 over 17",
            Case {
                rows: vec![row(&[(3, 8, 2), (4, 0, 0)], 17)],
                queries: 17,
                heads: 4,
                kv_heads: 2,
                hd: 8,
                block_rows: 4,
            },
        ),
        (
            "batch 1, sequence 1",
            Case {
                rows: vec![row(&[(1, 0, 0)], 1)],
                queries: 1,
                heads: 2,
                kv_heads: 1,
                hd: 4,
                block_rows: 16,
            },
        ),
        (
            "5 queries after a cached prefix of 12, inside an image",
            Case {
                rows: vec![row(&[(2, 6, 9)], 17), row(&[(9, 6, 2)], 17)],
                queries: 5,
                heads: 2,
                kv_heads: 2,
                hd: 8,
                block_rows: 2,
            },
        ),
    ]
}

/// `[b, l]` metadata of the positions `from..` of each row.
fn meta<B: Backend>(rows: &[Row], from: usize, device: &B::Device) -> SpanMeta<B> {
    let field = |f: fn(&(i64, i64, i64)) -> i64| {
        let l = rows[0].len() - from;
        let v: Vec<i64> = rows.iter().flat_map(|r| r[from..].iter().map(f)).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [rows.len(), l]), device)
    };
    SpanMeta {
        index: field(|p| p.0),
        span: field(|p| p.1),
        doc: field(|p| p.2),
    }
}

/// Deterministic values in about [-2, 2].
fn values(n: usize, seed: u64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let x = (i as u64 + 1)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed);
            ((x >> 33) as f64 / (1u64 << 31) as f64) * 4.0 - 2.0
        })
        .collect()
}

/// `[b, h, l, hd]` heads of `data` rounded to f32, held as `dtype`.
fn heads<B: Backend>(
    data: &[f64],
    shape: [usize; 4],
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, 4> {
    let rounded: Vec<f64> = data.iter().map(|&x| x as f32 as f64).collect();
    let t = match dtype {
        DType::F64 => TensorData::new(rounded, shape),
        _ => TensorData::new(rounded.iter().map(|&x| x as f32).collect::<Vec<_>>(), shape),
    };
    Tensor::<B, 4>::from_data(t, (device, dtype))
}

fn repeat_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    let [b, h, l, hd] = x.dims();
    x.reshape([b, h, 1, l, hd])
        .expand([b, h, rep, l, hd])
        .reshape([b, h * rep, l, hd])
}

/// Output and gradients of `[q, k, v]` of `attend` (loss: `Σ out · w`), as f64 vectors.
fn run<B: Backend>(
    case: &Case,
    device: &B::Device,
    dtype: DType,
    attend: impl Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
    to_f64: impl Fn(Tensor<B, 4>) -> Vec<f64>,
    grad: impl Fn(&Tensor<B, 4>, &B::Gradients) -> Vec<f64>,
) -> [Vec<f64>; 4]
where
    B: burn::tensor::backend::AutodiffBackend,
{
    let (b, l, s) = (case.rows.len(), case.rows[0].len(), case.queries);
    let (h, hkv, hd) = (case.heads, case.kv_heads, case.hd);
    let q = heads::<B>(&values(b * h * s * hd, 1), [b, h, s, hd], device, dtype).require_grad();
    let k = heads::<B>(&values(b * hkv * l * hd, 2), [b, hkv, l, hd], device, dtype).require_grad();
    let v = heads::<B>(&values(b * hkv * l * hd, 3), [b, hkv, l, hd], device, dtype).require_grad();
    let w = heads::<B>(&values(b * h * s * hd, 4), [b, h, s, hd], device, dtype);
    let out = attend(
        q.clone(),
        repeat_kv(k.clone(), h / hkv),
        repeat_kv(v.clone(), h / hkv),
    );
    let grads = (out.clone() * w).sum().backward();
    [
        to_f64(out),
        grad(&q, &grads),
        grad(&k, &grads),
        grad(&v, &grads),
    ]
}

/// The dense composition in f64 with the reference mask.
fn reference(case: &Case) -> [Vec<f64>; 4] {
    let dev = Default::default();
    let (b, l, s) = (case.rows.len(), case.rows[0].len(), case.queries);
    let mut masked = Vec::new();
    for r in &case.rows {
        let span: Vec<i64> = r.iter().map(|p| p.1).collect();
        let doc: Vec<i64> = r.iter().map(|p| p.2).collect();
        for allowed in &allowed_reference(&span, &doc)[l - s..] {
            masked.extend(allowed.iter().map(|&a| !a));
        }
    }
    let h = case.heads;
    let masked = Tensor::<Reference, 3, Bool>::from_data(TensorData::new(masked, [b, s, l]), &dev)
        .reshape([b, 1, s, l])
        .expand([b, h, s, l]);
    let scale = 1.0 / (case.hd as f64).sqrt();
    let attend = |q: Tensor<Reference, 4>, k: Tensor<Reference, 4>, v: Tensor<Reference, 4>| {
        let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3));
        let p = burn::tensor::activation::softmax(scores.mask_fill(masked.clone(), -1e300), 3);
        p.matmul(v)
    };
    let f64s = |t: Tensor<Reference, 4>| t.into_data().to_vec::<f64>().unwrap();
    run::<Reference>(case, &dev, DType::F64, attend, f64s, |t, g| {
        t.grad(g).unwrap().into_data().to_vec::<f64>().unwrap()
    })
}

/// The blockwise attention on backend `B` under autodiff, and its forward pass without.
fn blockwise_on<B: Backend>(case: &Case, dev: &B::Device) -> ([Vec<f64>; 4], Vec<f64>) {
    let s = case.queries;
    let l = case.rows[0].len();
    let plan = |d: &B::Device| {
        BlockPlan::<B>::with_rows(
            meta(&case.rows, l - s, d),
            meta(&case.rows, 0, d),
            case.block_rows,
        )
    };
    let ad_plan = plan(dev).map_backend::<Autodiff<B>>(Tensor::from_inner);
    let f64s = |t: Tensor<Autodiff<B>, 4>| t.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    let tracked = run::<Autodiff<B>>(
        case,
        dev,
        DType::F32,
        |q, k, v| blockwise::attention(q, k, v, &ad_plan),
        f64s,
        |t, g| {
            t.grad(g)
                .unwrap()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .unwrap()
        },
    );
    // the same inputs without autodiff
    let (b, h, hkv, hd) = (case.rows.len(), case.heads, case.kv_heads, case.hd);
    let q = heads::<B>(&values(b * h * s * hd, 1), [b, h, s, hd], dev, DType::F32);
    let k = heads::<B>(
        &values(b * hkv * l * hd, 2),
        [b, hkv, l, hd],
        dev,
        DType::F32,
    );
    let v = heads::<B>(
        &values(b * hkv * l * hd, 3),
        [b, hkv, l, hd],
        dev,
        DType::F32,
    );
    let out = blockwise::attention(q, repeat_kv(k, h / hkv), repeat_kv(v, h / hkv), &plan(dev));
    (
        tracked,
        out.into_data().convert::<f64>().to_vec::<f64>().unwrap(),
    )
}

/// Largest difference relative to the larger of 1 and the reference's largest magnitude.
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    // inputs are of order 1: errors are measured against at least that scale
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn check_backend<B: Backend>(name: &str, dev: &B::Device) {
    // f32 sums of at most a few dozen terms of magnitude ~10: a few ulps relative
    let tolerance = 1e-5;
    for (label, case) in cases() {
        let want = reference(&case);
        let (got, untracked) = blockwise_on::<B>(&case, dev);
        for (what, (g, w)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let err = relative_error(g, w);
            assert!(
                err < tolerance,
                "{name}, {label}: {what} off by {err:e} (relative)"
            );
        }
        let err = relative_error(&untracked, &want[0]);
        assert!(
            err < tolerance,
            "{name}, {label}: untracked output off by {err:e}"
        );
    }
}

#[test]
fn blockwise_matches_f64_reference_on_flex() {
    check_backend::<Flex>("flex", &Default::default());
}

#[test]
fn blockwise_matches_f64_reference_on_ndarray() {
    check_backend::<NdArray>("ndarray", &Default::default());
}

#[test]
fn blockwise_matches_f64_reference_on_wgpu() {
    if crate::backends::wgpu_adapter().is_none() {
        return;
    }
    check_backend::<Wgpu>("wgpu", &Default::default());
}

/// Every key a query may see lies in its block's key range, and the block's mask is the
/// reference mask there.
#[test]
fn block_ranges_hold_every_visible_key() {
    let dev = Default::default();
    for (label, case) in cases() {
        let l = case.rows[0].len();
        let s = case.queries;
        let plan = BlockPlan::<NdArray>::with_rows(
            meta(&case.rows, l - s, &dev),
            meta(&case.rows, 0, &dev),
            case.block_rows,
        );
        let covered: usize = plan.blocks.iter().map(|b| b.rows.len()).sum();
        assert_eq!(covered, s, "{label}: blocks cover the queries");
        for (r, row) in case.rows.iter().enumerate() {
            let span: Vec<i64> = row.iter().map(|p| p.1).collect();
            let doc: Vec<i64> = row.iter().map(|p| p.2).collect();
            let allowed = allowed_reference(&span, &doc);
            for block in plan.blocks.iter() {
                let masked = plan.masked(block).into_data().to_vec::<bool>().unwrap();
                let m = block.keys.len();
                let n = block.rows.len();
                for (qi, i) in block.rows.clone().enumerate() {
                    for j in 0..l {
                        let visible = allowed[l - s + i][j];
                        if !block.keys.contains(&j) {
                            assert!(!visible, "{label}: row {r} query {i} sees key {j} outside");
                            continue;
                        }
                        let at = r * n * m + qi * m + (j - block.keys.start);
                        assert_eq!(!masked[at], visible, "{label}: row {r} query {i} key {j}");
                    }
                }
            }
        }
    }
}

/// Causal rows skip the keys after each block: the plan's ranges are not all keys.
#[test]
fn causal_blocks_read_only_the_keys_before_them() {
    let dev = Default::default();
    let rows = vec![row(&[(64, 0, 0)], 64)];
    let plan = BlockPlan::<NdArray>::with_rows(meta(&rows, 0, &dev), meta(&rows, 0, &dev), 16);
    let ranges: Vec<_> = plan.blocks.iter().map(|b| b.keys.clone()).collect();
    assert_eq!(ranges, vec![0..16, 0..32, 0..48, 0..64]);
}

/// Every weight's gradient, flattened, in visiting order (`None`: no gradient).
struct AllGradients<'a, B: burn::tensor::backend::AutodiffBackend> {
    grads: &'a B::Gradients,
    out: Vec<Option<Vec<f32>>>,
}

impl<B: burn::tensor::backend::AutodiffBackend> burn::module::ModuleVisitor<B>
    for AllGradients<'_, B>
{
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        let g = param.val().grad(self.grads);
        self.out
            .push(g.map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap()));
    }
}

/// The loss and every weight's gradient of one training step taking the blockwise
/// attention from `keys` keys on.
fn model_step<B: burn::tensor::backend::AutodiffBackend>(
    model: &transfusion_model::Transfusion<B>,
    batch: transfusion_model::TransfusionBatch<B>,
    keys: usize,
) -> (f32, Vec<Option<Vec<f32>>>) {
    use burn::module::Module;
    let model = model.clone().with_blockwise_from(keys);
    let loss = model.forward_loss(batch).total;
    let value = loss.clone().into_scalar().elem::<f32>();
    let grads = loss.backward();
    let mut all = AllGradients::<B> {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut all);
    (value, all.out)
}

/// The whole model's training step through the blockwise attention equals the one
/// through the dense attention: the same loss and weight gradients.
fn whole_model_matches_dense<B: burn::tensor::backend::AutodiffBackend>(name: &str) {
    use crate::common::{mixed_batch, test_config, tweak};
    let dev = Default::default();
    let untied =
        tweak(|c| c.modality_weights = Some(transfusion_model::config::ModalityWeights::Untied));
    let cases: Vec<(&str, _, fn(&_, &B::Device) -> _, usize)> = vec![
        (
            "packed mixed batch, every pass blockwise",
            test_config(),
            mixed_batch::<B>,
            1,
        ),
        ("untied modality weights", untied, mixed_batch::<B>, 1),
        (
            "1100 positions, default threshold",
            test_config(),
            crate::common::long_batch::<B>,
            blockwise::MIN_KEYS,
        ),
    ];
    for (label, cfg, batch, keys) in cases {
        // one set of weights for both (the backend's random stream is shared by parallel
        // tests, so two seeded initialisations may differ)
        let model = cfg.init::<B>(&dev);
        transfusion_model::params::materialize(&model);
        let (loss, dense) = model_step::<B>(&model, batch(&cfg, &dev), usize::MAX);
        let (loss_b, blocks) = model_step::<B>(&model, batch(&cfg, &dev), keys);
        assert!(
            (loss - loss_b).abs() <= 1e-5 * loss.abs(),
            "{name}, {label}: loss {loss} vs {loss_b}"
        );
        let mut compared = 0;
        for (i, (a, b)) in dense.iter().zip(&blocks).enumerate() {
            let (Some(a), Some(b)) = (a, b) else {
                assert_eq!(a.is_some(), b.is_some(), "{name}, {label}: weight {i}");
                continue;
            };
            let scale = a.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
            let diff = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            // f32 sums in another order over up to 1100 positions and keys: about
            // 1100 x 2^-24 = 7e-5 of the largest term, which can be ten times the largest
            // gradient element after cancellation
            assert!(
                diff <= 1e-3 * scale,
                "{name}, {label}: weight {i} gradient off by {diff:e} (scale {scale:e})"
            );
            compared += 1;
        }
        assert!(compared > 10, "{name}, {label}: only {compared} gradients");
    }
}

#[test]
fn whole_model_step_matches_dense_on_flex() {
    whole_model_matches_dense::<Autodiff<Flex>>("flex");
}

#[test]
fn whole_model_step_matches_dense_on_ndarray() {
    whole_model_matches_dense::<Autodiff<NdArray>>("ndarray");
}

/// In bf16 the blockwise attention returns bf16 and keeps its softmax statistics in f32:
/// outputs and gradients stay within bf16's rounding of the f64 reference.
#[test]
fn blockwise_in_bf16_stays_within_bf16_rounding() {
    let dev = Default::default();
    let (_, case) = cases().remove(0);
    let want = reference(&case);
    let (b, l, s) = (case.rows.len(), case.rows[0].len(), case.queries);
    let (h, hd) = (case.heads, case.hd);
    type AF = Autodiff<Flex>;
    let plan = BlockPlan::<Flex>::with_rows(
        meta(&case.rows, 0, &dev),
        meta(&case.rows, 0, &dev),
        case.block_rows,
    )
    .map_backend::<AF>(Tensor::from_inner);
    let input = |seed, shape| heads::<AF>(&values(b * h * l * hd, seed), shape, &dev, DType::BF16);
    let (q, k, v) = (
        input(1, [b, h, s, hd]).require_grad(),
        input(2, [b, h, l, hd]).require_grad(),
        input(3, [b, h, l, hd]).require_grad(),
    );
    let w = heads::<AF>(&values(b * h * s * hd, 4), [b, h, s, hd], &dev, DType::F32);
    let out = blockwise::attention(q.clone(), k.clone(), v.clone(), &plan);
    assert_eq!(out.dtype(), DType::BF16);
    let grads = (out.clone().cast(DType::F32) * w).sum().backward();
    let f64s = |t: Tensor<Flex, 4>| t.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    let got = [
        f64s(out.inner()),
        f64s(q.grad(&grads).unwrap()),
        f64s(k.grad(&grads).unwrap()),
        f64s(v.grad(&grads).unwrap()),
    ];
    // bf16 keeps 8 significant bits (relative rounding 2^-9 per value); a gradient sums up
    // to 23 products whose factors were each rounded (dS after the difference
    // dP - rowsum(dO O), which cancels): at most 23 x 2^-9 = 0.045 of the largest term
    for (what, (g, w)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        let err = relative_error(g, w);
        assert!(err < 0.045, "bf16 {what} off by {err:e}");
    }
}
