//! The image-to-text grid: each image with its generated caption under it, drawn with a
//! small built-in bitmap font (no system fonts), words that are not in the reference
//! caption in red.

use image::imageops::{resize, FilterType};
use image::{Rgb, RgbImage};
use transfusion_data::image::image_grid;

/// Glyph cell: 5 x 7 pixels plus one pixel of spacing each way.
const GLYPH_W: u32 = 5;
const GLYPH_H: u32 = 7;
const ADVANCE_X: u32 = GLYPH_W + 1;
const ADVANCE_Y: u32 = GLYPH_H + 2;

/// Colour of the words found in the reference caption.
pub const RIGHT_WORD: Rgb<u8> = Rgb([210, 210, 210]);
/// Colour of the words that are not in the reference caption.
pub const WRONG_WORD: Rgb<u8> = Rgb([255, 70, 70]);

/// The glyphs, row by row from the top, bit 4 the leftmost pixel. Other characters are
/// drawn as `?` (upper case as lower case).
const FONT: [(char, [u8; 7]); 31] = [
    (
        'a',
        [
            0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111,
        ],
    ),
    (
        'b',
        [
            0b10000, 0b10000, 0b11110, 0b10001, 0b10001, 0b10001, 0b11110,
        ],
    ),
    (
        'c',
        [
            0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110,
        ],
    ),
    (
        'd',
        [
            0b00001, 0b00001, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111,
        ],
    ),
    (
        'e',
        [
            0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110,
        ],
    ),
    (
        'f',
        [
            0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000,
        ],
    ),
    (
        'g',
        [
            0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110,
        ],
    ),
    (
        'h',
        [
            0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001,
        ],
    ),
    (
        'i',
        [
            0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
    ),
    (
        'j',
        [
            0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b10010, 0b01100,
        ],
    ),
    (
        'k',
        [
            0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010,
        ],
    ),
    (
        'l',
        [
            0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
    ),
    (
        'm',
        [
            0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001,
        ],
    ),
    (
        'n',
        [
            0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001,
        ],
    ),
    (
        'o',
        [
            0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
    ),
    (
        'p',
        [
            0b00000, 0b00000, 0b11110, 0b10001, 0b11110, 0b10000, 0b10000,
        ],
    ),
    (
        'q',
        [
            0b00000, 0b00000, 0b01111, 0b10001, 0b01111, 0b00001, 0b00001,
        ],
    ),
    (
        'r',
        [
            0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000,
        ],
    ),
    (
        's',
        [
            0b00000, 0b00000, 0b01111, 0b10000, 0b01110, 0b00001, 0b11110,
        ],
    ),
    (
        't',
        [
            0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110,
        ],
    ),
    (
        'u',
        [
            0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101,
        ],
    ),
    (
        'v',
        [
            0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100,
        ],
    ),
    (
        'w',
        [
            0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010,
        ],
    ),
    (
        'x',
        [
            0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001,
        ],
    ),
    (
        'y',
        [
            0b00000, 0b00000, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110,
        ],
    ),
    (
        'z',
        [
            0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111,
        ],
    ),
    (
        '?',
        [
            0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100,
        ],
    ),
    (
        '.',
        [
            0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100,
        ],
    ),
    (
        ',',
        [
            0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000,
        ],
    ),
    (
        '-',
        [
            0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000,
        ],
    ),
    (
        '\'',
        [
            0b00100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000,
        ],
    ),
];

fn glyph(c: char) -> [u8; 7] {
    let c = c.to_ascii_lowercase();
    let find = |c| FONT.iter().find(|(g, _)| *g == c).map(|(_, rows)| *rows);
    find(c).or_else(|| find('?')).unwrap_or_default()
}

/// Draws `text` with its top-left corner at `(x, y)`; pixels outside the image are skipped.
fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        let x0 = x + i as u32 * ADVANCE_X;
        for (dy, bits) in rows.iter().enumerate() {
            for dx in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - dx)) != 0 {
                    let (px, py) = (x0 + dx, y + dy as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, color);
                    }
                }
            }
        }
    }
}

/// Which words of `caption` are wrong: not found in `reference` (each reference word
/// matches once), so a wrong attribute word is marked wherever it stands.
pub fn wrong_words(caption: &str, reference: &str) -> Vec<bool> {
    let mut left: Vec<&str> = reference.split_whitespace().collect();
    caption
        .split_whitespace()
        .map(
            |w| match left.iter().position(|r| r.eq_ignore_ascii_case(w)) {
                Some(i) => {
                    left.swap_remove(i);
                    false
                }
                None => true,
            },
        )
        .collect()
}

/// Greedy word wrap into lines of at most `chars` characters (a longer word is cut).
fn wrap(words: &[&str], chars: usize) -> Vec<Vec<usize>> {
    let mut lines: Vec<Vec<usize>> = Vec::new();
    let mut width = 0;
    for (i, w) in words.iter().enumerate() {
        let len = w.chars().count().min(chars);
        match lines.last_mut() {
            Some(line) if width + 1 + len <= chars => {
                line.push(i);
                width += 1 + len;
            }
            _ => {
                lines.push(vec![i]);
                width = len;
            }
        }
    }
    lines
}

/// One tile: the image scaled by `scale` (nearest neighbour) above its caption in
/// `lines` lines, wrong words in [`WRONG_WORD`].
fn tile(img: &RgbImage, caption: &str, reference: &str, scale: u32, lines: usize) -> RgbImage {
    let (w, h) = (img.width() * scale, img.height() * scale);
    let mut out = RgbImage::new(w, h + 2 + lines as u32 * ADVANCE_Y);
    image::imageops::replace(&mut out, &resize(img, w, h, FilterType::Nearest), 0, 0);
    let words: Vec<&str> = caption.split_whitespace().collect();
    let wrong = wrong_words(caption, reference);
    let chars = ((w + 1) / ADVANCE_X).max(1) as usize;
    for (row, line) in wrap(&words, chars).iter().take(lines).enumerate() {
        let mut x = 0;
        for &i in line {
            let word: String = words[i].chars().take(chars).collect();
            let color = if wrong[i] { WRONG_WORD } else { RIGHT_WORD };
            draw_text(&mut out, &word, x, h + 2 + row as u32 * ADVANCE_Y, color);
            x += (word.chars().count() as u32 + 1) * ADVANCE_X;
        }
    }
    out
}

/// The grid of `images` (row-major, `cols` per row), each scaled by `scale` above its
/// generated caption; words not in the matching reference caption are red.
pub fn captioned_grid(
    images: &[RgbImage],
    captions: &[String],
    references: &[String],
    cols: usize,
    scale: u32,
) -> RgbImage {
    let lines = 4;
    let tiles: Vec<RgbImage> = images
        .iter()
        .zip(captions)
        .zip(references)
        .map(|((img, c), r)| tile(img, c, r, scale, lines))
        .collect();
    image_grid(&tiles, cols, 2)
}
