//! Exact mixed-modal layouts, timestep limits, caption dropout and ordering rates.

use std::sync::Arc;

use crate::dataset_util::{test_image, ToyTokenizer, SPECIAL};
use transfusion_data::datasets::{ImageData, Sample};
use transfusion_data::encoder::{ImageEncoder, PixelEncoder};
use transfusion_data::image::{center_crop_resize, to_chw};
use transfusion_data::rng::Rng64;
use transfusion_data::sequence::*;

const BOS: u32 = SPECIAL.bos;
const EOS: u32 = SPECIAL.eos;
const PAD: u32 = SPECIAL.pad;
const BOI: u32 = SPECIAL.boi;
const EOI: u32 = SPECIAL.eoi;

fn builder(config: SequenceConfig, image_size: u32) -> SequenceBuilder {
    SequenceBuilder::new(
        config,
        Arc::new(ToyTokenizer::default()),
        Arc::new(PixelEncoder::new(image_size)),
    )
    .unwrap()
}

fn pair(seed: u8) -> Sample {
    Sample::Pair {
        image: ImageData::Pixels(test_image(12, 8, seed)),
        caption: "a red circle".into(),
    }
}

#[test]
fn text_document_layout() {
    let b = builder(SequenceConfig::default(), 4);
    let s = b
        .build(Sample::Text("the cat".into()), &mut Rng64::new(0))
        .unwrap();
    assert_eq!(s.tokens, vec![BOS, 16, 17, EOS]);
    assert!(s.images.is_empty());
}

#[test]
fn special_token_strings_in_text_are_dropped() {
    let b = builder(
        SequenceConfig {
            p_caption_first: 0.0,
            ..Default::default()
        },
        2,
    );
    let s = b
        .build(
            Sample::Text("the <|boi|> cat <|eos|>".into()),
            &mut Rng64::new(0),
        )
        .unwrap();
    assert_eq!(s.tokens, vec![BOS, 16, 17, EOS]);
    let forged = Sample::Pair {
        image: ImageData::Pixels(test_image(2, 2, 0)),
        caption: "a <|boi|> red".into(),
    };
    let s = b.build(forged, &mut Rng64::new(0)).unwrap();
    assert_eq!(s.tokens, vec![BOS, BOI, PAD, EOI, 10, 11, EOS]);
}

#[test]
fn caption_first_layout_is_exact() {
    let cfg = SequenceConfig {
        p_caption_first: 1.0,
        caption_dropout: 0.0,
        patch_size: 2,
        ..Default::default()
    };
    let s = builder(cfg, 4).build(pair(5), &mut Rng64::new(1)).unwrap();
    // a red circle = 10 11 12; 4x4 latent, 2x2 patches -> n = 4.
    assert_eq!(
        s.tokens,
        vec![BOS, 10, 11, 12, BOI, PAD, PAD, PAD, PAD, EOI, EOS]
    );
    assert_eq!(s.images.len(), 1);
    let img = &s.images[0];
    assert_eq!((img.offset, img.n_patches, img.shape), (5, 4, [3, 4, 4]));
    assert_eq!(
        img.latent,
        to_chw(&center_crop_resize(&test_image(12, 8, 5), 4))
    );
    assert!(img.t < 1000);
    assert_eq!(s.span_ids(), vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]);
}

#[test]
fn image_first_and_dropped_caption_layouts_are_exact() {
    let cfg = SequenceConfig {
        p_caption_first: 0.0,
        patch_size: 4,
        ..Default::default()
    };
    let s = builder(cfg, 8).build(pair(1), &mut Rng64::new(2)).unwrap();
    assert_eq!(
        s.tokens,
        vec![BOS, BOI, PAD, PAD, PAD, PAD, EOI, 10, 11, 12, EOS]
    );
    assert_eq!(
        (s.images[0].offset, s.images[0].n_patches, s.images[0].shape),
        (2, 4, [3, 8, 8])
    );

    let cfg = SequenceConfig {
        p_caption_first: 1.0,
        caption_dropout: 1.0,
        patch_size: 4,
        ..Default::default()
    };
    let s = builder(cfg, 8).build(pair(1), &mut Rng64::new(2)).unwrap();
    assert_eq!(s.tokens, vec![BOS, BOI, PAD, PAD, PAD, PAD, EOI, EOS]);
    assert_eq!(s.images[0].offset, 2);
}

