//! `transfusion-train vae-bench`: VAE encode and decode throughput.

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_model::vae::VaeConfig;
use transfusion_runtime::device::{dispatch, BackendTask, DeviceChoice};
use transfusion_train::vae::{bench_vae, VaeTrainConfig};

/// Flags of `vae-bench`.
#[derive(Args, Debug, Clone)]
pub struct VaeBenchArgs {
    /// Network preset: tiny, sd, paper.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Images per call.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Timed calls of each of encode and decode.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed warm-up calls.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Device: auto, cpu, wgpu, cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

struct VaeBenchTask(VaeBenchArgs, VaeConfig);

impl BackendTask for VaeBenchTask {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output {
        let a = &self.0;
        let r = bench_vae::<B::InnerBackend>(
            &self.1, a.size, a.batch, a.iters, a.warmup, &device, label,
        );
        println!(
            "VAE `{}` ({} parameters) on {}, {}px, batch {}:",
            a.preset, r.params, r.device, r.image_size, r.batch
        );
        println!("encode: {:.2} images/s", r.encode_images_per_s);
        println!("decode: {:.2} images/s", r.decode_images_per_s);
        Ok(())
    }
}

/// Measures and prints the throughput.
pub fn run(a: VaeBenchArgs) -> anyhow::Result<()> {
    let config = VaeTrainConfig::preset_vae(&a.preset).with_context(|| {
        format!(
            "unknown VAE preset `{}` (one of {})",
            a.preset,
            VaeTrainConfig::PRESETS.join(", ")
        )
    })?;
    let f = config.down_factor();
    anyhow::ensure!(
        a.size % f == 0,
        "--size {} should be a multiple of the preset's down-sampling factor {f}",
        a.size
    );
    dispatch(a.device, VaeBenchTask(a, config))?
}
