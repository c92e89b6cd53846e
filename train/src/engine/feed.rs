//! The training stream of a Transfusion-model task (pretraining, distillation):
//! [`Feed`].

use std::sync::Arc;

use transfusion_data::batcher::TransfusionBatcher;
use transfusion_data::packing::PackedRow;
use transfusion_data::pipeline::{DataPipeline, PipelineState};
use transfusion_data::prefetch::Prefetcher;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_model::TransfusionConfig;

use crate::config::ExperimentConfig;
use crate::data::{build_pipeline, Split};
use crate::error::Result;

/// The training batches: read directly, or by a background thread.
pub enum Feed {
    /// Batches built on the training thread.
    Direct(DataPipeline),
    /// Batches built ahead by a background thread.
    Prefetch(Prefetcher),
}

impl Feed {
    /// The training stream of `cfg` (prefetched when `data.prefetch > 0`), at `resume`
    /// when continuing a run.
    pub fn start(
        cfg: &ExperimentConfig,
        m: &TransfusionConfig,
        tokenizer: &Arc<TextTokenizer>,
        resume: Option<&PipelineState>,
    ) -> Result<Self> {
        let mut pipeline =
            build_pipeline(cfg, m, tokenizer, Split::Train, cfg.training.batch_size)?;
        if let Some(state) = resume {
            pipeline.restore(state)?;
        }
        Ok(if cfg.data.prefetch > 0 {
            Feed::Prefetch(Prefetcher::spawn(pipeline, cfg.data.prefetch)?)
        } else {
            Feed::Direct(pipeline)
        })
    }

    /// The next micro-batch's packed rows.
    pub fn next_rows(&mut self) -> Result<Vec<PackedRow>> {
        Ok(match self {
            Feed::Direct(p) => p.next_rows()?,
            Feed::Prefetch(p) => p.next_rows()?,
        })
    }

    /// The batcher that turns rows into tensors.
    pub fn batcher(&self) -> &TransfusionBatcher {
        match self {
            Feed::Direct(p) => p.batcher(),
            Feed::Prefetch(p) => p.batcher(),
        }
    }

    /// Where the stream stands (saved with a checkpoint).
    pub fn state(&self) -> PipelineState {
        match self {
            Feed::Direct(p) => p.state(),
            Feed::Prefetch(p) => p.state(),
        }
    }
}
