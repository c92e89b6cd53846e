//! A fast variant of the demo (seconds, CPU): every stage runs, every file is written, and
//! the report carries every field with values in range.

use std::time::Duration;

use burn::backend::{Autodiff, NdArray};
use transfusion_train::demo::{run_demo, DemoOptions};

#[test]
fn fast_demo_writes_every_file_and_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DemoOptions::new(dir.path());
    opts.train_budget = Duration::from_secs(60);
    opts.steps = 6;
    opts.eval_samples = 4;
    opts.sampling_steps = 3;
    opts.d_model = Some(32);
    opts.progress = false;
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
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    for key in [
        "device",
        "steps",
        "train_seconds",
        "parameters",
        "text_to_image",
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
}
