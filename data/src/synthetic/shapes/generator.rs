//! [`ShapesGenerator`]: the shapes set's samples, each regenerated from `(seed, index)`.

use ::image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{caption, render, Color, Column, Row, Shape, ShapeAttributes, Size};
use crate::rng::Rng64;

/// One generated image with its attributes and caption.
#[derive(Clone, Debug)]
pub struct ShapeSample {
    /// The rendered image.
    pub image: RgbImage,
    /// The shapes in it, in grid order.
    pub attributes: Vec<ShapeAttributes>,
    /// The caption ([`caption`] of `attributes`).
    pub caption: String,
}

/// Deterministic, index-addressable generator of shapes samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapesGenerator {
    /// Seed of the split: samples of different seeds are independent.
    pub seed: u64,
    /// Image side in pixels (at least 24 for [`analyze`] to read images back reliably).
    pub image_size: u32,
    /// Most shapes per image (1 to 9): each image gets between 1 and `max_shapes` shapes,
    /// uniformly, in distinct grid cells.
    pub max_shapes: usize,
}

impl Default for ShapesGenerator {
    fn default() -> Self {
        Self::train()
    }
}

impl ShapesGenerator {
    /// Seed of the training split.
    pub const TRAIN_SEED: u64 = 0x5EED_7A1E;
    /// Seed of the held-out (evaluation) split.
    pub const HELD_OUT_SEED: u64 = 0x0E7A_1ED5;

    /// A generator with the given seed, 32x32 images and one shape per image.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            image_size: 32,
            max_shapes: 1,
        }
    }

    /// The training split: [`Self::TRAIN_SEED`], 32x32, one shape.
    pub fn train() -> Self {
        Self::new(Self::TRAIN_SEED)
    }

    /// The held-out split: [`Self::HELD_OUT_SEED`], 32x32, one shape.
    pub fn held_out() -> Self {
        Self::new(Self::HELD_OUT_SEED)
    }

    /// Sets the image side in pixels.
    pub fn with_image_size(mut self, image_size: u32) -> Self {
        self.image_size = image_size;
        self
    }

    /// Sets the most shapes per image (clamped to 1..=9 when sampling).
    pub fn with_max_shapes(mut self, max_shapes: usize) -> Self {
        self.max_shapes = max_shapes;
        self
    }

    /// The attributes of sample `index`, in grid order, without rendering.
    pub fn attributes(&self, index: u64) -> Vec<ShapeAttributes> {
        let mut rng = sample_rng(self.seed, index);
        let max = self.max_shapes.clamp(1, 9) as u64;
        let count = 1 + rng.below_widening(max) as usize;
        let mut free: Vec<usize> = (0..9).collect();
        let mut attrs = Vec::with_capacity(count);
        for _ in 0..count {
            let cell = free.swap_remove(rng.below_widening(free.len() as u64) as usize);
            attrs.push(ShapeAttributes {
                shape: Shape::ALL[rng.below_widening(Shape::ALL.len() as u64) as usize],
                color: Color::ALL[rng.below_widening(Color::ALL.len() as u64) as usize],
                position: (Column::ALL[cell % 3], Row::ALL[cell / 3]),
                size: Size::ALL[rng.below_widening(Size::ALL.len() as u64) as usize],
            });
        }
        attrs.sort_by_key(ShapeAttributes::cell);
        attrs
    }

    /// Sample `index`: image, attributes and caption.
    pub fn sample(&self, index: u64) -> ShapeSample {
        let attributes = self.attributes(index);
        ShapeSample {
            image: render(&attributes, self.image_size),
            caption: caption(&attributes),
            attributes,
        }
    }
}

/// The random stream of sample `(seed, index)`: SplitMix64 seeded from both, fixed
/// forever so samples never change between builds.
fn sample_rng(seed: u64, index: u64) -> Rng64 {
    let mixed = Rng64::new(seed ^ 0x243F_6A88_85A3_08D3).next_u64();
    Rng64::new(mixed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
