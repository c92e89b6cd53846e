//! Training checkpoints: one directory per step, written atomically.
//!
//! ```text
//! OUT/checkpoints/step-00001000/
//!   model.safetensors  model.json  tokenizer.json   (transfusion_runtime::checkpoint: loads
//!                                                    for inference on any backend)
//!   raw_weights.safetensors  with an EMA (`training.ema_decay`) only: the trained weights;
//!                        model.safetensors then holds their moving average
//!   optimizer.mpk        AdamW state (Burn NamedMpk recorder, full precision), keyed by
//!                        parameter index (see below)
//!   config.json          the experiment config
//!   training_state.json  step, skipped steps, data pipeline position, seed, best eval loss
//! OUT/checkpoints/best/  the same, for the lowest eval loss (optional)
//! ```
//! Every task of the training engine writes the same frame (`optimizer.mpk`, then
//! `training_state.json` last) around its own model files; a VAE checkpoint holds
//! `vae.safetensors`, `vae.json` and `vae_train.json` instead of the first four.
//! A checkpoint is written into `.tmp-step-...` and renamed into place, so a crash at any
//! moment leaves either the complete directory or a `.tmp-*` leftover that resume ignores
//! (and deletes). A step directory counts as complete only with all six files.
//!
//! Burn keys optimizer state by `ParamId`, and a model loaded from safetensors gets fresh
//! ids; the state is therefore saved keyed by the parameter's index in visiting order
//! (stable for one model config) and mapped back to the loaded model's ids on resume.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use transfusion_data::files::create_dir;
use transfusion_data::pipeline::PipelineState;
use transfusion_runtime::checkpoint::{META_FILE, TOKENIZER_FILE, WEIGHTS_FILE};

use crate::config::ExperimentConfig;
use crate::error::{Result, TrainError};
use crate::optim::param_ids;

/// AdamW over any module `M` (the Transfusion model, the VAE).
pub type AdamWOptimizer<M, B> = OptimizerAdaptor<AdamW, M, B>;

/// The record type of [`AdamWOptimizer`] (a map from parameter id to AdamW state).
pub type AdamWRecord<M, B> = <AdamWOptimizer<M, B> as Optimizer<M, B>>::Record;

/// Files a complete Transfusion training checkpoint holds.
pub const REQUIRED_FILES: &[&str] = &[
    WEIGHTS_FILE,
    META_FILE,
    TOKENIZER_FILE,
    CONFIG_FILE,
    STATE_FILE,
    "optimizer.mpk",
];

/// Optimizer state file (the recorder adds `.mpk`).
pub const OPTIMIZER_FILE: &str = "optimizer";
/// Experiment config file.
pub const CONFIG_FILE: &str = "config.json";
/// Training state file.
pub const STATE_FILE: &str = "training_state.json";
/// Name of the best-checkpoint directory.
pub const BEST_DIR: &str = "best";

/// Everything besides weights and optimizer moments needed to continue exactly, for a
/// data stream whose position is `D`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState<D> {
    /// Optimizer steps done (the next step has this index).
    pub step: u64,
    /// Steps skipped for a non-finite loss or gradient, in the whole run.
    pub skipped_steps: u64,
    /// The data stream after the last batch used (the data order and every random choice
    /// of layouts, timesteps and noise derive from it and the seed).
    #[serde(alias = "pipeline")]
    pub data: D,
    /// The run's seed. All randomness is derived from it and positions in the data stream
    /// (`transfusion_data::rng::derive_seed`); no other RNG state exists.
    pub seed: u64,
    /// Lowest eval loss so far.
    pub best_eval_loss: Option<f64>,
    /// Eval loss of this checkpoint's step, if one was measured there.
    pub eval_loss: Option<f64>,
}

impl<D: Default> TrainingState<D> {
    /// The state before the first step of a run seeded with `seed`.
    pub fn fresh(seed: u64) -> Self {
        Self {
            step: 0,
            skipped_steps: 0,
            data: D::default(),
            seed,
            best_eval_loss: None,
            eval_loss: None,
        }
    }
}

/// A Transfusion run's training state (the data position is the pipeline's).
pub type TransfusionState = TrainingState<PipelineState>;

/// Name of the directory of step `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn is_complete(dir: &Path, required: &[&str]) -> bool {
    required.iter().all(|f| dir.join(f).is_file())
}

/// Complete step checkpoints under `root`, oldest first.
pub fn list_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    list_checkpoints_with(root, REQUIRED_FILES)
}

/// Step checkpoints under `root` holding every file of `required`, oldest first (any kind
/// of checkpoint: Transfusion, VAE).
pub fn list_checkpoints_with(root: &Path, required: &[&str]) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return vec![];
    };
    let mut v: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            let path = e.path();
            is_complete(&path, required).then_some((step, path))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint under `root`.
pub fn latest_checkpoint(root: &Path) -> Option<PathBuf> {
    list_checkpoints(root).pop().map(|(_, p)| p)
}

