//! Image decoding and preprocessing: bytes or files in PNG, JPEG, WebP, BMP or GIF become
//! 8-bit RGB images; images become `[3, H, W]` float arrays in `[-1, 1]` and back; a grid
//! writer for sample sheets.
//!
//! Colour handling: grayscale, palette and 16-bit images are converted to 8-bit RGB; images
//! with an alpha channel are composited over a white background (transparent pixels become
//! white, as in a browser on a white page). EXIF orientation (JPEG, WebP, PNG `eXIf`) is
//! applied, so the pixels come out the way a photo viewer shows them. GIF animations give
//! their first frame.

use std::io::Cursor;
use std::path::Path;

use ::image::imageops::{self, FilterType};
use ::image::{DynamicImage, ImageDecoder, ImageReader, Limits, Rgb, RgbImage};

use crate::error::DataError;

/// Largest accepted image width or height, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;

/// Largest accepted decoded image buffer, in bytes (1 GiB).
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// Decodes an image from memory to 8-bit RGB. `name` is only used in error messages (the
/// file, or a `archive.tar/member.png` style name).
///
/// Rejects empty input, unrecognised formats, zero-size images, images wider or taller
/// than [`MAX_IMAGE_SIDE`] or larger than [`MAX_DECODED_BYTES`] decoded, and truncated or
/// corrupt data.
pub fn decode_image(bytes: &[u8], name: &Path) -> Result<RgbImage, DataError> {
    if bytes.is_empty() {
        return Err(DataError::invalid(name, "empty file, not an image"));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::invalid(name, format!("cannot read image: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(DataError::invalid(
            name,
            "not an image in a supported format (PNG, JPEG, WebP, BMP, GIF)",
        ));
    };
    let mut reader = reader;
    // Dimensions are checked below, with a clearer message than the decoder's.
    let mut limits = Limits::default();
    limits.max_image_width = None;
    limits.max_image_height = None;
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits.clone());
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| DataError::invalid(name, format!("cannot decode {format:?} image: {e}")))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DataError::invalid(
            name,
            format!("image has zero size ({width}x{height})"),
        ));
    }
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(DataError::invalid(
            name,
            format!(
                "image is {width}x{height} pixels, larger than the limit of \
                 {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
            ),
        ));
    }
    let total = decoder.total_bytes();
    if total > MAX_DECODED_BYTES {
        return Err(DataError::invalid(
            name,
            format!(
                "image would take {total} bytes decoded, more than the limit of \
                 {MAX_DECODED_BYTES}"
            ),
        ));
    }
    // A malformed EXIF block is not worth rejecting the image for: keep it as stored.
    let orientation = decoder
        .orientation()
        .unwrap_or(::image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| {
        DataError::invalid(
            name,
            format!("cannot decode {format:?} image (truncated or corrupt?): {e}"),
        )
    })?;
    image.apply_orientation(orientation);
    Ok(to_rgb_on_white(image))
}

/// Converts any decoded image to 8-bit RGB, compositing alpha over white.
fn to_rgb_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    let (width, height) = rgba.dimensions();
    RgbImage::from_fn(width, height, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let a = a as u32;
        let over = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        Rgb([over(r), over(g), over(b)])
    })
}

/// Reads and decodes an image file (see [`decode_image`]); errors name the path.
pub fn load_image(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_image(&bytes, path)
}

/// Crops the largest centred square and resizes it to `size` x `size` with a Catmull-Rom
/// filter (which also low-passes correctly when shrinking). An image that is already
/// `size` x `size` is returned unchanged.
///
/// # Panics
/// When `size` is 0 or the image is empty.
pub fn center_crop_resize(img: &RgbImage, size: u32) -> RgbImage {
    assert!(size > 0, "center_crop_resize: size should be positive");
    let (width, height) = img.dimensions();
    assert!(
        width > 0 && height > 0,
        "center_crop_resize: image should not be empty"
    );
    let side = width.min(height);
    let x = (width - side) / 2;
    let y = (height - side) / 2;
    let square = imageops::crop_imm(img, x, y, side, side).to_image();
    if side == size {
        square
    } else {
        imageops::resize(&square, size, size, FilterType::CatmullRom)
    }
}

/// Converts an image to a `[3, H, W]` (channel-major) float array in `[-1, 1]`:
/// `v = p / 127.5 - 1`.
pub fn to_chw(img: &RgbImage) -> Vec<f32> {
    let (width, height) = img.dimensions();
    let plane = (width * height) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, pixel) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = pixel.0[c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// The inverse of [`to_chw`]: a `[3, H, W]` array in `[-1, 1]` to an image, clamping to
/// the valid range and rounding to the nearest 8-bit value.
///
/// # Panics
/// When `data.len() != 3 * height * width`.
pub fn from_chw(data: &[f32], height: usize, width: usize) -> RgbImage {
    let plane = height * width;
    assert_eq!(
        data.len(),
        3 * plane,
        "from_chw: data should hold 3 x {height} x {width} values"
    );
    let to_u8 = |v: f32| {
        let v = if v.is_nan() { 0.0 } else { v };
        ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
    };
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let i = y as usize * width + x as usize;
        Rgb([
            to_u8(data[i]),
            to_u8(data[plane + i]),
            to_u8(data[2 * plane + i]),
        ])
    })
}

/// Writes an image as PNG, creating the parent folder when needed.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), DataError> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, ::image::ImageFormat::Png)
        .map_err(|e| DataError::invalid(path, format!("cannot encode PNG: {e}")))?;
    crate::files::write_file(path, bytes.into_inner())
}

/// Colour of the padding between grid cells (mid grey, visible on dark and light images).
pub const GRID_PAD_COLOR: Rgb<u8> = Rgb([128, 128, 128]);

/// Lays images out in a grid, row by row, `columns` per row, with `pad` pixels of
/// [`GRID_PAD_COLOR`] around and between cells. Cells are as large as the largest image;
/// smaller images sit at their cell's top-left corner. `columns` is clamped to
/// `1..=images.len()`. No images gives a 0x0 image.
pub fn image_grid(images: &[RgbImage], columns: usize, pad: u32) -> RgbImage {
    if images.is_empty() {
        return RgbImage::new(0, 0);
    }
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let cell_w = images.iter().map(|i| i.width()).max().unwrap_or(0);
    let cell_h = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let width = columns as u32 * (cell_w + pad) + pad;
    let height = rows as u32 * (cell_h + pad) + pad;
    let mut grid = RgbImage::from_pixel(width, height, GRID_PAD_COLOR);
    for (k, img) in images.iter().enumerate() {
        let x = pad + (k % columns) as u32 * (cell_w + pad);
        let y = pad + (k / columns) as u32 * (cell_h + pad);
        imageops::replace(&mut grid, img, x as i64, y as i64);
    }
    grid
}
