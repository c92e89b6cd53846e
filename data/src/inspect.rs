//! Human-readable views of sources, sequences and packed rows (for `inspect` commands).

use std::fmt::Write;

use crate::datasets::Sample;
use crate::error::DataError;
use crate::packing::PackedRow;
use crate::sequence::{MixedSequence, TokenSource};
use crate::source::{open_source, SourceOptions, SourceSpec};

/// Opens every source and reads up to `check` records of each (decoding images), then
/// reports per source: what it is, its mixture share, record count, how many records were
/// checked, text documents / pairs among them, mean token counts (with a tokenizer) and
/// the skipped files.
pub fn describe_sources(
    specs: &[SourceSpec],
    opts: &SourceOptions,
    check: usize,
    tokenizer: Option<&dyn TokenSource>,
) -> Result<String, DataError> {
    let shares = crate::mixture::shares(&specs.iter().map(|s| s.weight).collect::<Vec<_>>());
    let mut out = String::new();
    for (i, (spec, share)) in specs.iter().zip(shares).enumerate() {
        let src = open_source(spec, opts)?;
        let _ = writeln!(
            out,
            "source {}/{}: {spec} (share {:.1}%)",
            i + 1,
            specs.len(),
            100.0 * share
        );
        let _ = writeln!(out, "  {}", src.describe());
        let (mut seen, mut texts, mut pairs, mut text_tokens, mut caption_tokens) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        for rec in src.iter_epoch(0, 0)?.take(check) {
            seen += 1;
            match rec? {
                Some(Sample::Text(t)) => {
                    texts += 1;
                    if let Some(tok) = tokenizer {
                        text_tokens += tok.encode_text(&t)?.len();
                    }
                }
                Some(Sample::Pair { caption, .. }) => {
                    pairs += 1;
                    if let Some(tok) = tokenizer {
                        caption_tokens += tok.encode_text(&caption)?.len();
                    }
                }
                None => {}
            }
        }
        let _ = write!(
            out,
            "  checked {seen} records: {texts} text documents, {pairs} pairs"
        );
        if tokenizer.is_some() {
            if texts > 0 {
                let _ = write!(
                    out,
                    "; {:.1} tokens per document",
                    text_tokens as f64 / texts as f64
                );
            }
            if pairs > 0 {
                let _ = write!(
                    out,
                    "; {:.1} tokens per caption",
                    caption_tokens as f64 / pairs as f64
                );
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "  {}", src.skips());
    }
    Ok(out)
}

fn special_name(id: u32, tok: &dyn TokenSource) -> Option<&'static str> {
    let s = tok.special_tokens();
    [
        (s.bos, "<|bos|>"),
        (s.eos, "<|eos|>"),
        (s.boi, "<|boi|>"),
        (s.eoi, "<|eoi|>"),
        (s.pad, "<|pad|>"),
    ]
    .into_iter()
    .find(|(i, _)| *i == id)
    .map(|(_, n)| n)
}

/// Renders positions `[start, end)` of `tokens`, with images given as
/// `(offset, n_patches, shape, t)` relative to `tokens`.
fn render_span(
    tokens: &[u32],
    images: &[(usize, usize, [usize; 3], u32)],
    tok: &dyn TokenSource,
) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut text: Vec<u32> = Vec::new();
    let flush = |text: &mut Vec<u32>, parts: &mut Vec<String>| {
        if !text.is_empty() {
            parts.push(tok.decode_text(text).trim().to_string());
            text.clear();
        }
    };
    let mut i = 0;
    while i < tokens.len() {
        if let Some((k, &(_, n, [c, h, w], t))) =
            images.iter().enumerate().find(|(_, im)| im.0 == i)
        {
            flush(&mut text, &mut parts);
            parts.push(format!("[img {k}: {n} patches, {c}x{h}x{w}, t={t}]"));
            i += n.max(1);
            continue;
        }
        match special_name(tokens[i], tok) {
            Some(name) => {
                flush(&mut text, &mut parts);
                parts.push(name.to_string());
            }
            None => text.push(tokens[i]),
        }
        i += 1;
    }
    flush(&mut text, &mut parts);
    parts.join(" ")
}

/// One sequence, token by token: special tokens by name, text decoded in runs, each image
/// as one bracket, e.g.
/// `<|bos|> a large red circle <|boi|> [img 0: 64 patches, 3x16x16, t=412] <|eoi|> <|eos|>`.
pub fn render_sequence(seq: &MixedSequence, tok: &dyn TokenSource) -> String {
    let images: Vec<_> = seq
        .images
        .iter()
        .map(|im| (im.offset, im.n_patches, im.shape, im.t))
        .collect();
    render_span(&seq.tokens, &images, tok)
}

/// One packed row: each document on its own line as `doc d (positions a..b): ...`, then
/// the padding length.
pub fn render_row(row: &PackedRow, tok: &dyn TokenSource) -> String {
    let mut out = String::new();
    for (d, doc) in row.documents().iter().enumerate() {
        let start = row
            .doc_ids
            .iter()
            .position(|&x| x as usize == d + 1)
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "doc {} (positions {}..{}): {}",
            d + 1,
            start,
            start + doc.len(),
            render_sequence(doc, tok)
        );
    }
    let _ = writeln!(
        out,
        "padding: {} of {} positions",
        row.free(),
        row.seq_len()
    );
    out
}
