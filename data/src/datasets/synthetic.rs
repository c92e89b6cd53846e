//! `shapes:N` and `digits:N`: N generated image-caption pairs of the synthetic shapes set
//! or the synthetic digits set.

use ::image::RgbImage;

use super::{ImageData, IndexedSource, Sample};
use crate::error::DataError;
use crate::synthetic::digits::DigitsGenerator;
use crate::synthetic::shapes::ShapesGenerator;

/// An index-addressable generator of image-caption pairs.
pub trait PairGenerator: Clone + Send + Sync + 'static {
    /// The spec kind (`shapes`, `digits`), for messages.
    const KIND: &'static str;
    /// One line for the console: what the generator draws.
    fn describe(&self) -> String;
    /// Pair `index`: the image and its caption.
    fn pair(&self, index: u64) -> (RgbImage, String);
}

impl PairGenerator for ShapesGenerator {
    const KIND: &'static str = "shapes";
    fn describe(&self) -> String {
        format!(
            "{0}x{0} px, up to {1} shapes, seed {2:#x}",
            self.image_size, self.max_shapes, self.seed
        )
    }
    fn pair(&self, index: u64) -> (RgbImage, String) {
        let s = self.sample(index);
        (s.image, s.caption)
    }
}

impl PairGenerator for DigitsGenerator {
    const KIND: &'static str = "digits";
    fn describe(&self) -> String {
        format!("{0}x{0} px, seed {1:#x}", self.image_size, self.seed)
    }
    fn pair(&self, index: u64) -> (RgbImage, String) {
        let s = self.sample(index);
        (s.image, s.caption)
    }
}

/// The first `count` pairs of a generator. Never skips anything.
#[derive(Clone, Debug)]
pub struct GeneratedSource<G> {
    /// The generator (seed, image size, ...).
    pub generator: G,
    /// Number of samples per epoch.
    pub count: usize,
}

/// `shapes:N`.
pub type ShapesSource = GeneratedSource<ShapesGenerator>;
/// `digits:N`.
pub type DigitsSource = GeneratedSource<DigitsGenerator>;

impl<G> GeneratedSource<G> {
    /// `count` samples of `generator`.
    pub fn new(generator: G, count: usize) -> Self {
        Self { generator, count }
    }
}

impl<G: PairGenerator> IndexedSource for GeneratedSource<G> {
    fn describe(&self) -> String {
        format!(
            "{}: {} generated pairs ({})",
            G::KIND,
            self.count,
            self.generator.describe()
        )
    }

    fn record_count(&self) -> usize {
        self.count
    }

    fn get(&self, _epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        if index >= self.count {
            return Err(DataError::Spec {
                spec: format!("{}:{}", G::KIND, self.count),
                message: format!("record {index} out of range"),
            });
        }
        let (image, caption) = self.generator.pair(index as u64);
        Ok(Some(Sample::Pair {
            image: ImageData::Pixels(image),
            caption,
        }))
    }
}
