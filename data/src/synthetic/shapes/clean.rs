//! How clean a generated single-shape image is, beside whether its attributes are right: a
//! drawing can be the right colour in the right cell and still be a speckled, ragged blob.
//!
//! - **background**: the share of background pixels that are background-coloured. The shape
//!   is the largest 8-connected group of lit pixels (brightest channel at least
//!   [`FOREGROUND_MIN`]), grown by one pixel for its edge; every other pixel is background,
//!   and is clean when its brightest channel is below [`CLEAN_BACKGROUND_MAX`].
//! - **one component**: the lit pixels form exactly one 8-connected group (no specks, no
//!   second fragment).
//!
//! A rendering of the dataset scores 100% and one component.

use ::image::RgbImage;
use serde::{Deserialize, Serialize};

use super::analyze::{label_components, FOREGROUND_MIN};

/// Background pixels whose brightest channel is below this count as background-coloured
/// (the rendered background is black; a dim haze up to this level is not counted).
pub const CLEAN_BACKGROUND_MAX: u8 = 40;

/// The cleanliness of one image (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cleanliness {
    /// Share of background pixels that are background-coloured, in [0, 1].
    pub background: f64,
    /// Number of 8-connected groups of lit pixels.
    pub components: usize,
}

impl Cleanliness {
    /// Whether the lit pixels form exactly one group.
    pub fn one_component(&self) -> bool {
        self.components == 1
    }
}

/// Measures an image; see the module docs.
pub fn cleanliness(img: &RgbImage) -> Cleanliness {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let brightest: Vec<u8> = img
        .pixels()
        .map(|p| p.0.iter().copied().max().unwrap_or(0))
        .collect();
    let lit: Vec<Option<()>> = brightest
        .iter()
        .map(|&b| (b >= FOREGROUND_MIN).then_some(()))
        .collect();
    let groups = label_components(&lit, w, h);
    let largest = groups.iter().map(|(_, g)| g).max_by_key(|g| g.len());
    // [h * w]: the shape grown by one pixel (8-neighbourhood), for its soft edge.
    let mut shape = vec![false; w * h];
    for &k in largest.into_iter().flatten() {
        let (x, y) = (k % w, k / w);
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                shape[ny * w + nx] = true;
            }
        }
    }
    let (mut background, mut clean) = (0usize, 0usize);
    for (k, &b) in brightest.iter().enumerate() {
        if !shape[k] {
            background += 1;
            clean += usize::from(b < CLEAN_BACKGROUND_MAX);
        }
    }
    Cleanliness {
        background: if background == 0 {
            1.0
        } else {
            clean as f64 / background as f64
        },
        components: groups.len(),
    }
}
