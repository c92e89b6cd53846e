//! The synthetic shapes set: the demo's built-in image-caption dataset.
//!
//! Each image (default 32x32) shows one coloured shape (or, with `max_shapes = 2`, two in
//! different grid cells) on a black background. A shape has four attributes: a [`Shape`]
//! (circle, square, triangle), a [`Color`] (six well-separated colours), a position on a
//! 3x3 grid ([`Column`] x [`Row`]) and a [`Size`] (small, large). Everything is generated
//! from `(seed, index)` with a tiny built-in PRNG, so any sample of any split can be
//! regenerated and the output does not change with the `rand` crate's version.
//!
//! Caption grammar (lower case, single spaces, no final period):
//! ```text
//! caption  := shape_phrase (" and " shape_phrase)*
//! shape_phrase := "a " size " " color " " shape " " location
//! location := "in the center"              (middle row, center column)
//!           | "at the " row " " column     (every other cell)
//! ```
//! e.g. "a large red circle at the top left", "a small green square in the center",
//! "a small cyan triangle at the middle left and a large blue square at the bottom center".
//! Shapes are listed in grid order (top row first, left to right).
//!
//! [`analyze`] reads an image back into attributes, so generated images can be scored.

mod analyze;
mod clean;
mod generator;

use std::fmt;

use ::image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

pub use analyze::{analyze, analyze_components, score, AttributeScore, Component};
pub use clean::{cleanliness, Cleanliness, CLEAN_BACKGROUND_MAX};
pub use generator::{ShapeSample, ShapesGenerator};

/// Defines a word-valued attribute enum with `ALL`, `word`, `from_word`, `index` and
/// `Display`.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The caption word.
            pub fn word(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }

            /// Parses a caption word (case-insensitive).
            pub fn from_word(word: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.word().eq_ignore_ascii_case(word))
            }

            /// Position of the value in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }
    };
}

word_enum!(
    /// The kind of shape.
    Shape {
        /// A filled disc.
        Circle => "circle",
        /// A filled axis-aligned square.
        Square => "square",
        /// A filled isosceles triangle, apex up, base at the bottom.
        Triangle => "triangle",
    }
);

word_enum!(
    /// The fill colour of a shape (see [`Color::rgb`]).
    Color {
        /// (230, 40, 40)
        Red => "red",
        /// (40, 200, 60)
        Green => "green",
        /// (40, 90, 240)
        Blue => "blue",
        /// (240, 220, 40)
        Yellow => "yellow",
        /// (200, 50, 220)
        Purple => "purple",
        /// (40, 210, 220)
        Cyan => "cyan",
    }
);

word_enum!(
    /// Horizontal grid position.
    Column {
        /// Left third.
        Left => "left",
        /// Middle third.
        Center => "center",
        /// Right third.
        Right => "right",
    }
);

word_enum!(
    /// Vertical grid position.
    Row {
        /// Top third.
        Top => "top",
        /// Middle third.
        Middle => "middle",
        /// Bottom third.
        Bottom => "bottom",
    }
);

word_enum!(
    /// The size of a shape (see [`shape_extent`]).
    Size {
        /// About half a grid cell across.
        Small => "small",
        /// About four fifths of a grid cell across.
        Large => "large",
    }
);

impl Color {
    /// The colour's RGB value.
    pub fn rgb(self) -> Rgb<u8> {
        Rgb(match self {
            Color::Red => [230, 40, 40],
            Color::Green => [40, 200, 60],
            Color::Blue => [40, 90, 240],
            Color::Yellow => [240, 220, 40],
            Color::Purple => [200, 50, 220],
            Color::Cyan => [40, 210, 220],
        })
    }
}

/// The background colour of every shapes image (black).
pub const BACKGROUND: Rgb<u8> = Rgb([0, 0, 0]);

/// The attributes of one shape in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShapeAttributes {
    /// Circle, square or triangle.
    pub shape: Shape,
    /// Fill colour.
    pub color: Color,
    /// Grid cell: (column, row).
    pub position: (Column, Row),
    /// Small or large.
    pub size: Size,
}

impl ShapeAttributes {
    /// The location phrase: "in the center" or "at the {row} {column}".
    pub fn location_phrase(&self) -> String {
        match self.position {
            (Column::Center, Row::Middle) => "in the center".to_string(),
            (column, row) => format!("at the {row} {column}"),
        }
    }

