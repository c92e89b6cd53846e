//! The text tokenizer: BPE training, round trips, special tokens, mismatch detection.

use std::fs;
use std::path::PathBuf;

use transfusion_data::tokenizer::{
    train_bpe, SpecialTokens, TextTokenizer, BOI, BOS, EOI, EOS, PAD, SPECIAL_TOKENS,
};

const TEXT: &str = "The quick brown fox jumps over the lazy dog. A large red circle at the \
top left and a small blue square in the center. Colors, shapes and numbers: 1, 2, 3!\n\
Every morning the baker opens the shop at six o'clock, and the bread is warm.\n";

/// A small training set: a text file, a nested folder with a `text` JSON-lines file, and an
/// image-caption `captions.jsonl`.
fn corpus() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("book.txt");
    fs::write(&text, TEXT.repeat(20)).unwrap();
    let nested = dir.path().join("more/deeper");
    fs::create_dir_all(&nested).unwrap();
    let mut lines = String::new();
    for i in 0..50 {
        lines.push_str(&format!(
            "{{\"text\": \"document number {i} talks about triangles and yellow kites\"}}\n"
        ));
    }
    fs::write(nested.join("docs.jsonl"), lines).unwrap();
    fs::write(
        nested.join("captions.jsonl"),
        "{\"file_name\": \"a.png\", \"caption\": \"a small green triangle at the bottom right\"}\n\n",
    )
    .unwrap();
    fs::write(nested.join("ignored.csv"), "zzzz,qqqq\n").unwrap();
    let files = vec![text, dir.path().join("more")];
    (dir, files)
}

#[test]
fn trained_vocab_size_is_respected_and_round_trip_is_exact() {
    let (_dir, files) = corpus();
    let trained = train_bpe(&files, 300).unwrap();
    // The directory walk names the file it did not read.
    let skipped: Vec<_> = trained
        .skipped
        .iter()
        .filter_map(|p| p.file_name())
        .collect();
    assert_eq!(skipped, ["ignored.csv"]);
    let tok = trained.tokenizer;
    assert_eq!(tok.vocab_size(), 300);
    for text in [
        "The quick brown fox.",
        "  leading spaces, trailing spaces  ",
        "tabs\tand\nnewlines\n\nand {braces} [brackets] 12345 67.89 #$%&*",
        "unseen words: zebra quixotic xylophone",
        "non-ASCII works too: café, naïve, 日本, 🙂",
        "",
    ] {
        let ids = tok.encode(text);
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids), text);
    }
    // Frequent words become single tokens.
    assert_eq!(tok.encode(" the").len(), 1);
    assert!(tok.encode("the quick brown fox").len() < "the quick brown fox".len());

    // A request larger than the corpus supports gives at most that many entries.
    let big = train_bpe(&files, 5000).unwrap().tokenizer;
    assert!(big.vocab_size() <= 5000 && big.vocab_size() > 300);
}

#[test]
fn special_tokens_are_distinct_recognised_and_skipped_when_decoding() {
    let (_dir, files) = corpus();
    let tok = train_bpe(&files, 280).unwrap().tokenizer;
    let s = *tok.special();
    let ids = [s.bos, s.eos, s.pad, s.boi, s.eoi];
    let mut unique = ids.to_vec();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);
    for (name, id) in s.pairs() {
        assert_eq!(tok.token_id(name), Some(id));
        assert_eq!(tok.encode(name), vec![id], "{name} is one token");
    }
    let text = format!("{BOS}hello{BOI}{EOI} world{EOS}{PAD}");
    let encoded = tok.encode(&text);
    assert_eq!(encoded[0], s.bos);
    assert!(encoded.contains(&s.boi) && encoded.contains(&s.eoi));
    assert_eq!(tok.decode(&encoded), "hello world");
    // No special token is added automatically.
    assert!(!tok.encode("hello").contains(&s.bos));
    assert!(!tok.encode("hello").contains(&s.eos));
}

#[test]
fn save_and_load_keep_ids() {
    let (dir, files) = corpus();
    let tok = train_bpe(&files, 290).unwrap().tokenizer;
    let path = dir.path().join("out/tokenizer.json");
    tok.save(&path).unwrap();
    let loaded = TextTokenizer::from_file(&path).unwrap();
    assert_eq!(loaded.special(), tok.special());
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    let text = "a small blue square in the center";
    assert_eq!(loaded.encode(text), tok.encode(text));
    let from_bytes = TextTokenizer::from_bytes(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(from_bytes.encode(text), tok.encode(text));
    loaded
        .check_matches(tok.special(), tok.vocab_size())
        .unwrap();
}

/// A word-level tokenizer.json with no Transfusion special tokens, except `<|eos|>` which
/// already sits at id 2.
const FOREIGN: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "<|eos|>": 2, "world": 3}, "unk_token": "[UNK]"}
}"#;

