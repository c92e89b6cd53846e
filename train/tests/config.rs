//! Config parsing and validation: errors name the key.

mod common;

use transfusion_train::config::ExperimentConfig;
use transfusion_train::lr_schedule::lr_at;

const BASE: &str = r#"
seed = 1
[model]
preset = "tiny"
[data]
train = ["shapes:100"]
[schedule]
warmup_steps = 10
[training]
steps = 100
batch_size = 2
seq_len = 128
"#;

fn key_of(text: &str) -> String {
    let cfg = match ExperimentConfig::from_toml_str(text) {
        Err(e) => return e.key,
        Ok(c) => c,
    };
    cfg.validate(512)
        .expect_err("config should be rejected")
        .key
}

#[test]
fn base_config_is_valid_and_uses_paper_optimizer() {
    let c = ExperimentConfig::from_toml_str(BASE).unwrap();
    c.validate(512).unwrap();
    assert_eq!(c.optimizer.beta2, 0.95);
    assert_eq!(c.optimizer.eps, 1e-8);
    assert_eq!(c.optimizer.weight_decay, 0.1);
    assert_eq!(c.eval.timesteps, vec![100, 500, 900]);
}

#[test]
fn unknown_keys_are_named() {
    assert_eq!(
        key_of(&format!("{BASE}learning_rate = 3\n")),
        "training.learning_rate"
    );
    let t = BASE.replace("[model]\n", "[model]\nwidth = 3\n");
    assert_eq!(key_of(&t), "model.width");
    let t = BASE.replace(
        "[model]\npreset = \"tiny\"\n",
        "[model.config]\nvocab_size = 512\nd_model = 64\nheadz = 3\n",
    );
    assert_eq!(key_of(&t), "model.config.headz");
}

#[test]
fn values_of_the_wrong_type_name_their_key_and_line() {
    let t = BASE.replace("steps = 100", "steps = \"ten\"");
    let err = ExperimentConfig::from_toml_str(&t).unwrap_err();
    assert_eq!(err.key, "training.steps");
    assert!(
        err.message.contains("line 10, in [training]"),
        "{}",
        err.message
    );
    let t = BASE.replace("warmup_steps = 10", "warmup_steps = -1.5");
    assert_eq!(key_of(&t), "schedule.warmup_steps");
}

#[test]
fn impossible_values_are_named() {
    let t = BASE.replace("seq_len = 128", "seq_len = 60");
    assert_eq!(key_of(&t), "training.seq_len"); // 64 patches + 4 tokens do not fit
                                                // Sizes that could only abort on allocation are refused with an estimate.
    let t = BASE.replace("seq_len = 128", "seq_len = 100000000");
    assert_eq!(key_of(&t), "training.seq_len");
    let t = BASE.replace("batch_size = 2", "batch_size = 100000000");
    assert_eq!(key_of(&t), "training.batch_size");
    let full = |extra: &str| {
        BASE.replace(
            "[model]\npreset = \"tiny\"\n",
            &format!(
                "[model.config]\nvocab_size = 512\nd_model = 96\nn_layers = 2\nn_heads = 4\n\
                 n_kv_heads = 4\nd_hidden = 128\nlatent_channels = 3\nlatent_size = 32\n\
                 image_io = {{ kind = \"linear\" }}\nrope_theta = 10000.0\nnorm_eps = 1e-5\n\
                 d_timestep = 64\ndiffusion_loss_weight = 5.0\ntimesteps = 1000\n{extra}"
            ),
        )
    };
    let ok = ExperimentConfig::from_toml_str(&full("patch_size = 4\n")).unwrap();
    if let Err(e) = ok.validate(512) {
        panic!("{e}");
    }
    assert_eq!(key_of(&full("patch_size = 5\n")), "model.config.patch_size");
    assert_eq!(
        key_of(&full("patch_size = 4\n").replace("n_heads = 4\nn_kv", "n_heads = 5\nn_kv")),
        "model.config.n_heads"
    );
    let t = BASE.replace("[data]\n", "[data]\nimage_size = 64\n");
    assert_eq!(key_of(&t), "data.image_size");
    let t = format!("{BASE}precision = \"int8\"\n");
    assert_eq!(key_of(&t), "training.precision");
    let err = ExperimentConfig::from_toml_str(&t).unwrap_err();
    assert!(err.message.contains("int8"), "{}", err.message);
    let bf16 = ExperimentConfig::from_toml_str(&format!("{BASE}precision = \"bf16\"\n")).unwrap();
    assert_eq!(bf16.training.precision, transfusion_model::Precision::Bf16);
    let t = BASE.replace(
        "warmup_steps = 10",
        "lr = 1e-3\nmin_lr = 1e-2\nwarmup_steps = 10",
    );
    assert_eq!(key_of(&t), "schedule.min_lr");
    let t = BASE.replace("preset = \"tiny\"", "preset = \"huge\"");
    assert_eq!(key_of(&t), "model.preset");
    let t = format!("{BASE}[eval]\ntimesteps = [100, 1000]\n");
    assert_eq!(key_of(&t), "eval.timesteps");
}

