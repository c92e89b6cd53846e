//! Image encoders: pixels to the latent the model diffuses over.
//!
//! Until a VAE exists the encoder is the identity in pixel space ([`PixelEncoder`]): the
//! latent is the centre-cropped, resized image as `[3, S, S]` in `[-1, 1]`. A VAE plugs in
//! by implementing [`ImageEncoder`] (or wrapping a closure in [`FnEncoder`]).

use image::RgbImage;

use crate::error::DataError;

/// Turns a decoded image into a latent `[c, H, W]` (row-major, `c*H*W` values).
pub trait ImageEncoder: Send + Sync {
    /// The shape `[c, H, W]` of every latent this encoder produces.
    fn latent_shape(&self) -> [usize; 3];

    /// Encodes one image of any size (the encoder crops / resizes as it needs).
    fn encode(&self, image: &RgbImage) -> Result<Vec<f32>, DataError>;

    /// One line naming the encoder and its settings (stored in latent caches).
    fn describe(&self) -> String;

    /// Images [`ImageEncoder::encode_batch`] takes at once (a VAE on a GPU wants many).
    fn batch_size(&self) -> usize {
        1
    }

    /// Encodes several images (default: one at a time); one latent per image, in order.
    fn encode_batch(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, DataError> {
        images.iter().map(|img| self.encode(img)).collect()
    }

    /// The autoencoder checkpoint this encoder runs, if any: recorded in latent caches so
    /// a model trained on them knows how to decode its latents.
    fn autoencoder_path(&self) -> Option<std::path::PathBuf> {
        None
    }
}

/// The identity encoder in pixel space: `to_chw(center_crop_resize(img, image_size))`,
/// a `[3, image_size, image_size]` latent in `[-1, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelEncoder {
    /// Side of the square image, in pixels.
    pub image_size: u32,
}

impl PixelEncoder {
    /// An identity encoder producing `[3, image_size, image_size]`.
    pub fn new(image_size: u32) -> Self {
        Self { image_size }
    }
}

impl ImageEncoder for PixelEncoder {
    fn latent_shape(&self) -> [usize; 3] {
        [3, self.image_size as usize, self.image_size as usize]
    }

    fn encode(&self, image: &RgbImage) -> Result<Vec<f32>, DataError> {
        if image.width() == 0 || image.height() == 0 {
            return Err(DataError::invalid("<image>", "empty image"));
        }
        let img = crate::image::center_crop_resize(image, self.image_size);
        Ok(crate::image::to_chw(&img))
    }

    fn describe(&self) -> String {
        format!(
            "pixels {0}x{0} (identity encoder, [-1, 1])",
            self.image_size
        )
    }
}

/// An encoder from a closure, e.g. a VAE's `encode` wrapped by the caller.
pub struct FnEncoder<F> {
    /// Shape of every latent the closure returns.
    pub shape: [usize; 3],
    /// What the closure is (stored in latent caches).
    pub description: String,
    /// The encoding function.
    pub f: F,
}

impl<F> ImageEncoder for FnEncoder<F>
where
    F: Fn(&RgbImage) -> Result<Vec<f32>, DataError> + Send + Sync,
{
    fn latent_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn encode(&self, image: &RgbImage) -> Result<Vec<f32>, DataError> {
        let v = (self.f)(image)?;
        let want: usize = self.shape.iter().product();
        if v.len() != want {
            return Err(DataError::invalid(
                "<encoder>",
                format!(
                    "{} returned {} values, expected {want} for shape {:?}",
                    self.description,
                    v.len(),
                    self.shape
                ),
            ));
        }
        Ok(v)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
