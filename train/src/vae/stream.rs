//! The VAE's training images: [`ImageStream`], cycled over any data sources.

use crate::error::{Result, TrainError};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use transfusion_data::datasets::{ImageData, RecordIter, Sample, SampleSource};
use transfusion_data::image::center_crop_resize;
use transfusion_data::rng::derive_seed;
use transfusion_data::source::{open_source, SourceOptions, SourceSpec};

/// Position in the image stream: epoch, source, record within the source's epoch order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPos {
    /// Pass over all sources.
    pub epoch: u64,
    /// Source index.
    pub source: usize,
    /// Records of that source consumed in this epoch.
    pub record: usize,
}

/// Images of a list of sources, cycled epoch after epoch; indexed sources are shuffled per
/// epoch (seeded), streamed ones read in order.
pub struct ImageStream {
    sources: Vec<Box<dyn SampleSource>>,
    specs: Vec<String>,
    image_size: u32,
    seed: u64,
    pos: StreamPos,
    order: Option<Vec<usize>>,
    iter: Option<RecordIter>,
}

impl ImageStream {
    /// Opens `specs` (shapes drawn with `shapes_seed`) at `image_size` pixels.
    pub fn open(
        specs: &[SourceSpec],
        image_size: u32,
        seed: u64,
        shapes_seed: u64,
    ) -> Result<Self> {
        let opts = SourceOptions {
            seed,
            shapes_image_size: image_size,
            shapes_seed,
            ..SourceOptions::default()
        };
        let sources = specs
            .iter()
            .map(|s| {
                open_source(s, &opts)
                    .map_err(|e| TrainError::from(e).within(format!("opening --data {s}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            sources,
            specs: specs.iter().map(|s| s.to_string()).collect(),
            image_size,
            seed,
            pos: StreamPos::default(),
            order: None,
            iter: None,
        })
    }

    /// The position after the last image returned.
    pub fn pos(&self) -> StreamPos {
        self.pos
    }

    /// Continues from `pos` (a resumed run).
    pub fn seek(&mut self, pos: StreamPos) {
        self.pos = pos;
        self.order = None;
        self.iter = None;
    }

    fn next_record(&mut self) -> Result<Option<Sample>> {
        let src = &self.sources[self.pos.source];
        if src.is_indexed() {
            let n = src.num_records().unwrap_or(0);
            if self.order.is_none() {
                let mut order: Vec<usize> = (0..n).collect();
                let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(&[
                    self.seed,
                    self.pos.epoch,
                    self.pos.source as u64,
                ]));
                order.shuffle(&mut rng);
                self.order = Some(order);
            }
            let order = self.order.as_ref().expect("set above");
            if self.pos.record >= order.len() {
                return Ok(None);
            }
            let idx = order[self.pos.record];
            self.pos.record += 1;
            Ok(src.get(self.pos.epoch, idx)?)
        } else {
            if self.iter.is_none() {
                self.iter = Some(src.iter_epoch(self.pos.epoch, self.pos.record)?);
            }
            match self.iter.as_mut().expect("set above").next() {
                None => Ok(None),
                Some(r) => {
                    self.pos.record += 1;
                    Ok(r?)
                }
            }
        }
    }

    /// The next image (center-cropped and resized), moving to the next source / epoch at
    /// the end of one. Errors when a whole pass over every source yields no image.
    pub fn next_image(&mut self) -> Result<RgbImage> {
        let mut empty_sources = 0;
        loop {
            match self.next_record()? {
                Some(Sample::Pair {
                    image: ImageData::Pixels(img),
                    ..
                }) => return Ok(center_crop_resize(&img, self.image_size)),
                Some(Sample::Pair {
                    image: ImageData::Latent { .. },
                    ..
                }) => {
                    return Err(TrainError::Setting(format!(
                        "{}: holds latents, not images; a VAE trains on images",
                        self.specs[self.pos.source]
                    )))
                }
                Some(Sample::Text(_)) => {}
                None if self.pos.record == 0 => {
                    empty_sources += 1;
                    if empty_sources > self.sources.len() {
                        return Err(TrainError::Setting(format!(
                            "no images in {}",
                            self.specs.join(", ")
                        )));
                    }
                    self.advance_source();
                }
                None => {
                    empty_sources = 0;
                    self.advance_source();
                }
            }
        }
    }

    fn advance_source(&mut self) {
        self.pos.record = 0;
        self.pos.source += 1;
        if self.pos.source == self.sources.len() {
            self.pos.source = 0;
            self.pos.epoch += 1;
        }
        self.order = None;
        self.iter = None;
    }

    /// The next `n` images.
    pub fn next_images(&mut self, n: usize) -> Result<Vec<RgbImage>> {
        (0..n).map(|_| self.next_image()).collect()
    }
}
