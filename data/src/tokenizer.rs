//! The text tokenizer: a thin wrapper over a HuggingFace `tokenizer.json` (Llama, GPT-2, or
//! one trained here with [`train_bpe`]) plus the five special tokens Transfusion needs.
//!
//! Everything works offline: tokenizers are loaded from files or bytes, never downloaded.
//! Any `tokenizer.json` is accepted; the special tokens [`BOS`], [`EOS`], [`PAD`], [`BOI`]
//! and [`EOI`] are added as special tokens when the file lacks them, and their ids are
//! recorded in [`SpecialTokens`], which a checkpoint stores so that a later run can detect
//! a tokenizer that does not match ([`TextTokenizer::check_matches`]).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::datasets::text::TEXT_EXTS;
use crate::datasets::{collect_files, has_ext};
use crate::error::DataError;

/// Beginning-of-sequence token string.
pub const BOS: &str = "<|bos|>";
/// End-of-sequence token string.
pub const EOS: &str = "<|eos|>";
/// Padding token string.
pub const PAD: &str = "<|pad|>";
/// Beginning-of-image token string: the image's patches follow it.
pub const BOI: &str = "<|boi|>";
/// End-of-image token string: it follows the image's last patch.
pub const EOI: &str = "<|eoi|>";

/// The five special token strings, in the order of the fields of [`SpecialTokens`].
pub const SPECIAL_TOKENS: [&str; 5] = [BOS, EOS, PAD, BOI, EOI];

/// The ids of the special tokens in one tokenizer's vocabulary.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Id of [`BOS`].
    pub bos: u32,
    /// Id of [`EOS`].
    pub eos: u32,
    /// Id of [`PAD`].
    pub pad: u32,
    /// Id of [`BOI`].
    pub boi: u32,
    /// Id of [`EOI`].
    pub eoi: u32,
}

