//! The synthetic digits set: the fine-distinction captioning benchmark.
//!
//! Each image (default 32x32, grayscale stored as RGB) shows one white digit on black,
//! drawn from a 5x7 bitmap font at 3x or 4x scale (15x21 or 20x28 pixels), centred up to
//! [`JITTER`] pixels each way (like a centred handwritten-digit set). The caption names the digit: `"the digit seven"`. Unlike
//! the shapes set, nothing global (colour, position, size) tells the classes apart: only
//! the outline does (0 vs 8 is one bar, 5 vs 6 one stroke), which is what a model has to
//! see to caption it. Samples are regenerated from `(seed, index)` like the shapes set's.
//!
//! [`classify_digit`] reads a digit back from an image by template matching, so generated
//! images can be scored.

use ::image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::rng::Rng64;

/// The digits' words, index = digit.
pub const DIGIT_WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// Glyph width and height in font pixels.
const GLYPH_W: u32 = 5;
const GLYPH_H: u32 = 7;
/// Scales a glyph is drawn at.
const SCALES: [u32; 2] = [3, 4];
/// Most pixels a digit is moved off the centre, along each axis.
pub const JITTER: u32 = 2;
/// The ink colour (the background is black).
const INK: Rgb<u8> = Rgb([255, 255, 255]);

/// The 5x7 glyphs, row by row from the top, bit 4 the leftmost pixel.
#[rustfmt::skip]
const FONT: [[u8; 7]; 10] = [
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110],
    [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111],
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110],
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010],
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110],
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110],
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000],
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110],
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100],
];

/// Where and how large one digit is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigitPlacement {
    /// The digit, 0 to 9.
    pub digit: u8,
    /// Pixels per font pixel (3 or 4).
    pub scale: u32,
    /// Left column of the glyph's box.
    pub x: u32,
    /// Top row of the glyph's box.
    pub y: u32,
}

/// One generated image with its digit and caption.
#[derive(Clone, Debug)]
pub struct DigitSample {
    /// The rendered image.
    pub image: RgbImage,
    /// What was drawn where.
    pub placement: DigitPlacement,
    /// The caption ([`digit_caption`] of the digit).
    pub caption: String,
}

/// The caption of a digit: `"the digit seven"`.
pub fn digit_caption(digit: u8) -> String {
    format!("the digit {}", DIGIT_WORDS[digit as usize])
}

/// Reads a caption back into a digit: the last word that names one (case-insensitive,
/// a final period ignored), or `None` when no word does.
pub fn parse_digit_caption(text: &str) -> Option<u8> {
    text.trim()
        .trim_end_matches('.')
        .split_whitespace()
        .rev()
        .find_map(|w| DIGIT_WORDS.iter().position(|d| d.eq_ignore_ascii_case(w)))
        .map(|d| d as u8)
}

/// Deterministic, index-addressable generator of digit samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigitsGenerator {
    /// Seed of the split: samples of different seeds are independent.
    pub seed: u64,
    /// Image side in pixels (at least 28, the largest glyph).
    pub image_size: u32,
}

impl DigitsGenerator {
    /// A generator with the given seed and 32x32 images (use the shapes set's split seeds,
    /// `ShapesGenerator::TRAIN_SEED` and `HELD_OUT_SEED`, for the two splits).
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            image_size: 32,
        }
    }

    /// Sets the image side in pixels (clamped to at least 28 when sampling).
    pub fn with_image_size(mut self, image_size: u32) -> Self {
        self.image_size = image_size;
        self
    }

    /// What sample `index` draws, without rendering.
    pub fn placement(&self, index: u64) -> DigitPlacement {
        let mut rng = sample_rng(self.seed, index);
        let size = self.image_size.max(GLYPH_H * SCALES[SCALES.len() - 1]);
        let digit = rng.below_widening(10) as u8;
        let scale = SCALES[rng.below_widening(SCALES.len() as u64) as usize];
        // The centred box's corner, moved by -JITTER..=JITTER (kept inside the image).
        let jittered = |free: u32, rng: &mut Rng64| {
            let shift = rng.below_widening(2 * JITTER as u64 + 1) as u32;
            (free / 2 + shift).saturating_sub(JITTER).min(free)
        };
        let x = jittered(size - GLYPH_W * scale, &mut rng);
        let y = jittered(size - GLYPH_H * scale, &mut rng);
        DigitPlacement { digit, scale, x, y }
    }

    /// Sample `index`: image, placement and caption.
    pub fn sample(&self, index: u64) -> DigitSample {
        let placement = self.placement(index);
        DigitSample {
            image: render_digit(&placement, self.image_size.max(GLYPH_H * 4)),
            caption: digit_caption(placement.digit),
            placement,
        }
    }
}

