//! The autoencoder between pixels and the model's latents, shared by training (which
//! writes VAE checkpoints and caches latents) and inference (which decodes generated
//! latents and encodes images to caption).
//!
//! A VAE checkpoint is a directory:
//! ```text
//! DIR/vae.safetensors   AutoencoderKl weights (burn-store safetensors)
//! DIR/vae.json          its VaeConfig (shape, latent scaling factor and shift)
//! ```
//! Training adds its optimizer and training state beside these (see the training crate).
//! [`load_vae`] also reads a VAE *run* directory (its newest `checkpoints/step-N/`) and a
//! diffusers `AutoencoderKL` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use image::RgbImage;
use transfusion_data::files::{create_dir, write_file};

use crate::checkpoint::{load_weights, save_weights};
use crate::error::{Result, RuntimeError};
use crate::image_tensor::{pixels_tensor, tensor_to_images};
use transfusion_model::vae::{load_diffusers_vae, AutoencoderKl, VaeConfig};

/// Weights of a VAE checkpoint.
pub const VAE_WEIGHTS_FILE: &str = "vae.safetensors";
/// Config of a VAE checkpoint.
pub const VAE_CONFIG_FILE: &str = "vae.json";

/// A loaded VAE: the network and its config (which holds the latent scale and shift).
#[derive(Debug)]
pub struct Vae<B: Backend> {
    /// The network.
    pub model: AutoencoderKl<B>,
    /// Its config.
    pub config: VaeConfig,
}

impl<B: Backend> Clone for Vae<B> {
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            config: self.config.clone(),
        }
    }
}

impl<B: Backend> Vae<B> {
    /// Diffusion latents (posterior mode, scaled and shifted) of images in `[-1, 1]`.
    ///
    /// # Shapes
    /// `[N, 3, H, W] -> [N, c, H/f, W/f]`
    pub fn encode(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.model.encode_latents(&self.config, x, false)
    }

    /// Images in `[-1, 1]` (clamped) from diffusion latents.
    ///
    /// # Shapes
    /// `[N, c, h, w] -> [N, 3, h*f, w*f]`
    pub fn decode(&self, latent: Tensor<B, 4>) -> Tensor<B, 4> {
        self.model
            .decode_latents(&self.config, latent)
            .clamp(-1.0, 1.0)
    }
}

/// Writes `vae.safetensors` and `vae.json` into `dir` (created if missing).
pub fn save_vae<B: Backend>(
    dir: &Path,
    model: &AutoencoderKl<B>,
    config: &VaeConfig,
) -> Result<()> {
    create_dir(dir)?;
    save_weights(model, &dir.join(VAE_WEIGHTS_FILE))?;
    write_file(
        &dir.join(VAE_CONFIG_FILE),
        serde_json::to_string_pretty(config).expect("a VAE config serialises to JSON"),
    )?;
    Ok(())
}

/// Reads `vae.json` of a VAE checkpoint directory.
pub fn read_vae_config(dir: &Path) -> Result<VaeConfig> {
    let path = dir.join(VAE_CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|e| {
        RuntimeError::invalid(
            dir,
            format!("VAE checkpoint: cannot read {VAE_CONFIG_FILE}: {e}"),
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| RuntimeError::invalid(&path, format!("not a VAE config: {e}")))
}

/// What kind of VAE directory `path` is, and where its files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaeSource {
    /// Our checkpoint layout (`vae.json` + `vae.safetensors`).
    Checkpoint(PathBuf),
    /// A diffusers `AutoencoderKL` folder or `.safetensors` file (with `config.json`).
    Diffusers(PathBuf),
}

/// Finds the VAE behind `path`: a VAE checkpoint directory, a VAE run directory (its newest
/// complete `checkpoints/step-N`), or a diffusers folder / `.safetensors` file. The error
/// names the path and what was looked for.
pub fn resolve_vae(path: &Path) -> Result<VaeSource> {
    if !path.exists() {
        return Err(RuntimeError::invalid(path, "the VAE does not exist"));
    }
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "safetensors") {
            return Ok(VaeSource::Diffusers(path.to_path_buf()));
        }
        return Err(RuntimeError::invalid(
            path,
            "a VAE must be a directory or a diffusers .safetensors file",
        ));
    }
    if path.join(VAE_CONFIG_FILE).is_file() {
        return Ok(VaeSource::Checkpoint(path.to_path_buf()));
    }
    let ckpts = path.join("checkpoints");
    if ckpts.is_dir() {
        let mut steps: Vec<PathBuf> = fs::read_dir(&ckpts)
            .map_err(|e| RuntimeError::invalid(&ckpts, format!("cannot list: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                    && p.join(VAE_CONFIG_FILE).is_file()
                    && p.join(VAE_WEIGHTS_FILE).is_file()
            })
            .collect();
        steps.sort();
        if let Some(last) = steps.pop() {
            return Ok(VaeSource::Checkpoint(last));
        }
    }
    if path.join("config.json").is_file() {
        return Ok(VaeSource::Diffusers(path.to_path_buf()));
    }
    Err(RuntimeError::invalid(
        path,
        format!(
            "not a VAE: no {VAE_CONFIG_FILE} (a VAE checkpoint), no checkpoints/step-N with one \
             (a VAE run), and no config.json (a diffusers AutoencoderKL folder)"
        ),
    ))
}

