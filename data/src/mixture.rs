//! Reading sources forever, epoch after epoch, and mixing several with weights.
//!
//! A [`SourceCursor`] reads one source from a [`StreamPosition`] (epoch, record offset):
//! indexed sources in a seeded random order per epoch (when shuffling), streaming ones in
//! their order. Saving the position and seeking to it later resumes exactly.
//!
//! A [`Mixture`] interleaves sources deterministically by *smooth weighted round robin*:
//! the next sample comes from the source `i` with the smallest `consumed_i / weight_i`
//! (ties: lowest index), where `consumed` counts tokens ([`Balance::Tokens`], the paper's
//! "1:1 in tokens") or samples ([`Balance::Samples`]). No randomness is needed: the order
//! inside every source is already shuffled, and the realised shares track the weights
//! within one sample at all times.

use serde::{Deserialize, Serialize};

use crate::datasets::{RecordIter, Sample, SampleSource};
use crate::error::DataError;
use crate::rng::Rng64;
use crate::source::{open_source, SourceOptions, SourceSpec};

/// A place in a source's infinite stream: record `offset` of epoch `epoch` (records count
/// good and skipped ones alike, so the same position always names the same record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    /// Epoch number, from 0.
    pub epoch: u64,
    /// Record index within the epoch (in the epoch's order).
    pub offset: u64,
}

/// Reads one source from a position on, wrapping around epochs.
pub struct SourceCursor {
    source: Box<dyn SampleSource>,
    pos: StreamPosition,
    shuffle: bool,
    seed: u64,
    order: Option<(u64, Vec<u32>)>,
    stream: Option<RecordIter>,
}

impl SourceCursor {
    /// A cursor at the start of epoch 0. `shuffle`: indexed sources are read in a random
    /// order per epoch, derived from `seed` and the epoch.
    pub fn new(source: Box<dyn SampleSource>, shuffle: bool, seed: u64) -> Self {
        Self {
            source,
            pos: StreamPosition::default(),
            shuffle,
            seed,
            order: None,
            stream: None,
        }
    }

    /// The source.
    pub fn source(&self) -> &dyn SampleSource {
        self.source.as_ref()
    }

    /// Where the next record will be read.
    pub fn position(&self) -> StreamPosition {
        self.pos
    }

    /// Moves to `pos` (a value from [`SourceCursor::position`]).
    pub fn seek(&mut self, pos: StreamPosition) {
        self.pos = pos;
        self.stream = None;
    }

    /// Index of record `offset` of `epoch` in an indexed source of `len` records.
    fn index_of(&mut self, len: usize) -> usize {
        let offset = self.pos.offset as usize;
        if !self.shuffle {
            return offset;
        }
        let epoch = self.pos.epoch;
        if self
            .order
            .as_ref()
            .is_none_or(|(e, o)| *e != epoch || o.len() != len)
        {
            let mut rng = Rng64::from_parts(&[self.seed, epoch, 0x5EF1]);
            self.order = Some((epoch, rng.permutation(len)));
        }
        self.order.as_ref().expect("order was just set").1[offset] as usize
    }

    /// Reads the record at the current position and advances: `Ok(None)` at the end of the
    /// epoch (the position then moves to the next epoch) or for a skipped record.
    fn read_record(&mut self) -> Result<Option<Option<Sample>>, DataError> {
        if self.source.is_indexed() {
            let len = self.source.num_records().unwrap_or(0);
            if self.pos.offset as usize >= len {
                return Ok(None);
            }
            let index = self.index_of(len);
            let rec = self.source.get(self.pos.epoch, index)?;
            self.pos.offset += 1;
            return Ok(Some(rec));
        }
        if self.stream.is_none() {
            self.stream = Some(
                self.source
                    .iter_epoch(self.pos.epoch, self.pos.offset as usize)?,
            );
        }
        let stream = self.stream.as_mut().expect("stream was just opened");
        match stream.next() {
            None => Ok(None),
            Some(rec) => {
                let rec = rec?;
                self.pos.offset += 1;
                Ok(Some(rec))
            }
        }
    }

    /// The next good sample and the position it was read from. Errors when a whole epoch
    /// passes without one usable sample.
    pub fn next_sample(&mut self) -> Result<(StreamPosition, Sample), DataError> {
        let mut boundaries = 0;
        loop {
            let at = self.pos;
            match self.read_record()? {
                Some(Some(sample)) => return Ok((at, sample)),
                Some(None) => {}
                None => {
                    boundaries += 1;
                    if boundaries >= 2 {
                        return Err(DataError::Spec {
                            spec: self.source.describe(),
                            message: format!(
                                "a whole epoch without one usable sample ({})",
                                self.source.skips()
                            ),
                        });
                    }
                    self.seek(StreamPosition {
                        epoch: self.pos.epoch + 1,
                        offset: 0,
                    });
                }
            }
        }
    }
}

/// What a mixture balances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weights are shares of tokens (needs [`Mixture::record_tokens`] after each sample).
    #[default]
    Tokens,
    /// Weights are shares of samples.
    Samples,
}

/// Mixture settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MixtureConfig {
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
    /// Shuffle indexed sources per epoch.
    pub shuffle: bool,
    /// What the weights balance.
    pub balance: Balance,
}

impl Default for MixtureConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            shuffle: true,
            balance: Balance::Tokens,
        }
    }
}

/// Everything needed to resume a mixture exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixtureState {
    /// Position of each source's cursor.
    pub positions: Vec<StreamPosition>,
    /// Tokens recorded per source.
    pub tokens: Vec<u64>,
    /// Samples drawn per source.
    pub samples: Vec<u64>,
}