/// The random stream of sample `(seed, index)` (a different stream from the shapes set's
/// for the same seed).
fn sample_rng(seed: u64, index: u64) -> Rng64 {
    let mixed = Rng64::new(seed ^ 0x9E37_79B9_0D16_1757).next_u64();
    Rng64::new(mixed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Whether pixel `(px, py)` of the image is ink under `p`.
fn inked(p: &DigitPlacement, px: u32, py: u32) -> bool {
    if px < p.x || py < p.y {
        return false;
    }
    let (gx, gy) = ((px - p.x) / p.scale, (py - p.y) / p.scale);
    gx < GLYPH_W && gy < GLYPH_H && (FONT[p.digit as usize][gy as usize] >> (4 - gx)) & 1 == 1
}

/// Renders one digit, white on a black `size` x `size` image.
pub fn render_digit(p: &DigitPlacement, size: u32) -> RgbImage {
    RgbImage::from_fn(size, size, |x, y| {
        if inked(p, x, y) {
            INK
        } else {
            Rgb([0, 0, 0])
        }
    })
}

/// The least overlap ([`DigitMatch::iou`]) at which a generated image counts as showing
/// the digit it matches best: below it the image is noise or a blob, whatever it resembles.
pub const MIN_READ_IOU: f64 = 0.5;

/// A digit read back from an image by [`classify_digit`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DigitMatch {
    /// The best-matching placement.
    pub placement: DigitPlacement,
    /// Intersection over union of the image's lit pixels (mean channel above 127) and
    /// the placement's ink, in `[0, 1]` (1: a clean rendering of it).
    pub iou: f64,
}

impl DigitMatch {
    /// The matched digit when the match is legible (overlap at least [`MIN_READ_IOU`]).
    pub fn legible_digit(&self) -> Option<u8> {
        (self.iou >= MIN_READ_IOU).then_some(self.placement.digit)
    }
}

/// Finds the placement (every digit, scale and position) whose ink overlaps the image's
/// lit pixels best by intersection over union. `None` for an image with no lit pixel.
/// Whether that match is legible is for the caller to judge (see [`MIN_READ_IOU`]).
pub fn classify_digit(image: &RgbImage) -> Option<DigitMatch> {
    let size = image.width().min(image.height());
    let lit: Vec<bool> = image
        .pixels()
        .map(|p| p.0.iter().map(|&c| c as u32).sum::<u32>() > 3 * 127)
        .collect();
    let width = image.width();
    let lit_count = lit.iter().filter(|&&l| l).count();
    if lit_count == 0 {
        return None;
    }
    let mut best: Option<DigitMatch> = None;
    for digit in 0..10u8 {
        for &scale in &SCALES {
            let (w, h) = (GLYPH_W * scale, GLYPH_H * scale);
            if w > size || h > size {
                continue;
            }
            for y in 0..=size - h {
                for x in 0..=size - w {
                    let p = DigitPlacement { digit, scale, x, y };
                    let (mut inter, mut ink) = (0usize, 0usize);
                    for py in y..y + h {
                        for px in x..x + w {
                            if inked(&p, px, py) {
                                ink += 1;
                                inter += lit[(py * width + px) as usize] as usize;
                            }
                        }
                    }
                    let iou = inter as f64 / (ink + lit_count - inter) as f64;
                    if best.is_none_or(|b| iou > b.iou) {
                        best = Some(DigitMatch { placement: p, iou });
                    }
                }
            }
        }
    }
    best
}

/// The digit an image shows: its best match (see [`classify_digit`]) if that overlaps
/// at least [`MIN_READ_IOU`].
pub fn read_digit(image: &RgbImage) -> Option<u8> {
    classify_digit(image).and_then(|m| m.legible_digit())
}
