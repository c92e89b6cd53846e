//! Consistency distillation (`transfusion-train distill`): which images it distils, the
//! batch it builds, the loss at the start, exact resume and the checkpoint it writes.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use transfusion_data::batcher::TransfusionBatcher;
use transfusion_data::packing::PackedRow;
use transfusion_data::sequence::{pair_sequence, text_sequence, PairChoice, PairOrder};
use transfusion_data::tokenizer::{SpecialTokens, TextTokenizer};
use transfusion_infer::pipeline::Pipeline;
use transfusion_infer::sampler::SamplerKind;
use transfusion_model::consistency::AdaptiveWeight;
use transfusion_model::{NoiseSchedule, Prediction};
use transfusion_runtime::checkpoint::{load_meta, load_model};
use transfusion_train::checkpoint::{latest_checkpoint, read_training_state};
use transfusion_train::distill::{
    distill_batch, distill_config, distill_loss, generation_images, run_distill,
    ConsistencyStudent, DistillDataState, DistillLossInputs, DistillSettings, ADAPTIVE_WEIGHT_FILE,
};
use transfusion_train::engine::EngineHooks;

use super::common::{quiet, tensors, tiny_cfg, tiny_model, tokenizer_path, train, B};

type I = NdArray;

/// A v-prediction teacher trained for two steps (a real checkpoint with its config.json).
fn teacher(dir: &Path) -> PathBuf {
    let mut cfg = tiny_cfg(2);
    let mut m = tiny_model();
    m.prediction = Some(Prediction::V);
    cfg.model.config = Some(m);
    train(&cfg, &quiet(dir)).unwrap();
    latest_checkpoint(&dir.join("checkpoints")).unwrap()
}

fn special() -> SpecialTokens {
    *TextTokenizer::from_file(tokenizer_path())
        .unwrap()
        .special()
}

/// One row: a caption-first pair, an image-first pair, a caption-dropped pair, a text.
fn mixed_row(special: &SpecialTokens) -> PackedRow {
    let shape = [3, 16, 16];
    let latent = |v: f32| vec![v; 3 * 16 * 16];
    let pair = |order, drop_caption, t, v| {
        let choice = PairChoice {
            order,
            drop_caption,
            t,
        };
        pair_sequence(&[40, 41, 42], latent(v), shape, &choice, 4, special).unwrap()
    };
    let mut row = PackedRow::new(120, special.pad);
    for seq in [
        pair(PairOrder::CaptionFirst, false, 10, 0.1),
        pair(PairOrder::ImageFirst, false, 20, 0.2),
        pair(PairOrder::CaptionFirst, true, 30, 0.3),
        text_sequence(&[50, 51], special),
    ] {
        row.try_push(seq).unwrap();
    }
    row
}

#[test]
fn generation_images_are_those_that_end_their_document() {
    let special = special();
    let row = mixed_row(&special);
    // Caption-first (0) and caption-dropped (2) images are drawn; the image-first one (1)
    // is captioned.
    assert_eq!(
        generation_images(&[row.clone(), row], &special),
        vec![0, 2, 3, 5]
    );
}

