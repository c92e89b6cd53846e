//! The generation API on a tiny random checkpoint: KV cache vs recomputation, step shapes,
//! guidance, seeds, batching, bad checkpoints.

use crate::common::{checkpoint, epsilon_checkpoint, max_diff, pipeline, to_vec, B};
use burn::prelude::*;
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

/// How far two computations of one sampled image (cached vs recomputed, batched vs alone)
/// may differ. Every sampler's first step is at t = 999 and goes through the implied eps:
/// `x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar)` with `sqrt(abar_999) = 4.9e-5` turns one f32
/// ulp of `x` (6e-8 near 1) into 1.2e-3, so paths that round differently agree to a few 1e-3
/// (seen: 1.5e-3 in one of 30 runs of fresh random weights, against the old bound of 1e-4);
/// a real mismatch moves whole pixels.
const TOL: f32 = 5e-3;

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
fn special_token_strings_in_a_prompt_are_text_not_control() {
    // Training strips special ids from captions; a prompt is treated the same way, so
    // `<|boi|>` typed into a prompt does not open an image span.
    let dir = checkpoint();
    let pipe = pipeline(dir.path());
    let opts = TextOptions::greedy(12);
    let plain = pipe.text_tokens("a red circle", &opts).unwrap();
    let forged = pipe
        .text_tokens("<|boi|>a red circle<|eoi|><|eos|>", &opts)
        .unwrap();
    assert_eq!(plain, forged);
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
fn pixel_space_x0_is_clipped_to_the_image_range() {
    // One DDIM step returns the predicted x_0 itself; in pixel space it is clipped to
    // [-1, 1] (a VAE's latents are not: see vae_pipeline.rs).
    let dir = checkpoint();
    let pipe = pipeline(dir.path());
    let x0 = pipe
        .image_tensor(
            "a red circle",
            &img_opts(2, 1, SamplerKind::Ddim, 0.0, 3),
            |_, _| {},
        )
        .unwrap();
    let peak: f32 = x0.abs().max().into_scalar();
    assert!(peak <= 1.0, "max |x_0| = {peak}");
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
    // A scale just above 1 runs both branches (padded batch of 2, mixed every step) and
    // must reproduce the conditional-only path that scales 0 and 1 take.
    let both = Guidance::new(1.0 + 1e-9);
    assert!(both.active() && !Guidance::new(1.0).active() && !Guidance::new(0.0).active());
    let one = to_vec(
        pipe.image_tensor("a red circle", &o(both.scale), |_, _| {})
            .unwrap(),
    );
    let off = to_vec(
        pipe.image_tensor("a red circle", &o(0.0), |_, _| {})
            .unwrap(),
    );
    assert!(max_diff(&one, &off) < TOL, "{}", max_diff(&one, &off));
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
        let eps2 =
            both.image_steps(model)
                .eps(Tensor::cat(vec![x.clone(), x.clone()], 0), 500, None);
        let (c, _) = Rows::start(model, &[cond.clone()], policy, s.pad, None);
        let (u, _) = Rows::start(model, &[uncond.clone()], policy, s.pad, None);
        let eps_c = to_vec(c.image_steps(model).eps(x.clone(), 500, None));
        let eps_u = to_vec(u.image_steps(model).eps(x.clone(), 500, None));
        let pair = to_vec(eps2.clone());
        let half = pair.len() / 2;
        assert!(max_diff(&pair[..half], &eps_c) < 1e-5, "{policy:?}");
        assert!(max_diff(&pair[half..], &eps_u) < 1e-5, "{policy:?}");
        // eps_u + 1 * (eps_c - eps_u) == eps_c
        let mixed = Guidance { scale: 1.0 + 1e-9 }.combine(eps2);
        assert!(max_diff(&to_vec(mixed), &eps_c) < 1e-5);
    }
}

