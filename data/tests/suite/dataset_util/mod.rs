//! Helpers shared by the data crate's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use image::{Rgb, RgbImage};
use transfusion_data::error::DataError;
use transfusion_data::sequence::TokenSource;
use transfusion_data::tokenizer::SpecialTokens;

/// Special ids of [`ToyTokenizer`].
pub const SPECIAL: SpecialTokens = SpecialTokens {
    bos: 1,
    eos: 2,
    pad: 0,
    boi: 3,
    eoi: 4,
};

/// Whitespace tokenizer with a fixed vocabulary: word i of `VOCAB` has id 10 + i; other
/// words get `1000 + hash % 10^6` (remembered, so decoding works).
#[derive(Default)]
pub struct ToyTokenizer {
    extra: Mutex<HashMap<String, u32>>,
}

pub const VOCAB: [&str; 8] = ["a", "red", "circle", "big", "blue", "square", "the", "cat"];

impl TokenSource for ToyTokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let mut extra = self.extra.lock().unwrap();
        Ok(text
            .split_whitespace()
            .map(|w| match VOCAB.iter().position(|v| *v == w) {
                Some(i) => 10 + i as u32,
                // Like real tokenizers, special token strings in text become their ids.
                None if w == "<|boi|>" => SPECIAL.boi,
                None if w == "<|eos|>" => SPECIAL.eos,
                None => {
                    // Stable across instances: FNV-1a of the word.
                    let h = w.bytes().fold(0x811c_9dc5u32, |h, b| {
                        (h ^ b as u32).wrapping_mul(0x0100_0193)
                    });
                    let id = 1000 + h % 1_000_000;
                    extra.insert(w.to_string(), id);
                    id
                }
            })
            .collect())
    }

    fn decode_text(&self, ids: &[u32]) -> String {
        let extra = self.extra.lock().unwrap();
        ids.iter()
            .map(|&id| {
                if (10..10 + VOCAB.len() as u32).contains(&id) {
                    VOCAB[(id - 10) as usize].to_string()
                } else {
                    extra
                        .iter()
                        .find(|(_, v)| **v == id)
                        .map(|(k, _)| k.clone())
                        .unwrap_or(format!("?{id}"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn special_tokens(&self) -> SpecialTokens {
        SPECIAL
    }
}

/// A `w` x `h` image whose pixels depend on `seed`.
pub fn test_image(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x as u8).wrapping_mul(7).wrapping_add(seed),
            (y as u8).wrapping_mul(13),
            seed,
        ])
    })
}

/// Writes `img` as PNG to `path`.
pub fn write_png(path: &Path, img: &RgbImage) {
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

/// Bytes of `img` encoded as PNG.
pub fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}