#[test]
fn shipped_configs_parse_and_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let c = ExperimentConfig::from_toml_file(&p).unwrap();
            c.validate(512)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(
        n >= 6,
        "expected a config per paper preset plus tiny, found {n}"
    );
}

#[test]
fn schedule_values_at_known_steps() {
    let s = transfusion_train::config::ScheduleSection {
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 10,
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(lr_at(&s, 0, 111), 1e-4)); // 1/10 of the peak
    assert!(close(lr_at(&s, 4, 111), 5e-4));
    assert!(close(lr_at(&s, 9, 111), 1e-3)); // warmup ends at the peak
    assert!(close(lr_at(&s, 10, 111), 1e-3)); // cosine starts at the peak
    assert!(close(lr_at(&s, 60, 111), 5.5e-4)); // half way: mean of peak and floor
    assert!(close(lr_at(&s, 110, 111), 1e-4)); // last step: the floor
    assert!(close(lr_at(&s, 500, 111), 1e-4)); // past the end: stays at the floor
                                               // The paper's recipe: 3e-4 peak after 4000 steps, 1.5e-5 at 250k.
    let p = transfusion_train::config::ScheduleSection::default();
    assert!(close(lr_at(&p, 3999, 250_000), 3e-4));
    assert!(close(lr_at(&p, 249_999, 250_000), 1.5e-5));
}

#[test]
fn an_evaluation_on_training_sources_is_not_called_held_out() {
    use transfusion_data::source::parse_source_spec;
    use transfusion_train::engine::metrics::EvalSplit;
    let spec = |s: &str| parse_source_spec(s).unwrap();
    let shapes = vec![spec("shapes:1000")];
    let mixed = vec![spec("shapes:1000"), spec("text:corpus.txt")];
    // Only generated shapes: the held-out seed makes a disjoint set.
    assert_eq!(EvalSplit::of(&[], &shapes), EvalSplit::HeldOut);
    // Text from the training sources is training data.
    assert_eq!(EvalSplit::of(&[], &mixed), EvalSplit::Training);
    assert_eq!(EvalSplit::Training.label(), "training-set");
    // A configured held-out source is held out.
    assert_eq!(
        EvalSplit::of(&[spec("text:other.txt")], &mixed),
        EvalSplit::HeldOut
    );
    // Metrics files written before the field existed read as held-out.
    let old: transfusion_train::held_out::EvalMetrics = serde_json::from_str(
        r#"{"step":1,"lm_nll":1.0,"perplexity":2.7,"lm_targets":3.0,"diffusion":[],"images":0,"loss":1.0}"#,
    )
    .unwrap();
    assert_eq!(old.split, EvalSplit::HeldOut);
}

#[test]
fn a_preset_written_out_as_model_config_parses_back() {
    // The tiny preset sets `patch_position_embedding`; written out as [model.config] (and
    // with `prediction` added) it must be accepted as a custom config, key for key.
    let mut m = transfusion_model::TransfusionConfig::tiny(512);
    m.prediction = Some(transfusion_model::Prediction::V);
    let mut model = toml::Table::new();
    model.insert("config".into(), toml::Value::try_from(&m).unwrap());
    let mut root = toml::Table::new();
    root.insert("model".into(), toml::Value::Table(model));
    let table = toml::to_string(&root).unwrap();
    assert!(table.contains("patch_position_embedding") && table.contains("prediction"));
    let t = BASE.replace("[model]\npreset = \"tiny\"\n", &table);
    let c = ExperimentConfig::from_toml_str(&t).unwrap();
    c.validate(512).unwrap();
    let got = c.model.config.expect("a custom config");
    assert_eq!(got.prediction, Some(transfusion_model::Prediction::V));
    assert_eq!(got.patch_position_embedding, Some(true));
}

