//! Throughput measurements of the data side: image decoding and batch building, on one
//! thread and on N worker threads (`std::thread`, work split evenly).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::datasets::synthetic::ShapesSource;
use crate::encoder::PixelEncoder;
use crate::error::DataError;
use crate::mixture::{Mixture, MixtureConfig};
use crate::packing::PackConfig;
use crate::pipeline::{DataPipeline, PipelineConfig};
use crate::rng::Rng64;
use crate::sequence::{SequenceConfig, TokenSource};
use crate::synthetic::shapes::ShapesGenerator;

/// One measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchResult {
    /// What was measured.
    pub task: String,
    /// Worker threads.
    pub threads: usize,
    /// Samples processed (images decoded, or documents packed into batches).
    pub samples: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// `samples / seconds`.
    pub samples_per_sec: f64,
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} thread(s): {} samples in {:.3}s = {:.1} samples/s",
            self.task, self.threads, self.samples, self.seconds, self.samples_per_sec
        )
    }
}

/// Writes `count` JPEG files of `size` x `size` pixels (smooth gradients plus noise, so
/// they compress like photos) into `dir`; returns their paths.
pub fn write_bench_jpegs(dir: &Path, count: usize, size: u32) -> Result<Vec<PathBuf>, DataError> {
    let mut paths = Vec::with_capacity(count);
    for i in 0..count {
        let mut rng = Rng64::from_parts(&[0xBE7C, i as u64]);
        let (a, b) = (rng.below(256) as u32, rng.below(256) as u32);
        let img = RgbImage::from_fn(size, size, |x, y| {
            let n = rng.below(32) as u32;
            Rgb([
                ((x * 255 / size + a + n) % 256) as u8,
                ((y * 255 / size + b + n) % 256) as u8,
                (((x + y) * 127 / size + n) % 256) as u8,
            ])
        });
        let path = dir.join(format!("bench-{i:05}.jpg"));
        img.save_with_format(&path, image::ImageFormat::Jpeg)
            .map_err(|e| DataError::invalid(&path, format!("cannot write JPEG: {e}")))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Runs `work(thread_index, threads)` on `threads` threads; returns the summed sample
/// count and the wall-clock seconds.
fn timed<F>(threads: usize, work: F) -> Result<(usize, f64), DataError>
where
    F: Fn(usize, usize) -> Result<usize, DataError> + Sync,
{
    let start = Instant::now();
    let counts: Vec<Result<usize, DataError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let w = &work;
                s.spawn(move || w(t, threads))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench worker should not panic"))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    Ok((total, secs))
}

fn result(task: &str, threads: usize, samples: usize, seconds: f64) -> BenchResult {
    BenchResult {
        task: task.into(),
        threads,
        samples,
        seconds,
        samples_per_sec: samples as f64 / seconds.max(1e-9),
    }
}

/// Decoding + centre-crop + resize to `target_size` + `[-1, 1]` conversion of `count`
/// generated `source_size`-pixel JPEGs (written to a temporary directory first), once per
/// entry of `threads`.
pub fn bench_decode(
    count: usize,
    source_size: u32,
    target_size: u32,
    threads: &[usize],
) -> Result<Vec<BenchResult>, DataError> {
    let dir = tempfile::tempdir().map_err(|e| DataError::io(std::env::temp_dir(), e))?;
    let paths = write_bench_jpegs(dir.path(), count, source_size)?;
    let encoder = PixelEncoder::new(target_size);
    let task = format!("decode {source_size}px JPEG + resize to {target_size}");
    let mut out = Vec::new();
    for &t in threads {
        let t = t.max(1);
        let (n, secs) = timed(t, |i, t| {
            let mut done = 0;
            for p in paths.iter().skip(i).step_by(t) {
                let img = crate::image::load_image(p)?;
                let latent = crate::encoder::ImageEncoder::encode(&encoder, &img)?;
                std::hint::black_box(latent);
                done += 1;
            }
            Ok(done)
        })?;
        out.push(result(&task, t, n, secs));
    }
    Ok(out)
}

/// Settings of [`bench_batches`].
#[derive(Clone, Debug)]
pub struct BatchBench {
    /// Side of the generated shapes images (and of the pixel latents).
    pub image_size: u32,
    /// Latent patch side.
    pub patch_size: usize,
    /// Row length.
    pub seq_len: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Batches built per thread.
    pub batches: usize,
}

/// Building batches (shapes generation, tokenization, layout, packing, noise, CPU arrays;
/// not the upload to a device) from `shapes` pairs, each thread running its own pipeline,
/// once per entry of `threads`. Samples are documents packed.
pub fn bench_batches(
    tokenizer: Arc<dyn TokenSource>,
    cfg: &BatchBench,
    threads: &[usize],
) -> Result<Vec<BenchResult>, DataError> {
    let task = format!(
        "batches of {}x{} ({}px images, patch {})",
        cfg.batch_size, cfg.seq_len, cfg.image_size, cfg.patch_size
    );
    let mut out = Vec::new();
    for &t in threads {
        let t = t.max(1);
        let (n, secs) = timed(t, |i, _| {
            let gen = ShapesGenerator::new(i as u64).with_image_size(cfg.image_size);
            let mix = Mixture::new(
                vec![(Box::new(ShapesSource::new(gen, 100_000)), 1.0)],
                &MixtureConfig::default(),
            )?;
            let config = PipelineConfig {
                batch_size: cfg.batch_size,
                pack: PackConfig::new(cfg.seq_len),
                sequence: SequenceConfig {
                    patch_size: cfg.patch_size,
                    ..Default::default()
                },
                seed: i as u64,
            };
            let mut pipe = DataPipeline::new(
                mix,
                tokenizer.clone(),
                Arc::new(PixelEncoder::new(cfg.image_size)),
                config,
            )?;
            for _ in 0..cfg.batches {
                let rows = pipe.next_rows()?;
                std::hint::black_box(pipe.batcher().arrays(&rows)?);
            }
            Ok(pipe.state().stats.sequences as usize)
        })?;
        out.push(result(&task, t, n, secs));
    }
    Ok(out)
}
