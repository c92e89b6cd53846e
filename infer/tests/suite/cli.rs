//! Every command of the `transfusion` binary on a tiny random checkpoint, and its errors.

use std::path::Path;
use std::process::{Command, Output};

/// The binary on `device`, with `args` after the device flag.
fn binary(device: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_transfusion"));
    command.args(["--device", device]).args(args);
    command
}

fn run(args: &[&str]) -> Output {
    binary("cpu", args)
        .output()
        .expect("the binary should start")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `--device auto` looks for a GPU among the wgpu adapters; on a machine without a
/// graphical session that search prints nothing (Mesa's device-selection layer used to
/// print `error: XDG_RUNTIME_DIR is invalid ...` twice), and the run succeeds.
#[test]
fn looking_for_a_gpu_without_a_session_prints_no_error() {
    let dir = crate::common::checkpoint();
    let ck = s(dir.path());
    let out = binary(
        "auto",
        &[
            "text",
            "--checkpoint",
            ck,
            "--prompt",
            "a",
            "--max-tokens",
            "2",
        ],
    )
    .env_remove("XDG_RUNTIME_DIR")
    .env_remove("NODEVICE_SELECT")
    .env_remove("MESA_VK_DEVICE_SELECT")
    .output()
    .expect("the binary should start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn text_streams_and_is_reproducible() {
    let dir = crate::common::checkpoint();
    let ck = s(dir.path());
    // `text --checkpoint CK --prompt "a red"`, then `rest`.
    let text = |rest: &[&'static str]| {
        [
            vec!["text", "--checkpoint", ck, "--prompt", "a red"],
            rest.to_vec(),
        ]
        .concat()
    };
    let args = text(&["--max-tokens", "12", "--seed", "4"]);
    let a = ok(&args);
    assert!(a.starts_with("a red"), "{a}");
    assert_eq!(a, ok(&args));
    let greedy = ok(&text(&[
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--top-k",
        "3",
        "--top-p",
        "0.5",
    ]));
    assert!(greedy.starts_with("a red"));
}

#[test]
fn image_writes_one_png_per_image_and_a_grid() {
    let dir = crate::common::checkpoint();
    let ck = s(dir.path());
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("img.png");
    let args = [
        "image",
        "--checkpoint",
        ck,
        "--prompt",
        "a red circle",
        "--num",
        "3",
        "--steps",
        "4",
        "--sampler",
        "ddim",
        "--cfg",
        "3",
        "--size",
        "8",
        "--seed",
        "1",
        "--out",
        s(&file),
    ];
    ok(&args);
    for k in 0..3 {
        let img = image::open(out.path().join(format!("img-{k}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (8, 8));
    }
    let grid = std::fs::read(&file).unwrap();
    let first = std::fs::read(out.path().join("img-0.png")).unwrap();
    ok(&args);
    assert_eq!(std::fs::read(&file).unwrap(), grid, "same seed, same grid");
    assert_eq!(std::fs::read(out.path().join("img-0.png")).unwrap(), first);

    let single = out.path().join("one.png");
    ok(&[
        "image",
        "--checkpoint",
        ck,
        "--prompt",
        "x",
        "--steps",
        "3",
        "--out",
        s(&single),
    ]);
    assert_eq!(image::open(&single).unwrap().width(), 8);
}

#[test]
fn caption_prints_one_line_per_image() {
    let dir = crate::common::checkpoint();
    let ck = s(dir.path());
    let out = tempfile::tempdir().unwrap();
    let (a, b) = (out.path().join("a.png"), out.path().join("b.png"));
    image::RgbImage::from_pixel(20, 10, image::Rgb([200, 0, 0]))
        .save(&a)
        .unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 200]))
        .save(&b)
        .unwrap();
    let text = ok(&[
        "caption",
        "--checkpoint",
        ck,
        "--image",
        s(&a),
        s(&b),
        "--max-tokens",
        "6",
    ]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with(s(&a)));
    assert!(lines[1].starts_with(s(&b)));
}

#[test]
fn generate_writes_a_transcript_and_its_images() {
    let dir = crate::common::checkpoint();
    let ck = s(dir.path());
    let out = tempfile::tempdir().unwrap();
    let doc = out.path().join("doc");
    ok(&[
        "generate",
        "--checkpoint",
        ck,
        "--prompt",
        "once upon",
        "--max-tokens",
        "10",
        "--steps",
        "3",
        "--out",
        s(&doc),
    ]);
    let md = std::fs::read_to_string(doc.join("transcript.md")).unwrap();
    assert!(md.contains("once upon"), "{md}");
    // Every image the transcript links exists.
    for (k, _) in md.match_indices("](image-") {
        let name: String = md[k + 2..].chars().take_while(|&c| c != ')').collect();
        assert!(doc.join(&name).is_file(), "{name}");
    }
}

#[test]
fn bench_runs_on_a_checkpoint_and_on_the_tiny_preset() {
    let dir = crate::common::checkpoint();
    let args = [
        "--prompt-tokens",
        "8",
        "--measure-steps",
        "2",
        "--ddpm-steps",
        "3",
        "--ddim-steps",
        "2",
        "--batch",
        "2",
        "--text-tokens",
        "3",
    ];
    let mut a = vec!["bench", "--checkpoint", s(dir.path())];
    a.extend(args);
    let report = ok(&a);
    for key in [
        "ms per diffusion step (kv cache, no CFG)",
        "ms per diffusion step (kv cache, with CFG)",
        "step time ratio full recompute / kv cache",
        "s per image (ddpm 3 steps",
        "s per image (ddim 2 steps",
        "s per image (consistency 2 steps",
        "s per image (consistency 1 step,",
        "images/s at batch 2",
        "text tokens/s (kv cache)",
        "text tokens/s (full recompute)",
        "float tensor ops per diffusion step (kv cache, with CFG)",
        "float tensor ops per text token (kv cache)",
    ] {
        assert!(report.contains(key), "missing `{key}` in\n{report}");
    }
    let mut p = vec!["bench", "--preset", "tiny", "--no-recompute"];
    p.extend(args);
    let report = ok(&p);
    assert!(report.contains("images/s"));
    assert!(!report.contains("full recompute"));
    assert!(report.contains("float tensor ops per diffusion step"));
    let err = fails(&["bench", "--preset", "huge"]);
    assert!(err.contains("unknown preset `huge`"), "{err}");
}

#[test]
fn bad_inputs_fail_with_messages_naming_the_problem() {
    let err = fails(&["text", "--checkpoint", "/no/such/ckpt", "--prompt", "x"]);
    assert!(err.contains("/no/such/ckpt"), "{err}");

    let dir = crate::common::checkpoint();
    let ck = s(dir.path());
    let out = tempfile::tempdir().unwrap();
    let err = fails(&[
        "image",
        "--checkpoint",
        ck,
        "--prompt",
        "x",
        "--size",
        "32",
        "--steps",
        "2",
        "--out",
        s(&out.path().join("x.png")),
    ]);
    assert!(err.contains("--size 32") && err.contains("8x8"), "{err}");

    // Values that used to be accepted silently (a grey image, a JPEG name on PNG bytes).
    let png = out.path().join("y.png");
    let image = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "image",
            "--checkpoint",
            ck,
            "--prompt",
            "x",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        fails(&args)
    };
    for (extra, expect) in [
        (&["--steps", "0"][..], "steps must be in 1..=1000"),
        (&["--steps", "5000"][..], "steps must be in 1..=1000"),
        (&["--cfg=-1"][..], "guidance scale"),
        (&["--cfg", "NaN"][..], "guidance scale"),
        (&["--cfg", "inf"][..], "guidance scale"),
        (&["--num", "10000000", "--steps", "2"][..], "GiB"),
    ] {
        let err = image(extra, &png);
        assert!(err.contains(expect), "{extra:?}: {err}");
    }
    assert!(!png.exists());
    let err = image(&["--steps", "2"], &out.path().join("y.jpg"));
    assert!(err.contains("PNG"), "{err}");
    let err = fails(&[
        "text",
        "--checkpoint",
        ck,
        "--prompt",
        "x",
        "--temperature",
        "NaN",
    ]);
    assert!(err.contains("temperature"), "{err}");

    let junk = out.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let err = fails(&["caption", "--checkpoint", ck, "--image", s(&junk)]);
    assert!(err.contains("junk.png"), "{err}");
    let err = fails(&["caption", "--checkpoint", ck, "--image", "/no/such/pic.png"]);
    assert!(err.contains("/no/such/pic.png"), "{err}");

    // A tokenizer that does not match the checkpoint (another vocabulary size).
    let other = out.path().join("ck2");
    crate::common::write_checkpoint(&other);
    let tok_path = other.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let last = vocab
        .iter()
        .max_by_key(|(_, v)| v.as_u64().unwrap())
        .map(|(k, _)| k.clone())
        .unwrap();
    vocab.remove(&last);
    json["model"]["merges"].as_array_mut().unwrap().pop();
    std::fs::write(&tok_path, json.to_string()).unwrap();
    let err = fails(&["text", "--checkpoint", s(&other), "--prompt", "x"]);
    assert!(err.contains("does not match"), "{err}");
}