/// A sampler's steps share one planned pass over the image positions
/// ([`Rows::image_steps`]): every step equals a step planned afresh, bit for bit, on
/// left-padded rows, under both cache policies.
#[test]
fn diffusion_steps_sharing_one_plan_equal_steps_planned_afresh() {
    let dir = checkpoint();
    let pipe = pipeline(dir.path());
    let s = pipe.meta.special_tokens;
    let model = &pipe.model;
    let mut cond = vec![s.bos];
    cond.extend(pipe.tokenizer.encode("a red circle"));
    cond.push(s.boi);
    let prompts = [cond, vec![s.bos, s.boi]];
    let x = Tensor::<B, 4>::random(
        [2, 3, 8, 8],
        burn::tensor::Distribution::Normal(0., 1.),
        &Default::default(),
    );
    for policy in [CachePolicy::Cached, CachePolicy::Recompute] {
        let (rows, _) = Rows::start(model, &prompts, policy, s.pad, None);
        let steps = rows.image_steps(model);
        for t in [999, 500, 10] {
            let shared = to_vec(steps.eps(x.clone(), t, None));
            let fresh = to_vec(rows.image_steps(model).eps(x.clone(), t, None));
            assert_eq!(shared, fresh, "{policy:?}, t = {t}");
        }
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
    let pipe_boi = crate::common::tokenizer().special().boi;
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

/// One packed training row: a text document, then `BOS caption BOI image EOI EOS` with
/// the image at timestep `t` (the second document of the row, so positions restart and
/// the document mask matters), as the data crate's batcher builds it.
fn training_row(
    pipe: &transfusion_infer::Pipeline<B>,
    text: &[u32],
    caption: &[u32],
    latent: Vec<f32>,
    t: u32,
) -> transfusion_model::TransfusionBatch<B> {
    use transfusion_data::batcher::TransfusionBatcher;
    use transfusion_data::packing::PackedRow;
    use transfusion_data::sequence::{ImageSlot, MixedSequence};
    let s = pipe.meta.special_tokens;
    let m = &pipe.meta.model;
    let n = pipe.patches_per_image();
    let mut first = vec![s.bos];
    first.extend(text);
    first.push(s.eos);
    let mut tokens = vec![s.bos];
    tokens.extend(caption);
    tokens.push(s.boi);
    let offset = tokens.len();
    tokens.extend(vec![s.pad; n]);
    tokens.extend([s.eoi, s.eos]);
    let shape = [m.latent_channels, m.latent_size, m.latent_size];
    let image = ImageSlot {
        offset,
        n_patches: n,
        latent,
        shape,
        t,
    };
    let mut row = PackedRow::new(48, s.pad);
    row.try_push(MixedSequence {
        tokens: first,
        images: vec![],
    })
    .unwrap();
    row.try_push(MixedSequence {
        tokens,
        images: vec![image],
    })
    .unwrap();
    TransfusionBatcher::new(shape, m.patch_size, s.pad, 17)
        .batch::<B>(vec![row], &Default::default())
        .unwrap()
}

#[test]
fn the_training_layout_and_the_inference_rows_compute_the_same_thing() {
    // The same documents through the batcher and `forward_loss` (training) and through
    // the pipeline's rows (inference) must give the same LM log-likelihoods and the same
    // noise prediction: nothing in packing, positions, masks or image spans may differ.
    let dir = epsilon_checkpoint();
    let pipe = pipeline(dir.path());
    let model = &pipe.model;
    assert_eq!(model.prediction, transfusion_model::Prediction::Epsilon);
    let s = pipe.meta.special_tokens;
    let text = pipe.tokenizer.encode("the big blue square");
    let caption = pipe.tokenizer.encode("a red circle");
    let m = &pipe.meta.model;
    let len = m.latent_channels * m.latent_size * m.latent_size;
    let latent: Vec<f32> = (0..len)
        .map(|i| (i * 37 % 23) as f32 / 11.5 - 1.0)
        .collect();
    let t = 400;
    let mut batch = training_row(&pipe, &text, &caption, latent, t);
    // Leave out the target after EOI (see below): row index 1 + text + 1 (first document)
    // + 1 + caption + 1 + n (second document up to EOI).
    let eoi = (text.len() + 2) + (caption.len() + 2) + pipe.patches_per_image();
    let rows: Vec<i64> = batch.text_targets.clone().into_data().to_vec().unwrap();
    assert!(rows.contains(&(eoi as i64)), "the target after EOI is EOS");
    let rows: Vec<i64> = rows.into_iter().filter(|&i| i != eoi as i64).collect();
    batch.text_targets = Tensor::from_ints(rows.as_slice(), &Default::default());
    let x_t = model.schedule().q_sample(
        batch.latents.clone(),
        batch.noise.clone(),
        batch.timesteps.clone(),
    );
    let noise = batch.noise.clone();
    let train = model.forward_loss(batch);

    // Inference: the image's noise prediction after the caption prompt.
    let mut prompt = vec![s.bos];
    prompt.extend(&caption);
    prompt.push(s.boi);
    let (rows, _) = Rows::start(model, &[prompt.clone()], CachePolicy::Cached, s.pad, None);
    let eps = rows.image_steps(model).eps(x_t, t as usize, None);
    let mse: f32 = (eps - noise).powi_scalar(2).mean().into_scalar();
    let want: f32 = train.diffusion_per_image.into_scalar();
    assert!(
        (mse - want).abs() <= 1e-5 * want,
        "diffusion loss: inference {mse}, training {want}"
    );

    // Inference: every text target's log-likelihood from its prefix alone. The targets of
    // the row: each text token and EOS after it in the first document; in the second the
    // caption, BOI (predicted after the caption) and EOS after EOI.
    let mut nll = 0.0f64;
    let mut count = 0usize;
    let mut score = |prefix: &[u32], next: u32| {
        let (_, h) = Rows::start(model, &[prefix.to_vec()], CachePolicy::Cached, s.pad, None);
        let logp = burn::tensor::activation::log_softmax(model.lm_logits(h), 1);
        let v: f32 = logp
            .slice([0..1, next as usize..next as usize + 1])
            .into_scalar();
        nll -= v as f64;
        count += 1;
    };
    let mut first = vec![s.bos];
    first.extend(&text);
    first.push(s.eos);
    for k in 1..first.len() {
        score(&first[..k], first[k]);
    }
    for k in 1..prompt.len() {
        score(&prompt[..k], prompt[k]);
    }
    // The row's remaining target, EOS after EOI, sees the noisy image in training (the
    // clean one at inference), so the training batch leaves it out of the LM mean.
    assert_eq!(train.lm_targets.into_scalar() as usize, count);
    let want = train.lm.into_scalar() as f64;
    let got = nll / count as f64;
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "mean NLL: inference {got}, training {want}"
    );
}

#[test]
fn a_checkpoint_stored_in_f16_loads_as_f32_and_generates() {
    use burn_store::{HalfPrecisionAdapter, ModuleSnapshot, SafetensorsStore};
    let dir = checkpoint();
    let weights = dir.path().join("model.safetensors");
    let full = pipeline(dir.path());
    let opts = img_opts(1, 3, SamplerKind::Ddim, 0.0, 5);
    let want = to_vec(full.image_tensor("a red circle", &opts, |_, _| {}).unwrap());
    let before = std::fs::metadata(&weights).unwrap().len();
    // The weights as other tools often ship them: f16.
    let mut store = SafetensorsStore::from_file(&weights)
        .with_to_adapter(HalfPrecisionAdapter::new())
        .overwrite(true);
    full.model.save_into(&mut store).unwrap();
    let after = std::fs::metadata(&weights).unwrap().len();
    assert!(
        after < before * 2 / 3,
        "f16 file {after} vs f32 {before} bytes"
    );

    let half = pipeline(dir.path());
    let w = half.model.blocks[0].attn.wq.weight.val();
    assert_eq!(w.dtype(), burn::tensor::DType::F32);
    let got = to_vec(half.image_tensor("a red circle", &opts, |_, _| {}).unwrap());
    // f16 keeps 11 significant bits (relative rounding 2^-11 = 4.9e-4 per weight); through
    // the tiny network and 3 DDIM steps the images move by about that much.
    let diff = max_diff(&want, &got);
    assert!(diff > 0.0 && diff < 1e-2, "f16 vs f32 weights: {diff}");
}

#[test]
fn a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor() {
    let dir = checkpoint();
    let weights = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    // safetensors: u64 header length, a JSON header of name -> offsets, then the data.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.contains("wq"))
        .unwrap()
        .clone();
    assert_eq!(header[&name]["dtype"], "F32");
    let start = 8 + header_len + header[&name]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    bytes[start + 4..start + 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&weights, bytes).unwrap();
    let err = match Pipeline::<B>::load(dir.path(), &Default::default()) {
        Ok(_) => panic!("NaN weights were accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("model.safetensors")
            && err.contains(&name)
            && err.contains("2 of")
            && err.contains("NaN or infinite"),
        "{err}"
    );
}

#[test]
fn model_json_refuses_unknown_and_missing_keys_and_reads_version_0() {
    use transfusion_runtime::checkpoint::{parse_meta, META_FORMAT};
    let dir = checkpoint();
    let meta_path = dir.path().join("model.json");
    let text = std::fs::read_to_string(&meta_path).unwrap();
    let written: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(written["format"], serde_json::json!(META_FORMAT));
    let load_err = |v: &serde_json::Value| {
        std::fs::write(&meta_path, v.to_string()).unwrap();
        let err = Pipeline::<B>::load(dir.path(), &Default::default()).err();
        format!("{:#}", err.expect("should be refused"))
    };
    // A misspelt key, in the model config or at the top level.
    let mut v = written.clone();
    v["model"]["predicton"] = serde_json::json!("v");
    let msg = load_err(&v);
    assert!(
        msg.contains("predicton") && msg.contains("model.json"),
        "{msg}"
    );
    let mut v = written.clone();
    v["autoencder"] = serde_json::json!({"kind": "pixel"});
    assert!(load_err(&v).contains("autoencder"));
    // A dropped key in a version-1 file.
    let mut v = written.clone();
    v["model"].as_object_mut().unwrap().remove("prediction");
    assert!(load_err(&v).contains("prediction"));
    // `modality_weights` came with format 2: a version-1 file may lack it (shared weights,
    // as the shipped checkpoints), a version-2 file may not.
    let mut v = written.clone();
    v["model"]
        .as_object_mut()
        .unwrap()
        .remove("modality_weights");
    assert!(load_err(&v).contains("modality_weights"));
    v["format"] = serde_json::json!(1);
    let meta = parse_meta(&v.to_string()).unwrap().meta;
    assert_eq!(meta.model.modality_weights, None);
    // A newer format.
    let mut v = written.clone();
    v["format"] = serde_json::json!(META_FORMAT + 1);
    assert!(load_err(&v).contains("newer version"));
    // Version 0 (no `format`, written before these keys existed): their documented
    // defaults apply.
    let mut v = written.clone();
    v.as_object_mut().unwrap().remove("format");
    v["model"].as_object_mut().unwrap().remove("prediction");
    v["model"]
        .as_object_mut()
        .unwrap()
        .remove("patch_position_embedding");
    let meta = parse_meta(&v.to_string()).unwrap().meta;
    assert_eq!(meta.model.prediction, None);
    std::fs::write(&meta_path, text).unwrap();
    assert!(Pipeline::<B>::load(dir.path(), &Default::default()).is_ok());

    // A tokenizer of the same size and special ids whose ids mean other tokens (two
    // ordinary entries swapped) is refused by the recorded fingerprint.
    let tok_path = dir.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["a"].clone(), vocab["b"].clone());
    vocab["a"] = b;
    vocab["b"] = a;
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let msg = format!(
        "{:#}",
        Pipeline::<B>::load(dir.path(), &Default::default())
            .err()
            .expect("a swapped vocabulary should be refused")
    );
    assert!(msg.contains("fingerprint"), "{msg}");
}

#[test]
fn the_consistency_sampler_starts_at_phi_max_renoises_near_phi_mid_and_reuses_the_cache() {
    use transfusion_infer::sampler::Sampler;
    use transfusion_model::consistency::PHI_MID;
    use transfusion_model::trigflow::phi_at;
    use transfusion_model::NoiseSchedule;
    let base = NoiseSchedule::cosine(1000);
    let one = Sampler::new(SamplerKind::Consistency, &base, 1, Some(1.0));
    assert_eq!(one.plan(), vec![(0, 999)]);
    let two = Sampler::new(SamplerKind::Consistency, &base, 2, Some(1.0));
    let plan = two.plan();
    assert_eq!(plan[0], (1, 999));
    let mid = plan[1].1;
    // The nearest step: its angle is within half a step's angle of PHI_MID.
    let half_step = 0.5 * (phi_at(&base, mid + 1) - phi_at(&base, mid - 1)) / 2.0;
    assert!(
        (phi_at(&base, mid) - PHI_MID).abs() <= half_step + 1e-12,
        "{mid}"
    );

    let dir = checkpoint();
    let cached = pipeline(dir.path());
    let full = pipeline(dir.path()).with_cache_policy(CachePolicy::Recompute);
    for (steps, cfg) in [(1, 0.0), (2, 3.0)] {
        let o = img_opts(2, steps, SamplerKind::Consistency, cfg, 4);
        let a = to_vec(cached.image_tensor("a red square", &o, |_, _| {}).unwrap());
        let b = to_vec(full.image_tensor("a red square", &o, |_, _| {}).unwrap());
        assert!(
            max_diff(&a, &b) < TOL,
            "{steps} steps: {}",
            max_diff(&a, &b)
        );
    }
    // One consistency step is DDIM's single step: x0 predicted at t = 999.
    let c1 = img_opts(1, 1, SamplerKind::Consistency, 3.0, 8);
    let d1 = img_opts(1, 1, SamplerKind::Ddim, 3.0, 8);
    let a = to_vec(
        cached
            .image_tensor("a blue circle", &c1, |_, _| {})
            .unwrap(),
    );
    let b = to_vec(
        cached
            .image_tensor("a blue circle", &d1, |_, _| {})
            .unwrap(),
    );
    assert_eq!(a, b);
    // The second step changes the image; a third is refused.
    let c2 = img_opts(1, 2, SamplerKind::Consistency, 3.0, 8);
    let two_steps = to_vec(
        cached
            .image_tensor("a blue circle", &c2, |_, _| {})
            .unwrap(),
    );
    assert!(max_diff(&a, &two_steps) > 1e-3);
    let c3 = img_opts(1, 3, SamplerKind::Consistency, 3.0, 8);
    let err = cached
        .image_tensor("a blue circle", &c3, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("consistency sampler takes 1..=2 steps"),
        "{err}"
    );
}

#[test]
fn a_consistency_model_samples_with_its_own_defaults_unless_told_otherwise() {
    use transfusion_runtime::checkpoint::ConsistencyMeta;
    let mut meta = crate::common::tiny_meta(&crate::common::tokenizer());
    let plain = ImageOptions::for_model(&meta, ImageOptions::default());
    assert_eq!(
        (plain.sampler, plain.steps, plain.cfg),
        (SamplerKind::Ddpm, 250, 3.0)
    );
    meta.consistency = Some(ConsistencyMeta {
        distilled_guidance: 3.0,
        sampling_steps: 2,
        teacher: "teacher".into(),
    });
    let d = ImageOptions::for_model(&meta, ImageOptions::default());
    assert_eq!(
        (d.sampler, d.steps, d.cfg),
        (SamplerKind::Consistency, 2, 1.0)
    );
    // Flags win; another sampler without steps takes its own default steps.
    let o = d
        .clone()
        .with_overrides(Some(SamplerKind::Ddim), None, Some(2.0));
    assert_eq!((o.sampler, o.steps, o.cfg), (SamplerKind::Ddim, 50, 2.0));
    let o = d.clone().with_overrides(None, Some(1), None);
    assert_eq!(
        (o.sampler, o.steps, o.cfg),
        (SamplerKind::Consistency, 1, 1.0)
    );
    let o = d.with_overrides(Some(SamplerKind::Consistency), None, None);
    assert_eq!(o.steps, 2);
}
