//! The generation API on a tiny random checkpoint: KV cache vs recomputation, step shapes,
//! guidance, seeds, batching, bad checkpoints.

mod common;

use burn::prelude::*;
use common::{checkpoint, max_diff, pipeline, to_vec, B};
use transfusion_infer::context::Rows;
use transfusion_infer::guidance::Guidance;
use transfusion_infer::{
    CachePolicy, ForwardKind, GenerateOptions, ImageOptions, Pipeline, SamplerKind, Segment,
    TextOptions,
};

fn img_opts(num: usize, steps: usize, sampler: SamplerKind, cfg: f64, seed: u64) -> ImageOptions {
    ImageOptions {
        num,
        steps,
        sampler,
        cfg,
        seed,
    }
}

const TOL: f32 = 1e-4;

#[test]
fn text_cached_equals_recomputed() {
    let dir = checkpoint();
    let cached = pipeline(dir.path());
    let full = pipeline(dir.path()).with_cache_policy(CachePolicy::Recompute);
    for opts in [
        TextOptions::greedy(24),
        TextOptions {
            max_tokens: 24,
            temperature: 1.0,
            top_p: 1.0,
            seed: 5,
            ..TextOptions::default()
        },
    ] {
        let a = cached.text_tokens("a red circle", &opts).unwrap();
        let b = full.text_tokens("a red circle", &opts).unwrap();
        assert!(!a.is_empty());
        assert_eq!(a, b, "{opts:?}");
    }
}

#[test]
fn text_stream_pieces_add_up_and_seeds_reproduce() {
    let dir = checkpoint();
    let pipe = pipeline(dir.path());
    let opts = TextOptions {
        max_tokens: 16,
        seed: 3,
        ..TextOptions::default()
    };
    let mut streamed = String::new();
    let text = pipe
        .text_stream("a blue square", &opts, |p| streamed.push_str(p))
        .unwrap();
    assert_eq!(streamed, text);
    assert_eq!(pipe.text("a blue square", &opts).unwrap(), text);
    let other = TextOptions { seed: 4, ..opts };
    assert_ne!(
        pipe.text_tokens("a blue square", &other).unwrap(),
        pipe.text_tokens(
            "a blue square",
            &TextOptions {
                seed: 3,
                ..other.clone()
            }
        )
        .unwrap()
    );
}

#[test]
fn image_cached_equals_recomputed_with_and_without_cfg() {
    let dir = checkpoint();
    let cached = pipeline(dir.path());
    let full = pipeline(dir.path()).with_cache_policy(CachePolicy::Recompute);
    for (sampler, cfg) in [(SamplerKind::Ddpm, 3.0), (SamplerKind::Ddim, 0.0)] {
        let o = img_opts(2, 8, sampler, cfg, 11);
        let a = to_vec(cached.image_tensor("a red circle", &o, |_, _| {}).unwrap());
        let b = to_vec(full.image_tensor("a red circle", &o, |_, _| {}).unwrap());
        assert!(
            max_diff(&a, &b) < TOL,
            "{sampler} cfg {cfg}: {}",
            max_diff(&a, &b)
        );
    }
}

#[test]
fn diffusion_step_shapes_do_not_depend_on_prefix_length_and_the_cache_does_not_grow() {
    let dir = checkpoint();
    let pipe = pipeline(dir.path()).with_trace();
    let n = pipe.patches_per_image();
    let mut seen = vec![];
    for prompt in [
        "a",
        "a red circle on a blue square next to a green triangle and more",
    ] {
        pipe.image_tensor(
            prompt,
            &img_opts(2, 5, SamplerKind::Ddim, 3.0, 0),
            |_, _| {},
        )
        .unwrap();
        let trace = pipe.take_trace();
        let prefix: Vec<_> = trace
            .iter()
            .filter(|r| r.kind == ForwardKind::Prefix)
            .collect();
        assert_eq!(
            prefix.len(),
            1,
            "the prefix is encoded once (both branches together)"
        );
        assert_eq!(
            prefix[0].input[0], 2,
            "conditional and unconditional in one batch"
        );
        let steps: Vec<_> = trace
            .iter()
            .filter(|r| r.kind == ForwardKind::DiffusionStep)
            .collect();
        assert_eq!(steps.len(), 5);
        for s in &steps {
            // 2 images x 2 branches, only the n image tokens.
            assert_eq!(s.input, [4, n, 64]);
            assert_eq!(s.cached_before, s.cached_after, "read-only steps");
            assert_eq!(s.cached_before, prefix[0].cached_after);
        }
        seen.push(steps[0].input);
    }
    assert_eq!(seen[0], seen[1]);
    // The recompute reference does run the whole sequence.
    let full = pipeline(dir.path())
        .with_cache_policy(CachePolicy::Recompute)
        .with_trace();
    full.image_tensor(
        "a red circle",
        &img_opts(1, 2, SamplerKind::Ddim, 0.0, 0),
        |_, _| {},
    )
    .unwrap();
    let t = full.take_trace();
    let step = t
        .iter()
        .find(|r| r.kind == ForwardKind::DiffusionStep)
        .unwrap();
    assert!(step.input[1] > n);
}