/// The newest step checkpoint under `root` holding every file of `required`.
pub fn latest_checkpoint_with(root: &Path, required: &[&str]) -> Option<PathBuf> {
    list_checkpoints_with(root, required).pop().map(|(_, p)| p)
}

/// Removes `.tmp-*` / `.old-*` leftovers of interrupted writes; returns how many.
pub fn remove_leftovers(root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-") || name.starts_with(".old-") {
            if fs::remove_dir_all(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// Writes the AdamW state of `optim` for `model` to `dir/optimizer.mpk`, keyed by parameter
/// index (see the module docs).
pub fn save_optimizer<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    model: &M,
    optim: &AdamWOptimizer<M, B>,
) -> Result<()> {
    let ids = param_ids::<B, _>(model);
    let index: HashMap<ParamId, u64> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u64))
        .collect();
    let record = optim.to_record();
    let mut by_index: AdamWRecord<M, B> = Default::default();
    for (id, r) in record {
        let i = index.get(&id).ok_or_else(|| {
            TrainError::Run("optimizer state for a parameter the model does not have".into())
        })?;
        by_index.insert(ParamId::from(*i), r);
    }
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .record(by_index, dir.join(OPTIMIZER_FILE))
        .map_err(|e| {
            TrainError::invalid(
                dir.join(OPTIMIZER_FILE),
                format!("cannot write optimizer state: {e}"),
            )
        })?;
    Ok(())
}

/// Creates `root/name` atomically: `fill` writes the files into `root/.tmp-NAME`, which is
/// then renamed into place (an existing directory of that name is replaced only after the
/// new one is complete). Shared by every kind of checkpoint.
pub fn write_dir_atomically(
    root: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    create_dir(root)?;
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TrainError::io("remove", &tmp, e))?;
    }
    create_dir(&tmp)?;
    fill(&tmp).map_err(|e| e.within(format!("writing checkpoint {}", tmp.display())))?;
    let dest = root.join(name);
    if dest.exists() {
        let old = root.join(format!(".old-{name}"));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| TrainError::io("remove", &old, e))?;
        }
        fs::rename(&dest, &old).map_err(|e| TrainError::io("move aside", &dest, e))?;
        fs::rename(&tmp, &dest).map_err(|e| TrainError::io("rename into place", &tmp, e))?;
        fs::remove_dir_all(&old).map_err(|e| TrainError::io("remove", &old, e))?;
    } else {
        fs::rename(&tmp, &dest).map_err(|e| TrainError::io("rename into place", &tmp, e))?;
    }
    Ok(dest)
}

/// Deletes all but the newest `keep` step checkpoints holding every file of `required`.
pub fn prune_with(root: &Path, keep: usize, required: &[&str]) -> Result<()> {
    let list = list_checkpoints_with(root, required);
    if list.len() > keep {
        for (_, p) in &list[..list.len() - keep] {
            fs::remove_dir_all(p).map_err(|e| TrainError::io("remove", p, e))?;
        }
    }
    Ok(())
}

/// Reads a Transfusion checkpoint's training state.
pub fn read_state(dir: &Path) -> Result<TransfusionState> {
    read_training_state(dir)
}

/// Reads any checkpoint's training state.
pub fn read_training_state<D: serde::de::DeserializeOwned>(dir: &Path) -> Result<TrainingState<D>> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| TrainError::io("read", &path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::invalid(&path, format!("bad training state: {e}")))
}

/// Reads a checkpoint's experiment config.
pub fn read_config(dir: &Path) -> Result<ExperimentConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|e| TrainError::io("read", &path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::invalid(&path, format!("bad experiment config: {e}")))
}

/// Loads the optimizer state of `dir` into `optim` for `model` (whose parameter ids may
/// differ from those of the model that was saved).
pub fn load_optimizer<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    model: &M,
    optim: AdamWOptimizer<M, B>,
    device: &B::Device,
) -> Result<AdamWOptimizer<M, B>> {
    // The recorder adds the `.mpk` extension itself.
    let path = dir.join(format!("{OPTIMIZER_FILE}.mpk"));
    let record: AdamWRecord<M, B> = NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join(OPTIMIZER_FILE), device)
        .map_err(|e| {
            // Burn's message for any unreadable record blames a format change between its
            // versions; only its first line says what failed.
            let burn = e.to_string();
            let first = burn.lines().next().unwrap_or_default().to_string();
            TrainError::invalid(
                &path,
                format!(
                    "cannot read the optimizer state: the file is damaged or truncated \
                     ({first}). To continue from the checkpoint before it, move {} aside and \
                     resume again",
                    dir.display()
                ),
            )
        })?;
    let ids = param_ids::<B, _>(model);
    let mut mapped: AdamWRecord<M, B> = Default::default();
    for (k, r) in record {
        let Some(id) = ids.get(k.val() as usize) else {
            return Err(TrainError::invalid(
                &path,
                format!(
                    "optimizer state for parameter {} but the model has {}",
                    k.val(),
                    ids.len()
                ),
            ));
        };
        mapped.insert(*id, r);
    }
    Ok(optim.load_record(mapped))
}
