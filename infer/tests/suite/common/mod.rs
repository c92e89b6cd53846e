//! A tiny randomly initialised checkpoint written into a temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use transfusion_data::tokenizer::TextTokenizer;
use transfusion_infer::Pipeline;
use transfusion_model::{ImageIoConfig, Prediction, TransfusionConfig};
use transfusion_runtime::checkpoint::{save_model, AutoencoderRef, ModelMeta};

pub type B = NdArray;

pub fn tokenizer_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tokenizer.json")
}

pub fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(tokenizer_path()).expect("the demo tokenizer should load")
}

/// d_model 64, 2 layers, 8x8 pixel-space images in 4x4 patches (n = 4), v-prediction.
///
/// v, not eps: the weights are random on every run, and an eps head's implied `x_0` at
/// `t = 999` multiplies every rounding difference by `1 / sqrt(abar_999)` (about 2e4), so a
/// comparison of two paths (cached vs recomputed, f16 vs f32 weights) failed whenever a run's
/// weights left an element inside the clip range. v's `x_0 = sqrt(abar) x - sqrt(1 - abar) v`
/// amplifies nothing.
pub fn tiny_config(vocab: usize) -> TransfusionConfig {
    TransfusionConfig::new(vocab, 64, 2, 4, 4, 192, 3, 8, 4, ImageIoConfig::Linear)
        .with_d_timestep(32)
        .with_prediction(Some(Prediction::V))
}

pub fn tiny_meta(tok: &TextTokenizer) -> ModelMeta {
    let model = tiny_config(tok.vocab_size());
    ModelMeta {
        image_size: model.latent_size as u32,
        special_tokens: *tok.special(),
        autoencoder: AutoencoderRef::Pixel,
        step: 0,
        consistency: None,
        model,
    }
}

/// Writes a tiny checkpoint into `dir`.
pub fn write_checkpoint(dir: &Path) {
    write_checkpoint_predicting(dir, Prediction::V);
}

/// Writes a tiny checkpoint whose image head predicts `prediction` into `dir`.
pub fn write_checkpoint_predicting(dir: &Path, prediction: Prediction) {
    let tok = tokenizer();
    let mut meta = tiny_meta(&tok);
    meta.model.prediction = Some(prediction);
    let model = meta.model.init::<B>(&Default::default());
    save_model(dir, &model, &meta, &tok).expect("saving the tiny checkpoint should work");
}

/// A tiny checkpoint in a fresh temporary directory.
pub fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_checkpoint(dir.path());
    dir
}

/// A tiny eps-prediction checkpoint (the paper's head) in a fresh temporary directory.
pub fn epsilon_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_checkpoint_predicting(dir.path(), Prediction::Epsilon);
    dir
}

pub fn pipeline(dir: &Path) -> Pipeline<B> {
    Pipeline::<B>::load(dir, &Default::default()).expect("the tiny checkpoint should load")
}

pub fn to_vec(x: burn::prelude::Tensor<B, 4>) -> Vec<f32> {
    x.into_data().to_vec::<f32>().unwrap()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
