//! `import-llm` against Hugging Face transformers: two tiny random Llama models written by
//! scripts/llama_reference.py (GQA with tied embeddings in f32; multi-head with a separate
//! LM head in bf16, sharded), with their logits and greedy continuations.

use std::fs;
use std::path::{Path, PathBuf};

use burn::backend::{Flex, NdArray};
use burn::prelude::*;
use serde::Deserialize;
use transfusion_infer::pipeline::Pipeline;
use transfusion_infer::text::TextOptions;
use transfusion_model::kv_cache::CacheMode;
use transfusion_model::mask::SpanMeta;
use transfusion_model::Transfusion;
use transfusion_train::llm_import::{import_llm, load_llama, ImportError, ImportOptions};

type I = NdArray;

const FIXTURES: [&str; 2] = ["gqa_tied", "mha_untied_bf16"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn cases(name: &str) -> Vec<Case> {
    #[derive(Deserialize)]
    struct File {
        cases: Vec<Case>,
    }
    let text = fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str::<File>(&text).unwrap().cases
}

/// The logits `[s][v]` of one unpacked document, recomputed in full.
fn logits<B: Backend>(model: &Transfusion<B>, ids: &[u32]) -> Vec<Vec<f32>> {
    let device = Default::default();
    let s = ids.len();
    let ints: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let tokens = Tensor::<B, 1, Int>::from_ints(ints.as_slice(), &device).reshape([1, s]);
    let positions = Tensor::<B, 1, Int>::arange(0..s as i64, &device).reshape([1, s]);
    let meta = SpanMeta::full_rows(
        Tensor::zeros([1, s], &device),
        Tensor::ones([1, s], &device),
    );
    let x = model.embed_tokens(tokens);
    let hidden = model.forward_embeddings(x, positions, meta, None, CacheMode::ReadOnly);
    let out: Vec<f32> = model.lm_logits(hidden).into_data().to_vec().unwrap();
    out.chunks(out.len() / s).map(<[f32]>::to_vec).collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn imported_llama_models_give_the_reference_logits_and_greedy_text() {
    reference_logits_and_greedy_text::<I>();
}

/// The same on `flex`, whose fused kernels (linear, RMSNorm, SwiGLU, attention, head
/// moves) run the whole decoder.
#[test]
fn imported_llama_models_give_the_reference_logits_and_greedy_text_on_flex() {
    reference_logits_and_greedy_text::<Flex>();
}

fn reference_logits_and_greedy_text<B: Backend>() {
    let device = Default::default();
    for name in FIXTURES {
        let imported = load_llama::<B>(&fixture(name), &ImportOptions::default(), &device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let hf_vocab = imported.source.vocab_size;
        assert_eq!(imported.new_tokens.len(), 5, "{name}");
        for case in cases(name) {
            let ours = logits(&imported.model, &case.ids);
            let scale = case
                .logits
                .iter()
                .flatten()
                .fold(0f32, |m, x| m.max(x.abs()));
            let mut worst = 0f32;
            for (row, reference) in ours.iter().zip(&case.logits) {
                for (a, b) in row[..hf_vocab].iter().zip(reference) {
                    worst = worst.max((a - b).abs());
                }
                // The new tokens' rows (the mean row, or a copy of EOS) never win.
                let best = row[..hf_vocab].iter().fold(f32::MIN, |m, &x| m.max(x));
                for &(token, id) in &imported.new_tokens {
                    assert!(
                        row[id as usize] <= best,
                        "{name}: {token} outscores the model"
                    );
                }
            }
            eprintln!("{name}: largest logit difference {worst:e} (largest logit {scale})");
            // The bound: 1e-4 relative to the largest logit (f32 sums in another
            // order differ by about 1e-6 here).
            assert!(
                worst <= 1e-4 * scale,
                "{name}: logits differ by {worst} (largest logit {scale})"
            );
            // Greedy continuation over the whole extended vocabulary, recomputed each step.
            let mut ids = case.ids.clone();
            for _ in 0..case.greedy.len() {
                let last = logits(&imported.model, &ids).pop().unwrap();
                ids.push(argmax(&last));
            }
            assert_eq!(&ids[case.ids.len()..], case.greedy.as_slice(), "{name}");
        }
    }
}

#[test]
fn an_imported_checkpoint_decodes_the_reference_text_through_the_pipeline() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ckpt");
    import_llm::<I>(
        &fixture("gqa_tied"),
        &out,
        &ImportOptions::default(),
        &device,
    )
    .unwrap();
    // The pipeline starts the prompt with <|bos|>, whose row is a copy of the model's <s>:
    // the same continuation as the reference's from <s>.
    let pipe = Pipeline::<I>::load(&out, &device).unwrap();
    let case = &cases("gqa_tied")[0];
    let got = pipe
        .text_tokens(
            "a red circle in the top left",
            &TextOptions::greedy(case.greedy.len()),
        )
        .unwrap();
    assert_eq!(got, case.greedy);
    // The same checkpoint on `flex` (KV-cached decoding through the fused kernels).
    let got = Pipeline::<Flex>::load(&out, &Default::default())
        .unwrap()
        .text_tokens(
            "a red circle in the top left",
            &TextOptions::greedy(case.greedy.len()),
        )
        .unwrap();
    assert_eq!(got, case.greedy, "on flex");
    // A second import into the same directory is refused; the first is intact.
    let err = import_llm::<I>(
        &fixture("gqa_tied"),
        &out,
        &ImportOptions::default(),
        &device,
    )
    .err()
    .expect("occupied output refused");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(Pipeline::<I>::load(&out, &device).is_ok());
}

/// A copy of the `gqa_tied` fixture with `edit` applied to its config.json.
fn edited(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixture("gqa_tied");
    let dst = dir.join(format!("edited-{}", fs::read_dir(dir).unwrap().count()));
    fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

#[test]
fn unsupported_or_mismatched_models_are_refused_naming_the_key_or_tensor() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let import = |path: &Path| {
        load_llama::<I>(path, &ImportOptions::default(), &device)
            .err()
            .expect("refused")
    };
    let key_of = |e: ImportError| match e {
        ImportError::Key { key, .. } => key,
        other => panic!("not a key error: {other}"),
    };
    let cases: Vec<(&str, Box<dyn FnOnce(&mut serde_json::Value)>)> = vec![
        ("model_type", Box::new(|c| c["model_type"] = "gpt2".into())),
        (
            "rope_scaling",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0})
            }),
        ),
        (
            "rope_parameters.rope_type",
            Box::new(|c| c["rope_parameters"]["rope_type"] = "yarn".into()),
        ),
        (
            "attention_bias",
            Box::new(|c| c["attention_bias"] = true.into()),
        ),
        ("hidden_act", Box::new(|c| c["hidden_act"] = "gelu".into())),
        ("head_dim", Box::new(|c| c["head_dim"] = 16.into())),
        (
            "sliding_window",
            Box::new(|c| c["sliding_window"] = 4096.into()),
        ),
        (
            "hidden_size",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            }),
        ),
    ];
    for (key, edit) in cases {
        let e = import(&edited(dir.path(), edit));
        let text = e.to_string();
        assert_eq!(key_of(e), key, "{text}");
        assert!(text.contains("config.json"), "{text}");
    }
    // A layer the weights lack, and a width they do not have.
    match import(&edited(dir.path(), |c| c["num_hidden_layers"] = 3.into())) {
        ImportError::MissingTensor { name } => {
            assert!(name.starts_with("model.layers.2."), "{name}")
        }
        other => panic!("{other}"),
    }
    match import(&edited(dir.path(), |c| c["intermediate_size"] = 96.into())) {
        ImportError::TensorShape {
            name,
            expected,
            found,
            ..
        } => {
            assert!(name.contains("mlp"), "{name}");
            assert_eq!((expected[0], found[0]), (96, 64));
        }
        other => panic!("{other}"),
    }
    // A tokenizer with ids beyond the model's rows is not the model's.
    match import(&edited(dir.path(), |c| c["vocab_size"] = 100.into())) {
        ImportError::Invalid { path, message } => {
            assert!(
                path.ends_with("tokenizer.json") && message.contains("vocab_size"),
                "{message}"
            )
        }
        other => panic!("{other}"),
    }
    // No weights at all.
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    fs::copy(
        fixture("gqa_tied").join("config.json"),
        empty.join("config.json"),
    )
    .unwrap();
    fs::copy(
        fixture("gqa_tied").join("tokenizer.json"),
        empty.join("tokenizer.json"),
    )
    .unwrap();
    let text = import(&empty).to_string();
    assert!(text.contains("neither model.safetensors"), "{text}");
}

