//! Image-caption pairs in a folder with a metadata file:
//! - `metadata.jsonl` (HuggingFace `imagefolder`): `{"file_name": "a.jpg", "text": "..."}`
//! - `captions.jsonl`: `{"image": "a.jpg", "caption": "..."}`
//!
//! Image paths are relative to the folder; absolute paths and `..` are rejected. An image
//! file that is a symbolic link is followed wherever it points: folders of links into a
//! shared store (the Hugging Face cache lays out snapshots this way) are read as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::skip::reason_of;
use super::{is_safe_relative, ImageData, IndexedSource, Sample};
use super::{SkipPolicy, SkipReport};
use crate::error::DataError;

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    metadata_file: PathBuf,
    /// (image path, caption)
    records: Vec<(PathBuf, String)>,
    policy: SkipPolicy,
}

/// Pairs from an image folder with `metadata.jsonl` or `captions.jsonl`.
#[derive(Clone, Debug)]
pub struct ImageFolderSource {
    inner: Arc<Inner>,
}

impl ImageFolderSource {
    /// Reads the folder's metadata file. Lines with a bad path, a missing image or no
    /// caption are skipped and counted (errors in strict mode); images are decoded later,
    /// when read, and skipped then if corrupt.
    pub fn open(root: &Path, strict: bool) -> Result<Self, DataError> {
        let policy = SkipPolicy::new(strict);
        let candidates = [
            ("metadata.jsonl", "file_name", "text"),
            ("captions.jsonl", "image", "caption"),
        ];
        let Some((file, image_key, text_key)) = candidates
            .iter()
            .find(|(f, _, _)| root.join(f).is_file())
            .copied()
        else {
            return Err(DataError::invalid(
                root,
                "no metadata.jsonl (file_name, text) or captions.jsonl (image, caption) in this folder",
            ));
        };
        let metadata_file = root.join(file);
        let content = std::fs::read_to_string(&metadata_file)
            .map_err(|e| DataError::io(&metadata_file, e))?;
        let mut records = Vec::new();
        for (i, line) in content.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let name = format!("{}:{}", metadata_file.display(), i + 1);
            let value: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    policy.bad::<()>(&name, format!("invalid JSON: {e}"))?;
                    continue;
                }
            };
            let image = value.get(image_key).and_then(|v| v.as_str());
            let caption = value.get(text_key).and_then(|v| v.as_str());
            let (Some(image), Some(caption)) = (image, caption) else {
                policy.bad::<()>(
                    &name,
                    format!("needs string fields `{image_key}` and `{text_key}`"),
                )?;
                continue;
            };
            if !is_safe_relative(image) {
                policy.bad::<()>(
                    &name,
                    format!("unsafe image path `{image}` (absolute or `..`)"),
                )?;
                continue;
            }
            let path = root.join(image);
            if !path.is_file() {
                policy.bad::<()>(&path.display().to_string(), "missing image file")?;
                continue;
            }
            records.push((path, caption.to_string()));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                metadata_file,
                records,
                policy,
            }),
        })
    }
}

/// Reads and decodes one image file; a bad file becomes a skip (or a strict error).
pub(crate) fn read_image_or_skip(
    path: &Path,
    policy: &SkipPolicy,
) -> Result<Option<image::RgbImage>, DataError> {
    let name = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return policy.bad(&name, format!("cannot read: {e}")),
    };
    match crate::image::decode_image(&bytes, path) {
        Ok(img) => Ok(Some(img)),
        Err(e) => policy.bad(&name, reason_of(&e)),
    }
}

impl IndexedSource for ImageFolderSource {
    fn describe(&self) -> String {
        format!(
            "imagefolder {} ({}): {} pairs",
            self.inner.root.display(),
            self.inner
                .metadata_file
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            self.inner.records.len()
        )
    }

    fn record_count(&self) -> usize {
        self.inner.records.len()
    }

    fn get(&self, _epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        let (path, caption) = self.inner.records.get(index).ok_or_else(|| {
            DataError::invalid(&self.inner.root, format!("record {index} out of range"))
        })?;
        Ok(
            read_image_or_skip(path, &self.inner.policy)?.map(|img| Sample::Pair {
                image: ImageData::Pixels(img),
                caption: caption.clone(),
            }),
        )
    }

    fn skips(&self) -> SkipReport {
        self.inner.policy.report()
    }
}