impl SpecialTokens {
    /// The `(token string, id)` pairs, in field order.
    pub fn pairs(&self) -> [(&'static str, u32); 5] {
        [
            (BOS, self.bos),
            (EOS, self.eos),
            (PAD, self.pad),
            (BOI, self.boi),
            (EOI, self.eoi),
        ]
    }

    /// Whether `id` is one of the special tokens.
    pub fn contains(&self, id: u32) -> bool {
        self.pairs().iter().any(|&(_, s)| s == id)
    }
}

/// A HuggingFace tokenizer together with the ids of Transfusion's special tokens.
#[derive(Clone, Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    special: SpecialTokens,
    vocab_size: usize,
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` from disk, adding the special tokens when it lacks them.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::parse(&bytes, path)
    }

    /// Parses the bytes of a `tokenizer.json`, adding the special tokens when it lacks them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DataError> {
        Self::parse(bytes, Path::new("<tokenizer.json bytes>"))
    }

    fn parse(bytes: &[u8], origin: &Path) -> Result<Self, DataError> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| {
            DataError::invalid(
                origin,
                format!("not a valid HuggingFace tokenizer.json: {e}"),
            )
        })?;
        Ok(Self::from_tokenizer(inner))
    }

    /// Wraps an already-built HuggingFace tokenizer, adding the special tokens when missing.
    pub fn from_tokenizer(mut inner: Tokenizer) -> Self {
        let missing: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .filter(|t| inner.token_to_id(t).is_none())
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        if !missing.is_empty() {
            inner.add_special_tokens(&missing);
        }
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .expect("special token should exist after add_special_tokens")
        };
        let special = SpecialTokens {
            bos: id(BOS),
            eos: id(EOS),
            pad: id(PAD),
            boi: id(BOI),
            eoi: id(EOI),
        };
        // Ids of added tokens may leave holes: the embedding table must cover the largest id.
        let max_id = inner.get_vocab(true).values().copied().max().unwrap_or(0) as usize;
        let vocab_size = inner.get_vocab_size(true).max(max_id + 1);
        Self {
            inner,
            special,
            vocab_size,
        }
    }

    /// Writes the tokenizer (with its special tokens) as a pretty-printed `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), DataError> {
        let path = path.as_ref();
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| DataError::invalid(path, format!("cannot serialize tokenizer: {e}")))?;
        crate::files::write_file(path, json)
    }

    /// Number of rows the embedding table needs: the largest token id plus one, added tokens
    /// included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The ids of the special tokens.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The id of one token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped HuggingFace tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Encodes text to ids without adding any special token (the sequence builder places
    /// BOS, EOS, BOI and EOI itself). Special token strings written in the text are still
    /// recognised as their ids.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        self.inner
            .encode(text, false)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer(format!("cannot encode text: {e}")))
    }

    /// Like [`TextTokenizer::try_encode`].
    ///
    /// # Panics
    /// When the tokenizer's pipeline fails on the text (for example a regex backtracking
    /// limit in a foreign tokenizer.json); byte-level BPE tokenizers never fail.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.try_encode(text)
            .unwrap_or_else(|e| panic!("{e} (text starts {:?})", preview(text)))
    }

    /// Decodes ids to text, skipping special tokens. Unknown ids are skipped.
    pub fn try_decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// Decodes ids to text, skipping special tokens; on a decoder failure returns the
    /// concatenated raw token strings instead.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.try_decode(ids).unwrap_or_else(|_| {
            ids.iter()
                .filter(|&&id| !self.special.contains(id))
                .filter_map(|&id| self.inner.id_to_token(id))
                .collect()
        })
    }

    /// Checks that this tokenizer matches the one a checkpoint was trained with: same
    /// special token ids and same vocabulary size. The error lists every difference.
    pub fn check_matches(
        &self,
        expected: &SpecialTokens,
        vocab_size: usize,
    ) -> Result<(), DataError> {
        let mut problems = Vec::new();
        if self.vocab_size != vocab_size {
            problems.push(format!(
                "vocabulary size is {} but the checkpoint expects {vocab_size}",
                self.vocab_size
            ));
        }
        for ((name, got), (_, want)) in self.special.pairs().iter().zip(expected.pairs()) {
            if *got != want {
                problems.push(format!(
                    "{name} has id {got} but the checkpoint expects {want}"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DataError::Tokenizer(format!(
                "tokenizer does not match the checkpoint ({}); use the tokenizer.json saved \
                 with the checkpoint",
                problems.join("; ")
            )))
        }
    }

    /// A fingerprint of what the ids mean: FNV-1a (64 bit, hex) over the vocabulary as
    /// `(id, token)` pairs in id order, the BPE merges and the added tokens. Two tokenizers
    /// with the same size and special ids but other contents (another BPE trained to the
    /// same size) differ here; a file re-saved by another version does not.
    pub fn fingerprint(&self) -> String {
        let text = self.inner.to_string(false).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let mut vocab: Vec<(u64, &str)> = json["model"]["vocab"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(t, id)| (id.as_u64().unwrap_or(u64::MAX), t.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        vocab.sort();
        let mut h = Fnv64::default();
        for (id, token) in vocab {
            h.write(&id.to_le_bytes());
            h.write(token.as_bytes());
        }
        h.write(json["model"]["merges"].to_string().as_bytes());
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            h.write(&added["id"].as_u64().unwrap_or(u64::MAX).to_le_bytes());
            h.write(added["content"].as_str().unwrap_or_default().as_bytes());
        }
        format!("{:016x}", h.0)
    }

    /// Checks the [`TextTokenizer::fingerprint`] recorded with a checkpoint.
    pub fn check_fingerprint(&self, expected: &str) -> Result<(), DataError> {
        let got = self.fingerprint();
        if got == expected {
            Ok(())
        } else {
            Err(DataError::Tokenizer(format!(
                "tokenizer does not match the checkpoint (its vocabulary or merges differ: \
                 fingerprint {got}, the checkpoint's {expected}); use the tokenizer.json saved \
                 with the checkpoint"
            )))
        }
    }
}

/// FNV-1a, 64 bit: a stable, dependency-free hash for fingerprints.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}

/// Trains a byte-level BPE tokenizer offline (GPT-2 style: byte-level pre-tokenizer with the
/// GPT-2 split regex, no prefix space, byte-level decoder, so `decode(encode(x)) == x`).
///
/// `files` may name `.jsonl` files (one JSON object per line; its `text` field, or else its
/// `caption` field, a string or a list of strings), other files (plain text, the whole file
/// one document, whatever its extension) and directories, searched recursively for `.txt`
/// and `.jsonl` files (in sorted order, so training is deterministic; the files of other
/// types they hold are returned in [`TrainedBpe::skipped`]). `vocab_size` counts the 256 byte symbols, the
/// five special tokens and the learned merges; it must be at least 261. All the text is
/// held in memory while training.
pub fn train_bpe(files: &[PathBuf], vocab_size: usize) -> Result<TrainedBpe, DataError> {
    let min_vocab = 256 + SPECIAL_TOKENS.len();
    if vocab_size < min_vocab {
        return Err(DataError::Spec {
            spec: format!("vocab_size={vocab_size}"),
            message: format!(
                "a byte-level BPE vocabulary needs at least {min_vocab} entries \
                 (256 bytes + 5 special tokens)"
            ),
        });
    }
    let mut documents = Vec::new();
    let mut skipped = Vec::new();
    for path in files {
        skipped.extend(collect_documents(path, &mut documents)?);
    }
    if documents.iter().all(|d| d.trim().is_empty()) {
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::Spec {
            spec: names.join(", "),
            message: "no training text found (expected .txt or .jsonl files)".into(),
        });
    }

    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();

    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, documents.iter())
        .map_err(|e| DataError::Tokenizer(format!("BPE training failed: {e}")))?;
    Ok(TrainedBpe {
        tokenizer: TextTokenizer::from_tokenizer(tokenizer),
        skipped,
    })
}

