//! The whole input pipeline: mixture -> sequences -> packed rows -> batches, resumable.
//!
//! Each batch fills `batch_size` rows by greedy first-fit; the first document that fits
//! no row ends the batch and is carried over to the next one. Every random choice is
//! derived from the pipeline seed and the sample's (source, epoch, offset), and the
//! [`PipelineState`] records the mixture as it was *before* the carried document, so
//! restoring a state regenerates exactly the batches that would have followed.

use std::sync::Arc;

use burn::prelude::Backend;
use serde::{Deserialize, Serialize};
use transfusion_model::batch::TransfusionBatch;

use crate::batcher::TransfusionBatcher;
use crate::encoder::ImageEncoder;
use crate::error::DataError;
use crate::mixture::{Mixture, MixtureState};
use crate::packing::{first_fit, PackConfig, PackStats, PackedRow};
use crate::rng::{derive_seed, Rng64};
use crate::sequence::{MixedSequence, SequenceBuilder, SequenceConfig, TokenSource};

/// Pipeline settings (the mixture and its sources are configured separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// Rows per batch `b`.
    pub batch_size: usize,
    /// Row length and overlong-text handling.
    pub pack: PackConfig,
    /// Sequence layout (patch size, pair ordering, dropout, timesteps).
    pub sequence: SequenceConfig,
    /// Seed of layouts, timesteps and noise.
    pub seed: u64,
}

/// Everything needed to resume a pipeline exactly (store it with a checkpoint).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineState {
    /// The mixture before the next document to place.
    pub mixture: MixtureState,
    /// Pieces of that document already placed in an earlier batch (split text only).
    pub skip_pieces: usize,
    /// Batches produced so far.
    pub batches: u64,
    /// Packing counters.
    pub stats: PackStats,
}

struct Carry {
    before: MixtureState,
    stats_before: PackStats,
    pieces: Vec<MixedSequence>,
    placed: usize,
}

/// A stream of packed rows with the batcher that turns them into batches: a
/// [`DataPipeline`] in the foreground or a [`crate::prefetch::Prefetcher`] on a thread.
pub trait BatchStream {
    /// The rows of the next batch.
    fn next_rows(&mut self) -> Result<Vec<PackedRow>, DataError>;

    /// The batcher (latent shape, patch size, pad id, noise seed).
    fn batcher(&self) -> &TransfusionBatcher;

    /// The next batch on `device`.
    fn next_batch<B: Backend>(
        &mut self,
        device: &B::Device,
    ) -> Result<TransfusionBatch<B>, DataError> {
        let rows = self.next_rows()?;
        self.batcher().batch(rows, device)
    }
}

impl BatchStream for DataPipeline {
    fn next_rows(&mut self) -> Result<Vec<PackedRow>, DataError> {
        DataPipeline::next_rows(self)
    }

    fn batcher(&self) -> &TransfusionBatcher {
        &self.batcher
    }
}

/// Mixture -> [`SequenceBuilder`] -> packing -> [`TransfusionBatcher`].
pub struct DataPipeline {
    mixture: Mixture,
    builder: SequenceBuilder,
    batcher: TransfusionBatcher,
    config: PipelineConfig,
    carry: Option<Carry>,
    skip_pieces: usize,
    batches: u64,
    stats: PackStats,
    dropped_in_a_row: usize,
}

/// Consecutive documents dropped by packing (each an image document longer than a row)
/// after which the pipeline gives up: a source whose every document is dropped records no
/// tokens, so a token-balanced mixture would otherwise draw from it forever.
const MAX_DROPPED_IN_A_ROW: usize = 1000;

impl DataPipeline {
    /// Assembles a pipeline. Errors when an image (n patches + BOS BOI EOI EOS) cannot fit
    /// a row, or on a bad sequence config.
    pub fn new(
        mixture: Mixture,
        tokenizer: Arc<dyn TokenSource>,
        encoder: Arc<dyn ImageEncoder>,
        config: PipelineConfig,
    ) -> Result<Self, DataError> {
        let builder =
            SequenceBuilder::new(config.sequence.clone(), tokenizer.clone(), encoder.clone())?;
        let n = builder.patches_per_image();
        if n + 4 > config.pack.seq_len || config.batch_size == 0 {
            return Err(DataError::Spec {
                spec: "pipeline config".into(),
                message: format!(
                    "seq_len {} cannot hold one image ({n} patches + 4 tokens), or batch_size {} is 0",
                    config.pack.seq_len, config.batch_size
                ),
            });
        }
        let batcher = TransfusionBatcher::new(
            encoder.latent_shape(),
            config.sequence.patch_size,
            tokenizer.special_tokens().pad,
            derive_seed(&[config.seed, 0x4015E]),
        );
        Ok(Self {
            mixture,
            builder,
            batcher,
            config,
            carry: None,
            skip_pieces: 0,
            batches: 0,
            stats: PackStats::default(),
            dropped_in_a_row: 0,
        })
    }

