//! Cursors (epochs, shuffling, resume) and weighted mixtures.

use transfusion_data::datasets::synthetic::ShapesSource;
use transfusion_data::datasets::text::{TextSource, TextSplit};
use transfusion_data::datasets::{Sample, SampleSource};
use transfusion_data::mixture::{Balance, Mixture, MixtureConfig, SourceCursor, StreamPosition};
use transfusion_data::synthetic::shapes::ShapesGenerator;

fn text_source(dir: &std::path::Path, n: usize) -> TextSource {
    let lines: Vec<String> = (0..n)
        .map(|i| format!("{{\"text\": \"doc {i}\"}}"))
        .collect();
    std::fs::write(dir.join("docs.jsonl"), lines.join("\n")).unwrap();
    TextSource::open(&dir.join("docs.jsonl"), TextSplit::File, false).unwrap()
}

fn doc_number(s: &Sample) -> usize {
    match s {
        Sample::Text(t) => t.strip_prefix("doc ").unwrap().parse().unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cursor_shuffles_each_epoch_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let src = text_source(dir.path(), 10);
    let mut c = SourceCursor::new(Box::new(src.clone()), true, 42);
    let mut seq = Vec::new();
    for _ in 0..25 {
        let (pos, s) = c.next_sample().unwrap();
        seq.push((pos, doc_number(&s)));
    }
    // Each epoch is a permutation of 0..10, and epochs differ.
    let epoch = |e: u64| -> Vec<usize> {
        seq.iter()
            .filter(|(p, _)| p.epoch == e)
            .map(|(_, d)| *d)
            .collect()
    };
    let (mut e0, mut e1) = (epoch(0), epoch(1));
    assert_ne!(e0, e1);
    assert_ne!(e0, (0..10).collect::<Vec<_>>());
    e0.sort();
    e1.sort();
    assert_eq!(e0, (0..10).collect::<Vec<_>>());
    assert_eq!(e1, e0);
    assert_eq!(
        seq[24].0,
        StreamPosition {
            epoch: 2,
            offset: 4
        }
    );

    // Resume from a saved position: identical continuation.
    let mut d = SourceCursor::new(Box::new(src), true, 42);
    d.seek(seq[13].0);
    for want in &seq[13..] {
        let (pos, s) = d.next_sample().unwrap();
        assert_eq!((pos, doc_number(&s)), *want);
    }
}

#[test]
fn cursor_without_shuffle_is_in_order_and_skips_bad_records() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("d.jsonl"),
        "{\"text\": \"doc 0\"}\nnot json\n{\"text\": \"doc 2\"}\n",
    )
    .unwrap();
    let src = TextSource::open(&dir.path().join("d.jsonl"), TextSplit::File, false).unwrap();
    let mut c = SourceCursor::new(Box::new(src), false, 0);
    let got: Vec<(StreamPosition, usize)> = (0..4)
        .map(|_| {
            let (p, s) = c.next_sample().unwrap();
            (p, doc_number(&s))
        })
        .collect();
    let pos = |epoch, offset| StreamPosition { epoch, offset };
    assert_eq!(
        got,
        vec![
            (pos(0, 0), 0),
            (pos(0, 2), 2),
            (pos(1, 0), 0),
            (pos(1, 2), 2)
        ]
    );

    std::fs::write(dir.path().join("bad.jsonl"), "nope\nnope either\n").unwrap();
    let bad = TextSource::open(&dir.path().join("bad.jsonl"), TextSplit::File, false).unwrap();
    let err = SourceCursor::new(Box::new(bad), false, 0)
        .next_sample()
        .unwrap_err()
        .to_string();
    assert!(err.contains("without one usable sample"), "{err}");
}

#[test]
fn mixture_by_samples_follows_weights() {
    let dir = tempfile::tempdir().unwrap();
    let text = text_source(dir.path(), 7);
    let shapes = ShapesSource::new(ShapesGenerator::new(1), 5);
    let cfg = MixtureConfig {
        seed: 3,
        shuffle: true,
        balance: Balance::Samples,
    };
    let mut m = Mixture::new(vec![(Box::new(text), 3.0), (Box::new(shapes), 1.0)], &cfg).unwrap();
    assert_eq!(m.weights(), &[0.75, 0.25]);
    let mut counts = [0usize; 2];
    for step in 1..=400 {
        let d = m.next_sample().unwrap();
        assert_eq!(d.sample.kind(), if d.source == 0 { "text" } else { "pair" });
        counts[d.source] += 1;
        // Smooth round robin: never more than one sample off the exact share.
        assert!(
            (counts[0] as f64 - 0.75 * step as f64).abs() <= 1.0,
            "step {step}: {counts:?}"
        );
    }
    assert_eq!(counts, [300, 100]);
}

#[test]
fn huge_weights_give_the_same_shares_as_small_ones() {
    use transfusion_data::mixture::shares;
    // The plain sum of these overflows to infinity (shares would be NaN / 0).
    assert_eq!(shares(&[1e308, 1e308]), [0.5, 0.5]);
    let big = shares(&[3e307, 1e307]);
    assert!(
        (big[0] - 0.75).abs() < 1e-15 && (big[1] - 0.25).abs() < 1e-15,
        "{big:?}"
    );
    assert_eq!(shares(&[3.0, 1.0]), [0.75, 0.25]);
    assert_eq!(shares(&[1e-300, 3e-300]), [0.25, 0.75]);
}

#[test]
fn mixture_by_tokens_balances_tokens_and_restores_state() {
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        let a = text_source(dir.path(), 6);
        let b = ShapesSource::new(ShapesGenerator::new(1), 4);
        let cfg = MixtureConfig {
            seed: 9,
            shuffle: true,
            balance: Balance::Tokens,
        };
        Mixture::new(
            vec![
                (Box::new(a) as Box<dyn SampleSource>, 1.0),
                (Box::new(b), 1.0),
            ],
            &cfg,
        )
        .unwrap()
    };
    // Source 0 costs 10 tokens a sample, source 1 costs 40: equal token shares need four
    // text samples per pair.
    let cost = |s: usize| if s == 0 { 10 } else { 40 };
    let mut m = make();
    let mut drawn = Vec::new();
    let mut saved = None;
    for i in 0..200 {
        if i == 77 {
            saved = Some(m.state());
        }
        let d = m.next_sample().unwrap();
        m.record_tokens(d.source, cost(d.source));
        drawn.push(d);
    }
    let pairs = drawn.iter().filter(|d| d.source == 1).count();
    assert_eq!(pairs, 40);
    assert_eq!(m.tokens(), &[1600, 1600]);

    // Forgetting record_tokens is an error, not a silent imbalance.
    let mut f = make();
    f.next_sample().unwrap();
    assert!(f
        .next_sample()
        .unwrap_err()
        .to_string()
        .contains("record_tokens"));

    // A fresh mixture restored to the state at step 77 continues identically.
    let mut r = make();
    r.restore(&saved.unwrap()).unwrap();
    for want in &drawn[77..] {
        let d = r.next_sample().unwrap();
        r.record_tokens(d.source, cost(d.source));
        assert_eq!(&d, want);
    }
}