#[test]
fn special_tokens_are_added_when_missing() {
    let tok = TextTokenizer::from_bytes(FOREIGN.as_bytes()).unwrap();
    // Four added (eos existed), so 4 + 4 entries.
    assert_eq!(tok.vocab_size(), 8);
    let s = tok.special();
    assert_eq!(s.eos, 2, "an existing token keeps its id");
    let mut added = vec![s.bos, s.pad, s.boi, s.eoi];
    added.sort();
    assert_eq!(added, vec![4, 5, 6, 7]);
    assert_eq!(tok.encode("hello world"), vec![1, 3]);
    assert_eq!(tok.encode(&format!("hello {BOI}")), vec![1, s.boi]);
    for name in SPECIAL_TOKENS {
        assert!(tok.token_id(name).is_some());
    }

    // The saved file now contains them, at the same ids.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let json = fs::read_to_string(&path).unwrap();
    assert!(json.contains(BOI) && json.contains(EOI) && json.contains(PAD));
    let again = TextTokenizer::from_file(&path).unwrap();
    assert_eq!(again.special(), tok.special());
    assert_eq!(again.vocab_size(), 8);
}

#[test]
fn mismatch_error_lists_the_differences() {
    let tok = TextTokenizer::from_bytes(FOREIGN.as_bytes()).unwrap();
    let mut expected = *tok.special();
    tok.check_matches(&expected, 8).unwrap();
    expected.boi += 100;
    let message = tok.check_matches(&expected, 32000).unwrap_err().to_string();
    assert!(
        message.contains("does not match the checkpoint"),
        "{message}"
    );
    assert!(
        message.contains("vocabulary size is 8 but the checkpoint expects 32000"),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "{BOI} has id {} but the checkpoint expects {}",
            tok.special().boi,
            expected.boi
        )),
        "{message}"
    );
    assert!(
        !message.contains(EOI),
        "only differences are listed: {message}"
    );

    let other = SpecialTokens {
        bos: 0,
        eos: 1,
        pad: 2,
        boi: 3,
        eoi: 4,
    };
    let json = serde_json::to_string(&other).unwrap();
    assert_eq!(serde_json::from_str::<SpecialTokens>(&json).unwrap(), other);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("a.txt");
    fs::write(&text, TEXT).unwrap();

    let message = train_bpe(std::slice::from_ref(&text), 100)
        .unwrap_err()
        .to_string();
    assert!(message.contains("at least 261"), "{message}");

    // A file named explicitly is read as text whatever its extension (a fortune file).
    let fortunes = dir.path().join("fortunes");
    fs::write(&fortunes, TEXT.repeat(5)).unwrap();
    let only_fortunes = train_bpe(std::slice::from_ref(&fortunes), 300).unwrap();
    let with_txt = train_bpe(std::slice::from_ref(&text), 300).unwrap();
    assert!(only_fortunes.skipped.is_empty());
    let sample = "the quick brown fox";
    assert!(only_fortunes.tokenizer.encode(sample).len() < sample.len());
    assert_eq!(
        only_fortunes.tokenizer.vocab_size(),
        with_txt.tokenizer.vocab_size()
    );

    let binary = dir.path().join("table.bin");
    fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
    let message = train_bpe(&[binary], 300).unwrap_err().to_string();
    assert!(
        message.contains("table.bin") && message.contains("not UTF-8"),
        "{message}"
    );

    let bad = dir.path().join("bad.jsonl");
    fs::write(&bad, "{\"text\": \"fine\"}\n{\"title\": \"no text\"}\n").unwrap();
    let message = train_bpe(&[bad], 300).unwrap_err().to_string();
    assert!(
        message.contains("bad.jsonl") && message.contains("line 2"),
        "{message}"
    );

    let empty_dir = dir.path().join("empty");
    fs::create_dir(&empty_dir).unwrap();
    let message = train_bpe(&[empty_dir], 300).unwrap_err().to_string();
    assert!(message.contains("no training text"), "{message}");

    let missing = dir.path().join("missing.txt");
    let message = train_bpe(&[missing], 300).unwrap_err().to_string();
    assert!(message.contains("missing.txt"), "{message}");

    let not_json = dir.path().join("tokenizer.json");
    fs::write(&not_json, "{ not json").unwrap();
    let message = TextTokenizer::from_file(&not_json).unwrap_err().to_string();
    assert!(
        message.contains("tokenizer.json") && message.contains("not a valid"),
        "{message}"
    );
}
