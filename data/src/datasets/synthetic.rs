//! `shapes:N` and `digits:N`: N generated image-caption pairs of the synthetic shapes set
//! or the synthetic digits set.

use super::{ImageData, IndexedSource, Sample};
use crate::digits::DigitsGenerator;
use crate::error::DataError;
use crate::shapes::ShapesGenerator;

/// The first `count` samples of a [`ShapesGenerator`]. Never skips anything.
#[derive(Clone, Debug)]
pub struct ShapesSource {
    /// The generator (seed, image size, shapes per image).
    pub generator: ShapesGenerator,
    /// Number of samples per epoch.
    pub count: usize,
}

impl ShapesSource {
    /// `count` samples of `generator`.
    pub fn new(generator: ShapesGenerator, count: usize) -> Self {
        Self { generator, count }
    }
}

impl IndexedSource for ShapesSource {
    fn describe(&self) -> String {
        format!(
            "shapes: {} generated pairs ({}x{} px, up to {} shapes, seed {:#x})",
            self.count,
            self.generator.image_size,
            self.generator.image_size,
            self.generator.max_shapes,
            self.generator.seed
        )
    }

    fn record_count(&self) -> usize {
        self.count
    }

    fn get(&self, _epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        check_index("shapes", index, self.count)?;
        let s = self.generator.sample(index as u64);
        Ok(Some(pixel_pair(s.image, s.caption)))
    }
}

/// The first `count` samples of a [`DigitsGenerator`]. Never skips anything.
#[derive(Clone, Debug)]
pub struct DigitsSource {
    /// The generator (seed, image size).
    pub generator: DigitsGenerator,
    /// Number of samples per epoch.
    pub count: usize,
}

impl DigitsSource {
    /// `count` samples of `generator`.
    pub fn new(generator: DigitsGenerator, count: usize) -> Self {
        Self { generator, count }
    }
}

impl IndexedSource for DigitsSource {
    fn describe(&self) -> String {
        let size = self.generator.image_size;
        format!(
            "digits: {} generated pairs ({size}x{size} px, seed {:#x})",
            self.count, self.generator.seed
        )
    }

    fn record_count(&self) -> usize {
        self.count
    }

    fn get(&self, _epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        check_index("digits", index, self.count)?;
        let s = self.generator.sample(index as u64);
        Ok(Some(pixel_pair(s.image, s.caption)))
    }
}

/// A record number past a generated source's end is an error naming the source.
fn check_index(kind: &str, index: usize, count: usize) -> Result<(), DataError> {
    if index >= count {
        return Err(DataError::Spec {
            spec: format!("{kind}:{count}"),
            message: format!("record {index} out of range"),
        });
    }
    Ok(())
}

fn pixel_pair(image: ::image::RgbImage, caption: String) -> Sample {
    Sample::Pair {
        image: ImageData::Pixels(image),
        caption,
    }
}