#[test]
fn run_preset_tiny_trains_what_the_demo_trains() {
    use transfusion_train::demo::{demo_config, DemoOptions};
    let opts = DemoOptions::new("unused");
    let demo = demo_config(&opts, "tok.json".as_ref()).unwrap();
    let run = ExperimentConfig::quick("tiny", demo.data.train.clone(), opts.steps);
    // The objective, the data layout and the optimizer schedule are the same.
    assert_eq!(run.model, demo.model);
    assert_eq!(run.model.prediction, Some(transfusion_model::Prediction::V));
    assert_eq!(run.data.p_caption_first, demo.data.p_caption_first);
    assert_eq!(run.data.caption_dropout, demo.data.caption_dropout);
    assert_eq!(run.data.noise_limit, demo.data.noise_limit);
    assert_eq!(run.data.noise_limit, 250); // the tiny recipe, not the paper's 500
    assert_eq!(run.training.seq_len, demo.training.seq_len);
    assert_eq!(run.training.batch_size, demo.training.batch_size);
    assert_eq!(run.schedule, demo.schedule);
    assert_eq!(run.optimizer, demo.optimizer);
    assert_eq!(run.training.ema_decay, demo.training.ema_decay);
}

/// The demo plans the steps that fit 90% of its budget at the measured step time, in
/// hundreds, never fewer than 100 and never more than its cap.
#[test]
fn demo_plans_the_steps_that_fit_its_budget() {
    use std::time::Duration;
    use transfusion_train::demo::budget::steps_for_budget;
    let (min8, ms) = (Duration::from_secs(480), Duration::from_millis);
    // 0.9 * 480 s / 0.2 s = 2160
    assert_eq!(steps_for_budget(min8, ms(200), 20_000), 2100);
    // 0.9 * 480 s / 0.129 s = 3348
    assert_eq!(steps_for_budget(min8, ms(129), 20_000), 3300);
    assert_eq!(steps_for_budget(min8, ms(1), 20_000), 20_000);
    assert_eq!(steps_for_budget(min8, ms(200), 1234), 1200);
    assert_eq!(steps_for_budget(min8, Duration::from_secs(60), 20_000), 100);
    assert_eq!(steps_for_budget(min8, ms(200), 50), 100);
}

/// `--set KEY=VALUE`: values land at their dotted key (a float key takes an integer, a
/// bare word is a string, TOML arrays parse); unknown keys and wrong types are errors
/// naming the key; the rest of the config is untouched.
#[test]
fn overrides_set_dotted_keys_and_name_bad_ones() {
    use transfusion_train::config::ConfigOverride;
    let base = ExperimentConfig::from_toml_str(BASE).unwrap();
    let set = |items: &[&str]| {
        let o: Vec<ConfigOverride> = items.iter().map(|s| s.parse().unwrap()).collect();
        base.with_overrides(&o)
    };
    let c = set(&[
        "data.noise_limit=250",
        "schedule.lr=1",
        "data.tokenizer=assets/other.json",
        "eval.timesteps=[10, 20]",
        "training.min_snr_gamma = 5.0",
    ])
    .unwrap();
    assert_eq!(c.data.noise_limit, 250);
    assert_eq!(c.schedule.lr, 1.0);
    assert_eq!(
        c.data.tokenizer,
        std::path::PathBuf::from("assets/other.json")
    );
    assert_eq!(c.eval.timesteps, vec![10, 20]);
    assert_eq!(c.training.min_snr_gamma, 5.0);
    let mut want = base.clone();
    want.data.noise_limit = 250;
    want.schedule.lr = 1.0;
    want.data.tokenizer = "assets/other.json".into();
    want.eval.timesteps = vec![10, 20];
    want.training.min_snr_gamma = 5.0;
    assert_eq!(c, want);
    // Later overrides win.
    let c = set(&["data.noise_limit=250", "data.noise_limit=100"]).unwrap();
    assert_eq!(c.data.noise_limit, 100);
    assert_eq!(set(&[]).unwrap(), base);
    // Errors name the key.
    assert_eq!(
        set(&["data.nosie_limit=250"]).unwrap_err().key,
        "data.nosie_limit"
    );
    assert_eq!(
        set(&["data.noise_limit=ten"]).unwrap_err().key,
        "data.noise_limit"
    );
    assert_eq!(set(&["seed.x=1"]).unwrap_err().key, "seed");
    for bad in ["data.noise_limit", "data..x=1", "=3"] {
        assert!(bad.parse::<ConfigOverride>().is_err(), "{bad}");
    }
}

