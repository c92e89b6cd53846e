//! The loss-curve PNG (`loss.png` in the run directory), refreshed at each evaluation.
//!
//! Drawn with plotters' bitmap backend without any font (none ships with the project):
//! the y axis is logarithmic with a light line at every decade labelled by a small built-in
//! pixel font (digits and `.` only); the x axis spans step 0 to the last step, with a tick
//! every tenth of the run. Colours (also in the legend bars at the top right, in order):
//! - grey: training total loss, blue: training LM loss, red: training diffusion loss
//!   (all smoothed with an exponential moving average, factor 0.9);
//! - dark blue dots joined: held-out LM NLL; dark red: held-out diffusion loss (mean over
//!   the fixed timesteps).

use std::path::Path;

use plotters::prelude::*;

use crate::metrics::MetricsLine;

const W: i32 = 900;
const H: i32 = 520;
const L: i32 = 60;
const R: i32 = 20;
const T: i32 = 30;
const B: i32 = 30;

const GREY: RGBColor = RGBColor(130, 130, 130);
const BLUE: RGBColor = RGBColor(60, 110, 230);
const RED_: RGBColor = RGBColor(225, 70, 60);
const DBLUE: RGBColor = RGBColor(10, 30, 140);
const DRED: RGBColor = RGBColor(140, 10, 10);

/// 3x5 glyphs for `0-9` and `.` (rows top to bottom, bit 2 = left column).
fn glyph(c: char) -> [u8; 5] {
    match c {
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
        '.' => [0, 0, 0, 0, 2],
        _ => [0; 5],
    }
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
                        [(px, py), (px + scale - 1, py + scale - 1)],
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

/// One curve of [`plot_series`]: `(step, value)` points, colour, and whether the points
/// are drawn as dots (evaluations) besides the line.
pub type Series = (Vec<(u64, f64)>, RGBColor, bool);

/// Exponential moving average (factor 0.9) of a training curve, non-finite points dropped.
pub fn smooth(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    ema(points)
}

/// Draws the curves of `lines` into `path` (PNG).
pub fn plot_losses(lines: &[MetricsLine], path: &Path) -> anyhow::Result<()> {
    let (mut total, mut lm, mut diff, mut elm, mut ediff) =
        (vec![], vec![], vec![], vec![], vec![]);
    for l in lines {
        match l {
            MetricsLine::Train(m) if !m.skipped_this => {
                total.push((m.step, m.total));
                lm.push((m.step, m.lm));
                diff.push((m.step, m.diffusion));
            }
            MetricsLine::Eval(e) => {
                elm.push((e.step, e.lm_nll));
                if !e.diffusion.is_empty() {
                    let mean =
                        e.diffusion.iter().map(|(_, v)| v).sum::<f64>() / e.diffusion.len() as f64;
                    ediff.push((e.step, mean));
                }
            }
            _ => {}
        }
    }
    let series: Vec<Series> = vec![
        (ema(&total), GREY, false),
        (ema(&lm), BLUE, false),
        (ema(&diff), RED_, false),
        (elm, DBLUE, true),
        (ediff, DRED, true),
    ];
    plot_series(&series, path)
}

/// Draws `series` on one log-scale chart into `path` (PNG), with a legend bar per series
/// (in order) at the top right. The layout of [`plot_losses`], for any run's curves.
pub fn plot_series(series: &[Series], path: &Path) -> anyhow::Result<()> {
    let all: Vec<(u64, f64)> = series
        .iter()
        .flat_map(|(s, _, _)| s.iter().copied())
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .collect();
    let root = BitMapBackend::new(path, (W as u32, H as u32)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
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
    for (i, (pts, color, dots)) in series.iter().enumerate() {
        let path: Vec<(i32, i32)> = pts
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
        // Legend bar.
        let lx = W - R - series.len() as i32 * 34 + i as i32 * 34;
        let _ = root.draw(&Rectangle::new(
            [(lx, T - 18), (lx + 28, T - 8)],
            color.filled(),
        ));
    }
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}