#[test]
fn pair_sequence_is_a_pure_function_of_the_choice() {
    let choice = PairChoice {
        order: PairOrder::ImageFirst,
        drop_caption: false,
        t: 42,
    };
    let s = pair_sequence(
        &[7, 8],
        vec![0.5; 3 * 2 * 2],
        [3, 2, 2],
        &choice,
        1,
        &SPECIAL,
    )
    .unwrap();
    assert_eq!(s.tokens, vec![BOS, BOI, PAD, PAD, PAD, PAD, EOI, 7, 8, EOS]);
    assert_eq!(s.images[0].t, 42);
    assert!(pair_sequence(&[7], vec![0.0; 11], [3, 2, 2], &choice, 1, &SPECIAL).is_err());
    let e = pair_sequence(&[7], vec![0.0; 27], [3, 3, 3], &choice, 2, &SPECIAL).unwrap_err();
    assert!(e.to_string().contains("does not divide"), "{e}");
}

#[test]
fn image_first_timesteps_respect_the_noise_limit() {
    let mut rng = Rng64::new(11);
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let cfg = SequenceConfig::default();
    for _ in 0..20_000 {
        let c = sample_pair_choice(&mut rng, &cfg);
        match c.order {
            PairOrder::ImageFirst => first.push(c.t),
            PairOrder::CaptionFirst => second.push(c.t),
        }
    }
    assert!(
        first.iter().all(|&t| t < 500),
        "image-first t must stay below 500"
    );
    assert!(*first.iter().max().unwrap() >= 495);
    let mean = first.iter().map(|&t| t as f64).sum::<f64>() / first.len() as f64;
    assert!(
        (mean - 249.5).abs() < 10.0,
        "uniform in 0..500, mean {mean}"
    );
    assert!(second.iter().any(|&t| t >= 500));
    assert!(*second.iter().max().unwrap() >= 995 && second.iter().all(|&t| t < 1000));

    let unlimited = SequenceConfig {
        noise_limit: None,
        p_caption_first: 0.0,
        ..Default::default()
    };
    assert!((0..2000)
        .map(|_| sample_pair_choice(&mut rng, &unlimited).t)
        .any(|t| t >= 500));
}

#[test]
fn ordering_and_caption_dropout_rates() {
    let cfg = SequenceConfig::default(); // 0.8 caption first, 0.1 dropout
    let mut rng = Rng64::new(5);
    let n = 40_000;
    let choices: Vec<PairChoice> = (0..n).map(|_| sample_pair_choice(&mut rng, &cfg)).collect();
    let caption_first = choices
        .iter()
        .filter(|c| c.order == PairOrder::CaptionFirst)
        .count();
    let dropped = choices.iter().filter(|c| c.drop_caption).count();
    let p_first = caption_first as f64 / n as f64;
    let p_drop = dropped as f64 / caption_first as f64;
    assert!((p_first - 0.8).abs() < 0.01, "caption-first rate {p_first}");
    assert!((p_drop - 0.1).abs() < 0.01, "dropout rate {p_drop}");
    assert!(choices
        .iter()
        .all(|c| !(c.drop_caption && c.order == PairOrder::ImageFirst)));

    // Through the builder: dropped captions show up as BOS BOI.
    let b = builder(
        SequenceConfig {
            p_caption_first: 1.0,
            ..Default::default()
        },
        4,
    );
    let drops = (0..5000u64)
        .filter(|&i| b.build(pair(0), &mut Rng64::new(i)).unwrap().tokens[1] == BOI)
        .count();
    assert!((drops as f64 / 5000.0 - 0.1).abs() < 0.02, "{drops}");
}

#[test]
fn builder_checks_shapes_and_is_deterministic() {
    let b = builder(SequenceConfig::default(), 4);
    let x = b.build(pair(3), &mut Rng64::new(99)).unwrap();
    let y = b.build(pair(3), &mut Rng64::new(99)).unwrap();
    assert_eq!(x, y);

    let cached = Sample::Pair {
        image: ImageData::Latent {
            data: vec![0.0; 3 * 8 * 8],
            shape: [3, 8, 8],
        },
        caption: "a".into(),
    };
    let e = b.build(cached, &mut Rng64::new(0)).unwrap_err().to_string();
    assert!(e.contains("[3, 8, 8]") && e.contains("[3, 4, 4]"), "{e}");
    let ok = Sample::Pair {
        image: ImageData::Latent {
            data: vec![0.25; 48],
            shape: [3, 4, 4],
        },
        caption: "a".into(),
    };
    assert_eq!(
        b.build(ok, &mut Rng64::new(0)).unwrap().images[0].latent,
        vec![0.25; 48]
    );

    let bad = SequenceConfig {
        patch_size: 3,
        ..Default::default()
    };
    assert!(SequenceBuilder::new(
        bad,
        Arc::new(ToyTokenizer::default()),
        Arc::new(PixelEncoder::new(4))
    )
    .is_err());
    assert_eq!(PixelEncoder::new(4).latent_shape(), [3, 4, 4]);
}