/// `bench` counts the forward pass's float tensor ops: the same batches through 1, 2 and 3
/// layers give counts that grow by the same positive number per layer (a count of real
/// per-layer work, not of something fixed), and the step figures are positive. It lives in
/// this binary because the autodiff node counter is process-wide: no other test here runs
/// a model at the same time.
#[test]
fn bench_counts_forward_ops_per_layer() {
    use transfusion_train::bench::{run_bench, BenchConfig};
    let tok = std::sync::Arc::new(
        transfusion_train::data::load_tokenizer(&common::tiny_cfg(1), None).unwrap(),
    );
    let ops = |layers: usize| {
        let mut model = common::tiny_model();
        model.n_layers = layers;
        let cfg = BenchConfig {
            model,
            batch_size: 2,
            seq_len: 96,
            steps: 1,
            warmup: 0,
            peak_tflops: None,
            precision: transfusion_model::Precision::F32,
            blockwise_from: transfusion_model::ops::blockwise::MIN_KEYS,
            recompute: transfusion_train::config::Recompute::None,
        };
        let r = run_bench::<common::B>(&cfg, &tok, &Default::default(), "cpu").unwrap();
        assert!(r.step_ms_median > 0.0 && r.images_per_s > 0.0);
        r.forward_ops
    };
    let (one, two, three) = (ops(1), ops(2), ops(3));
    assert!(one > 0 && two > one, "{one} {two} {three}");
    assert_eq!(three - two, two - one, "{one} {two} {three}");
}

/// `transfusion-train` with `args`, its exit status and output (stdout then stderr).
fn train_binary(
    args: &[impl AsRef<std::ffi::OsStr>],
    dir: &std::path::Path,
) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_transfusion-train"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, text)
}

/// The memory plan against the peak a real step takes, read from the process that ran
/// it (its resident peak during the steps minus its resident size before the model):
/// three shapes, dense and blockwise attention, 1 to 8 rows.
#[test]
fn memory_plan_is_within_a_quarter_of_the_measured_peak() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cases = [
        "--preset tiny --batch 8 --seq-len 160",
        "--preset paper_160m --layers 2 --batch 1 --seq-len 1024",
        "--preset paper_160m --layers 2 --batch 1 --seq-len 2048 --dense-attention",
        "--preset paper_160m --layers 4 --batch 2 --seq-len 1024 --recompute",
    ];
    for case in cases {
        let mut args = vec![
            "bench", "--device", "cpu", "--steps", "1", "--warmup", "1", "--json",
        ];
        args.extend(case.split_whitespace());
        let (status, text) = train_binary(&args, &repo);
        assert!(status.success(), "{case:?}: {text}");
        let json = &text[text.find('{').expect("a JSON report")..text.rfind('}').unwrap() + 1];
        let report: serde_json::Value = serde_json::from_str(json).unwrap();
        let Some(measured) = report["step_memory"].as_f64() else {
            eprintln!("skipped: this system reports no resident-memory peak");
            return;
        };
        let planned = report["planned_peak"].as_f64().unwrap();
        let ratio = planned / measured;
        assert!(
            (0.75..=1.25).contains(&ratio),
            "{case:?}: planned {:.0} MiB, measured {:.0} MiB",
            planned / 1048576.0,
            measured / 1048576.0
        );
    }
}

/// A run whose step cannot fit the CPU's memory is refused before anything is written,
/// and the refusal names settings that would fit.
#[test]
fn a_run_that_cannot_fit_is_refused_with_the_settings_that_would() {
    use transfusion_train::memory_plan::{available_host_memory, plan, StepShape};
    let Some(available) = available_host_memory() else {
        eprintln!("skipped: available memory not readable");
        return;
    };
    // the smallest power-of-two batch of 4096-position rows of the tiny model that needs
    // twice the available memory
    let model = transfusion_model::TransfusionConfig::tiny(512);
    let shape = |batch_size| StepShape {
        model: model.clone(),
        batch_size,
        seq_len: 4096,
        precision: transfusion_model::Precision::F32,
        ema: false,
        blockwise_from: transfusion_model::ops::blockwise::MIN_KEYS,
        recompute: transfusion_train::config::Recompute::None,
        fused_attention: true,
    };
    let mut batch = 1;
    while plan(&shape(batch)).peak() < 2.0 * available {
        batch *= 2;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (status, text) = train_binary(
        &[
            "run",
            "--preset",
            "tiny",
            "--data",
            "shapes:100",
            "--batch-size",
            &batch.to_string(),
            "--seq-len",
            "4096",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ],
        &repo,
    );
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("GiB available"), "{text}");
    assert!(
        text.contains("training.batch_size = "),
        "names a batch size: {text}"
    );
    assert!(
        text.contains("training.seq_len = "),
        "names a row length: {text}"
    );
    // recomputation is named exactly when it alone makes the step fit
    let recomputed = StepShape {
        recompute: transfusion_train::config::Recompute::Layers,
        ..shape(batch)
    };
    assert_eq!(
        text.contains("training.recompute = \"layers\""),
        plan(&recomputed).peak() <= available,
        "{text}"
    );
    assert!(!out.exists(), "nothing written: {text}");
}

