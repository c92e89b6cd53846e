//! The network on CPU: parameter counts, training signal, gradients, and the KV cache.

use crate::common::{max_abs_diff, mixed_batch, test_config, tweak};
use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use transfusion_model::config::ConfigError;
use transfusion_model::kv_cache::CacheMode;
use transfusion_model::mask::SpanMeta;
use transfusion_model::{ImageIoConfig, KvCache, TransfusionBatch, TransfusionConfig, UNetConfig};

type B = NdArray;
type AB = Autodiff<NdArray>;

fn unet_config() -> TransfusionConfig {
    tweak(|c| {
        c.image_io = ImageIoConfig::Unet(UNetConfig {
            channels: vec![8, 16],
            blocks_per_level: 1,
            norm_groups: 4,
        })
    })
}

#[test]
fn analytic_param_count_matches_the_built_model() {
    let dev = Default::default();
    for cfg in [
        test_config(),
        unet_config(),
        tweak(|c| c.n_kv_heads = 2),
        tweak(|c| c.modality_weights = Some(transfusion_model::ModalityWeights::Untied)),
        TransfusionConfig::tiny(512),
    ] {
        let model = cfg.init::<B>(&dev);
        assert_eq!(cfg.param_count().total(), model.num_params(), "{cfg:?}");
    }
}

#[test]
fn tiny_preset_is_between_one_and_five_million_parameters() {
    let n = TransfusionConfig::tiny(512).param_count().total();
    assert!(
        (1_000_000..=5_000_000).contains(&n),
        "tiny has {n} parameters"
    );
}

#[test]
fn paper_presets_land_within_ten_percent_of_their_nominal_size() {
    // Counted with input embedding and (untied) LM head, 32k vocabulary, no image adapter.
    for (name, nominal) in [
        ("paper_160m", 160e6),
        ("paper_370m", 370e6),
        ("paper_760m", 760e6),
        ("paper_1_4b", 1.4e9),
        ("paper_7b", 7e9),
    ] {
        let cfg = TransfusionConfig::preset(name, 32_000).unwrap();
        cfg.validate().unwrap();
        let n = cfg.param_count().language_model() as f64;
        assert!((n / nominal - 1.0).abs() < 0.10, "{name}: {n} vs {nominal}");
    }
}

/// The error of validating the test config after `change`.
fn rejected(change: impl FnOnce(&mut TransfusionConfig)) -> ConfigError {
    tweak(change).validate().unwrap_err()
}

#[test]
fn invalid_configs_name_the_key() {
    assert_eq!(rejected(|c| c.n_heads = 3).key, "n_heads");
    assert_eq!(rejected(|c| c.patch_size = 3).key, "patch_size");
    assert_eq!(rejected(|c| c.n_kv_heads = 3).key, "n_kv_heads");
    let odd_quarter = rejected(|c| {
        c.d_model = 66;
        c.n_heads = 1;
        c.n_kv_heads = 1;
    });
    assert_eq!(odd_quarter.key, "patch_position_embedding");
    let mut unet = unet_config();
    unet.patch_size = 1;
    assert_eq!(unet.validate().unwrap_err().key, "image_io.channels");
    // Values that would panic (RMSNorm of eps <= 0) or abort on allocation are refused.
    for eps in [0.0, -1e-5, f64::NAN] {
        assert_eq!(rejected(|c| c.norm_eps = eps).key, "norm_eps");
    }
    assert_eq!(rejected(|c| c.n_layers = 1_000_000).key, "n_layers");
    // Within every per-key bound, but 4096 layers of width 16384 is 12T parameters.
    let e = rejected(|c| {
        c.n_layers = 4096;
        c.d_model = 16384;
        c.n_heads = 128;
        c.n_kv_heads = 128;
        c.d_hidden = 65536;
    });
    assert_eq!(e.key, "n_layers");
    assert!(e.message.contains("GiB"), "{}", e.message);
}

