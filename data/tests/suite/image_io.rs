//! Image decoding (every format, every colour type, bad files) and preprocessing.

use std::io::Cursor;
use std::path::Path;

use image::codecs::gif::GifEncoder;
use image::codecs::png::PngEncoder;
use image::{
    DynamicImage, Frame, GrayAlphaImage, GrayImage, ImageBuffer, ImageEncoder, ImageFormat, Luma,
    LumaA, Rgb, RgbImage, Rgba, RgbaImage,
};
use transfusion_data::image::{
    center_crop_resize, decode_image, from_chw, image_grid, load_image, save_png, to_chw,
    GRID_PAD_COLOR,
};

/// A 7x5 test pattern with distinct, saturated colours.
fn pattern() -> RgbImage {
    RgbImage::from_fn(7, 5, |x, y| match (x + 2 * y) % 4 {
        0 => Rgb([255, 0, 0]),
        1 => Rgb([0, 255, 0]),
        2 => Rgb([0, 0, 255]),
        _ => Rgb([255, 255, 255]),
    })
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)
        .expect("test image should encode");
    out.into_inner()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn name() -> &'static Path {
    Path::new("photos/cat-042.png")
}

#[test]
fn every_format_decodes_to_rgb8() {
    let want = pattern();
    for (format, tolerance) in [
        (ImageFormat::Png, 0),
        (ImageFormat::WebP, 0),
        (ImageFormat::Bmp, 0),
        (ImageFormat::Gif, 0),
        (ImageFormat::Jpeg, 80),
    ] {
        let source = if format == ImageFormat::Gif {
            DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(want.clone()).to_rgba8())
        } else {
            DynamicImage::ImageRgb8(want.clone())
        };
        let bytes = encode(source, format);
        let got = decode_image(&bytes, name()).unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!(got.dimensions(), (7, 5), "{format:?}");
        let diff = max_diff(&got, &want);
        assert!(diff <= tolerance, "{format:?}: max difference {diff}");
    }
    // A smooth JPEG is close everywhere.
    let smooth = RgbImage::from_fn(16, 16, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 100]));
    let bytes = encode(DynamicImage::ImageRgb8(smooth.clone()), ImageFormat::Jpeg);
    let got = decode_image(&bytes, name()).unwrap();
    assert!(max_diff(&got, &smooth) <= 12);
}

#[test]
fn gif_gives_the_first_frame() {
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut bytes);
        let red = RgbaImage::from_pixel(4, 3, Rgba([255, 0, 0, 255]));
        let blue = RgbaImage::from_pixel(4, 3, Rgba([0, 0, 255, 255]));
        encoder
            .encode_frames(vec![Frame::new(red), Frame::new(blue)])
            .unwrap();
    }
    let got = decode_image(&bytes, name()).unwrap();
    assert_eq!(got.dimensions(), (4, 3));
    assert!(got.pixels().all(|p| *p == Rgb([255, 0, 0])));
}