#[test]
fn cfg_scale_one_equals_no_cfg_and_guided_rows_match_rows_run_alone() {
    let dir = checkpoint();
    let pipe = pipeline(dir.path());
    let o = |cfg| img_opts(1, 6, SamplerKind::Ddpm, cfg, 9);
    let one = to_vec(
        pipe.image_tensor("a red circle", &o(1.0), |_, _| {})
            .unwrap(),
    );
    let off = to_vec(
        pipe.image_tensor("a red circle", &o(0.0), |_, _| {})
            .unwrap(),
    );
    assert_eq!(one, off);
    let guided = to_vec(
        pipe.image_tensor("a red circle", &o(3.0), |_, _| {})
            .unwrap(),
    );
    assert!(
        max_diff(&guided, &off) > 1e-3,
        "guidance should change the image"
    );

    // The batch of 2 (left-padded unconditional prefix) computes what each branch computes
    // alone, so the guided mix at scale 1 is exactly the conditional prediction.
    let s = pipe.meta.special_tokens;
    let model = &pipe.model;
    let mut cond = vec![s.bos];
    cond.extend(pipe.tokenizer.encode("a red circle on a square"));
    cond.push(s.boi);
    let uncond = vec![s.bos, s.boi];
    let dev = Default::default();
    let x = Tensor::<B, 4>::random(
        [1, 3, 8, 8],
        burn::tensor::Distribution::Normal(0., 1.),
        &dev,
    );
    for policy in [CachePolicy::Cached, CachePolicy::Recompute] {
        let (both, _) = Rows::start(model, &[cond.clone(), uncond.clone()], policy, s.pad, None);
        let eps2 = both.image_eps(model, Tensor::cat(vec![x.clone(), x.clone()], 0), 500, None);
        let (c, _) = Rows::start(model, &[cond.clone()], policy, s.pad, None);
        let (u, _) = Rows::start(model, &[uncond.clone()], policy, s.pad, None);
        let eps_c = to_vec(c.image_eps(model, x.clone(), 500, None));
        let eps_u = to_vec(u.image_eps(model, x.clone(), 500, None));
        let pair = to_vec(eps2.clone());
        let half = pair.len() / 2;
        assert!(max_diff(&pair[..half], &eps_c) < 1e-5, "{policy:?}");
        assert!(max_diff(&pair[half..], &eps_u) < 1e-5, "{policy:?}");
        // eps_u + 1 * (eps_c - eps_u) == eps_c
        let mixed = Guidance { scale: 1.0 + 1e-9 }.combine(eps2);
        assert!(max_diff(&to_vec(mixed), &eps_c) < 1e-5);
    }
}

#[test]
fn seeds_reproduce_ddim_is_deterministic_and_batches_match_single_images() {
    let dir = checkpoint();
    let pipe = pipeline(dir.path());
    for sampler in [SamplerKind::Ddpm, SamplerKind::Ddim] {
        let o = img_opts(3, 6, sampler, 3.0, 21);
        let a = pipe
            .image_tensor("a green triangle", &o, |_, _| {})
            .unwrap();
        assert_eq!(a.dims(), [3, 3, 8, 8]);
        let a = to_vec(a);
        let b = to_vec(
            pipe.image_tensor("a green triangle", &o, |_, _| {})
                .unwrap(),
        );
        assert_eq!(a, b, "{sampler}: same seed, same images");
        let c = to_vec(
            pipe.image_tensor(
                "a green triangle",
                &ImageOptions {
                    seed: 22,
                    ..o.clone()
                },
                |_, _| {},
            )
            .unwrap(),
        );
        assert!(
            max_diff(&a, &c) > 1e-3,
            "{sampler}: another seed, other images"
        );
        // Image 0 of the batch is the image of a batch of one.
        let single = to_vec(
            pipe.image_tensor(
                "a green triangle",
                &ImageOptions {
                    num: 1,
                    ..o.clone()
                },
                |_, _| {},
            )
            .unwrap(),
        );
        assert!(max_diff(&a[..single.len()], &single) < TOL);
        let images = pipe.image("a green triangle", &o).unwrap();
        assert_eq!(images.len(), 3);
        assert_eq!(images[0].dimensions(), (8, 8));
    }
}

