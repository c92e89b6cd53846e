//! The shipped demo tokenizer, `assets/tokenizer.json`.
//!
//! How the asset was made: a byte-level BPE with a vocabulary of 512 (256 bytes, the five
//! special tokens, 251 merges), trained offline by `train_bpe` on `assets/corpus/` (original
//! English prose about shapes, colours and everyday life) plus 2000 captions of the shapes
//! training split with up to two shapes per image (`ShapesGenerator::train()
//! .with_max_shapes(2)`, indices 0..2000, written to a temporary `captions.jsonl`). To
//! regenerate it, run from the workspace root:
//!
//! ```text
//! CARGO_TARGET_DIR=/root/.cache/transfusion-target cargo test --release -p transfusion-data \
//!     --test suite -- --ignored regenerate_assets_tokenizer
//! ```
//!
//! Regenerating changes token ids only if the corpus, the generator or the trainer changes;
//! a checkpoint trained with the old file then fails `TextTokenizer::check_matches` or, if
//! the ids happen to agree, silently sees different text: retrain the demo checkpoint.

use std::path::{Path, PathBuf};

use transfusion_data::synthetic::shapes::{
    caption, Color, Column, Row, Shape, ShapeAttributes, ShapesGenerator, Size,
};
use transfusion_data::tokenizer::{train_bpe, TextTokenizer, SPECIAL_TOKENS};

const VOCAB_SIZE: usize = 512;
const CAPTIONS: u64 = 2000;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

#[test]
#[ignore = "writes assets/tokenizer.json; run on purpose (see the top of this file)"]
fn regenerate_assets_tokenizer() {
    let tokenizer = train_demo_tokenizer();
    tokenizer.save(assets().join("tokenizer.json")).unwrap();
    println!("special tokens: {:?}", tokenizer.special());
}

/// Trains the demo tokenizer from its recipe (see the top of this file).
fn train_demo_tokenizer() -> TextTokenizer {
    let dir = tempfile::tempdir().unwrap();
    let captions = dir.path().join("captions.jsonl");
    let generator = ShapesGenerator::train().with_max_shapes(2);
    let lines: Vec<String> = (0..CAPTIONS)
        .map(|i| serde_json::json!({ "caption": caption(&generator.attributes(i)) }).to_string())
        .collect();
    std::fs::write(&captions, lines.join("\n")).unwrap();
    let tokenizer = train_bpe(&[assets().join("corpus"), captions], VOCAB_SIZE)
        .unwrap()
        .tokenizer;
    assert_eq!(tokenizer.vocab_size(), VOCAB_SIZE);
    tokenizer
}

#[test]
fn asset_is_up_to_date_with_its_recipe() {
    let fresh = train_demo_tokenizer();
    let shipped = load();
    assert!(
        fresh.inner().get_vocab(true) == shipped.inner().get_vocab(true),
        "assets/tokenizer.json differs from what its recipe trains: regenerate it"
    );
    let text = caption(&ShapesGenerator::held_out().attributes(7));
    assert_eq!(fresh.encode(&text), shipped.encode(&text));
}

fn load() -> TextTokenizer {
    TextTokenizer::from_file(assets().join("tokenizer.json")).unwrap()
}

/// Every word a shapes caption can contain.
fn caption_words() -> Vec<&'static str> {
    let mut words = vec!["a", "at", "the", "in", "and"];
    words.extend(Shape::ALL.iter().map(|v| v.word()));
    words.extend(Color::ALL.iter().map(|v| v.word()));
    words.extend(Column::ALL.iter().map(|v| v.word()));
    words.extend(Row::ALL.iter().map(|v| v.word()));
    words.extend(Size::ALL.iter().map(|v| v.word()));
    words
}

#[test]
fn asset_has_the_special_tokens_and_the_expected_size() {
    let tok = load();
    assert_eq!(tok.vocab_size(), VOCAB_SIZE);
    let s = tok.special();
    // The trainer places the special tokens first, in this order.
    assert_eq!([s.bos, s.eos, s.pad, s.boi, s.eoi], [0, 1, 2, 3, 4]);
    for name in SPECIAL_TOKENS {
        assert!(tok.token_id(name).is_some(), "{name} missing");
        assert_eq!(tok.encode(name).len(), 1);
    }
    tok.check_matches(s, VOCAB_SIZE).unwrap();
}

#[test]
fn every_caption_word_round_trips_and_is_one_token_after_a_space() {
    let tok = load();
    for word in caption_words() {
        // Inside a caption every word follows a space: " word" is one token.
        let spaced = format!(" {word}");
        let ids = tok.encode(&spaced);
        assert_eq!(tok.decode(&ids), spaced);
        assert_eq!(ids.len(), 1, "{spaced:?} should be one token, got {ids:?}");
        let ids = tok.encode(word);
        assert_eq!(tok.decode(&ids), word);
    }
    // Captions start with "a", without a space.
    assert_eq!(tok.encode("a").len(), 1);
}

#[test]
fn captions_encode_compactly_and_round_trip() {
    let tok = load();
    let generator = ShapesGenerator::held_out().with_max_shapes(2);
    let mut single_lengths = Vec::new();
    for i in 0..1000 {
        let attrs: Vec<ShapeAttributes> = generator.attributes(i);
        let text = caption(&attrs);
        let ids = tok.encode(&text);
        assert_eq!(tok.decode(&ids), text);
        // One token per word.
        assert_eq!(ids.len(), text.split(' ').count(), "{text}");
        if attrs.len() == 1 {
            single_lengths.push(ids.len());
        }
    }
    let max = *single_lengths.iter().max().unwrap();
    let min = *single_lengths.iter().min().unwrap();
    assert!(
        (7..=8).contains(&min) && max <= 12,
        "single captions take {min}..={max} tokens"
    );
    // Ordinary prose still round-trips.
    let prose = "Yesterday's weather: 12 degrees, light rain; tomorrow? Sunny!";
    assert_eq!(tok.decode(&tok.encode(prose)), prose);
}