#[test]
fn gray_alpha_and_sixteen_bit_become_rgb8() {
    let gray = GrayImage::from_fn(3, 2, |x, _| Luma([(x * 100) as u8]));
    let got = decode_image(&encode(gray.into(), ImageFormat::Png), name()).unwrap();
    assert_eq!(got.get_pixel(2, 1), &Rgb([200, 200, 200]));

    // Alpha is composited on white: transparent is white, opaque keeps its colour,
    // half-transparent black is mid grey.
    let rgba = RgbaImage::from_fn(3, 1, |x, _| match x {
        0 => Rgba([255, 0, 0, 0]),
        1 => Rgba([255, 0, 0, 255]),
        _ => Rgba([0, 0, 0, 128]),
    });
    let got = decode_image(&encode(rgba.into(), ImageFormat::Png), name()).unwrap();
    assert_eq!(got.get_pixel(0, 0), &Rgb([255, 255, 255]));
    assert_eq!(got.get_pixel(1, 0), &Rgb([255, 0, 0]));
    assert_eq!(got.get_pixel(2, 0), &Rgb([127, 127, 127]));
    let la = GrayAlphaImage::from_pixel(2, 2, LumaA([0, 0]));
    let got = decode_image(&encode(la.into(), ImageFormat::Png), name()).unwrap();
    assert!(got.pixels().all(|p| *p == Rgb([255, 255, 255])));
    let la = GrayAlphaImage::from_pixel(2, 2, LumaA([40, 255]));
    let got = decode_image(&encode(la.into(), ImageFormat::WebP), name()).unwrap();
    assert!(got.pixels().all(|p| *p == Rgb([40, 40, 40])));

    // 16-bit: 257 * v is exactly v in 8 bits.
    let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(2, 2, |x, y| {
        Rgb([257 * 10, 257 * (100 + x as u16), 257 * (200 + y as u16)])
    });
    let got = decode_image(&encode(rgb16.into(), ImageFormat::Png), name()).unwrap();
    assert_eq!(got.get_pixel(1, 1), &Rgb([10, 101, 201]));
    let l16: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_pixel(2, 1, Luma([65535]));
    let got = decode_image(&encode(l16.into(), ImageFormat::Png), name()).unwrap();
    assert_eq!(got.get_pixel(0, 0), &Rgb([255, 255, 255]));
    let rgba16: ImageBuffer<Rgba<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(1, 1, Rgba([0, 65535, 0, 65535]));
    let got = decode_image(&encode(rgba16.into(), ImageFormat::Png), name()).unwrap();
    assert_eq!(got.get_pixel(0, 0), &Rgb([0, 255, 0]));
}

/// CRC-32 (IEEE), as PNG chunks need.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend(data);
    out.extend(&body);
    out.extend(crc32(&body).to_be_bytes());
}

