//! The synthetic digits set: deterministic samples, captions that parse back, the template
//! reader that scores generated images, and the `digits:N` source.

use transfusion_data::datasets::{ImageData, Sample};
use transfusion_data::source::{open_source, parse_source_spec, SourceOptions};
use transfusion_data::synthetic::digits::{
    classify_digit, digit_caption, parse_digit_caption, read_digit, render_digit, DigitPlacement,
    DigitsGenerator, DIGIT_WORDS, JITTER, MIN_READ_IOU,
};
use transfusion_data::synthetic::shapes::ShapesGenerator;

#[test]
fn samples_are_deterministic_cover_every_digit_and_splits_differ() {
    let train = DigitsGenerator::new(ShapesGenerator::TRAIN_SEED);
    let held = DigitsGenerator::new(ShapesGenerator::HELD_OUT_SEED);
    let a = train.sample(17);
    let b = train.sample(17);
    assert_eq!(a.image, b.image);
    assert_eq!(a.caption, b.caption);
    let mut seen = [0usize; 10];
    let mut same = 0;
    for i in 0..400 {
        let s = train.sample(i);
        seen[s.placement.digit as usize] += 1;
        assert_eq!(s.caption, digit_caption(s.placement.digit));
        // Centred, moved at most JITTER pixels each way.
        let (w, h) = (5 * s.placement.scale, 7 * s.placement.scale);
        let (cx, cy) = ((32 - w) / 2, (32 - h) / 2);
        assert!(
            s.placement.x + w <= 32 && s.placement.y + h <= 32,
            "{:?}",
            s.placement
        );
        assert!(s.placement.x.abs_diff(cx) <= JITTER && s.placement.y.abs_diff(cy) <= JITTER);
        // White ink on black only: grayscale stored as RGB.
        assert!(s
            .image
            .pixels()
            .all(|p| p.0 == [0, 0, 0] || p.0 == [255, 255, 255]));
        same += (held.placement(i) == s.placement) as usize;
    }
    // 400 samples over 10 digits: each digit well represented (expected 40 each).
    assert!(seen.iter().all(|&n| n >= 20), "{seen:?}");
    // Two placements match by chance with probability 1 / (10 * 2 * 25) = 1 / 500.
    assert!(same <= 4, "{same} identical placements across splits");
}

#[test]
fn captions_name_the_digit_and_parse_back() {
    for d in 0..10u8 {
        let c = digit_caption(d);
        assert_eq!(c, format!("the digit {}", DIGIT_WORDS[d as usize]));
        assert_eq!(parse_digit_caption(&c), Some(d));
    }
    assert_eq!(parse_digit_caption("The digit Seven."), Some(7));
    assert_eq!(parse_digit_caption("  eight  "), Some(8));
    assert_eq!(parse_digit_caption("the digit"), None);
    assert_eq!(
        parse_digit_caption("a large red circle in the center"),
        None
    );
}

#[test]
fn the_template_reader_reads_renderings_exactly_and_noise_poorly() {
    let gen = DigitsGenerator::new(ShapesGenerator::HELD_OUT_SEED);
    for i in 0..60 {
        let s = gen.sample(i);
        let m = classify_digit(&s.image).expect("a rendering has ink");
        assert_eq!(m.placement, s.placement, "sample {i}");
        assert_eq!(m.iou, 1.0);
        assert_eq!(read_digit(&s.image), Some(s.placement.digit));
    }
    // Every pair of digits differs in outline at both scales: no glyph reads as another.
    for d in 0..10u8 {
        for scale in [3, 4] {
            let p = DigitPlacement {
                digit: d,
                scale,
                x: 2,
                y: 1,
            };
            assert_eq!(classify_digit(&render_digit(&p, 32)).unwrap().placement, p);
        }
    }
    // A seven with a speck of noise on every fourth background pixel is still a seven,
    // with a low overlap.
    let p = DigitPlacement {
        digit: 7,
        scale: 3,
        x: 8,
        y: 5,
    };
    let mut noisy = render_digit(&p, 32);
    for (i, px) in noisy.pixels_mut().enumerate() {
        if i % 4 == 0 {
            px.0 = [255, 255, 255];
        }
    }
    let m = classify_digit(&noisy).unwrap();
    assert!(m.iou < MIN_READ_IOU, "{}", m.iou);
    assert_eq!(read_digit(&noisy), None, "noise is read as nothing");
    assert!(classify_digit(&image::RgbImage::new(32, 32)).is_none());
}

#[test]
fn the_digits_source_yields_the_generator_samples_with_the_split_seed() {
    let spec = parse_source_spec("digits:50").unwrap();
    assert_eq!(spec.to_string(), "digits:50");
    assert!(parse_source_spec("digits:0").is_err());
    assert!(parse_source_spec("digits:many").is_err());
    let opts = SourceOptions {
        shapes_seed: ShapesGenerator::HELD_OUT_SEED,
        ..SourceOptions::default()
    };
    let source = open_source(&spec, &opts).unwrap();
    assert_eq!(source.num_records(), Some(50));
    assert!(source.describe().contains("digits"));
    let want = DigitsGenerator::new(ShapesGenerator::HELD_OUT_SEED).sample(3);
    assert!(
        source.get(0, 50).is_err(),
        "record 50 of 50 is out of range"
    );
    match source.get(0, 3).unwrap() {
        Some(Sample::Pair {
            image: ImageData::Pixels(img),
            caption,
        }) => {
            assert_eq!(img, want.image);
            assert_eq!(caption, want.caption);
        }
        other => panic!("expected a pixel pair, got {other:?}"),
    }
}