/// One sample drawn from a mixture.
#[derive(Clone, Debug, PartialEq)]
pub struct Drawn {
    /// Index of the source in the mixture.
    pub source: usize,
    /// Where in that source it was read.
    pub position: StreamPosition,
    /// The sample.
    pub sample: Sample,
}

/// Several sources interleaved by weight (see the module docs).
pub struct Mixture {
    cursors: Vec<SourceCursor>,
    weights: Vec<f64>,
    balance: Balance,
    tokens: Vec<u64>,
    samples: Vec<u64>,
    unrecorded: Option<usize>,
}

/// Positive finite weights as shares summing to 1. Scaled first by the power of two nearest
/// below the largest (exact in floating point), so weights near `f64::MAX`, whose plain sum
/// overflows to infinity, give the same shares as small ones.
pub fn shares(weights: &[f64]) -> Vec<f64> {
    let max = weights.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
    let scale = 2f64.powi(max.log2().floor() as i32);
    let scaled: Vec<f64> = weights.iter().map(|w| w / scale).collect();
    let total: f64 = scaled.iter().sum();
    scaled.iter().map(|w| w / total).collect()
}

impl Mixture {
    /// Mixes `sources` with their (positive) weights; weights are normalized to sum 1.
    pub fn new(
        sources: Vec<(Box<dyn SampleSource>, f64)>,
        config: &MixtureConfig,
    ) -> Result<Self, DataError> {
        if sources.is_empty() {
            return Err(DataError::Spec {
                spec: String::new(),
                message: "no data sources given".into(),
            });
        }
        let mut cursors = Vec::new();
        let mut raw = Vec::new();
        for (i, (src, w)) in sources.into_iter().enumerate() {
            if !(w.is_finite() && w > 0.0) {
                return Err(DataError::Spec {
                    spec: src.describe(),
                    message: format!("weight must be positive, got {w}"),
                });
            }
            raw.push(w);
            cursors.push(SourceCursor::new(
                src,
                config.shuffle,
                crate::rng::derive_seed(&[config.seed, i as u64]),
            ));
        }
        let n = cursors.len();
        Ok(Self {
            cursors,
            weights: shares(&raw),
            balance: config.balance,
            tokens: vec![0; n],
            samples: vec![0; n],
            unrecorded: None,
        })
    }

    /// Opens every spec with `opts` and mixes them with the specs' weights.
    pub fn open(
        specs: &[SourceSpec],
        opts: &SourceOptions,
        config: &MixtureConfig,
    ) -> Result<Self, DataError> {
        let sources = specs
            .iter()
            .map(|s| Ok((open_source(s, opts)?, s.weight)))
            .collect::<Result<Vec<_>, DataError>>()?;
        Self::new(sources, config)
    }

    /// Number of sources.
    pub fn num_sources(&self) -> usize {
        self.cursors.len()
    }

    /// Source `i`.
    pub fn source(&self, i: usize) -> &dyn SampleSource {
        self.cursors[i].source()
    }

    /// Normalized weights.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Tokens recorded per source.
    pub fn tokens(&self) -> &[u64] {
        &self.tokens
    }

    /// Samples drawn per source.
    pub fn samples(&self) -> &[u64] {
        &self.samples
    }

    /// The source the next sample will come from.
    pub fn next_source(&self) -> usize {
        let consumed = |i: usize| match self.balance {
            Balance::Tokens => self.tokens[i] as f64,
            Balance::Samples => self.samples[i] as f64,
        };
        let mut best = 0;
        for i in 1..self.cursors.len() {
            if consumed(i) / self.weights[i] < consumed(best) / self.weights[best] {
                best = i;
            }
        }
        best
    }

    /// Draws the next sample. With [`Balance::Tokens`], the previous sample's token count
    /// must have been given to [`Mixture::record_tokens`] first.
    pub fn next_sample(&mut self) -> Result<Drawn, DataError> {
        if let (Balance::Tokens, Some(i)) = (self.balance, self.unrecorded) {
            return Err(DataError::Spec {
                spec: self.cursors[i].source().describe(),
                message:
                    "token-balanced mixture: record_tokens was not called for the previous sample"
                        .into(),
            });
        }
        let i = self.next_source();
        let (position, sample) = self.cursors[i].next_sample()?;
        self.samples[i] += 1;
        self.unrecorded = Some(i);
        Ok(Drawn {
            source: i,
            position,
            sample,
        })
    }

    /// Counts `tokens` for the sample last drawn from `source`.
    pub fn record_tokens(&mut self, source: usize, tokens: u64) {
        self.tokens[source] += tokens;
        if self.unrecorded == Some(source) {
            self.unrecorded = None;
        }
    }

    /// A snapshot to resume from (call between a draw and its `record_tokens` and the
    /// record is lost: snapshot after recording).
    pub fn state(&self) -> MixtureState {
        MixtureState {
            positions: self.cursors.iter().map(SourceCursor::position).collect(),
            tokens: self.tokens.clone(),
            samples: self.samples.clone(),
        }
    }

    /// Restores a snapshot taken from a mixture of the same sources.
    pub fn restore(&mut self, state: &MixtureState) -> Result<(), DataError> {
        let n = self.cursors.len();
        if state.positions.len() != n || state.tokens.len() != n || state.samples.len() != n {
            return Err(DataError::Spec {
                spec: "mixture state".into(),
                message: format!(
                    "state is for {} sources, this mixture has {n}",
                    state.positions.len()
                ),
            });
        }
        for (c, &p) in self.cursors.iter_mut().zip(&state.positions) {
            c.seek(p);
        }
        self.tokens = state.tokens.clone();
        self.samples = state.samples.clone();
        self.unrecorded = None;
        Ok(())
    }
}
