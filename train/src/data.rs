//! Building the data side of a run from the experiment config: tokenizer, image encoder,
//! training and held-out pipelines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use transfusion_data::encoder::{FnEncoder, ImageEncoder, PixelEncoder};
use transfusion_data::latent_cache::LatentCacheSource;
use transfusion_data::mixture::{Mixture, MixtureConfig};
use transfusion_data::packing::PackConfig;
use transfusion_data::pipeline::{DataPipeline, PipelineConfig};
use transfusion_data::rng::derive_seed;
use transfusion_data::sequence::SequenceConfig;
use transfusion_data::source::{SourceKind, SourceOptions, SourceSpec};
use transfusion_data::synthetic::shapes::ShapesGenerator;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_data::DataError;
use transfusion_model::TransfusionConfig;
use transfusion_runtime::checkpoint::AutoencoderRef;

use crate::config::ExperimentConfig;
use crate::error::{Result, TrainError};

/// Finds a file a config names (the tokenizer, an init checkpoint): as given (relative to
/// the working directory), else relative to `base` (the config file's directory), else
/// relative to the workspace root this binary was built from (so `assets/tokenizer.json`
/// works from anywhere in a checkout).
pub fn resolve_path(path: &Path, base: Option<&Path>) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    let mut candidates = vec![];
    if let Some(b) = base {
        candidates.push(b.join(path));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path));
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| path.to_path_buf())
}

/// Loads the tokenizer named by the config.
pub fn load_tokenizer(cfg: &ExperimentConfig, base: Option<&Path>) -> Result<TextTokenizer> {
    let path = resolve_path(&cfg.data.tokenizer, base);
    TextTokenizer::from_file(&path).map_err(|e| TrainError::from(e).within("data.tokenizer"))
}

/// The image encoder a model needs: the identity pixel encoder for a pixel-space model
/// (`[3, S, S]` with `S = data.image_size`), otherwise an encoder that only accepts
/// pre-computed latents (`latents:` sources) and explains why pixels cannot be used.
pub fn encoder_for(m: &TransfusionConfig, image_size: u32) -> Arc<dyn ImageEncoder> {
    if m.latent_channels == 3 && m.latent_size == image_size as usize {
        return Arc::new(PixelEncoder::new(image_size));
    }
    let shape = [m.latent_channels, m.latent_size, m.latent_size];
    Arc::new(FnEncoder {
        shape,
        description: format!("latents {shape:?} only (no VAE in this build)"),
        f: move |_img: &image::RgbImage| -> Result<Vec<f32>, DataError> {
            Err(DataError::Spec {
                spec: "image encoder".into(),
                message: format!(
                    "the model expects latents {shape:?} and no VAE is available: cache latents \
                     first and train on `latents:DIR` sources"
                ),
            })
        },
    })
}

/// The autoencoder a model trained on `cfg`'s data decodes with: the VAE recorded in its
/// latent caches (`latents:DIR` sources written by `cache-latents --vae`), else pixel
/// space. Caches made with different VAEs cannot be mixed.
pub fn autoencoder_for(cfg: &ExperimentConfig) -> Result<AutoencoderRef> {
    let mut found: Option<PathBuf> = None;
    for spec in &cfg.data.train {
        if spec.kind != SourceKind::Latents {
            continue;
        }
        let dir = Path::new(&spec.location);
        let index = LatentCacheSource::open(dir)
            .map_err(|e| TrainError::from(e).within("reading a latent cache"))?
            .index()
            .clone();
        match (&found, index.vae) {
            (_, None) => {}
            (None, Some(v)) => found = Some(v),
            (Some(a), Some(b)) if *a == b => {}
            (Some(a), Some(b)) => {
                return Err(TrainError::Setting(format!(
                    "latent caches of different VAEs in data.train: {} and {} ({})",
                    a.display(),
                    b.display(),
                    dir.display()
                )))
            }
        }
    }
    Ok(match found {
        Some(path) => AutoencoderRef::Vae { path },
        None => AutoencoderRef::Pixel,
    })
}

/// Which split a pipeline reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// `data.train` with the training shapes seed.
    Train,
    /// `data.held_out` (or `data.train` with the held-out shapes seed when empty).
    HeldOut,
}

/// The pipeline of `split` with `batch_size` rows of the config's `seq_len`.
pub fn build_pipeline(
    cfg: &ExperimentConfig,
    m: &TransfusionConfig,
    tokenizer: &Arc<TextTokenizer>,
    split: Split,
    batch_size: usize,
) -> Result<DataPipeline> {
    let d = &cfg.data;
    let (specs, shapes_seed, seed): (&[SourceSpec], u64, u64) = match split {
        Split::Train => (&d.train, ShapesGenerator::TRAIN_SEED, cfg.seed),
        Split::HeldOut if d.held_out.is_empty() => (
            &d.train,
            ShapesGenerator::HELD_OUT_SEED,
            derive_seed(&[cfg.seed, 0xE7A1]),
        ),
        Split::HeldOut => (
            &d.held_out,
            ShapesGenerator::HELD_OUT_SEED,
            derive_seed(&[cfg.seed, 0xE7A1]),
        ),
    };
    let opts = SourceOptions {
        strict: d.strict,
        seed,
        shapes_image_size: d.image_size,
        shapes_max_shapes: d.shapes_max_shapes,
        shapes_seed,
        ..SourceOptions::default()
    };
    let mixture = Mixture::open(
        specs,
        &opts,
        &MixtureConfig {
            seed: derive_seed(&[seed, 1]),
            shuffle: true,
            balance: d.balance,
        },
    )
    .map_err(|e| TrainError::from(e).within("opening data sources"))?;
    let config = PipelineConfig {
        batch_size,
        pack: PackConfig::new(cfg.training.seq_len),
        sequence: SequenceConfig {
            patch_size: m.patch_size,
            p_caption_first: d.p_caption_first,
            caption_dropout: d.caption_dropout,
            noise_limit: (d.noise_limit > 0).then_some(d.noise_limit),
            max_timestep: m.timesteps as u32,
        },
        seed: derive_seed(&[seed, 2]),
    };
    let tok: Arc<dyn transfusion_data::sequence::TokenSource> = tokenizer.clone();
    DataPipeline::new(mixture, tok, encoder_for(m, d.image_size), config)
        .map_err(|e| TrainError::from(e).within("building the data pipeline"))
}