/// What [`train_bpe`] produced.
#[derive(Debug)]
pub struct TrainedBpe {
    /// The trained tokenizer.
    pub tokenizer: TextTokenizer,
    /// Files under the given directories that were not read (not `.txt` / `.jsonl`).
    pub skipped: Vec<PathBuf>,
}

/// Appends the documents of one training path to `out`: a file named explicitly is read
/// whatever its extension (`.jsonl` as JSON lines, anything else as plain text); a directory
/// gives its `.txt` and `.jsonl` files (see [`collect_files`]). Returns the files of other
/// types the walk passed over.
fn collect_documents(path: &Path, out: &mut Vec<String>) -> Result<Vec<PathBuf>, DataError> {
    let found = collect_files(path, &TEXT_EXTS)?;
    for file in &found.files {
        if has_ext(file, &["jsonl"]) {
            read_jsonl_texts(file, out)?;
        } else {
            let text = fs::read_to_string(file)
                .map_err(|e| DataError::invalid(file, format!("not UTF-8 text: {e}")))?;
            out.push(text);
        }
    }
    Ok(found.skipped)
}

/// Reads the `text` (or else `caption`) field of every line of a JSON-lines file.
fn read_jsonl_texts(path: &Path, out: &mut Vec<String>) -> Result<(), DataError> {
    let content = fs::read_to_string(path)
        .map_err(|e| DataError::invalid(path, format!("not UTF-8 text: {e}")))?;
    for (number, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            DataError::invalid(path, format!("line {}: invalid JSON: {e}", number + 1))
        })?;
        let field = value.get("text").or_else(|| value.get("caption"));
        match field {
            Some(serde_json::Value::String(s)) => out.push(s.clone()),
            Some(serde_json::Value::Array(items)) => {
                out.extend(items.iter().filter_map(|v| v.as_str().map(str::to_owned)))
            }
            _ => {
                return Err(DataError::invalid(
                    path,
                    format!(
                        "line {}: expected a string `text` or `caption` field",
                        number + 1
                    ),
                ))
            }
        }
    }
    Ok(())
}
