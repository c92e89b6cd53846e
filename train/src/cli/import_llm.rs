//! `transfusion-train import-llm`: a Hugging Face Llama-family folder becomes a checkpoint
//! to train from (`run --init`) or to run (`transfusion text`).

use std::path::PathBuf;

use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use transfusion_model::ModalityWeights;
use transfusion_runtime::device::{dispatch, BackendTask, DeviceChoice};
use transfusion_train::llm_import::{import_llm, AdapterChoice, ImportOptions};

/// Flags of `import-llm`.
#[derive(Args, Debug, Clone)]
pub struct ImportLlmArgs {
    /// The Hugging Face folder: config.json, model.safetensors (or model.safetensors.index.json
    /// and its shards), tokenizer.json.
    #[arg(long)]
    pub from: PathBuf,
    /// The checkpoint directory to write (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the square training images, in pixels.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Patch side over the image.
    #[arg(long, default_value_t = 4)]
    pub patch: usize,
    /// Image adapter.
    #[arg(long, value_enum, default_value_t = AdapterChoice::Linear)]
    pub adapter: AdapterChoice,
    /// Decoder weights for image positions: shared with text, or untied (a copy of every
    /// layer's weights, for `run --init OUT --freeze-text`).
    #[arg(long, value_enum, default_value_t = ModalityChoice::Shared)]
    pub modality_weights: ModalityChoice,
    /// Seed of the new weights (image adapters, new token rows).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl BackendTask for ImportLlmArgs {
    type Output = anyhow::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, _label: &str) -> Self::Output {
        let opts = ImportOptions {
            image_size: self.image_size,
            patch_size: self.patch,
            adapter: self.adapter,
            modality_weights: match self.modality_weights {
                ModalityChoice::Shared => ModalityWeights::Shared,
                ModalityChoice::Untied => ModalityWeights::Untied,
            },
            seed: self.seed,
        };
        let i = import_llm::<B::InnerBackend>(&self.from, &self.out, &opts, &device)?;
        let m = &i.meta.model;
        println!(
            "imported {} ({} layers, width {}, {} heads / {} key-value heads, weights {}) into {}",
            self.from.display(),
            m.n_layers,
            m.d_model,
            m.n_heads,
            m.n_kv_heads,
            i.dtypes.join("+"),
            self.out.display()
        );
        let new: Vec<String> = i
            .new_tokens
            .iter()
            .map(|(t, id)| format!("{t}={id}"))
            .collect();
        println!(
            "vocabulary {} -> {} rows; new tokens: {}",
            i.source.vocab_size,
            m.vocab_size,
            if new.is_empty() {
                "none".into()
            } else {
                new.join(" ")
            }
        );
        println!(
            "{} parameters; train it with `transfusion-train run --init {}`",
            m.param_count().total(),
            self.out.display()
        );
        Ok(())
    }
}

/// `--modality-weights` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModalityChoice {
    /// One set of decoder weights for text and images.
    Shared,
    /// Image positions get their own copy.
    Untied,
}

/// Imports on the CPU (the import reads and writes files; no device work).
pub fn run(a: ImportLlmArgs) -> anyhow::Result<()> {
    dispatch(DeviceChoice::Cpu, a)?
}
