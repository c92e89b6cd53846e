//! A fast variant of the demo (seconds, CPU): every stage runs, every file is written, and
//! the report carries every field with values in range.

use std::time::Duration;

use burn::backend::{Autodiff, NdArray};
use transfusion_train::demo::{run_demo, DemoOptions};

/// A demo of `steps` steps of a 32-wide model, scored on `samples` samples each way with
/// `sampling_steps` DDIM steps, writing to `out`.
fn fast_options(
    out: &std::path::Path,
    steps: u64,
    samples: usize,
    sampling_steps: usize,
) -> DemoOptions {
    let mut opts = DemoOptions::new(out);
    opts.train_budget = Duration::from_secs(60);
    opts.steps = steps;
    opts.fit_steps_to_budget = false;
    opts.eval_samples = samples;
    opts.sampling_steps = sampling_steps;
    opts.d_model = Some(32);
    opts.progress = false;
    opts
}

#[test]
fn fast_demo_writes_every_file_and_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let opts = fast_options(dir.path(), 6, 4, 3);
    let report = run_demo::<Autodiff<NdArray>>(&opts, &Default::default(), "cpu").unwrap();

    assert_eq!(report.steps, 6);
    assert_eq!(report.text_to_image.count, 4);
    assert_eq!(report.image_to_text.count, 4);
    for v in [
        report.text_to_image.color,
        report.text_to_image.all,
        report.image_to_text.shape,
        report.caption_exact_match,
    ] {
        assert!((0.0..=1.0).contains(&v), "{v}");
    }
    assert!(report.held_out_perplexity.is_finite() && report.held_out_perplexity > 1.0);
    let clean = report.text_to_image_cleanliness;
    assert_eq!(clean.count, 4);
    assert!((0.0..=1.0).contains(&clean.background) && (0.0..=1.0).contains(&clean.one_component));
    assert_eq!(
        report
            .held_out_diffusion
            .iter()
            .map(|(t, _)| *t)
            .collect::<Vec<_>>(),
        vec![100, 500, 900]
    );

    for f in [
        "report.json",
        "text_to_image.png",
        "text_to_image.md",
        "image_to_text.png",
        "image_to_text.md",
        "loss.png",
        "metrics.jsonl",
    ] {
        let p = dir.path().join(f);
        assert!(
            p.is_file() && p.metadata().unwrap().len() > 0,
            "{f} missing"
        );
    }
    // text_to_image.md lists each image's lit groups: its one-group rows are the report's share.
    let md = std::fs::read_to_string(dir.path().join("text_to_image.md")).unwrap();
    let groups: Vec<usize> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| #"))
        .map(|l| l.split('|').nth(5).unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(groups.len(), 4, "{md}");
    let one = groups.iter().filter(|&&g| g == 1).count() as f64 / 4.0;
    assert_eq!(one, clean.one_component, "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    for key in [
        "device",
        "steps",
        "train_seconds",
        "parameters",
        "text_to_image",
        "text_to_image_cleanliness",
        "image_to_text",
        "caption_exact_match",
        "held_out_perplexity",
        "held_out_diffusion",
        "sampler",
        "cfg_scale",
        "checkpoint",
    ] {
        assert!(json.get(key).is_some(), "report.json lacks {key}");
    }
    for key in ["color", "shape", "position", "size", "all", "count"] {
        assert!(
            json["text_to_image"].get(key).is_some(),
            "text_to_image lacks {key}"
        );
    }
    // The text-to-image grid holds a generated row above a reference row of 4 prompts.
    let grid = image::open(dir.path().join("text_to_image.png")).unwrap();
    assert!(
        grid.height() >= 2 * 32 && grid.height() < 3 * 32,
        "{}",
        grid.height()
    );
    assert!(
        grid.width() >= 4 * 32 && grid.width() < 5 * 32,
        "{}",
        grid.width()
    );
    // The checkpoint the evaluation used is a loadable model directory.
    assert!(report.checkpoint.join("model.safetensors").is_file());

    // Re-scoring that checkpoint measures its held-out figures again (they used to be NaN):
    // the same weights on the same held-out batches.
    let rescored = tempfile::tempdir().unwrap();
    let mut again = DemoOptions::new(rescored.path());
    again.checkpoint = Some(report.checkpoint.clone());
    again.eval_samples = 4;
    again.sampling_steps = 3;
    again.progress = false;
    let second = run_demo::<Autodiff<NdArray>>(&again, &Default::default(), "cpu").unwrap();
    assert_eq!(second.steps, 0);
    let rel = (second.held_out_perplexity / report.held_out_perplexity - 1.0).abs();
    assert!(
        rel < 1e-5,
        "{} vs {}",
        second.held_out_perplexity,
        report.held_out_perplexity
    );
}