/// One process per run directory: while another process holds `OUT`'s lock (here this
/// test process), `run` into it is refused with exit 1, naming the holder's pid, and
/// writes nothing; released, the same command trains. A run killed with SIGKILL leaves
/// no stale lock: `--resume` then continues.
#[test]
fn a_second_process_in_one_run_directory_is_refused_and_no_lock_outlives_its_run() {
    use transfusion_train::engine::run_lock::RunLock;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--preset",
            "tiny",
            "--data",
            "shapes:64",
            "--steps",
            steps,
            "--device",
            "cpu",
            "--out",
        ];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let held = RunLock::acquire(&out).unwrap();
    let args = run("2", &[]);
    let (status, text) = train_binary(&args, &repo);
    assert_eq!(status.code(), Some(1), "{text}");
    let pid = std::process::id();
    assert!(
        text.contains(&format!("in use by another run (pid {pid})")),
        "{text}"
    );
    assert!(!out.join("metrics.jsonl").exists() && !out.join("checkpoints").exists());
    drop(held);
    let (status, text) = train_binary(&args, &repo);
    assert!(status.success(), "{text}");
    assert!(out.join("checkpoints/step-00000002").is_dir(), "{text}");

    // A run killed while it trains: its lock dies with it.
    let long = run("100000", &["--resume"]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_transfusion-train"))
        .args(&long)
        .current_dir(&repo)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock_file = out.join(transfusion_train::engine::run_lock::LOCK_FILE);
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&lock_file)
        .unwrap_or_default()
        .trim()
        != child.id().to_string()
    {
        assert!(
            started.elapsed().as_secs() < 120,
            "the run never took its lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let again = RunLock::acquire(&out).expect("no stale lock after SIGKILL");
    drop(again);
    let (status, text) = train_binary(&run("3", &["--resume"]), &repo);
    assert!(status.success(), "{text}");
    assert!(out.join("checkpoints/step-00000003").is_dir(), "{text}");
}

/// `tokenizer` refuses an existing output file before training (exit 1, the file
/// unchanged) and replaces it with `--overwrite`.
#[test]
fn the_tokenizer_command_never_overwrites_without_being_asked() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        "a red circle\na blue square in the top left\n".repeat(20),
    )
    .unwrap();
    let out = dir.path().join("tokenizer.json");
    std::fs::write(&out, "a checkpoint's tokenizer").unwrap();
    let mut args = vec!["tokenizer", "--input", corpus.to_str().unwrap()];
    args.extend_from_slice(&["--vocab-size", "300", "--out", out.to_str().unwrap()]);
    let (status, text) = train_binary(&args, dir.path());
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("already exists") && text.contains("--overwrite"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "a checkpoint's tokenizer"
    );
    args.push("--overwrite");
    let (status, text) = train_binary(&args, dir.path());
    assert!(status.success(), "{text}");
    assert!(transfusion_data::tokenizer::TextTokenizer::from_file(&out).is_ok());
}

/// Options that cannot work fail before any work, as usage errors (exit 2) naming the
/// flag: `demo --eval-samples 0` (which used to train the whole budget, then fail on an
/// empty grid), `bench --steps 0` (which reported a step time) and `distill --cfg inf`
/// (which trained on non-finite targets); `plot` of a run with
/// no recorded line fails (exit 1) and draws no blank image.
#[test]
fn options_that_cannot_work_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["demo", "--eval-samples", "0", "--out", "demo-out"],
        vec!["bench", "--steps", "0", "--preset", "tiny"],
        vec!["distill", "--cfg", "inf", "--teacher", "t", "--out", "d"],
    ] {
        let started = std::time::Instant::now();
        let (status, text) = train_binary(&args, dir.path());
        assert_eq!(status.code(), Some(2), "{args:?}: {text}");
        assert!(
            text.contains(args[1]) && text.contains("at least"),
            "{text}"
        );
        assert!(started.elapsed().as_secs() < 10, "{args:?} did work first");
    }
    assert!(!dir.path().join("demo-out").exists());
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "").unwrap();
    let (status, text) = train_binary(&["plot", run.to_str().unwrap()], dir.path());
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("nothing to plot"), "{text}");
    assert!(!run.join("loss.png").exists());
}
