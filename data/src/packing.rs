//! Packing: several mixed-modal sequences (documents) into rows of `seq_len` positions.
//!
//! - Greedy first-fit in arrival order: a document goes into the first row with room.
//! - A document is never split across rows, so an image never straddles a row boundary.
//! - A document longer than `seq_len`: a text-only one is truncated to `seq_len` tokens
//!   (or, with [`OverlongText::Split`], cut into `seq_len` chunks, each its own document);
//!   one with an image is dropped and counted in [`PackStats::dropped`].
//! - Each document of a row gets doc id `1, 2, ...`; positions restart at 0 per document;
//!   padding (the tail of a row) has doc id 0, position 0 and the pad token.

use serde::{Deserialize, Serialize};

use crate::sequence::{span_ids, ImageSlot, MixedSequence};

/// What to do with a text-only document longer than a row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlongText {
    /// Keep the first `seq_len` tokens (the rest of the document is lost).
    #[default]
    Truncate,
    /// Cut into `seq_len` chunks, each packed as its own document.
    Split,
}

/// Counters of what packing did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackStats {
    /// Documents offered.
    pub sequences: u64,
    /// Text-only documents truncated (or split) because they were longer than a row.
    pub truncated: u64,
    /// Documents with images dropped because they were longer than a row.
    pub dropped: u64,
}

/// One row of a batch: packed documents then padding, `seq_len` positions.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedRow {
    /// Token ids (pad at patch positions and in the padding tail).
    pub tokens: Vec<u32>,
    /// Position id per position, restarting at 0 for each document; 0 in padding.
    pub positions: Vec<u32>,
    /// Document id per position: 1, 2, ... for the documents, 0 for padding.
    pub doc_ids: Vec<u32>,
    /// The images of the row in order, `offset` relative to the row start.
    pub images: Vec<ImageSlot>,
    /// Seed of this row's diffusion noise (the batcher mixes it with its own seed and the
    /// image's index in the row). Rows of different batches need different values, or
    /// their images get the same noise: [`crate::pipeline::DataPipeline`] derives it from
    /// the batch and row index.
    pub noise_seed: u64,
    used: usize,
    docs: u32,
    pad: u32,
}

impl PackedRow {
    /// An empty row (all padding) of `seq_len` positions.
    pub fn new(seq_len: usize, pad: u32) -> Self {
        Self {
            tokens: vec![pad; seq_len],
            positions: vec![0; seq_len],
            doc_ids: vec![0; seq_len],
            images: Vec::new(),
            noise_seed: 0,
            used: 0,
            docs: 0,
            pad,
        }
    }

    /// Row length `s`.
    pub fn seq_len(&self) -> usize {
        self.tokens.len()
    }

    /// Positions taken by documents (the rest is padding).
    pub fn used(&self) -> usize {
        self.used
    }

    /// Positions still free.
    pub fn free(&self) -> usize {
        self.tokens.len() - self.used
    }

    /// Number of documents in the row.
    pub fn num_docs(&self) -> usize {
        self.docs as usize
    }

    /// The pad id of this row.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Appends `seq` as the next document if it fits; gives it back otherwise.
    pub fn try_push(&mut self, seq: MixedSequence) -> Result<(), MixedSequence> {
        if seq.len() > self.free() || seq.is_empty() {
            return Err(seq);
        }
        let start = self.used;
        let end = start + seq.len();
        self.docs += 1;
        self.tokens[start..end].copy_from_slice(&seq.tokens);
        for (i, p) in self.positions[start..end].iter_mut().enumerate() {
            *p = i as u32;
        }
        self.doc_ids[start..end].fill(self.docs);
        self.images.extend(seq.images.into_iter().map(|mut img| {
            img.offset += start;
            img
        }));
        self.used = end;
        Ok(())
    }

    /// Recomputes the used length and document count from `doc_ids` (after the public
    /// fields were filled directly, e.g. when reading a batch back).
    pub(crate) fn restore_counts(&mut self) {
        self.docs = self.doc_ids.iter().copied().max().unwrap_or(0);
        self.used = self
            .doc_ids
            .iter()
            .rposition(|&d| d != 0)
            .map_or(0, |i| i + 1);
    }

