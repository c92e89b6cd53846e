//! `shapes:N`: N generated image-caption pairs of the synthetic shapes set.

use super::{ImageData, IndexedSource, Sample};
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
        if index >= self.count {
            return Err(DataError::Spec {
                spec: format!("shapes:{}", self.count),
                message: format!("record {index} out of range"),
            });
        }
        let s = self.generator.sample(index as u64);
        Ok(Some(Sample::Pair {
            image: ImageData::Pixels(s.image),
            caption: s.caption,
        }))
    }
}
