//! Data source specifications: `KIND:LOCATION[@WEIGHT]`, the same spelling on the command
//! line and in a TOML config, and opening them as [`SampleSource`]s.
//!
//! | spec                                   | what                                      |
//! |----------------------------------------|-------------------------------------------|
//! | `text:corpus/` / `text:wiki.jsonl`     | `.txt` / `.jsonl` documents               |
//! | `imagefolder:pets/`                    | folder with `metadata.jsonl` or `captions.jsonl` |
//! | `coco:train2017,captions_train2017.json` | COCO images folder + captions file      |
//! | `wds:shards/{0000..0099}.tar`          | WebDataset tar shards (brace expansion)   |
//! | `shapes:10000`                         | 10000 synthetic shapes pairs              |
//! | `digits:10000`                         | 10000 synthetic digit pairs               |
//! | `latents:cache/`                       | a latent cache written by `cache_latents` |
//!
//! `@WEIGHT` (a positive number, default 1) is the source's share in a mixture.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::datasets::coco::{CocoCaptions, CocoSource};
use crate::datasets::imagefolder::ImageFolderSource;
use crate::datasets::synthetic::{DigitsSource, ShapesSource};
use crate::datasets::text::{TextSource, TextSplit};
use crate::datasets::wds::WdsSource;
use crate::datasets::SampleSource;
use crate::error::DataError;
use crate::latent_cache::LatentCacheSource;
use crate::synthetic::digits::DigitsGenerator;
use crate::synthetic::shapes::ShapesGenerator;

/// The format of a data source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// `.txt` / `.jsonl` text documents.
    Text,
    /// An image folder with `metadata.jsonl` or `captions.jsonl`.
    ImageFolder,
    /// MS-COCO captions: `IMAGES_DIR,ANNOTATIONS.json`.
    Coco,
    /// WebDataset tar shards.
    Wds,
    /// `N` synthetic shapes pairs.
    Shapes,
    /// `N` synthetic digit pairs (the fine-distinction set).
    Digits,
    /// A latent cache directory.
    Latents,
}

impl SourceKind {
    /// Every kind, in the order of the docs.
    pub const ALL: [SourceKind; 7] = [
        SourceKind::Text,
        SourceKind::ImageFolder,
        SourceKind::Coco,
        SourceKind::Wds,
        SourceKind::Shapes,
        SourceKind::Digits,
        SourceKind::Latents,
    ];

    /// The spelling in a spec.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Text => "text",
            SourceKind::ImageFolder => "imagefolder",
            SourceKind::Coco => "coco",
            SourceKind::Wds => "wds",
            SourceKind::Shapes => "shapes",
            SourceKind::Digits => "digits",
            SourceKind::Latents => "latents",
        }
    }

    /// Whether the source is generated (`shapes`, `digits`): its held-out split is a
    /// different seed of the same generator, never a record trained on.
    pub fn is_generated(self) -> bool {
        matches!(self, SourceKind::Shapes | SourceKind::Digits)
    }
}

/// One parsed `KIND:LOCATION[@WEIGHT]`. Serializes as that string.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceSpec {
    /// The format.
    pub kind: SourceKind,
    /// Everything between `KIND:` and `@WEIGHT` (a path, a pattern, a count).
    pub location: String,
    /// Relative share in a mixture (> 0; normalized over the mixture).
    pub weight: f64,
}

