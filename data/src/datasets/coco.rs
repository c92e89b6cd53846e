//! MS-COCO captions: an images folder plus a `captions_*.json` annotation file
//! (`images: [{id, file_name}]`, `annotations: [{image_id, caption}]`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::imagefolder::read_image_or_skip;
use super::{is_safe_relative, ImageData, IndexedSource, Sample};
use super::{SkipPolicy, SkipReport};
use crate::error::DataError;
use crate::rng::Rng64;

/// How COCO's several captions per image become samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CocoCaptions {
    /// Every caption is its own pair (an image appears about 5 times per epoch).
    #[default]
    AllPairs,
    /// One record per image; each epoch picks one of its captions at random (seeded).
    OnePerEpoch,
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: u64,
    caption: String,
}

#[derive(Debug)]
struct Inner {
    images_dir: PathBuf,
    annotations: PathBuf,
    /// Image paths, in the annotation file's order (only images with captions).
    images: Vec<PathBuf>,
    /// Captions of each image, in annotation order.
    captions: Vec<Vec<String>>,
    /// AllPairs: (image, caption) per record. OnePerEpoch: empty (a record is an image).
    pairs: Vec<(u32, u32)>,
    mode: CocoCaptions,
    seed: u64,
    policy: SkipPolicy,
}

/// MS-COCO captions as image-caption pairs.
#[derive(Clone, Debug)]
pub struct CocoSource {
    inner: Arc<Inner>,
}

impl CocoSource {
    /// Reads `annotations` (a COCO captions JSON file) for images under `images_dir`.
    /// Images listed but missing on disk are skipped and counted (strict: an error).
    pub fn open(
        images_dir: &Path,
        annotations: &Path,
        mode: CocoCaptions,
        seed: u64,
        strict: bool,
    ) -> Result<Self, DataError> {
        let policy = SkipPolicy::new(strict);
        if !images_dir.is_dir() {
            return Err(DataError::invalid(
                images_dir,
                "COCO images folder does not exist",
            ));
        }
        let text =
            std::fs::read_to_string(annotations).map_err(|e| DataError::io(annotations, e))?;
        let file: CocoFile = serde_json::from_str(&text).map_err(|e| {
            DataError::invalid(annotations, format!("not a COCO captions file: {e}"))
        })?;
        let (listed_images, listed_captions) = (file.images.len(), file.annotations.len());
        let mut caps: HashMap<u64, Vec<String>> = HashMap::new();
        for a in file.annotations {
            caps.entry(a.image_id)
                .or_default()
                .push(a.caption.trim().to_string());
        }
        let mut images = Vec::new();
        let mut captions = Vec::new();
        let mut uncaptioned = 0usize;
        for img in file.images {
            let Some(c) = caps.remove(&img.id) else {
                uncaptioned += 1;
                continue;
            };
            if !is_safe_relative(&img.file_name) {
                policy.bad::<()>(&img.file_name, "unsafe image path (absolute or `..`)")?;
                continue;
            }
            let path = images_dir.join(&img.file_name);
            if !path.is_file() {
                policy.bad::<()>(&path.display().to_string(), "missing image file")?;
                continue;
            }
            images.push(path);
            captions.push(c);
        }
        if images.is_empty() {
            // Say why: every reason an image was left out, with examples.
            let mut why = format!(
                "no captioned images found: {listed_images} images and {listed_captions} \
                 captions listed; {uncaptioned} images have no caption, {} captions name no \
                 listed image",
                caps.values().map(Vec::len).sum::<usize>()
            );
            let skipped = policy.report();
            if skipped.count > 0 {
                why.push_str(&format!("; in {}: {skipped}", images_dir.display()));
            }
            return Err(DataError::invalid(annotations, why));
        }
        let pairs = match mode {
            CocoCaptions::AllPairs => captions
                .iter()
                .enumerate()
                .flat_map(|(i, c)| (0..c.len() as u32).map(move |j| (i as u32, j)))
                .collect(),
            CocoCaptions::OnePerEpoch => Vec::new(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                images_dir: images_dir.to_path_buf(),
                annotations: annotations.to_path_buf(),
                images,
                captions,
                pairs,
                mode,
                seed,
                policy,
            }),
        })
    }
}

impl IndexedSource for CocoSource {
    fn describe(&self) -> String {
        let n_caps: usize = self.inner.captions.iter().map(Vec::len).sum();
        let mode = match self.inner.mode {
            CocoCaptions::AllPairs => "every caption a pair",
            CocoCaptions::OnePerEpoch => "one caption per image per epoch",
        };
        format!(
            "coco {} + {}: {} images, {n_caps} captions ({mode})",
            self.inner.images_dir.display(),
            self.inner.annotations.display(),
            self.inner.images.len()
        )
    }

    fn record_count(&self) -> usize {
        match self.inner.mode {
            CocoCaptions::AllPairs => self.inner.pairs.len(),
            CocoCaptions::OnePerEpoch => self.inner.images.len(),
        }
    }

    fn get(&self, epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        let inner = &self.inner;
        let out_of_range =
            || DataError::invalid(&inner.annotations, format!("record {index} out of range"));
        let (img, cap) = match inner.mode {
            CocoCaptions::AllPairs => {
                let &(i, j) = inner.pairs.get(index).ok_or_else(out_of_range)?;
                (i as usize, j as usize)
            }
            CocoCaptions::OnePerEpoch => {
                let caps = inner.captions.get(index).ok_or_else(out_of_range)?;
                let mut rng = Rng64::from_parts(&[inner.seed, epoch, index as u64, 0xC0C0]);
                (index, rng.below(caps.len() as u64) as usize)
            }
        };
        let caption = inner.captions[img][cap].clone();
        Ok(
            read_image_or_skip(&inner.images[img], &inner.policy)?.map(|im| Sample::Pair {
                image: ImageData::Pixels(im),
                caption,
            }),
        )
    }

    fn skips(&self) -> SkipReport {
        self.inner.policy.report()
    }
}
