//! The loss-curve PNG (`loss.png` in the run directory), refreshed at each evaluation:
//! [`plot_series`] draws any task's curves (each task says which in its own `plot`).
//!
//! Drawn with plotters' bitmap backend and a built-in 3x5 pixel font (no font file ships
//! with the project, and none is needed at run time): the y axis is logarithmic with a
//! light line at every decade, labelled; the x axis spans step 0 to the last step, with a
//! tick every tenth of the run. A legend at the top left names every curve:
//! - grey: training total loss, blue: training LM loss, red: training diffusion loss
//!   (all smoothed with an exponential moving average, factor 0.9);
//! - dark blue dots joined: held-out LM NLL; dark red: held-out diffusion loss (mean over
//!   the fixed timesteps).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

const W: i32 = 900;
const H: i32 = 520;
const L: i32 = 60;
const R: i32 = 20;
const T: i32 = 30;
const B: i32 = 30;

/// A training total loss.
pub const GREY: RGBColor = RGBColor(130, 130, 130);
/// A training LM loss.
pub const BLUE: RGBColor = RGBColor(60, 110, 230);
/// A training image loss.
pub const RED_: RGBColor = RGBColor(225, 70, 60);
/// An evaluation's LM figure.
pub const DBLUE: RGBColor = RGBColor(10, 30, 140);
/// An evaluation's image figure.
pub const DRED: RGBColor = RGBColor(140, 10, 10);

/// 3x5 glyphs for digits, upper-case letters and a little punctuation (rows top to
/// bottom, bit 2 = left column); lower-case letters are drawn upper-case.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '/' => [1, 1, 2, 4, 4],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        _ => [0; 5],
    }
}

/// Top-left corner of the legend's first entry: the colour bar at `x`, the label at
/// `x + 32`; entries are 16 pixels apart.
fn legend_origin(series: &[Series]) -> (i32, i32) {
    let widest = series
        .iter()
        .map(|s| text_width(&s.label, 2))
        .max()
        .unwrap_or(0);
    (W - R - 14 - 32 - widest, T + 12)
}

/// Width in pixels of `text` drawn at `scale`.
fn text_width(text: &str, scale: i32) -> i32 {
    4 * scale * text.chars().count() as i32
}

fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    x: i32,
    y: i32,
    scale: i32,
) {
    let mut cx = x;
    for c in text.chars() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    let px = cx + col * scale;
                    let py = y + row as i32 * scale;
                    let _ = area.draw(&Rectangle::new(
                        [(px, py), (px + scale, py + scale)],
                        BLACK.filled(),
                    ));
                }
            }
        }
        cx += 4 * scale;
    }
}

fn decade_label(k: i32) -> String {
    if k >= 0 {
        format!("{}", 10f64.powi(k) as u64)
    } else {
        format!("{:.*}", (-k) as usize, 10f64.powi(k))
    }
}

fn ema(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut m: Option<f64> = None;
    for &(s, v) in points {
        if !v.is_finite() {
            continue;
        }
        let next = match m {
            Some(prev) => 0.9 * prev + 0.1 * v,
            None => v,
        };
        m = Some(next);
        out.push((s, next));
    }
    out
}

/// One curve of [`plot_series`].
#[derive(Clone, Debug)]
pub struct Series {
    /// `(step, value)` points.
    pub points: Vec<(u64, f64)>,
    /// Line colour.
    pub color: RGBColor,
    /// Whether the points are also drawn as dots (evaluations).
    pub dots: bool,
    /// Legend text.
    pub label: String,
}

impl Series {
    /// A line of `points` named `label`.
    pub fn line(label: &str, points: Vec<(u64, f64)>, color: RGBColor) -> Self {
        Self {
            points,
            color,
            dots: false,
            label: label.into(),
        }
    }

    /// Evaluation points (dots joined by a line) named `label`.
    pub fn dots(label: &str, points: Vec<(u64, f64)>, color: RGBColor) -> Self {
        Self {
            dots: true,
            ..Self::line(label, points, color)
        }
    }
}

/// Exponential moving average (factor 0.9) of a training curve, non-finite points dropped.
pub fn smooth(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    ema(points)
}