#[test]
fn the_batch_redraws_generation_images_and_pairs_them_with_unconditional_rows() {
    let special = special();
    let rows = vec![mixed_row(&special)];
    let batcher = TransfusionBatcher::new([3, 16, 16], 4, special.pad, 7);
    let schedule = NoiseSchedule::cosine(1000);
    let device = Default::default();
    let make = |draw| {
        distill_batch::<I>(
            &rows,
            &batcher,
            &special,
            (&schedule, 1),
            (3, draw),
            &device,
        )
        .unwrap()
    };
    let plain = batcher.arrays(&rows).unwrap();
    let a = make(0);
    assert_eq!(a.generation, vec![0, 2]);
    let targets = plain.text_targets.len() as u64;
    assert_eq!(a.text_targets, targets);
    assert!(targets > 0);
    let t: Vec<i64> = a.packed.timesteps.to_data().to_vec().unwrap();
    // The captioned image keeps its step and noise; the others take their proposal step.
    assert_eq!(t[1], 20);
    assert_eq!(
        vec![t[0], t[2]],
        a.steps.iter().map(|&s| s as i64).collect::<Vec<_>>()
    );
    assert!(a.steps.iter().all(|&s| (1..=998).contains(&s)));
    let noise: Vec<f32> = a.packed.noise.to_data().to_vec().unwrap();
    let d = 3 * 16 * 16;
    assert_eq!(noise[d..2 * d], plain.noise[d..2 * d]);
    assert_ne!(noise[..d], plain.noise[..d]);
    // The same draw repeats exactly (resume); another draw differs.
    let again = make(0);
    assert_eq!(again.steps, a.steps);
    assert_eq!(again.packed.noise.to_data(), a.packed.noise.to_data());
    assert_ne!(make(1).packed.noise.to_data(), a.packed.noise.to_data());
    // One unconditional row per generation image: BOS BOI [pad]*16 EOI EOS, same latent.
    let u = a.unconditional.unwrap();
    assert_eq!(u.tokens.dims(), [2, 20]);
    let row0: Vec<i64> = u
        .tokens
        .clone()
        .slice([0..1, 0..20])
        .to_data()
        .to_vec()
        .unwrap();
    let mut want = vec![special.bos as i64, special.boi as i64];
    want.extend([special.pad as i64; 16]);
    want.extend([special.eoi as i64, special.eos as i64]);
    assert_eq!(row0, want);
    let latents: Vec<f32> = u.latents.to_data().to_vec().unwrap();
    assert!(latents[..d].iter().all(|&v| v == 0.1));
    assert!(latents[d..].iter().all(|&v| v == 0.3));
}

#[test]
fn at_the_start_the_consistency_loss_is_the_initial_weight_unless_guided_or_warmed_up() {
    let dir = tempfile::tempdir().unwrap();
    let teacher_dir = teacher(dir.path());
    let device = Default::default();
    let (teacher, _, _) = load_model::<I>(&teacher_dir, &device).unwrap();
    let (student, _, _) = load_model::<B>(&teacher_dir, &device).unwrap();
    let initial = -((3.0 * 16.0 * 16.0) as f64).ln();
    let student = ConsistencyStudent {
        model: student,
        weight: AdaptiveWeight::new(8, initial, &device),
    };
    let special = special();
    let rows = vec![mixed_row(&special)];
    let batcher = TransfusionBatcher::new([3, 16, 16], 4, special.pad, 7);
    let batch = distill_batch::<I>(
        &rows,
        &batcher,
        &special,
        (&teacher.schedule(), 4),
        (1, 0),
        &device,
    )
    .unwrap();
    let consistency = |guidance, warmup| -> f64 {
        let inputs = DistillLossInputs {
            teacher: &teacher,
            guidance,
            warmup,
            weight: 1.0,
            derivative_span: 4,
        };
        let loss = distill_loss(&student, batch.clone(), &inputs);
        loss.sums[1].clone().into_scalar() as f64
    };
    // Student == teacher, no guidance, no ramp: the tangent -cos^2 (F^- - dx/dphi) is 0,
    // so the loss of each of the 2 images is its log-weight alone.
    let start = consistency(1.0, 0.0);
    assert!(
        (start - 2.0 * initial).abs() < 1e-4,
        "{start} vs {}",
        2.0 * initial
    );
    // Guidance or the tangent's second term give a target away from F^-: then each image
    // adds exactly ||g / (||g|| + 0.1)||^2, in [0, 1), to its log-weight (e^-w = D).
    // Guided, only the captioned image adds (the caption-dropped one's conditional velocity
    // is its unconditional one); with the ramp, both do (measured +0.98 and +2.00).
    let guided = consistency(3.0, 0.0) - start;
    assert!(guided > 0.5 && guided < 1.0, "{guided}");
    let ramped = consistency(1.0, 1.0) - start;
    assert!(ramped > 1.5 && ramped < 2.0, "{ramped}");
    // The LM part is the student's summed NLL, positive.
    let inputs = DistillLossInputs {
        teacher: &teacher,
        guidance: 1.0,
        warmup: 0.0,
        weight: 1.0,
        derivative_span: 4,
    };
    let lm = distill_loss(&student, batch, &inputs).sums[0]
        .clone()
        .into_scalar();
    assert!(lm > 0.0 && lm.is_finite());
}