    /// Row-major grid cell number, 0 (top left) to 8 (bottom right).
    pub fn cell(&self) -> usize {
        self.position.1.index() * 3 + self.position.0.index()
    }
}

impl fmt::Display for ShapeAttributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {} {} {} {}",
            self.size,
            self.color,
            self.shape,
            self.location_phrase()
        )
    }
}

/// The caption of an image: one phrase per shape, joined by " and " (see the module docs).
pub fn caption(attrs: &[ShapeAttributes]) -> String {
    attrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Parses a caption back into attributes. Tolerates upper case, extra whitespace, a final
/// period, "an" for "a", and the location synonyms "at the center", "in the middle" and
/// "at the middle center". Returns `None` when any part does not follow the grammar.
pub fn parse_caption(text: &str) -> Option<Vec<ShapeAttributes>> {
    let lower = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    if words.is_empty() {
        return None;
    }
    words
        .split(|w| *w == "and")
        .map(parse_phrase)
        .collect::<Option<Vec<_>>>()
}

fn parse_phrase(words: &[&str]) -> Option<ShapeAttributes> {
    let (article, rest) = words.split_first()?;
    if *article != "a" && *article != "an" {
        return None;
    }
    let [size, color, shape, location @ ..] = rest else {
        return None;
    };
    let position = match location {
        ["in" | "at", "the", "center" | "middle"] | ["at", "the", "middle", "center"] => {
            (Column::Center, Row::Middle)
        }
        ["at", "the", row, column] => (Column::from_word(column)?, Row::from_word(row)?),
        _ => return None,
    };
    Some(ShapeAttributes {
        shape: Shape::from_word(shape)?,
        color: Color::from_word(color)?,
        position,
        size: Size::from_word(size)?,
    })
}

/// Side of one grid cell in pixels, for an image `image_size` pixels wide.
pub fn cell_size(image_size: u32) -> f32 {
    image_size as f32 / 3.0
}

/// Width and height in pixels of a shape's bounding box: about 0.8 of a cell when large,
/// 0.5 when small (9 and 5 pixels at 32x32, 17 and 11 at 64x64), so shapes in
/// neighbouring cells never touch.
pub fn shape_extent(size: Size, image_size: u32) -> u32 {
    let cell = cell_size(image_size);
    let small = ((cell * 0.5).round() as u32).max(3);
    match size {
        Size::Small => small,
        Size::Large => ((cell * 0.8).round() as u32).max(small + 2),
    }
}

/// Whether local pixel `(i, j)` of an `e` x `e` box belongs to the shape.
fn covers(shape: Shape, e: u32, i: u32, j: u32) -> bool {
    let half = e as f32 / 2.0;
    let dx = i as f32 + 0.5 - half;
    let dy = j as f32 + 0.5 - half;
    match shape {
        Shape::Square => true,
        Shape::Circle => dx * dx + dy * dy <= half * half,
        // Width grows linearly from the apex row to the full base row.
        Shape::Triangle => dx.abs() <= ((j as f32 + 0.5) / 2.0).max(0.5),
    }
}

/// Draws one shape onto an image whose side is `image.width()`.
pub fn draw_shape(image: &mut RgbImage, attrs: &ShapeAttributes) {
    let size = image.width();
    let e = shape_extent(attrs.size, size);
    let cell = cell_size(size);
    let cx = (attrs.position.0.index() as f32 + 0.5) * cell;
    let cy = (attrs.position.1.index() as f32 + 0.5) * cell;
    let x0 = (cx - e as f32 / 2.0).round() as i64;
    let y0 = (cy - e as f32 / 2.0).round() as i64;
    let color = attrs.color.rgb();
    for j in 0..e {
        for i in 0..e {
            let (x, y) = (x0 + i as i64, y0 + j as i64);
            let inside = x >= 0 && y >= 0 && x < image.width() as i64 && y < image.height() as i64;
            if inside && covers(attrs.shape, e, i, j) {
                image.put_pixel(x as u32, y as u32, color);
            }
        }
    }
}

/// Renders the shapes on a black `size` x `size` image, without anti-aliasing.
pub fn render(attrs: &[ShapeAttributes], size: u32) -> RgbImage {
    let mut image = RgbImage::from_pixel(size, size, BACKGROUND);
    for a in attrs {
        draw_shape(&mut image, a);
    }
    image
}