#[test]
fn weights_of_every_float_width_are_widened_exactly_and_others_refused() {
    use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
    use transfusion_train::llm_import::HfWeights;
    let dir = tempfile::tempdir().unwrap();
    let values = [1.5f32, -0.25, 3.0e-5, 65504.0];
    let f16: Vec<u8> = values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = values
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let f64: Vec<u8> = values
        .iter()
        .flat_map(|&v| (v as f64).to_le_bytes())
        .collect();
    let ints: Vec<u8> = [1i32, 2, 3, 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let tensors = [
        (
            "a.f16",
            TensorView::new(Dtype::F16, vec![2, 2], &f16).unwrap(),
        ),
        (
            "a.bf16",
            TensorView::new(Dtype::BF16, vec![2, 2], &bf16).unwrap(),
        ),
        (
            "a.f64",
            TensorView::new(Dtype::F64, vec![2, 2], &f64).unwrap(),
        ),
        (
            "a.i32",
            TensorView::new(Dtype::I32, vec![2, 2], &ints).unwrap(),
        ),
    ];
    serialize_to_file(tensors, None, &dir.path().join("model.safetensors")).unwrap();
    let w = HfWeights::open(dir.path()).unwrap();
    let read = |name: &str| w.tensor(name, &[2, 2]).unwrap().values;
    let widened = |f: fn(f32) -> f32| values.iter().map(|&v| f(v)).collect::<Vec<f32>>();
    assert_eq!(read("a.f16"), widened(|v| half::f16::from_f32(v).to_f32()));
    assert_eq!(
        read("a.bf16"),
        widened(|v| half::bf16::from_f32(v).to_f32())
    );
    assert_eq!(read("a.f64"), values.to_vec());
    assert!(matches!(
        w.tensor("a.i32", &[2, 2]),
        Err(ImportError::TensorType { ref dtype, .. }) if dtype == "I32"
    ));
    assert!(matches!(
        w.tensor("a.f16", &[4]),
        Err(ImportError::TensorShape { .. })
    ));
}
