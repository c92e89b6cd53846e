//! Text-only documents: `.txt` files and `.jsonl` files with a `text` field.
//!
//! Opening scans the files once and keeps only byte ranges (file, start, length) per
//! document, so a corpus larger than memory works; documents are read on demand.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{collect_files, has_ext, skipped_note, FoundFiles, IndexedSource, Sample};
use super::{SkipPolicy, SkipReport};
use crate::error::DataError;

/// Extensions a directory walk takes as text (a file named explicitly is read whatever its
/// extension: `.jsonl` as JSON lines, anything else as plain text).
pub const TEXT_EXTS: [&str; 2] = ["txt", "jsonl"];

/// How `.txt` files are cut into documents (`.jsonl`: always one document per line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSplit {
    /// One document per file.
    #[default]
    File,
    /// One document per paragraph: runs of non-blank lines separated by blank lines.
    Paragraph,
}

#[derive(Debug)]
struct Record {
    file: u32,
    start: u64,
    len: u32,
    /// 1-based line number for `.jsonl` records (0 for `.txt`).
    line: u32,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    files: Vec<PathBuf>,
    /// Files of other types under the walked directory.
    skipped: Vec<PathBuf>,
    records: Vec<Record>,
    split: TextSplit,
    policy: SkipPolicy,
}

/// Text documents from a file (`.jsonl`: JSON lines; any other name: plain text) or a
/// directory of `.txt` / `.jsonl` files (recursive, sorted by path; other files are
/// skipped and named by [`IndexedSource::describe`]). Empty documents are left out when scanning.
#[derive(Clone, Debug)]
pub struct TextSource {
    inner: Arc<Inner>,
}

impl TextSource {
    /// Scans `root` (a file or a directory).
    pub fn open(root: &Path, split: TextSplit, strict: bool) -> Result<Self, DataError> {
        let found = collect_files(root, &TEXT_EXTS)?.require_some(root, ".txt or .jsonl files")?;
        let FoundFiles { files, skipped } = found;
        let mut records = Vec::new();
        for (fi, path) in files.iter().enumerate() {
            if has_ext(path, &["jsonl"]) {
                scan_lines(path, fi as u32, &mut records)?;
            } else if split == TextSplit::Paragraph {
                scan_paragraphs(path, fi as u32, &mut records)?;
            } else {
                let len = std::fs::metadata(path)
                    .map_err(|e| DataError::io(path, e))?
                    .len();
                if len > u32::MAX as u64 {
                    return Err(DataError::invalid(path, "text file larger than 4 GiB"));
                }
                if len > 0 {
                    records.push(Record {
                        file: fi as u32,
                        start: 0,
                        len: len as u32,
                        line: 0,
                    });
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                files,
                skipped,
                records,
                split,
                policy: SkipPolicy::new(strict),
            }),
        })
    }

    /// Number of files read.
    pub fn num_files(&self) -> usize {
        self.inner.files.len()
    }
}

/// Records every non-blank line of a `.jsonl` file.
fn scan_lines(path: &Path, file: u32, out: &mut Vec<Record>) -> Result<(), DataError> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::new(f);
    let mut buf = Vec::new();
    let mut pos = 0u64;
    let mut line = 0u32;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        if buf.iter().any(|b| !b.is_ascii_whitespace()) {
            out.push(Record {
                file,
                start: pos,
                len: n as u32,
                line,
            });
        }
        pos += n as u64;
    }
}

/// Records every paragraph (non-blank lines between blank lines) of a `.txt` file.
fn scan_paragraphs(path: &Path, file: u32, out: &mut Vec<Record>) -> Result<(), DataError> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::new(f);
    let mut buf = Vec::new();
    let mut pos = 0u64;
    let mut para: Option<u64> = None; // start of the open paragraph
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, e))?;
        let blank = buf.iter().all(|b| b.is_ascii_whitespace());
        if n == 0 || blank {
            if let Some(start) = para.take() {
                out.push(Record {
                    file,
                    start,
                    len: (pos - start) as u32,
                    line: 0,
                });
            }
            if n == 0 {
                return Ok(());
            }
        } else if para.is_none() {
            para = Some(pos);
        }
        pos += n as u64;
    }
}

#[derive(Deserialize)]
struct JsonText {
    text: Option<serde_json::Value>,
}

impl IndexedSource for TextSource {
    fn describe(&self) -> String {
        let unit = match self.inner.split {
            TextSplit::File => "documents",
            TextSplit::Paragraph => "documents (txt: one per paragraph)",
        };
        let skipped = skipped_note(&self.inner.skipped);
        format!(
            "text {}: {} files, {} {unit}{skipped}",
            self.inner.root.display(),
            self.inner.files.len(),
            self.inner.records.len()
        )
    }

    fn record_count(&self) -> usize {
        self.inner.records.len()
    }

    fn get(&self, _epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        let inner = &self.inner;
        let rec = inner.records.get(index).ok_or_else(|| {
            DataError::invalid(&inner.root, format!("record {index} out of range"))
        })?;
        let path = &inner.files[rec.file as usize];
        let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
        f.seek(SeekFrom::Start(rec.start))
            .map_err(|e| DataError::io(path, e))?;
        let mut bytes = vec![0u8; rec.len as usize];
        f.read_exact(&mut bytes)
            .map_err(|e| DataError::io(path, e))?;
        let name = if rec.line > 0 {
            format!("{}:{}", path.display(), rec.line)
        } else {
            path.display().to_string()
        };
        let Ok(text) = String::from_utf8(bytes) else {
            return inner.policy.bad(&name, "not UTF-8 text");
        };
        if rec.line == 0 {
            return Ok(Some(Sample::Text(text.trim().to_string())));
        }
        match serde_json::from_str::<JsonText>(&text) {
            Ok(JsonText {
                text: Some(serde_json::Value::String(t)),
            }) if !t.trim().is_empty() => Ok(Some(Sample::Text(t))),
            Ok(_) => inner.policy.bad(&name, "no non-empty `text` string field"),
            Err(e) => inner.policy.bad(&name, format!("invalid JSON: {e}")),
        }
    }

    fn skips(&self) -> SkipReport {
        self.inner.policy.report()
    }
}
