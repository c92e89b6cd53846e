//! Shared test helpers: a very small pixel-space model on the shapes set.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use transfusion_model::config::ImageIoConfig;
use transfusion_model::TransfusionConfig;
use transfusion_train::config::ExperimentConfig;
use transfusion_train::{run_training, RunOptions, RunSummary, TrainHooks};

pub type B = Autodiff<NdArray>;

pub fn tokenizer_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tokenizer.json")
}

/// 2 layers, width 32, 16x16 RGB images in 4x4 patches (16 patches), rows of 48.
pub fn tiny_model() -> TransfusionConfig {
    TransfusionConfig::new(512, 32, 2, 2, 2, 64, 3, 16, 4, ImageIoConfig::Linear)
        .with_d_timestep(16)
}

pub fn tiny_cfg(steps: u64) -> ExperimentConfig {
    let mut c = ExperimentConfig::quick("tiny", vec!["shapes:500".parse().unwrap()], steps);
    // The tests' small model keeps the paper's objective (eps).
    c.model.prediction = None;
    c.model.preset = None;
    c.model.config = Some(tiny_model());
    c.data.tokenizer = tokenizer_path();
    c.data.image_size = 16;
    c.data.prefetch = 0;
    c.training.batch_size = 2;
    c.training.seq_len = 48;
    c.eval.batches = 1;
    c.schedule.lr = 3e-3;
    c.schedule.min_lr = 3e-4;
    c
}

/// Every tensor of a safetensors file, as raw bytes by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The training pipeline of `tiny_cfg` over `tiny_model` with rows of 2.
pub fn tiny_pipeline() -> transfusion_data::pipeline::DataPipeline {
    let cfg = tiny_cfg(10);
    let tok = std::sync::Arc::new(transfusion_train::data::load_tokenizer(&cfg, None).unwrap());
    let split = transfusion_train::data::Split::Train;
    transfusion_train::data::build_pipeline(&cfg, &tiny_model(), &tok, split, 2).unwrap()
}

/// Run options without a progress bar.
pub fn quiet(out: &std::path::Path) -> RunOptions {
    let mut o = RunOptions::new(out);
    o.progress = false;
    o
}

/// A Transfusion run of `cfg` with `opts` on the default device, without hooks.
pub fn train(cfg: &ExperimentConfig, opts: &RunOptions) -> transfusion_train::Result<RunSummary> {
    run_training::<B>(cfg, opts, &mut TrainHooks::default(), &Default::default())
}

/// Every gradient as a flat f32 vector, in parameter order.
pub fn flat_grads(model: &transfusion_model::Transfusion<B>, g: &GradientsParams) -> Vec<Vec<f32>> {
    struct V<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor<B> for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(t) = self.0.get::<burn::backend::NdArray, D>(p.id) {
                self.1.push(t.into_data().to_vec().unwrap());
            }
        }
    }
    let mut v = V(g, vec![]);
    model.visit(&mut v);
    v.1
}