#[test]
fn captions_are_batched_and_match_the_recomputed_reference() {
    let dir = checkpoint();
    let cached = pipeline(dir.path());
    let full = pipeline(dir.path()).with_cache_policy(CachePolicy::Recompute);
    let img = |r, g, b| image::RgbImage::from_pixel(16, 12, image::Rgb([r, g, b]));
    let images = vec![img(255, 0, 0), img(0, 0, 255), img(10, 200, 30)];
    let opts = TextOptions::greedy(10);
    let batch = cached.caption_tokens(&images, &opts).unwrap();
    assert_eq!(batch.len(), 3);
    assert_eq!(batch, full.caption_tokens(&images, &opts).unwrap());
    for (k, img) in images.iter().enumerate() {
        let alone = cached
            .caption_tokens(std::slice::from_ref(img), &opts)
            .unwrap();
        assert_eq!(alone[0], batch[k]);
    }
    assert_eq!(cached.caption(&images, &opts).unwrap().len(), 3);
}

fn interleaved_opts(cfg: f64) -> GenerateOptions {
    let pipe_boi = common::tokenizer().special().boi;
    GenerateOptions {
        text: TextOptions {
            max_tokens: 12,
            seed: 2,
            temperature: 1.0,
            top_p: 1.0,
            // Make the random model open images early.
            logit_bias: vec![(pipe_boi, 7.0)],
            ..TextOptions::default()
        },
        image: img_opts(1, 4, SamplerKind::Ddpm, cfg, 5),
        max_images: 2,
    }
}

#[test]
fn interleaved_cached_equals_recomputed_and_the_cache_grows_by_each_image() {
    let dir = checkpoint();
    let cached = pipeline(dir.path()).with_trace();
    let full = pipeline(dir.path()).with_cache_policy(CachePolicy::Recompute);
    let n = cached.patches_per_image();
    for cfg in [3.0, 1.0] {
        let opts = interleaved_opts(cfg);
        let a = cached.generate_document("a story:", &opts).unwrap();
        let b = full.generate_document("a story:", &opts).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.latents.len(), 2, "tokens {:?}", a.tokens);
        for (x, y) in a.latents.iter().zip(&b.latents) {
            let (x, y) = (to_vec(x.clone()), to_vec(y.clone()));
            assert!(max_diff(&x, &y) < TOL, "{}", max_diff(&x, &y));
        }
        let trace = cached.take_trace();
        let images: Vec<_> = trace
            .iter()
            .filter(|r| r.kind == ForwardKind::Image)
            .collect();
        assert_eq!(images.len(), 2);
        for r in images {
            assert_eq!(r.cached_after, r.cached_before + n);
            assert_eq!(r.input, [1, n, 64]);
        }
        for r in trace
            .iter()
            .filter(|r| r.kind == ForwardKind::DiffusionStep)
        {
            assert_eq!(r.input[1], n);
            assert_eq!(r.cached_before, r.cached_after);
        }
    }
    let segments = cached.generate("a story:", &interleaved_opts(3.0)).unwrap();
    assert_eq!(
        segments
            .iter()
            .filter(|s| matches!(s, Segment::Image(_)))
            .count(),
        2
    );
}

#[test]
fn bad_checkpoints_and_sizes_give_clear_errors() {
    let missing = Pipeline::<B>::load("/nonexistent/ckpt".as_ref(), &Default::default());
    let msg = format!("{:#}", missing.err().unwrap());
    assert!(msg.contains("/nonexistent/ckpt"), "{msg}");

    let dir = checkpoint();
    // A tokenizer whose vocabulary size differs from the model's.
    let meta_path = dir.path().join("model.json");
    let text = std::fs::read_to_string(&meta_path).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["special_tokens"]["boi"] = serde_json::json!(7);
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let msg = format!(
        "{:#}",
        Pipeline::<B>::load(dir.path(), &Default::default())
            .err()
            .unwrap()
    );
    assert!(msg.contains("tokenizer does not match"), "{msg}");
    std::fs::write(&meta_path, text).unwrap();

    let pipe = pipeline(dir.path());
    assert!(pipe.check_size(8).is_ok());
    let msg = pipe.check_size(32).unwrap_err().to_string();
    assert!(msg.contains("8x8") && msg.contains("--size 32"), "{msg}");
}
