//! RGB images to and from `[-1, 1]` float batches: the one conversion used by the
//! autoencoder, the pipeline and VAE training.

use burn::prelude::*;
use burn::tensor::TensorData;
use image::RgbImage;
use transfusion_data::image::{center_crop_resize, from_chw, to_chw};

/// Images of one size as a batch in `[-1, 1]`.
///
/// # Shapes
/// `N` images of `H x W` -> `[N, 3, H, W]`
pub fn images_to_tensor<B: Backend>(images: &[RgbImage], device: &B::Device) -> Tensor<B, 4> {
    let (h, w) = images
        .first()
        .map_or((0, 0), |i| (i.height() as usize, i.width() as usize));
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for img in images {
        assert_eq!(
            (img.height() as usize, img.width() as usize),
            (h, w),
            "images of one batch should share a size"
        );
        data.extend(to_chw(img));
    }
    Tensor::from_data(TensorData::new(data, [images.len(), 3, h, w]), device)
}

/// Images center-cropped and resized to `size` pixels, as a batch in `[-1, 1]`.
///
/// # Shapes
/// output `[N, 3, size, size]`
pub fn pixels_tensor<B: Backend>(
    images: &[RgbImage],
    size: u32,
    device: &B::Device,
) -> Tensor<B, 4> {
    let resized: Vec<RgbImage> = images
        .iter()
        .map(|img| center_crop_resize(img, size))
        .collect();
    images_to_tensor(&resized, device)
}

/// Images from a batch in `[-1, 1]` (clamped by the conversion).
///
/// # Shapes
/// `[N, 3, H, W]` -> `N` images
pub fn tensor_to_images<B: Backend>(x: Tensor<B, 4>) -> Vec<RgbImage> {
    let [n, _, h, w] = x.dims();
    let flat: Vec<f32> = x
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("images should convert to f32");
    let per = 3 * h * w;
    (0..n)
        .map(|k| from_chw(&flat[k * per..(k + 1) * per], h, w))
        .collect()
}