    /// `span[i]` = 0 for text and padding, `k >= 1` at the patches of the row's k-th image.
    pub fn span_ids(&self) -> Vec<u32> {
        span_ids(self.tokens.len(), &self.images)
    }

    /// The documents of the row, as they were pushed (the inverse of packing).
    pub fn documents(&self) -> Vec<MixedSequence> {
        let mut docs: Vec<MixedSequence> = Vec::with_capacity(self.docs as usize);
        let mut starts = Vec::with_capacity(self.docs as usize);
        for (i, &d) in self.doc_ids.iter().enumerate() {
            if d != 0 && d as usize > docs.len() {
                docs.push(MixedSequence::default());
                starts.push(i);
            }
            if d != 0 {
                docs[d as usize - 1].tokens.push(self.tokens[i]);
            }
        }
        for img in &self.images {
            let d = self.doc_ids[img.offset] as usize - 1;
            let mut img = img.clone();
            img.offset -= starts[d];
            docs[d].images.push(img);
        }
        docs
    }
}

/// Packing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackConfig {
    /// Row length `s`.
    pub seq_len: usize,
    /// What to do with overlong text-only documents.
    #[serde(default)]
    pub overlong_text: OverlongText,
}

impl PackConfig {
    /// Rows of `seq_len`, overlong text truncated.
    pub fn new(seq_len: usize) -> Self {
        Self {
            seq_len,
            overlong_text: OverlongText::Truncate,
        }
    }

    /// Makes `seq` fit a row: unchanged, truncated / split (text only), or dropped
    /// (returns nothing) when it holds an image and is too long. Updates `stats`.
    pub fn prepare(&self, seq: MixedSequence, stats: &mut PackStats) -> Vec<MixedSequence> {
        stats.sequences += 1;
        if seq.is_empty() {
            return Vec::new();
        }
        let s = self.seq_len;
        if seq.len() <= s {
            return vec![seq];
        }
        if !seq.images.is_empty() {
            stats.dropped += 1;
            return Vec::new();
        }
        stats.truncated += 1;
        match self.overlong_text {
            OverlongText::Truncate => {
                vec![MixedSequence {
                    tokens: seq.tokens[..s].to_vec(),
                    images: Vec::new(),
                }]
            }
            OverlongText::Split => seq
                .tokens
                .chunks(s)
                .map(|c| MixedSequence {
                    tokens: c.to_vec(),
                    images: Vec::new(),
                })
                .collect(),
        }
    }
}

/// Puts `seq` into the first row of `rows` with room; gives it back if none has.
pub fn first_fit(rows: &mut [PackedRow], seq: MixedSequence) -> Result<(), MixedSequence> {
    let mut seq = seq;
    for row in rows.iter_mut() {
        match row.try_push(seq) {
            Ok(()) => return Ok(()),
            Err(back) => seq = back,
        }
    }
    Err(seq)
}

/// Packs all `seqs` into as many rows as needed (greedy first-fit over every open row, in
/// arrival order). Rows come back in creation order; `noise_seed` is the row's index, so
/// callers batching several such results with one batcher should reassign it.
pub fn pack_sequences(
    seqs: impl IntoIterator<Item = MixedSequence>,
    config: &PackConfig,
    pad: u32,
) -> (Vec<PackedRow>, PackStats) {
    let mut rows: Vec<PackedRow> = Vec::new();
    let mut stats = PackStats::default();
    for seq in seqs {
        for piece in config.prepare(seq, &mut stats) {
            if let Err(piece) = first_fit(&mut rows, piece) {
                let mut row = PackedRow::new(config.seq_len, pad);
                row.noise_seed = rows.len() as u64;
                row.try_push(piece)
                    .expect("a prepared document fits an empty row");
                rows.push(row);
            }
        }
    }
    (rows, stats)
}
