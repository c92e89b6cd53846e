//! `transfusion-train cache-latents`: encode every image of a source once.

use std::path::PathBuf;

use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_data::encoder::ImageEncoder;
use transfusion_data::source::{SourceOptions, SourceSpec};
use transfusion_runtime::autoencoder::{load_vae, VaeImageEncoder};
use transfusion_runtime::device::{dispatch, BackendTask, DeviceChoice};
use transfusion_train::engine::step_progress_bar;

/// Flags of `cache-latents`.
#[derive(Args, Debug)]
pub struct CacheArgs {
    /// Source with images (KIND:LOCATION).
    #[arg(long)]
    pub data: SourceSpec,
    /// Image side in pixels (latent [3, S, S] in pixel space, [c, S/f, S/f] with a VAE).
    #[arg(long, default_value_t = 32)]
    pub image_size: u32,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Latents per shard file.
    #[arg(long, default_value_t = 4096)]
    pub per_shard: usize,
    /// Encode with this VAE: a VAE checkpoint or run directory (`transfusion-train vae`),
    /// or a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).
    /// Latents are the posterior mode, scaled by the VAE's scaling factor and shift.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Images per VAE call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Device for the VAE: auto, cpu, wgpu, cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

struct CacheVaeTask(CacheArgs, PathBuf);

impl BackendTask for CacheVaeTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        let a = &self.0;
        let vae = load_vae::<B::InnerBackend>(&self.1, &device)?;
        let path = std::fs::canonicalize(&self.1).unwrap_or(self.1.clone());
        let enc = VaeImageEncoder::new(vae, a.image_size, a.batch, device.clone(), Some(path))?;
        eprintln!("encoding with {} on {label}", enc.describe());
        write_cache(a, &enc)
    }
}

fn write_cache(a: &CacheArgs, enc: &dyn ImageEncoder) -> anyhow::Result<()> {
    let opts = SourceOptions {
        shapes_image_size: a.image_size,
        ..Default::default()
    };
    let src = transfusion_data::source::open_source(&a.data, &opts)?;
    let bar = step_progress_bar(src.num_records().unwrap_or(0) as u64, 0, true);
    let index = transfusion_data::latent_cache::cache_latents(
        src.as_ref(),
        enc,
        &a.out,
        a.per_shard,
        |n, _| bar.set_position(n as u64),
    )?;
    bar.finish();
    println!(
        "wrote {} latents {:?} in {} shard(s) to {} (train on it with --data latents:{})",
        index.count,
        index.shape,
        index.shards.len(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

/// Writes the cache (with the VAE of `--vae`, else in pixel space).
pub fn run(a: CacheArgs) -> anyhow::Result<()> {
    match a.vae.clone() {
        Some(vae) => {
            let device = a.device;
            dispatch(device, CacheVaeTask(a, vae))?
        }
        None => {
            let enc = transfusion_data::encoder::PixelEncoder::new(a.image_size);
            write_cache(&a, &enc)
        }
    }
}
