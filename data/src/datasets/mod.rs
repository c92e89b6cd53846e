//! Dataset readers for the formats users already have, behind one [`SampleSource`] trait.
//!
//! | spec kind     | module            | access    |
//! |---------------|-------------------|-----------|
//! | `text`        | [`text`]          | indexed   |
//! | `imagefolder` | [`imagefolder`]   | indexed   |
//! | `coco`        | [`coco`]          | indexed   |
//! | `wds`         | [`wds`]           | streaming |
//! | `shapes`      | [`synthetic`]     | indexed   |
//! | `digits`      | [`synthetic`]     | indexed   |
//! | `latents`     | [`crate::latent_cache`] | indexed |
//!
//! Indexed sources implement [`IndexedSource`], which gives their [`SampleSource`].
//!
//! A source is a sequence of *records* per epoch. Reading a record gives `Some(sample)`
//! or `None` when the record is bad and was skipped (see [`SkipPolicy`]); in strict mode a
//! bad record is an error instead. Positions count records, good or bad, so a
//! `(epoch, offset)` pair names the same place on every run.

pub mod brace;
pub mod coco;
pub mod imagefolder;
pub mod skip;
pub mod synthetic;
pub mod text;
pub mod wds;

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::DataError;
pub use skip::{SkipPolicy, SkipReport};

/// The image half of an image-caption pair.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageData {
    /// Decoded pixels, still to be encoded (cropped, resized, VAE) by an image encoder.
    Pixels(RgbImage),
    /// An already encoded latent (from a latent cache), `[c, H, W]` row-major.
    Latent {
        /// The values, `c * H * W` of them.
        data: Vec<f32>,
        /// `[c, H, W]`.
        shape: [usize; 3],
    },
}

/// One training example, whatever the source format.
#[derive(Clone, Debug, PartialEq)]
pub enum Sample {
    /// A text-only document.
    Text(String),
    /// An image with its caption.
    Pair {
        /// The image (pixels or a cached latent).
        image: ImageData,
        /// The caption.
        caption: String,
    },
}

impl Sample {
    /// `"text"` or `"pair"`, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Sample::Text(_) => "text",
            Sample::Pair { .. } => "pair",
        }
    }
}

/// Records of one epoch from some offset on: `Some(sample)`, `None` for a skipped record,
/// `Err` for a fatal problem (or any bad record in strict mode).
pub type RecordIter = Box<dyn Iterator<Item = Result<Option<Sample>, DataError>> + Send>;

/// A data source: a finite list of records read by index, or a stream read in order.
pub trait SampleSource: Send + Sync {
    /// One line saying what this is (`"coco: 5000 images, 25014 captions (one per epoch)"`).
    fn describe(&self) -> String;

    /// Number of records per epoch, when known without reading everything (streaming
    /// sources: `None`).
    fn num_records(&self) -> Option<usize>;

    /// Whether [`SampleSource::get`] works (random access). Streaming sources return false.
    fn is_indexed(&self) -> bool;

    /// Record `index` of epoch `epoch` (the epoch matters where a record has several
    /// variants, e.g. one of several COCO captions). Only for indexed sources.
    fn get(&self, epoch: u64, index: usize) -> Result<Option<Sample>, DataError>;

    /// Records of epoch `epoch` in order, starting at record `start`. Indexed sources get
    /// it from [`IndexedSource`] (unshuffled); streaming sources must implement it.
    fn iter_epoch(&self, epoch: u64, start: usize) -> Result<RecordIter, DataError>;

    /// What was skipped so far.
    fn skips(&self) -> SkipReport;
}

/// Whether `path` has one of `exts` as extension (case-insensitive).
pub(crate) fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
        .unwrap_or(false)
}

/// The files a directory walk found, and the ones it passed over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoundFiles {
    /// The files taken, sorted by path.
    pub files: Vec<PathBuf>,
    /// Files under a walked directory whose extension is not one asked for (sorted).
    /// Hidden entries (`.name`) are neither taken nor listed.
    pub skipped: Vec<PathBuf>,
}

