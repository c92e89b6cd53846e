//! Starting a run from a checkpoint's weights (`model.init`, `run --init`).

use std::path::Path;

use transfusion_runtime::checkpoint::{load_meta, TOKENIZER_FILE};

use super::ExperimentConfig;
use crate::data::resolve_path;
use crate::error::{Result, TrainError};

impl ExperimentConfig {
    /// With `model.init` set, makes the run build the model the checkpoint's weights fit:
    /// its model config (the run's `model.lambda` still applies), its tokenizer and its
    /// image size replace the run's; `model.preset`, `model.prediction` and
    /// `model.modality_weights` are cleared.
    /// A relative path is resolved like the tokenizer's (see [`resolve_path`]); `base` is
    /// the config file's directory. Applying it twice changes nothing; a config that already
    /// names its model in full is left as it is when the checkpoint cannot be read.
    pub fn apply_init(&mut self, base: Option<&Path>) -> Result<()> {
        let Some(init) = &self.model.init else {
            return Ok(());
        };
        let dir = resolve_path(init, base);
        let meta = match load_meta(&dir) {
            Ok(meta) => meta,
            // Applied when the run started (its config.json names the model in full) and the
            // checkpoint has moved since: a resumed run loads its own checkpoints, so it
            // must not need it; a fresh start still fails naming it (the task loads it).
            Err(_) if self.model.config.is_some() && self.model.preset.is_none() => return Ok(()),
            Err(e) => {
                return Err(TrainError::from(e).within(format!("model.init = {}", init.display())))
            }
        };
        self.model.preset = None;
        self.model.prediction = None;
        self.model.modality_weights = None;
        self.model.config = Some(meta.model);
        self.data.tokenizer = dir.join(TOKENIZER_FILE);
        self.data.image_size = meta.image_size;
        self.model.init = Some(dir);
        Ok(())
    }
}
