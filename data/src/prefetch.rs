//! Running a [`DataPipeline`] on a background thread, a few batches ahead of training.
//!
//! The batches and their order are exactly those of the pipeline run in the foreground;
//! [`Prefetcher::state`] is the resume point after the batches the caller has taken (not
//! after the ones waiting in the queue), so checkpoints stay exact. Batches come through
//! [`BatchStream::next_batch`].

use std::sync::mpsc::{sync_channel, Receiver};

use crate::batcher::TransfusionBatcher;
use crate::error::DataError;
use crate::packing::PackedRow;
use crate::pipeline::{BatchStream, DataPipeline, PipelineState};

type Item = Result<(Vec<PackedRow>, PipelineState), DataError>;

/// A pipeline producing rows on its own thread into a bounded queue.
pub struct Prefetcher {
    rx: Receiver<Item>,
    state: PipelineState,
    batcher: TransfusionBatcher,
    failed: bool,
}

impl Prefetcher {
    /// Moves `pipeline` to a new thread that keeps up to `depth` batches ready.
    pub fn spawn(mut pipeline: DataPipeline, depth: usize) -> Result<Self, DataError> {
        let state = pipeline.state();
        let batcher = pipeline.batcher().clone();
        let (tx, rx) = sync_channel::<Item>(depth.max(1));
        std::thread::Builder::new()
            .name("data-prefetch".into())
            .spawn(move || loop {
                let item = pipeline.next_rows().map(|rows| (rows, pipeline.state()));
                let stop = item.is_err();
                // A send error means the Prefetcher was dropped: stop quietly.
                if tx.send(item).is_err() || stop {
                    return;
                }
            })
            .map_err(|e| DataError::Spec {
                spec: "prefetch".into(),
                message: format!("cannot start the data thread: {e}"),
            })?;
        Ok(Self {
            rx,
            state,
            batcher,
            failed: false,
        })
    }

    /// The rows of the next batch (waits for the data thread if it is behind). After an
    /// error the prefetcher is finished: every later call errors too.
    pub fn next_rows(&mut self) -> Result<Vec<PackedRow>, DataError> {
        let dead = || DataError::Spec {
            spec: "prefetch".into(),
            message: "the data thread stopped (after an error, or it panicked)".into(),
        };
        if self.failed {
            return Err(dead());
        }
        match self.rx.recv() {
            Ok(Ok((rows, state))) => {
                self.state = state;
                Ok(rows)
            }
            Ok(Err(e)) => {
                self.failed = true;
                Err(e)
            }
            Err(_) => {
                self.failed = true;
                Err(dead())
            }
        }
    }

    /// The resume point after the batches taken so far (restore it into a fresh
    /// [`DataPipeline`] with [`DataPipeline::restore`]).
    pub fn state(&self) -> PipelineState {
        self.state.clone()
    }

    /// The batcher the pipeline uses (shapes, pad id, noise seed).
    pub fn batcher(&self) -> &TransfusionBatcher {
        &self.batcher
    }
}

impl BatchStream for Prefetcher {
    fn next_rows(&mut self) -> Result<Vec<PackedRow>, DataError> {
        Prefetcher::next_rows(self)
    }

    fn batcher(&self) -> &TransfusionBatcher {
        &self.batcher
    }
}