/// Parses `KIND:LOCATION[@WEIGHT]` (see the module docs). The weight is the text after
/// the last `@` when that text contains no `/` (so `@` inside a path still works).
pub fn parse_source_spec(spec: &str) -> Result<SourceSpec, DataError> {
    let err = |message: String| DataError::Spec {
        spec: spec.to_string(),
        message,
    };
    let kinds = || SourceKind::ALL.map(SourceKind::name).join(", ");
    let Some((kind, rest)) = spec.trim().split_once(':') else {
        return Err(err(format!(
            "expected KIND:LOCATION[@WEIGHT] with KIND one of {}",
            kinds()
        )));
    };
    let kind = SourceKind::ALL
        .into_iter()
        .find(|k| k.name().eq_ignore_ascii_case(kind.trim()))
        .ok_or_else(|| {
            err(format!(
                "unknown kind `{kind}` (expected one of {})",
                kinds()
            ))
        })?;
    let (location, weight) = match rest.rsplit_once('@') {
        Some((loc, w)) if !w.contains('/') && !w.contains('\\') => {
            let weight: f64 = w
                .trim()
                .parse()
                .map_err(|_| err(format!("weight `{w}` is not a number")))?;
            (loc, weight)
        }
        _ => (rest, 1.0),
    };
    if !(weight.is_finite() && weight > 0.0) {
        return Err(err(format!(
            "weight must be a positive number, got {weight}"
        )));
    }
    let location = location.trim().to_string();
    if location.is_empty() {
        return Err(err("empty location".into()));
    }
    match kind {
        SourceKind::Shapes | SourceKind::Digits => {
            let name = kind.name();
            let n: usize = location
                .parse()
                .map_err(|_| err(format!("`{name}:N` needs a sample count, got `{location}`")))?;
            if n == 0 {
                return Err(err(format!("`{name}:N` needs N >= 1")));
            }
        }
        SourceKind::Coco => {
            let ok = location
                .rsplit_once(',')
                .is_some_and(|(a, b)| !a.trim().is_empty() && !b.trim().is_empty());
            if !ok {
                return Err(err("expected `coco:IMAGES_DIR,ANNOTATIONS.json`".into()));
            }
        }
        _ => {}
    }
    Ok(SourceSpec {
        kind,
        location,
        weight,
    })
}

impl FromStr for SourceSpec {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_source_spec(s)
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.location)?;
        if self.weight != 1.0 {
            write!(f, "@{}", self.weight)?;
        }
        Ok(())
    }
}

impl Serialize for SourceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SourceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_source_spec(&s).map_err(serde::de::Error::custom)
    }
}

/// How sources are opened: the knobs that are not part of a spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceOptions {
    /// Bad records (corrupt image, invalid JSON line...) are errors instead of skipped.
    pub strict: bool,
    /// How `.txt` files become documents.
    pub text_split: TextSplit,
    /// How COCO's captions become pairs.
    pub coco_captions: CocoCaptions,
    /// Seed for per-epoch choices inside sources (COCO caption choice, shard order).
    pub seed: u64,
    /// Shuffle WebDataset shard order per epoch (indexed sources are shuffled by the
    /// mixture's cursors instead).
    pub shuffle: bool,
    /// Image side of generated `shapes` and `digits` pairs, in pixels.
    pub shapes_image_size: u32,
    /// Most shapes per generated image (1 to 9).
    pub shapes_max_shapes: usize,
    /// Seed of the shapes and digits generators (the split's).
    pub shapes_seed: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            strict: false,
            text_split: TextSplit::File,
            coco_captions: CocoCaptions::AllPairs,
            seed: 0,
            shuffle: true,
            shapes_image_size: 32,
            shapes_max_shapes: 1,
            shapes_seed: ShapesGenerator::TRAIN_SEED,
        }
    }
}

/// Opens the source a spec names.
pub fn open_source(
    spec: &SourceSpec,
    opts: &SourceOptions,
) -> Result<Box<dyn SampleSource>, DataError> {
    let loc = spec.location.as_str();
    Ok(match spec.kind {
        SourceKind::Text => Box::new(TextSource::open(
            Path::new(loc),
            opts.text_split,
            opts.strict,
        )?),
        SourceKind::ImageFolder => Box::new(ImageFolderSource::open(Path::new(loc), opts.strict)?),
        SourceKind::Coco => {
            let (images, ann) = loc
                .rsplit_once(',')
                .expect("parse_source_spec checked the comma");
            Box::new(CocoSource::open(
                Path::new(images.trim()),
                Path::new(ann.trim()),
                opts.coco_captions,
                opts.seed,
                opts.strict,
            )?)
        }
        SourceKind::Wds => Box::new(WdsSource::open(loc, opts.shuffle, opts.seed, opts.strict)?),
        SourceKind::Shapes | SourceKind::Digits => {
            let n: usize = loc.parse().map_err(|_| DataError::Spec {
                spec: spec.to_string(),
                message: format!("`{}:N` needs a sample count", spec.kind.name()),
            })?;
            if spec.kind == SourceKind::Digits {
                let generator =
                    DigitsGenerator::new(opts.shapes_seed).with_image_size(opts.shapes_image_size);
                return Ok(Box::new(DigitsSource::new(generator, n)));
            }
            let generator = ShapesGenerator::new(opts.shapes_seed)
                .with_image_size(opts.shapes_image_size)
                .with_max_shapes(opts.shapes_max_shapes);
            Box::new(ShapesSource::new(generator, n))
        }
        SourceKind::Latents => Box::new(LatentCacheSource::open(Path::new(loc))?),
    })
}
