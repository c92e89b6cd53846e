//! Scoring the demo: per-attribute accuracy of generated images (read back with the shapes
//! analyzer) and of generated captions (parsed back into attributes), and the cleanliness
//! of generated images.

use serde::{Deserialize, Serialize};
use transfusion_data::synthetic::shapes::{
    analyze, parse_caption, score, AttributeScore, Cleanliness, ShapeAttributes,
};

/// Accuracy of one attribute-scored task, in `[0, 1]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttributeAccuracy {
    /// Samples scored.
    pub count: usize,
    /// Colour correct.
    pub color: f64,
    /// Shape correct.
    pub shape: f64,
    /// Grid cell correct.
    pub position: f64,
    /// Size correct.
    pub size: f64,
    /// Every attribute correct.
    pub all: f64,
}

impl AttributeAccuracy {
    /// Averages per-sample scores.
    pub fn from_scores(scores: &[AttributeScore]) -> Self {
        let n = scores.len().max(1) as f64;
        let frac =
            |f: fn(&AttributeScore) -> bool| scores.iter().filter(|s| f(s)).count() as f64 / n;
        Self {
            count: scores.len(),
            color: frac(|s| s.color),
            shape: frac(|s| s.shape),
            position: frac(|s| s.position),
            size: frac(|s| s.size),
            all: frac(|s| s.all),
        }
    }
}

/// Scores generated images against the attributes their prompts asked for.
pub fn score_generated_images(
    expected: &[Vec<ShapeAttributes>],
    images: &[image::RgbImage],
) -> AttributeAccuracy {
    let scores: Vec<AttributeScore> = expected
        .iter()
        .zip(images)
        .map(|(want, img)| score(want, &analyze(img)))
        .collect();
    AttributeAccuracy::from_scores(&scores)
}

/// How clean the generated images are (see `transfusion_data::synthetic::shapes::cleanliness`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CleanlinessSummary {
    /// Images measured.
    pub count: usize,
    /// Mean share of background pixels that are background-coloured.
    pub background: f64,
    /// Share of images whose lit pixels form exactly one connected group.
    pub one_component: f64,
}

/// Summarises the cleanliness of each generated image (`transfusion_data::synthetic::shapes::cleanliness`).
pub fn score_cleanliness(each: &[Cleanliness]) -> CleanlinessSummary {
    let n = each.len().max(1) as f64;
    CleanlinessSummary {
        count: each.len(),
        background: each.iter().map(|c| c.background).sum::<f64>() / n,
        one_component: each.iter().filter(|c| c.one_component()).count() as f64 / n,
    }
}

/// Scores generated captions against the attributes of the images they describe.
///
/// Returns the per-attribute accuracy (an unparseable caption scores 0 on everything) and
/// the exact-match rate (the caption equals the reference caption after trimming).
pub fn score_captions(
    expected: &[Vec<ShapeAttributes>],
    references: &[String],
    captions: &[String],
) -> (AttributeAccuracy, f64) {
    let scores: Vec<AttributeScore> = expected
        .iter()
        .zip(captions)
        .map(|(want, text)| score(want, &parse_caption(text).unwrap_or_default()))
        .collect();
    let exact = references
        .iter()
        .zip(captions)
        .filter(|(r, c)| r.trim() == c.trim())
        .count() as f64
        / captions.len().max(1) as f64;
    (AttributeAccuracy::from_scores(&scores), exact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use transfusion_data::synthetic::shapes::{caption, render, ShapesGenerator};

    #[test]
    fn ground_truth_scores_one_and_wrong_colour_scores_zero_on_colour() {
        let gen = ShapesGenerator::held_out();
        let samples: Vec<_> = (0..50).map(|i| gen.sample(i)).collect();
        let want: Vec<_> = samples.iter().map(|s| s.attributes.clone()).collect();
        let imgs: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
        let acc = score_generated_images(&want, &imgs);
        assert_eq!(
            (acc.color, acc.shape, acc.position, acc.size, acc.all),
            (1.0, 1.0, 1.0, 1.0, 1.0)
        );

        // Re-render every image with a different colour: colour accuracy 0, shape still 1.
        let recoloured: Vec<_> = samples
            .iter()
            .map(|s| {
                let mut a = s.attributes.clone();
                let all = transfusion_data::synthetic::shapes::Color::ALL;
                a[0].color = all[(a[0].color.index() + 1) % all.len()];
                render(&a, s.image.width())
            })
            .collect();
        let acc = score_generated_images(&want, &recoloured);
        assert_eq!(acc.color, 0.0);
        assert_eq!(acc.shape, 1.0);
    }

    #[test]
    fn captions_are_parsed_and_exact_matches_counted() {
        let gen = ShapesGenerator::held_out();
        let samples: Vec<_> = (0..4).map(|i| gen.sample(i)).collect();
        let want: Vec<_> = samples.iter().map(|s| s.attributes.clone()).collect();
        let refs: Vec<_> = samples.iter().map(|s| s.caption.clone()).collect();
        let mut got = refs.clone();
        got[3] = "gibberish".into();
        let (acc, exact) = score_captions(&want, &refs, &got);
        assert_eq!(acc.all, 0.75);
        assert_eq!(exact, 0.75);
        assert_eq!(caption(&want[0]), refs[0]);
    }
}