    /// The mixture (sources, weights, counters).
    pub fn mixture(&self) -> &Mixture {
        &self.mixture
    }

    /// The batcher (latent shape, patch size, pad id, noise seed).
    pub fn batcher(&self) -> &TransfusionBatcher {
        &self.batcher
    }

    /// The sequence builder.
    pub fn builder(&self) -> &SequenceBuilder {
        &self.builder
    }

    /// Packing counters (documents, truncated, dropped).
    pub fn stats(&self) -> &PackStats {
        &self.stats
    }

    /// Draws the next document: its pieces (after truncation / splitting; none when
    /// dropped), and the state before it.
    fn next_document(&mut self) -> Result<Carry, DataError> {
        let before = self.mixture.state();
        let stats_before = self.stats.clone();
        let drawn = self.mixture.next_sample()?;
        let p = drawn.position;
        let mut rng =
            Rng64::from_parts(&[self.config.seed, drawn.source as u64, p.epoch, p.offset]);
        let seq = self.builder.build(drawn.sample, &mut rng)?;
        let pieces = self.config.pack.prepare(seq, &mut self.stats);
        // The balance counts what is trained: the tokens packing keeps (the first seq_len
        // of a truncated document, none of a dropped one), not the document's length.
        let kept: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        self.mixture.record_tokens(drawn.source, kept);
        self.dropped_in_a_row = if kept == 0 {
            self.dropped_in_a_row + 1
        } else {
            0
        };
        if self.dropped_in_a_row >= MAX_DROPPED_IN_A_ROW {
            return Err(DataError::Spec {
                spec: self.mixture.source(drawn.source).describe(),
                message: format!(
                    "{MAX_DROPPED_IN_A_ROW} documents in a row were dropped as longer than a \
                     row of seq_len {}: raise seq_len or use smaller images",
                    self.config.pack.seq_len
                ),
            });
        }
        let placed = std::mem::take(&mut self.skip_pieces).min(pieces.len());
        Ok(Carry {
            before,
            stats_before,
            pieces,
            placed,
        })
    }

    /// The rows of the next batch.
    pub fn next_rows(&mut self) -> Result<Vec<PackedRow>, DataError> {
        let pad = self.batcher.config.pad_id;
        let mut rows: Vec<PackedRow> = (0..self.config.batch_size)
            .map(|r| {
                let mut row = PackedRow::new(self.config.pack.seq_len, pad);
                row.noise_seed = derive_seed(&[self.batches, r as u64]);
                row
            })
            .collect();
        loop {
            let mut doc = match self.carry.take() {
                Some(c) => c,
                None => self.next_document()?,
            };
            while doc.placed < doc.pieces.len() {
                let piece = std::mem::take(&mut doc.pieces[doc.placed]);
                match first_fit(&mut rows, piece) {
                    Ok(()) => doc.placed += 1,
                    Err(back) => {
                        doc.pieces[doc.placed] = back;
                        self.carry = Some(doc);
                        self.batches += 1;
                        return Ok(rows);
                    }
                }
            }
        }
    }

    /// Where the pipeline stands (store it with a checkpoint).
    pub fn state(&self) -> PipelineState {
        match &self.carry {
            Some(c) => PipelineState {
                mixture: c.before.clone(),
                skip_pieces: c.placed,
                batches: self.batches,
                stats: c.stats_before.clone(),
            },
            None => PipelineState {
                mixture: self.mixture.state(),
                skip_pieces: self.skip_pieces,
                batches: self.batches,
                stats: self.stats.clone(),
            },
        }
    }

    /// Continues from a state of a pipeline with the same sources and config.
    pub fn restore(&mut self, state: &PipelineState) -> Result<(), DataError> {
        self.mixture.restore(&state.mixture)?;
        self.carry = None;
        self.skip_pieces = state.skip_pieces;
        self.batches = state.batches;
        self.stats = state.stats.clone();
        Ok(())
    }
}