/// Draws `series` on one log-scale chart into `path` (PNG), with a legend (colour and
/// label per series, in order) at the top right, for any run's curves.
pub fn plot_series(series: &[Series], path: &Path) -> Result<()> {
    let all: Vec<(u64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .collect();
    let root = BitMapBackend::new(path, (W as u32, H as u32)).into_drawing_area();
    let failed = |e: DrawingAreaErrorKind<_>| TrainError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    root.fill(&WHITE).map_err(failed)?;
    let max_step = all.iter().map(|(s, _)| *s).max().unwrap_or(1).max(1) as f64;
    let (lo, hi) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, v)| {
        (a.min(v.log10()), b.max(v.log10()))
    });
    let (lo, hi) = if all.is_empty() {
        (-1.0, 1.0)
    } else {
        (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
    };
    let px = |s: f64| L + ((s / max_step) * (W - L - R) as f64) as i32;
    let py = |v: f64| {
        let f = (v.max(1e-12).log10() - lo) / (hi - lo);
        H - B - (f * (H - T - B) as f64) as i32
    };
    // Frame, decade lines and labels, x ticks.
    let frame = [(L, T), (W - R, T), (W - R, H - B), (L, H - B), (L, T)];
    let _ = root.draw(&PathElement::new(frame.to_vec(), BLACK));
    for k in lo as i32..=hi as i32 {
        let y = py(10f64.powi(k));
        let _ = root.draw(&PathElement::new(
            vec![(L, y), (W - R, y)],
            RGBColor(215, 215, 215),
        ));
        for m in [2.0, 5.0] {
            let v = m * 10f64.powi(k);
            if v.log10() < hi {
                let y = py(v);
                let _ = root.draw(&PathElement::new(
                    vec![(L, y), (W - R, y)],
                    RGBColor(240, 240, 240),
                ));
            }
        }
        let label = decade_label(k);
        draw_text(&root, &label, L - 6 - 8 * label.len() as i32, y - 5, 2);
    }
    for i in 0..=10 {
        let x = L + i * (W - L - R) / 10;
        let _ = root.draw(&PathElement::new(vec![(x, H - B), (x, H - B + 6)], BLACK));
    }
    draw_text(
        &root,
        &format!("{}", max_step as u64),
        W - R - 60,
        H - B + 10,
        2,
    );
    draw_text(&root, "0", L - 2, H - B + 10, 2);
    draw_text(
        &root,
        "step",
        (L + W - R) / 2 - text_width("step", 2) / 2,
        H - B + 10,
        2,
    );
    draw_text(&root, "loss (log scale)", L, T - 16, 2);
    for s in series {
        let (color, dots) = (&s.color, &s.dots);
        let path: Vec<(i32, i32)> = s
            .points
            .iter()
            .filter(|(_, v)| v.is_finite() && *v > 0.0)
            .map(|&(s, v)| (px(s as f64), py(v)))
            .collect();
        if path.len() > 1 {
            let _ = root.draw(&PathElement::new(path.clone(), color.stroke_width(2)));
        }
        if *dots {
            for &(x, y) in &path {
                let _ = root.draw(&Circle::new((x, y), 3, color.filled()));
            }
        }
    }
    // The legend, over a white box at the top right (where falling curves are lowest).
    let (lx, ly0) = legend_origin(series);
    let _ = root.draw(&Rectangle::new(
        [
            (lx - 8, ly0 - 6),
            (W - R - 6, ly0 + series.len() as i32 * 16 + 2),
        ],
        WHITE.filled(),
    ));
    let _ = root.draw(&Rectangle::new(
        [
            (lx - 8, ly0 - 6),
            (W - R - 6, ly0 + series.len() as i32 * 16 + 2),
        ],
        RGBColor(200, 200, 200),
    ));
    for (i, s) in series.iter().enumerate() {
        let ly = ly0 + i as i32 * 16;
        let _ = root.draw(&Rectangle::new(
            [(lx, ly + 2), (lx + 24, ly + 7)],
            s.color.filled(),
        ));
        draw_text(&root, &s.label, lx + 32, ly, 2);
    }
    root.present().map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_letter_and_digit_has_its_own_glyph() {
        let chars: Vec<char> = ('A'..='Z').chain('0'..='9').collect();
        for (i, a) in chars.iter().enumerate() {
            assert_ne!(glyph(*a), [0; 5], "{a} has no glyph");
            assert_eq!(glyph(a.to_ascii_lowercase()), glyph(*a));
            for b in &chars[i + 1..] {
                assert_ne!(glyph(*a), glyph(*b), "{a} and {b} look the same");
            }
        }
    }

    #[test]
    fn the_legend_shows_each_colour_and_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let pts = |k: f64| (0..50).map(|s| (s, k / (1.0 + s as f64))).collect();
        let series = vec![
            Series::line("first curve", pts(4.0), BLUE),
            Series::dots("second", pts(2.0), DRED),
        ];
        plot_series(&series, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W as u32, H as u32));
        let (lx, ly0) = legend_origin(&series);
        for (i, s) in series.iter().enumerate() {
            let ly = ly0 + i as i32 * 16;
            // The colour bar.
            let p = img.get_pixel((lx + 12) as u32, (ly + 4) as u32).0;
            assert_eq!(p, [s.color.0, s.color.1, s.color.2], "bar of {}", s.label);
            // The label: black pixels in its box, as many columns wide as its text.
            let w = text_width(&s.label, 2);
            let black_cols = (0..w)
                .filter(|dx| {
                    (0..10).any(|dy| {
                        img.get_pixel((lx + 32 + dx) as u32, (ly + dy) as u32).0 == [0, 0, 0]
                    })
                })
                .count() as i32;
            assert!(
                black_cols > w / 2,
                "label {} drew {black_cols} of {w} columns",
                s.label
            );
            // Nothing black right of the label's end, inside the legend box.
            let right = W - R - 8 - (lx + 32);
            assert!((w + 1..right).all(|dx| (0..10).all(|dy| {
                img.get_pixel((lx + 32 + dx) as u32, (ly + dy) as u32).0 != [0, 0, 0]
            })));
        }
    }
}
