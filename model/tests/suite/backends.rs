//! One definition, every backend: the same weights give the same outputs on the CPU
//! backend and on wgpu (Mesa lavapipe on machines without a GPU), and weights saved from
//! one backend load on the other.
//!
//! Tolerance: 1e-3 absolute on the loss and 2e-3 on logits. The backends reduce in
//! different orders (tiled matmul, fused attention on wgpu), so bitwise equality is not
//! expected; the values are O(1).

use crate::common::{max_abs_diff, mixed_batch, test_config};
use burn::backend::{NdArray, Wgpu};
use burn::module::Module;
use burn::prelude::*;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use transfusion_model::kv_cache::CacheMode;
use transfusion_model::mask::SpanMeta;
use transfusion_model::Transfusion;

type Cpu = NdArray;
type Gpu = Wgpu;

fn logits<B: Backend>(model: &Transfusion<B>, dev: &B::Device) -> Tensor<B, 3> {
    let tokens = Tensor::<B, 1, Int>::from_ints([1, 5, 6, 7, 8, 2], dev).reshape([1, 6]);
    let x = model.embed_tokens(tokens.clone());
    let positions = Tensor::<B, 1, Int>::from_ints([0, 1, 2, 3, 4, 5], dev).reshape([1, 6]);
    let meta = SpanMeta::full_rows(tokens.clone().zeros_like(), tokens.ones_like());
    model.lm_logits(model.forward_embeddings(x, positions, meta, None, CacheMode::ReadOnly))
}

/// The wgpu adapter these tests would run on, if any (a GPU, or Mesa's lavapipe; Vulkan,
/// Metal or DX12, the APIs Burn requests). Without
/// one the tests skip with a printed reason, unless `TRANSFUSION_REQUIRE_WGPU` is set:
/// CI installs lavapipe and sets it, so a missing adapter fails there instead of silently
/// skipping.
pub(crate) fn wgpu_adapter() -> Option<String> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapters =
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    let found = adapters
        .first()
        .map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend));
    if found.is_none() {
        assert!(
            std::env::var_os("TRANSFUSION_REQUIRE_WGPU").is_none(),
            "TRANSFUSION_REQUIRE_WGPU is set but wgpu finds no adapter"
        );
        eprintln!(
            "skipped: no wgpu adapter (install a Vulkan/Metal/DX12 driver, or Mesa's lavapipe: \
             apt-get install mesa-vulkan-drivers)"
        );
    }
    found
}

#[test]
fn same_weights_same_outputs_on_cpu_and_wgpu_and_safetensors_round_trip() {
    if wgpu_adapter().is_none() {
        return;
    }
    let cfg = test_config();
    let cpu_dev = Default::default();
    let gpu_dev = Default::default();
    let cpu_model = cfg.init::<Cpu>(&cpu_dev);

    // Save on the CPU backend (safetensors), load on wgpu.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mut store = SafetensorsStore::from_file(&path);
    cpu_model.save_into(&mut store).unwrap();
    let mut gpu_model = cfg.init::<Gpu>(&gpu_dev);
    let mut store = SafetensorsStore::from_file(&path);
    let result = gpu_model.load_from(&mut store).unwrap();
    assert!(result.missing.is_empty(), "missing: {:?}", result.missing);
    assert_eq!(gpu_model.num_params(), cpu_model.num_params());

    let cpu_loss: f32 = cpu_model
        .forward_loss(mixed_batch::<Cpu>(&cfg, &cpu_dev))
        .total
        .into_scalar();
    let gpu_loss: f32 = gpu_model
        .forward_loss(mixed_batch::<Gpu>(&cfg, &gpu_dev))
        .total
        .into_scalar();
    assert!(
        (cpu_loss - gpu_loss).abs() < 1e-3,
        "cpu {cpu_loss} vs wgpu {gpu_loss}"
    );
    let diff = max_abs_diff(logits(&cpu_model, &cpu_dev), logits(&gpu_model, &gpu_dev));
    assert!(diff < 2e-3, "logits differ by {diff}");

    // And back: saved from wgpu, loaded on CPU, bit-identical parameters.
    let path2 = dir.path().join("model2.safetensors");
    gpu_model
        .save_into(&mut SafetensorsStore::from_file(&path2))
        .unwrap();
    let mut back = cfg.init::<Cpu>(&cpu_dev);
    back.load_from(&mut SafetensorsStore::from_file(&path2))
        .unwrap();
    assert_eq!(
        max_abs_diff(logits(&back, &cpu_dev), logits(&cpu_model, &cpu_dev)),
        0.0
    );
}
