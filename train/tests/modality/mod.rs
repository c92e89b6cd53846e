//! Untied modality weights and frozen text weights: a copy computes what shared weights
//! compute; training from an imported language model with `freeze_text` leaves every text
//! weight bit-identical (through EMA and a resume) while the image side trains.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use transfusion_infer::pipeline::Pipeline;
use transfusion_infer::text::TextOptions;
use transfusion_model::{ModalityWeights, Transfusion};
use transfusion_runtime::checkpoint::WEIGHTS_FILE;
use transfusion_train::checkpoint::latest_checkpoint;
use transfusion_train::engine::RAW_WEIGHTS_FILE;
use transfusion_train::llm_import::{import_llm, ImportOptions};
use transfusion_train::transfusion::seeded_init;

use crate::common::{quiet, tensors, tiny_cfg, tiny_model, tiny_pipeline, train, B};

type I = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;

/// Every parameter id of a module.
fn param_ids<M: Module<B>>(m: &M) -> Vec<String> {
    struct Ids(Vec<String>);
    impl ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.push(p.id.to_string());
        }
    }
    let mut ids = Ids(vec![]);
    m.visit(&mut ids);
    ids.0
}

#[test]
fn untied_copies_compute_exactly_what_shared_weights_compute() {
    let m = tiny_model();
    let mut pipe = tiny_pipeline();
    let device = Default::default();
    let shared: Transfusion<B> = seeded_init(&m, &device, 3);
    let untied = shared.clone().untie_modalities();
    assert_eq!(shared.modality_weights(), ModalityWeights::Shared);
    assert_eq!(untied.modality_weights(), ModalityWeights::Untied);
    // The copies are parameters of their own (an optimizer must see them apart).
    let ids = param_ids(&untied);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len());
    assert!(ids.len() > param_ids(&shared).len());
    let rows = pipe.next_rows().unwrap();
    let b = pipe.batcher().batch::<B>(rows, &device).unwrap();
    assert!(b.num_images() > 0);
    let (a, u) = (shared.forward_loss(b.clone()), untied.forward_loss(b));
    let scalar = |t: Tensor<B, 1>| t.into_scalar();
    assert_eq!(scalar(a.lm), scalar(u.lm));
    assert_eq!(scalar(a.diffusion), scalar(u.diffusion));
    // A freshly built untied model starts with copies too.
    let fresh_cfg = m
        .clone()
        .with_modality_weights(Some(ModalityWeights::Untied));
    let fresh = seeded_init::<B>(&fresh_cfg, &device, 3);
    let block = &fresh.blocks[0];
    let image = block.image.as_ref().expect("image weights");
    let values = |l: &burn::nn::Linear<B>| l.weight.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(values(&block.attn.wq), values(&image.attn.wq));
    assert_ne!(block.attn.wq.weight.id, image.attn.wq.weight.id);
}

/// Whether a tensor name of the checkpoint belongs to the text weights.
fn is_text(name: &str) -> bool {
    let layer_text = name.starts_with("blocks.") && !name.contains(".image.");
    layer_text
        || ["tok_emb.", "norm.", "lm_head."]
            .iter()
            .any(|p| name.starts_with(p))
}

#[test]
fn training_an_imported_model_with_frozen_text_keeps_its_text_exactly() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("imported");
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/gqa_tied");
    let opts = ImportOptions {
        image_size: 16,
        modality_weights: ModalityWeights::Untied,
        ..ImportOptions::default()
    };
    import_llm::<I>(&llama, &ckpt, &opts, &device).unwrap();

    let mut cfg = tiny_cfg(3);
    cfg.model.init = Some(ckpt.clone());
    cfg.training.freeze_text = true;
    cfg.training.seq_len = 96;
    cfg.training.ema_decay = 0.9;
    cfg.checkpoint.every = 2;
    let run = dir.path().join("run");
    let mut o = quiet(&run);
    o.stop_at_step = Some(2);
    let first = train(&cfg, &o).unwrap();
    assert_eq!(first.steps, 2);
    let mut o = quiet(&run);
    o.resume = true;
    let second = train(&cfg, &o).unwrap();
    assert_eq!((second.started_at, second.steps), (2, 3));

    let before = tensors(&ckpt.join(WEIGHTS_FILE));
    let last = latest_checkpoint(&run.join("checkpoints")).unwrap();
    let (mut text, mut image_moved) = (0, 0);
    for file in [WEIGHTS_FILE, RAW_WEIGHTS_FILE] {
        let after = tensors(&last.join(file));
        assert_eq!(before.len(), after.len());
        for ((name, a), (name_b, b)) in before.iter().zip(&after) {
            assert_eq!(name, name_b);
            if is_text(name) {
                assert!(a == b, "{file}: text weight {name} changed");
                text += 1;
            } else if a != b {
                image_moved += 1;
            }
        }
    }
    // 2 layers x 9 text tensors + embedding, final norm, LM head; in both files.
    assert_eq!(text, 2 * (2 * 9 + 3));
    assert!(image_moved > 20, "only {image_moved} image tensors trained");

    // The trained checkpoint continues text exactly as the language model did.
    let pipe = Pipeline::<I>::load(&last, &device).unwrap();
    let reference = Pipeline::<I>::load(&ckpt, &device).unwrap();
    let greedy = TextOptions::greedy(6);
    let prompt = "a red circle in the top left";
    assert_eq!(
        pipe.text_tokens(prompt, &greedy).unwrap(),
        reference.text_tokens(prompt, &greedy).unwrap()
    );
}

#[test]
fn frozen_text_with_shared_weights_is_refused() {
    let mut cfg = tiny_cfg(3);
    cfg.training.freeze_text = true;
    let err = cfg.validate(512).unwrap_err();
    assert_eq!(err.key, "training.freeze_text", "{err}");
    cfg.model.modality_weights = Some(ModalityWeights::Untied);
    let m = cfg.validate(512).unwrap();
    assert!(m.untied());
}