/// A PNG file by hand: `ihdr` fields, optional extra chunks before IDAT, raw scanlines
/// (filter byte included) stored uncompressed in zlib.
fn handmade_png(
    width: u32,
    height: u32,
    depth: u8,
    color: u8,
    extra: &[(&[u8; 4], Vec<u8>)],
    raw: &[u8],
) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([depth, color, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    for (kind, data) in extra {
        chunk(&mut out, kind, data);
    }
    let mut zlib = vec![0x78, 0x01, 0x01];
    zlib.extend((raw.len() as u16).to_le_bytes());
    zlib.extend((!(raw.len() as u16)).to_le_bytes());
    zlib.extend(raw);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in raw {
        a = (a + byte as u32) % 65521;
        b = (b + a) % 65521;
    }
    zlib.extend(((b << 16) | a).to_be_bytes());
    chunk(&mut out, b"IDAT", &zlib);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn palette_png_becomes_rgb8_with_transparency_on_white() {
    let palette = vec![10, 20, 30, 200, 100, 0, 0, 0, 0];
    let trns = vec![255, 255, 0];
    // 3x1, 8-bit indices 0, 1, 2.
    let raw = [0u8, 0, 1, 2];
    let bytes = handmade_png(3, 1, 8, 3, &[(b"PLTE", palette), (b"tRNS", trns)], &raw);
    let got = decode_image(&bytes, name()).unwrap();
    assert_eq!(got.get_pixel(0, 0), &Rgb([10, 20, 30]));
    assert_eq!(got.get_pixel(1, 0), &Rgb([200, 100, 0]));
    assert_eq!(got.get_pixel(2, 0), &Rgb([255, 255, 255]));
}

#[test]
fn exif_orientation_is_applied() {
    // 3x2 image: top row red, bottom row blue; EXIF orientation 6 = rotate 90 clockwise.
    let img = RgbImage::from_fn(3, 2, |_, y| {
        if y == 0 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let mut exif = b"II*\0".to_vec();
    exif.extend(8u32.to_le_bytes());
    exif.extend(1u16.to_le_bytes());
    exif.extend(0x0112u16.to_le_bytes());
    exif.extend(3u16.to_le_bytes());
    exif.extend(1u32.to_le_bytes());
    exif.extend(6u16.to_le_bytes());
    exif.extend([0, 0]);
    exif.extend(0u32.to_le_bytes());
    let mut bytes = Vec::new();
    let mut encoder = PngEncoder::new(&mut bytes);
    encoder.set_exif_metadata(exif).unwrap();
    encoder
        .write_image(img.as_raw(), 3, 2, image::ExtendedColorType::Rgb8)
        .unwrap();
    let got = decode_image(&bytes, name()).unwrap();
    assert_eq!(got.dimensions(), (2, 3), "rotated");
    // After a clockwise quarter turn the top row is the right column.
    assert!((0..3).all(|y| *got.get_pixel(1, y) == Rgb([255, 0, 0])));
    assert!((0..3).all(|y| *got.get_pixel(0, y) == Rgb([0, 0, 255])));
}

fn assert_error_names(
    result: Result<RgbImage, transfusion_data::DataError>,
    file: &str,
    what: &str,
) {
    let message = result.expect_err("should be rejected").to_string();
    println!("{message}");
    assert!(message.contains(file), "{message:?} should name {file}");
    assert!(
        message.to_lowercase().contains(what),
        "{message:?} should say {what:?}"
    );
}

#[test]
fn bad_files_are_rejected_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let png = encode(DynamicImage::ImageRgb8(pattern()), ImageFormat::Png);

    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    assert_error_names(load_image(&truncated), "truncated.png", "png");

    let text = dir.path().join("notes.png");
    std::fs::write(&text, "this is a text file, not a picture\n").unwrap();
    assert_error_names(load_image(&text), "notes.png", "not an image");

    let empty = dir.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    assert_error_names(load_image(&empty), "empty.jpg", "empty");

    let missing = dir.path().join("missing.webp");
    assert_error_names(load_image(&missing), "missing.webp", "cannot read");

    // A valid PNG header announcing 100000 x 100000 pixels.
    let huge = handmade_png(100_000, 100_000, 8, 2, &[], &[0, 1, 2, 3]);
    assert_error_names(
        decode_image(&huge, Path::new("huge.png")),
        "huge.png",
        "limit",
    );
    let wide = handmade_png(20_000, 1, 8, 0, &[], &[0, 1]);
    assert_error_names(
        decode_image(&wide, Path::new("wide.png")),
        "wide.png",
        "16384",
    );
    // A BMP header announcing 60000 x 60000 pixels.
    let mut bmp = encode(DynamicImage::ImageRgb8(pattern()), ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&60_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&60_000i32.to_le_bytes());
    assert_error_names(
        decode_image(&bmp, Path::new("huge.bmp")),
        "huge.bmp",
        "limit",
    );
    // Zero width.
    let zero = handmade_png(0, 4, 8, 0, &[], &[0]);
    let message = decode_image(&zero, Path::new("zero.png"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("zero.png"), "{message}");
}

#[test]
fn center_crop_resize_keeps_the_middle() {
    // 30x10: green centre square, red sides.
    let wide = RgbImage::from_fn(30, 10, |x, _| {
        if (10..20).contains(&x) {
            Rgb([0, 200, 0])
        } else {
            Rgb([200, 0, 0])
        }
    });
    let out = center_crop_resize(&wide, 5);
    assert_eq!(out.dimensions(), (5, 5));
    assert!(
        out.pixels().all(|p| *p == Rgb([0, 200, 0])),
        "{:?}",
        out.as_raw()
    );
    // 10x30: top third white, rest black; the centre crop is black.
    let tall = RgbImage::from_fn(
        10,
        30,
        |_, y| if y < 10 { Rgb([255; 3]) } else { Rgb([0; 3]) },
    );
    let out = center_crop_resize(&tall, 20);
    assert_eq!(out.dimensions(), (20, 20));
    assert!(out.pixels().all(|p| *p == Rgb([0; 3])));
    // Left half black, right half white at 64 -> 32: the edge stays in the middle.
    let half = RgbImage::from_fn(
        64,
        64,
        |x, _| if x < 32 { Rgb([0; 3]) } else { Rgb([255; 3]) },
    );
    let out = center_crop_resize(&half, 32);
    assert_eq!(out.get_pixel(2, 10), &Rgb([0; 3]));
    assert_eq!(out.get_pixel(29, 10), &Rgb([255; 3]));
    // Already the right size: unchanged.
    assert_eq!(center_crop_resize(&pattern(), 7).dimensions(), (7, 7));
    let square = RgbImage::from_fn(6, 6, |x, y| Rgb([x as u8 * 40, y as u8 * 40, 7]));
    assert_eq!(center_crop_resize(&square, 6), square);
}

#[test]
fn chw_round_trip_is_exact() {
    let img = RgbImage::from_fn(16, 16, |x, y| {
        let v = (y * 16 + x) as u8;
        Rgb([v, 255 - v, v.wrapping_mul(7)])
    });
    let chw = to_chw(&img);
    assert_eq!(chw.len(), 3 * 16 * 16);
    assert!(chw.iter().all(|v| (-1.0..=1.0).contains(v)));
    // Channel-major layout: plane c, then row, then column.
    assert_eq!(chw[0], -1.0);
    assert_eq!(chw[256], 1.0);
    assert!((chw[17] - (17.0 / 127.5 - 1.0)).abs() < 1e-6);
    assert!((chw[2 * 256 + 3] - (21.0 / 127.5 - 1.0)).abs() < 1e-6);
    assert_eq!(from_chw(&chw, 16, 16), img);

    // Out-of-range values clamp; non-square shapes keep their layout.
    let data = vec![-3.0, 3.0, 0.0, 0.0, 0.0, 0.0];
    let out = from_chw(&data, 1, 2);
    assert_eq!(out.dimensions(), (2, 1));
    assert_eq!(out.get_pixel(0, 0), &Rgb([0, 128, 128]));
    assert_eq!(out.get_pixel(1, 0), &Rgb([255, 128, 128]));
    let rect = RgbImage::from_fn(5, 3, |x, y| Rgb([x as u8, y as u8, 9]));
    assert_eq!(from_chw(&to_chw(&rect), 3, 5), rect);
}

#[test]
fn grid_and_png_round_trip() {
    let a = RgbImage::from_pixel(4, 4, Rgb([255, 0, 0]));
    let b = RgbImage::from_pixel(4, 4, Rgb([0, 255, 0]));
    let c = RgbImage::from_pixel(2, 2, Rgb([0, 0, 255]));
    let grid = image_grid(&[a, b, c], 2, 1);
    assert_eq!(grid.dimensions(), (2 * 5 + 1, 2 * 5 + 1));
    assert_eq!(grid.get_pixel(0, 0), &GRID_PAD_COLOR);
    assert_eq!(grid.get_pixel(1, 1), &Rgb([255, 0, 0]));
    assert_eq!(grid.get_pixel(6, 4), &Rgb([0, 255, 0]));
    assert_eq!(grid.get_pixel(5, 1), &GRID_PAD_COLOR);
    assert_eq!(grid.get_pixel(1, 6), &Rgb([0, 0, 255]));
    assert_eq!(
        grid.get_pixel(4, 9),
        &GRID_PAD_COLOR,
        "outside the small image"
    );
    assert_eq!(image_grid(&[], 3, 2).dimensions(), (0, 0));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/out/grid.png");
    save_png(&grid, &path).unwrap();
    assert_eq!(load_image(&path).unwrap(), grid);

    // A place that cannot be written (here a directory under a file) is named.
    let under_file = path.join("x.png");
    let err = save_png(&grid, &under_file).unwrap_err().to_string();
    assert!(
        err.starts_with("cannot write") && err.contains(&path.display().to_string()),
        "{err}"
    );
}