#[test]
fn an_eps_teacher_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    train(&tiny_cfg(1), &quiet(dir.path())).unwrap();
    let ckpt = latest_checkpoint(&dir.path().join("checkpoints")).unwrap();
    let err = distill_config(&ckpt, vec![], 2).unwrap_err().to_string();
    assert!(err.contains("v-prediction"), "{err}");
}

#[test]
fn distillation_resumes_exactly_and_writes_a_consistency_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let teacher_dir = teacher(&dir.path().join("teacher"));
    let mut cfg = distill_config(&teacher_dir, vec![], 4).unwrap();
    cfg.checkpoint.every = 2;
    cfg.eval.every = 2;
    let settings = DistillSettings::new(&teacher_dir, 4);
    let device = Default::default();
    let run = |out: &Path, stop: Option<u64>, resume: bool| {
        let mut o = quiet(out);
        o.stop_at_step = stop;
        o.resume = resume;
        run_distill::<B>(&cfg, &settings, &o, &mut EngineHooks::default(), &device).unwrap()
    };
    let full = dir.path().join("full");
    assert_eq!(run(&full, None, false).steps, 4);
    let split = dir.path().join("split");
    assert_eq!(run(&split, Some(2), false).steps, 2);
    let second = run(&split, None, true);
    assert_eq!((second.started_at, second.steps), (2, 4));

    let a = full.join("checkpoints/step-00000004");
    let b = split.join("checkpoints/step-00000004");
    for file in ["model.safetensors", ADAPTIVE_WEIGHT_FILE] {
        for ((na, da), (nb, db)) in tensors(&a.join(file))
            .into_iter()
            .zip(tensors(&b.join(file)))
        {
            assert_eq!(na, nb);
            let diff = da
                .chunks(4)
                .zip(db.chunks(4))
                .map(|(x, y)| {
                    let x = f32::from_le_bytes(x.try_into().unwrap());
                    let y = f32::from_le_bytes(y.try_into().unwrap());
                    (x - y).abs()
                })
                .fold(0f32, f32::max);
            // The bound and its reason are the Transfusion resume test's (kernels' last
            // bits amplified by AdamW); a wrong resume moves weights by about the lr.
            assert!(diff <= 5e-5, "{file}: {na} differs after resume by {diff}");
        }
    }
    let state = |d: &Path| read_training_state::<DistillDataState>(d).unwrap().data;
    assert_eq!(state(&a), state(&b));
    assert_eq!(state(&a).draws, 4);
    // The student is not the teacher any more, and says what it is.
    assert_ne!(
        tensors(&a.join("model.safetensors")),
        tensors(&teacher_dir.join("model.safetensors"))
    );
    let meta = load_meta(&a).unwrap();
    let c = meta.consistency.expect("a consistency model");
    assert_eq!((c.distilled_guidance, c.sampling_steps), (3.0, 2));
    assert_eq!(load_meta(&teacher_dir).unwrap().consistency, None);
    // A distilled student is no teacher: its guidance would be baked in twice.
    let err = distill_config(&a, vec![], 2).unwrap_err().to_string();
    assert!(err.contains("already consistency-distilled"), "{err}");
    // Inference picks the consistency sampler, unguided, by default.
    let pipe = Pipeline::<I>::load(&a, &device).unwrap();
    let opts = pipe.default_image_options();
    assert_eq!(
        (opts.sampler, opts.steps, opts.cfg),
        (SamplerKind::Consistency, 2, 1.0)
    );
    let teacher_pipe = Pipeline::<I>::load(&teacher_dir, &device).unwrap();
    assert_eq!(
        teacher_pipe.default_image_options().sampler,
        SamplerKind::Ddpm
    );
}