/// Loads the VAE behind `path` (see [`resolve_vae`]) onto `device`.
pub fn load_vae<B: Backend>(path: &Path, device: &B::Device) -> Result<Vae<B>> {
    match resolve_vae(path)? {
        VaeSource::Checkpoint(dir) => {
            let config = read_vae_config(&dir)?;
            let weights = dir.join(VAE_WEIGHTS_FILE);
            if !weights.is_file() {
                return Err(RuntimeError::invalid(
                    &dir,
                    format!("VAE checkpoint: missing {VAE_WEIGHTS_FILE}"),
                ));
            }
            let against = dir.join(VAE_CONFIG_FILE).display().to_string();
            let model = load_weights(config.init::<B>(device), &weights, &against)?;
            Ok(Vae { model, config })
        }
        VaeSource::Diffusers(p) => {
            let (config, model) = load_diffusers_vae::<B>(&p, device)
                .map_err(|e| RuntimeError::invalid(&p, format!("diffusers VAE: {e}")))?;
            Ok(Vae { model, config })
        }
    }
}

/// The autoencoder of a pipeline: pixel space (identity) or a VAE.
#[derive(Debug)]
pub enum Autoencoder<B: Backend> {
    /// The latent is the `[-1, 1]` RGB image.
    Pixel,
    /// Latents of a VAE.
    Vae(Vae<B>),
}

impl<B: Backend> Autoencoder<B> {
    /// Latent channels and down-sampling factor: `(3, 1)` in pixel space.
    pub fn latent_geometry(&self) -> (usize, usize) {
        match self {
            Autoencoder::Pixel => (3, 1),
            Autoencoder::Vae(v) => (v.config.latent_channels, v.config.down_factor()),
        }
    }

    /// The bound the sampler clips the predicted `x_0` to: `Some(1.0)` in pixel space, where
    /// images live in `[-1, 1]`; `None` for a VAE, whose scaled latents have unit variance
    /// and routinely exceed 1, so clipping them would distort every image.
    pub fn x0_bound(&self) -> Option<f64> {
        match self {
            Autoencoder::Pixel => Some(1.0),
            Autoencoder::Vae(_) => None,
        }
    }

    /// Latents of images: center-cropped and resized to `size` pixels, then encoded.
    ///
    /// # Shapes
    /// output `[N, c, size/f, size/f]`
    pub fn encode_images(
        &self,
        images: &[RgbImage],
        size: u32,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        // [N, 3, S, S] in [-1, 1]
        let x = pixels_tensor::<B>(images, size, device);
        match self {
            Autoencoder::Pixel => x,
            Autoencoder::Vae(v) => v.encode(x),
        }
    }

    /// Images from latents (decoded by the VAE, if any).
    ///
    /// # Shapes
    /// `x`: `[N, c, h, w]` -> N images of `h*f` x `w*f`
    pub fn decode_images(&self, x: Tensor<B, 4>) -> Vec<RgbImage> {
        let x = match self {
            Autoencoder::Pixel => x,
            Autoencoder::Vae(v) => v.decode(x),
        };
        tensor_to_images(x)
    }
}

/// A VAE as a [`transfusion_data::encoder::ImageEncoder`] for latent caches: images are
/// center-cropped and resized to `image_size`, encoded in batches of `batch` (posterior
/// mode, scaled by the VAE config's factor and shift) to `[c, S/f, S/f]`.
pub struct VaeImageEncoder<B: Backend> {
    vae: std::sync::Mutex<Vae<B>>,
    shape: [usize; 3],
    image_size: u32,
    batch: usize,
    device: B::Device,
    path: Option<PathBuf>,
    description: String,
}

impl<B: Backend> VaeImageEncoder<B> {
    /// Wraps `vae` for `image_size`-pixel images (a multiple of its down-sampling factor).
    /// `path` is where the VAE was loaded from (recorded in the cache's index).
    pub fn new(
        vae: Vae<B>,
        image_size: u32,
        batch: usize,
        device: B::Device,
        path: Option<PathBuf>,
    ) -> Result<Self> {
        let f = vae.config.down_factor();
        if image_size as usize % f != 0 {
            return Err(RuntimeError::Options(format!(
                "image size {image_size} is not a multiple of the VAE's down-sampling factor {f}"
            )));
        }
        let side = image_size as usize / f;
        let shape = [vae.config.latent_channels, side, side];
        let description = format!(
            "VAE {} ({f}x, {} channels, scale {}, shift {}) on {image_size}x{image_size} images",
            path.as_ref()
                .map_or("<in memory>".to_string(), |p| p.display().to_string()),
            vae.config.latent_channels,
            vae.config.scaling_factor,
            vae.config.shift_factor
        );
        Ok(Self {
            vae: std::sync::Mutex::new(vae),
            shape,
            image_size,
            batch: batch.max(1),
            device,
            path,
            description,
        })
    }
}

impl<B: Backend> transfusion_data::encoder::ImageEncoder for VaeImageEncoder<B> {
    fn latent_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn encode(&self, image: &RgbImage) -> Result<Vec<f32>, transfusion_data::DataError> {
        Ok(self
            .encode_batch(std::slice::from_ref(image))?
            .pop()
            .expect("one latent per image"))
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn encode_batch(
        &self,
        images: &[RgbImage],
    ) -> Result<Vec<Vec<f32>>, transfusion_data::DataError> {
        let vae = self.vae.lock().expect("VAE lock should not be poisoned");
        // [N, 3, S, S] -> [N, c, S/f, S/f]
        let z = vae.encode(pixels_tensor::<B>(images, self.image_size, &self.device));
        let flat: Vec<f32> = z
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("latents should convert to f32");
        let per: usize = self.shape.iter().product();
        Ok(flat.chunks_exact(per).map(|c| c.to_vec()).collect())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn autoencoder_path(&self) -> Option<PathBuf> {
        self.path.clone()
    }
}