fn overfit(cfg: TransfusionConfig, steps: usize) -> ((f32, f32), (f32, f32)) {
    let dev = Default::default();
    let mut model = cfg.init::<AB>(&dev);
    let batch = mixed_batch::<AB>(&cfg, &dev);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut first = None;
    let mut last = (0.0, 0.0);
    for _ in 0..steps {
        let loss = model.forward_loss(batch.clone());
        let parts = (
            loss.lm.clone().into_scalar().elem::<f32>(),
            loss.diffusion.clone().into_scalar().elem::<f32>(),
        );
        first.get_or_insert(parts);
        last = parts;
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    (first.unwrap(), last)
}

#[test]
fn tiny_model_overfits_a_mixed_batch_both_losses_fall_tenfold() {
    let ((lm0, df0), (lm1, df1)) = overfit(test_config(), 300);
    assert!(lm1 * 10.0 < lm0, "LM loss {lm0} -> {lm1}");
    assert!(df1 * 10.0 < df0, "diffusion loss {df0} -> {df1}");
}

#[test]
fn v_prediction_model_overfits_a_mixed_batch() {
    let cfg = tweak(|c| c.prediction = Some(transfusion_model::Prediction::V));
    let ((lm0, df0), (lm1, df1)) = overfit(cfg, 300);
    assert!(lm1 * 10.0 < lm0, "LM loss {lm0} -> {lm1}");
    assert!(df1 * 10.0 < df0, "diffusion loss {df0} -> {df1}");
}

#[test]
fn unet_model_overfits_a_mixed_batch() {
    let ((lm0, df0), (lm1, df1)) = overfit(unet_config(), 200);
    assert!(lm1 * 10.0 < lm0, "LM loss {lm0} -> {lm1}");
    assert!(df1 * 5.0 < df0, "diffusion loss {df0} -> {df1}");
}

fn grad_norm(g: Option<Tensor<B, 2>>) -> f32 {
    g.expect("parameter should have a gradient")
        .abs()
        .sum()
        .into_scalar()
}

#[test]
fn gradients_reach_embedding_head_and_both_image_layers() {
    let dev = Default::default();
    let cfg = test_config();
    let model = cfg.init::<AB>(&dev);
    let loss = model.forward_loss(mixed_batch::<AB>(&cfg, &dev));
    let grads = loss.total.backward();
    let lin = model.image.linear.as_ref().unwrap();
    for (weight, name) in [
        (&model.tok_emb.weight, "embedding"),
        (&model.lm_head.weight, "LM head"),
        (&lin.proj_in.weight, "patch encoder"),
        (&lin.proj_out.weight, "patch decoder"),
        (&model.image.timestep.fc1.weight, "timestep MLP"),
    ] {
        assert!(grad_norm(weight.grad(&grads)) > 0.0, "{name}");
    }
}

#[test]
fn loss_parts_follow_their_definitions() {
    let dev = Default::default();
    let cfg = test_config().with_diffusion_loss_weight(5.0);
    let model = cfg.init::<B>(&dev);
    let loss = model.forward_loss(mixed_batch::<B>(&cfg, &dev));
    let lm: f32 = loss.lm.into_scalar();
    let df: f32 = loss.diffusion.into_scalar();
    let total: f32 = loss.total.into_scalar();
    assert!((total - (lm + 5.0 * df)).abs() < 1e-4);
    // An untrained model is near uniform over the vocabulary.
    assert!((lm - (32f32).ln()).abs() < 1.0, "lm {lm}");
    // Mean of the per-image losses; two images in the batch.
    let per: Vec<f32> = loss.diffusion_per_image.into_data().to_vec().unwrap();
    assert_eq!(per.len(), 2);
    assert!((df - (per[0] + per[1]) / 2.0).abs() < 1e-5);
    // Text targets: row 0 has 4 + 1, row 1 has 5 + 1 + 3 (see common::mixed_batch).
    assert_eq!(loss.lm_targets.into_scalar(), 14.0);
}

/// `[len]`: 1.0 at the batch's text-target positions, 0.0 elsewhere.
fn text_target_mask(batch: &TransfusionBatch<B>, len: usize) -> Tensor<B, 1> {
    let rows: Vec<i64> = batch.text_targets.to_data().to_vec().unwrap();
    let mut mask = vec![0f32; len];
    for r in rows {
        mask[r as usize] = 1.0;
    }
    Tensor::from_floats(mask.as_slice(), &Default::default())
}

/// The LM loss runs the head on the text-target rows only: the same mean as the masked
/// cross-entropy over every position; with no text target it is 0 over 0 targets.
#[test]
fn lm_loss_over_text_rows_equals_the_masked_loss_over_all_rows() {
    use transfusion_model::loss::masked_cross_entropy;
    let dev = Default::default();
    let cfg = test_config();
    let model = cfg.init::<B>(&dev);
    let batch = mixed_batch::<B>(&cfg, &dev);
    let [b, s] = batch.tokens.dims();
    let (hidden, _) = model.forward_packed(&batch, None);
    let (lm, count) = model.lm_loss(hidden.clone(), &batch);
    let (want, want_count) = masked_cross_entropy(
        model.lm_logits(hidden.clone()),
        batch.targets.clone().reshape([b * s]),
        text_target_mask(&batch, b * s),
    );
    let (lm, want): (f32, f32) = (lm.into_scalar(), want.into_scalar());
    assert!((lm - want).abs() <= 1e-6 * want.abs(), "{lm} vs {want}");
    assert_eq!(count.into_scalar(), want_count.into_scalar());
    let mut none = batch.clone();
    none.text_targets = Tensor::zeros([0], &dev);
    let (lm, count) = model.lm_loss(hidden, &none);
    assert_eq!((lm.into_scalar(), count.into_scalar()), (0.0, 0.0));
}

/// Full forward of a single text+image row versus: prefix appended to the cache, the image
/// run read-only (twice, the cache must not grow), then appended, then the rest token by
/// token.
fn cache_matches_full_forward(cfg: TransfusionConfig) {
    let dev = Default::default();
    let model = cfg.init::<B>(&dev);
    let n = cfg.patches_per_image();
    let (c, h) = (cfg.latent_channels, cfg.latent_size);
    let prefix = [1i64, 5, 6, 3];
    let suffix = [4i64, 7, 8];
    let s = prefix.len() + n + suffix.len();
    let x_t = Tensor::<B, 4>::random(
        [1, c, h, h],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let t = Tensor::<B, 1>::from_floats([321.0], &dev);
    let (patches, ctx) = model.embed_image(x_t, t);

    // Full forward.
    let mut tokens = prefix.to_vec();
    tokens.extend(std::iter::repeat_n(0, n));
    tokens.extend(suffix);
    let mut source: Vec<i64> = (0..s as i64).collect();
    for p in 0..n {
        source[prefix.len() + p] = (s + p) as i64;
    }
    let span: Vec<i64> = (0..s)
        .map(|i| (i >= prefix.len() && i < prefix.len() + n) as i64)
        .collect();
    let ids = |v: &[i64]| Tensor::<B, 1, Int>::from_ints(v, &dev).reshape([1, v.len()]);
    let x = model.embed_sequence(
        ids(&tokens),
        Some(patches.clone()),
        Tensor::from_ints(source.as_slice(), &dev),
    );
    let positions: Vec<i64> = (0..s as i64).collect();
    let meta = SpanMeta::full_rows(ids(&span), ids(&vec![1; s]));
    let full = model.forward_embeddings(x, ids(&positions), meta, None, CacheMode::ReadOnly);

    // Cached.
    let mut cache = KvCache::new(cfg.n_layers);
    let run = |cache: &mut KvCache<B>, x: Tensor<B, 3>, start: usize, span_id: i64, mode| {
        let len = x.dims()[1];
        let idx: Vec<i64> = (start as i64..(start + len) as i64).collect();
        let meta = SpanMeta {
            index: ids(&idx),
            span: ids(&vec![span_id; len]),
            doc: ids(&vec![1; len]),
        };
        model.forward_embeddings(x, ids(&idx), meta, Some(cache), mode)
    };
    let h_prefix = run(
        &mut cache,
        model.embed_tokens(ids(&prefix)),
        0,
        0,
        CacheMode::Append,
    );
    assert_eq!(cache.len(), prefix.len());
    let h_img = run(
        &mut cache,
        patches.clone(),
        prefix.len(),
        1,
        CacheMode::ReadOnly,
    );
    let h_img2 = run(
        &mut cache,
        patches.clone(),
        prefix.len(),
        1,
        CacheMode::ReadOnly,
    );
    assert_eq!(
        cache.len(),
        prefix.len(),
        "read-only steps must not grow the cache"
    );
    assert_eq!(max_abs_diff(h_img.clone(), h_img2), 0.0);
    run(&mut cache, patches, prefix.len(), 1, CacheMode::Append);
    let mut pieces = vec![h_prefix, h_img];
    for (j, &tok) in suffix.iter().enumerate() {
        let start = prefix.len() + n + j;
        pieces.push(run(
            &mut cache,
            model.embed_tokens(ids(&[tok])),
            start,
            0,
            CacheMode::Append,
        ));
    }
    assert_eq!(cache.len(), s);
    let cached = Tensor::cat(pieces, 1);
    let diff = max_abs_diff(full.clone(), cached.clone());
    assert!(diff < 1e-4, "cached vs full: {diff}");
    // The image-conditioned noise prediction is the same either way.
    let eps_full = model.image_head(full.narrow(1, prefix.len(), n), &ctx);
    let eps_cached = model.image_head(cached.narrow(1, prefix.len(), n), &ctx);
    assert_eq!(eps_full.dims(), [1, c, h, h]);
    let eps_diff = max_abs_diff(eps_full, eps_cached);
    assert!(
        eps_diff < 1e-4,
        "noise prediction cached vs full: {eps_diff}"
    );

    // Truncating the cache rolls back exactly.
    cache.truncate(prefix.len());
    assert_eq!(cache.len(), prefix.len());
    assert_eq!(
        cache.layers[0].as_ref().unwrap().key.dims()[2],
        prefix.len()
    );
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    cache_matches_full_forward(test_config());
}

#[test]
fn kv_cache_decoding_equals_full_forward_with_grouped_query_attention() {
    cache_matches_full_forward(tweak(|c| c.n_kv_heads = 2));
}

#[test]
fn rope_scores_depend_only_on_relative_position() {
    use transfusion_model::rope::{apply_rope, rope_tables};
    let dev = Default::default();
    let q = Tensor::<B, 4>::random(
        [1, 1, 1, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let k = Tensor::<B, 4>::random(
        [1, 1, 1, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let score = |m: i64, n: i64| -> f32 {
        let tq = rope_tables::<B>(Tensor::from_ints([[m]], &dev), 8, 10000.0, 1);
        let tk = rope_tables::<B>(Tensor::from_ints([[n]], &dev), 8, 10000.0, 1);
        (apply_rope(q.clone(), &tq) * apply_rope(k.clone(), &tk))
            .sum()
            .into_scalar()
    };
    assert!((score(3, 1) - score(10, 8)).abs() < 1e-4);
    assert!((score(0, 0) - score(7, 7)).abs() < 1e-4);
    assert!(
        (score(5, 0) - score(0, 0)).abs() > 1e-3,
        "rotation should change the score"
    );
    // Norm preserved.
    let t = rope_tables::<B>(Tensor::from_ints([[17]], &dev), 8, 10000.0, 1);
    let n0: f32 = q.clone().powi_scalar(2).sum().into_scalar();
    let n1: f32 = apply_rope(q, &t).powi_scalar(2).sum().into_scalar();
    assert!((n0 - n1).abs() < 1e-4);
}

/// RoPE against HuggingFace transformers' Llama rotary embedding
/// (scripts/rope_reference.py -> tests/fixtures/rope.json): same half-split layout, so the
/// rotated q and k must agree element by element, with no permutation.
///
/// Tolerance: HF, like us, computes the inverse frequencies and angles in f32, and its
/// `theta^(-2i/hd)` may round 1 ulp away from ours (checked below; it does for hd 16,
/// theta 5e5). For `i >= 1` the frequency is `<= theta^(-2/hd) < 0.25`, whose ulp is
/// `<= 2^-26 = 1.5e-8`, so an angle differs by `<= 1.5e-8 pos`, and a rotated pair of norm
/// `<= 1.9` by `<= 2.8e-8 pos`; the f32 cos/sin and rotation add a few ulps of the O(1)
/// inputs. Hence `|ours - hf| <= 1e-6 + 4e-8 pos` (measured: 1.2e-7 for hd 8, where the
/// frequencies agree to the bit; 2.3e-5 at position 1000 for hd 16, bound 4.1e-5).
#[test]
fn rope_matches_huggingface_llama() {
    use burn::tensor::TensorData;
    use transfusion_model::rope::{apply_rope, inverse_frequencies, rope_tables};
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/rope.json")).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        let v = v.as_array().unwrap();
        v.iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let dev = Default::default();
    for case in fixture["cases"].as_array().unwrap() {
        let hd = case["head_dim"].as_u64().unwrap() as usize;
        let theta = case["theta"].as_f64().unwrap();
        let (h, h_kv) = (
            case["heads"].as_u64().unwrap() as usize,
            case["kv_heads"].as_u64().unwrap() as usize,
        );
        let positions: Vec<Vec<i64>> = serde_json::from_value(case["positions"].clone()).unwrap();
        let (b, s) = (positions.len(), positions[0].len());

        // Inverse frequencies: within 1 ulp of HF's f32 `1 / theta^(2i/hd)`.
        for (i, (ours, hf)) in inverse_frequencies(hd, theta)
            .iter()
            .zip(floats(&case["inv_freq"]))
            .enumerate()
        {
            let ulps = (ours.to_bits() as i64 - hf.to_bits() as i64).abs();
            assert!(ulps <= 1, "hd {hd} inv_freq[{i}]: {ours} vs {hf}");
        }

        let pos_flat: Vec<i64> = positions.concat();
        let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(pos_flat, [b, s]), &dev);
        let mut worst = 0.0f32;
        for (name, heads) in [("q", h), ("k", h_kv)] {
            let tables = rope_tables::<B>(pos.clone(), hd, theta, heads);
            let shape = [b, heads, s, hd];
            let x = Tensor::<B, 4>::from_data(TensorData::new(floats(&case[name]), shape), &dev);
            // [b, heads, s, hd] -> [b, s, heads, hd] (the rotation's layout) -> back
            let ours = apply_rope(x.swap_dims(1, 2), &tables).swap_dims(1, 2);
            let ours = ours.into_data().to_vec::<f32>().unwrap();
            let want = floats(&case[format!("{name}_rot")]);
            for (j, (o, w)) in ours.iter().zip(&want).enumerate() {
                // [b, heads, s, hd] row-major: position of element j.
                let p = positions[j / (heads * s * hd)][(j / hd) % s];
                let tol = 1e-6 + 4e-8 * p as f32;
                assert!(
                    (o - w).abs() <= tol,
                    "hd {hd} {name}_rot[{j}] (pos {p}): ours {o}, hf {w}, tol {tol}"
                );
                worst = worst.max((o - w).abs());
            }
        }
        eprintln!("rope hd {hd}: largest |ours - hf| {worst:.2e}");
    }
}

#[test]
fn valid_model_is_an_autodiff_module() {
    // The inner (non-autodiff) model gives the same loss as the autodiff one.
    let dev = Default::default();
    let cfg = test_config();
    let model = cfg.init::<AB>(&dev);
    let a: f32 = model
        .forward_loss(mixed_batch::<AB>(&cfg, &dev))
        .total
        .into_scalar();
    let b: f32 = model
        .valid()
        .forward_loss(mixed_batch::<B>(&cfg, &dev))
        .total
        .into_scalar();
    assert!((a - b).abs() < 1e-5);
}

/// Building an untied layer draws its copies' values from the backend's global RNG; it
/// must wait while a seeded initialisation holds that RNG, or the seeded weights change.
#[test]
fn untied_copies_do_not_draw_from_a_seeded_initialisation_in_progress() {
    use std::sync::mpsc;
    use transfusion_model::block::DecoderBlockConfig;
    use transfusion_model::params::with_backend_rng;

    let dev = Default::default();
    let draw = |dev: &burn::tensor::Device<B>| {
        Tensor::<B, 1>::random([64], burn::tensor::Distribution::Default, dev).into_data()
    };
    let alone = with_backend_rng(|| {
        B::seed(&dev, 11);
        draw(&dev)
    });
    let (started, wait_start) = mpsc::channel();
    let builder = std::thread::spawn(move || {
        wait_start.recv().unwrap();
        let cfg = DecoderBlockConfig::new(16, 2, 2, 32).with_untied(true);
        let _ = cfg.init::<B>(&Default::default());
    });
    let beside = with_backend_rng(|| {
        B::seed(&dev, 11);
        started.send(()).unwrap();
        // The other thread builds its untied layer now; without the lock its draws
        // would come from this seeded sequence before the draw below.
        std::thread::sleep(std::time::Duration::from_millis(300));
        draw(&dev)
    });
    builder.join().unwrap();
    assert_eq!(alone, beside);
}

/// Parameters of `model` whose values have been drawn (Burn draws lazily, at first use).
fn drawn_params(model: &transfusion_model::Transfusion<B>) -> usize {
    struct Count(usize);
    impl burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0 += usize::from(param.is_initialized());
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// A skeleton to load weights into draws no parameter, untied image weights included
/// (a full initialisation draws the text weights of every layer to copy them).
#[test]
fn an_unloaded_untied_model_draws_no_parameter() {
    let dev = Default::default();
    let cfg = tweak(|c| c.modality_weights = Some(transfusion_model::ModalityWeights::Untied));
    let layers = cfg.n_layers;
    let skeleton = cfg.init_unloaded::<B>(&dev);
    assert_eq!(
        skeleton.modality_weights(),
        transfusion_model::ModalityWeights::Untied
    );
    assert_eq!(drawn_params(&skeleton), 0);
    // Each layer's text weights (two norms, four projections, three MLP matrices) and
    // their copies: drawn to copy them.
    assert_eq!(drawn_params(&cfg.init::<B>(&dev)), layers * 2 * 9);
    // Shared weights: nothing is drawn either way.
    assert_eq!(drawn_params(&test_config().init_unloaded::<B>(&dev)), 0);
}