impl FoundFiles {
    /// Itself when it holds a file, else an error naming `root`: `"no {what} found"` and
    /// the files of other types it passed over.
    pub fn require_some(self, root: &Path, what: &str) -> Result<Self, DataError> {
        if self.files.is_empty() {
            let note = skipped_note(&self.skipped);
            return Err(DataError::invalid(root, format!("no {what} found{note}")));
        }
        Ok(self)
    }
}

/// `""` when `skipped` is empty, else `" (skipped N files of other types: a, b, ...)"`,
/// naming the first few (see [`FoundFiles::skipped`]).
pub fn skipped_note(skipped: &[PathBuf]) -> String {
    const SHOWN: usize = 3;
    if skipped.is_empty() {
        return String::new();
    }
    let names: Vec<String> = skipped
        .iter()
        .take(SHOWN)
        .map(|p| p.display().to_string())
        .collect();
    let more = if skipped.len() > SHOWN { ", ..." } else { "" };
    format!(
        " (skipped {} file{} of other types: {}{more})",
        skipped.len(),
        if skipped.len() == 1 { "" } else { "s" },
        names.join(", ")
    )
}

/// The files under `root`: `root` itself when it is a file (whatever its extension: a file
/// named explicitly is taken as asked), else every file below it whose extension is in
/// `exts`, recursively, sorted by path for determinism; the others are listed in
/// [`FoundFiles::skipped`]. Hidden entries (`.name`) are ignored.
pub fn collect_files(root: &Path, exts: &[&str]) -> Result<FoundFiles, DataError> {
    let meta = std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
    if meta.is_file() {
        return Ok(FoundFiles {
            files: vec![root.to_path_buf()],
            skipped: Vec::new(),
        });
    }
    let mut found = FoundFiles::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(&dir, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = entry.file_type().map_err(|e| DataError::io(&path, e))?;
            if ft.is_dir() || (ft.is_symlink() && path.is_dir()) {
                stack.push(path);
            } else if has_ext(&path, exts) {
                found.files.push(path);
            } else {
                found.skipped.push(path);
            }
        }
    }
    found.files.sort();
    found.skipped.sort();
    Ok(found)
}

/// A source with random access to a known number of records (a list). Implementing it
/// gives the [`SampleSource`] that every indexed source shares: `is_indexed` is true and
/// `iter_epoch` reads `get(epoch, i)` for `i` in order (unshuffled).
pub trait IndexedSource: Clone + Send + Sync + 'static {
    /// See [`SampleSource::describe`].
    fn describe(&self) -> String;

    /// Number of records per epoch.
    fn record_count(&self) -> usize;

    /// See [`SampleSource::get`].
    fn get(&self, epoch: u64, index: usize) -> Result<Option<Sample>, DataError>;

    /// See [`SampleSource::skips`]; by default nothing (sources that never skip).
    fn skips(&self) -> SkipReport {
        SkipReport::default()
    }
}

impl<S: IndexedSource> SampleSource for S {
    fn describe(&self) -> String {
        IndexedSource::describe(self)
    }

    fn num_records(&self) -> Option<usize> {
        Some(self.record_count())
    }

    fn is_indexed(&self) -> bool {
        true
    }

    fn get(&self, epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        IndexedSource::get(self, epoch, index)
    }

    fn iter_epoch(&self, epoch: u64, start: usize) -> Result<RecordIter, DataError> {
        let src = self.clone();
        let len = src.record_count();
        Ok(Box::new(
            (start..len).map(move |i| IndexedSource::get(&src, epoch, i)),
        ))
    }

    fn skips(&self) -> SkipReport {
        IndexedSource::skips(self)
    }
}

/// Whether a relative path from a data file is safe to join to its base directory:
/// not absolute, no `..`, no root or drive prefix.
pub(crate) fn is_safe_relative(path: &str) -> bool {
    use std::path::Component;
    let p = Path::new(path);
    !path.is_empty()
        && !path.starts_with('/')
        && !path.starts_with('\\')
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}