#[test]
fn wrong_caption_words_are_the_ones_not_in_the_reference() {
    use transfusion_train::demo::captions::wrong_words;
    let reference = "a small red circle at the top left";
    assert_eq!(wrong_words(reference, reference), vec![false; 8]);
    assert_eq!(
        wrong_words("a large red circle at the top right", reference),
        [false, true, false, false, false, false, false, true]
    );
    // Another word count (center vs top left); a repeated word matches once.
    assert_eq!(
        wrong_words("a small red circle at the center the", reference),
        [false, false, false, false, false, false, true, true]
    );
    assert!(wrong_words("", reference).is_empty());
}

#[test]
fn the_captioned_grid_shows_each_image_above_its_caption_wrong_words_in_red() {
    use image::{Rgb, RgbImage};
    use transfusion_train::demo::captions::{captioned_grid, RIGHT_WORD, WRONG_WORD};
    let img = RgbImage::from_pixel(8, 8, Rgb([0, 0, 255]));
    let count = |g: &RgbImage, c: Rgb<u8>| g.pixels().filter(|p| **p == c).count();
    let refs = vec!["a red circle".to_string(), "a red circle".to_string()];
    let right = captioned_grid(&[img.clone(), img.clone()], &refs, &refs, 2, 4);
    // Two tiles side by side: each 32 px of image (8 x 4) above 4 text lines of 9 px.
    assert!(
        right.width() >= 64 && right.width() < 80,
        "{}",
        right.width()
    );
    assert!(right.height() >= 32 + 36, "{}", right.height());
    assert_eq!(count(&right, Rgb([0, 0, 255])), 2 * 32 * 32);
    assert!(count(&right, RIGHT_WORD) > 0);
    assert_eq!(count(&right, WRONG_WORD), 0);
    // One wrong word: red pixels appear, in the first tile's caption only.
    let captions = vec!["a blue circle".to_string(), "a red circle".to_string()];
    let marked = captioned_grid(&[img.clone(), img], &captions, &refs, 2, 4);
    let red: Vec<(u32, u32)> = marked
        .enumerate_pixels()
        .filter(|(_, _, p)| **p == WRONG_WORD)
        .map(|(x, y, _)| (x, y))
        .collect();
    assert!(!red.is_empty());
    assert!(red.iter().all(|&(x, y)| x < 36 && y > 32), "{red:?}");
}

/// `demo --dataset digits` in seconds: it trains on digits (the run's config says so),
/// scores both directions and the training-image captions, and writes its files.
#[test]
fn fast_digits_demo_trains_on_digits_and_scores_both_directions() {
    use transfusion_train::demo::{run_digits_demo, DemoDataset};
    let dir = tempfile::tempdir().unwrap();
    let mut opts = fast_options(dir.path(), 4, 3, 2);
    // The dataset field is forced to digits whatever it says.
    opts.dataset = DemoDataset::Shapes;
    let report = run_digits_demo::<Autodiff<NdArray>>(&opts, &Default::default(), "cpu").unwrap();
    assert_eq!(report.steps, 4);
    for s in [
        &report.image_to_text,
        &report.image_to_text_training,
        &report.text_to_image,
    ] {
        assert_eq!(s.count, 3);
        assert!((0.0..=1.0).contains(&s.accuracy) && s.distinct <= 3);
        assert_eq!(s.per_digit.len(), 10);
    }
    assert!((0.0..=1.0).contains(&report.text_to_image_iou));
    assert!(report.held_out_perplexity.is_finite() && report.held_out_perplexity > 1.0);
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(config.contains("digits:100000"), "{config}");
    for f in [
        "report.json",
        "text_to_image.png",
        "image_to_text.png",
        "loss.png",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
}

#[test]
fn digit_scores_count_right_answers_per_digit_and_distinct_answers() {
    use transfusion_train::demo::digits::DigitScores;
    let s = DigitScores::new(&[7, 7, 1, 3], &[Some(7), Some(1), Some(1), None]);
    assert_eq!(s.count, 4);
    assert_eq!(s.accuracy, 0.5);
    assert_eq!(s.distinct, 2); // 7 and 1 were named
    assert_eq!(
        (s.per_digit[7], s.per_digit[1], s.per_digit[3]),
        (0.5, 1.0, 0.0)
    );
    assert!(s.per_digit[0].is_nan());
    // A model that names one digit for everything.
    let collapsed = DigitScores::new(&[0, 1, 2, 3], &[Some(5); 4]);
    assert_eq!((collapsed.accuracy, collapsed.distinct), (0.0, 1));
}
