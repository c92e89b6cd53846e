//! One definition, every backend: the same weights give the same outputs on the CPU
//! backends and on wgpu (Mesa lavapipe on machines without a GPU), the same loss and
//! gradients on `flex` (its fused kernels), `ndarray` (plain Burn operations) and wgpu,
//! and weights saved from one backend load on the other.
//!
//! Tolerance: 1e-3 absolute on the loss and 2e-3 on logits. The backends reduce in
//! different orders (tiled matmul, fused attention on wgpu), so bitwise equality is not
//! expected; the values are O(1).

use crate::common::{collect, max_abs_diff, mixed_batch, test_config, tweak};
use burn::backend::{Autodiff, Flex, NdArray, Wgpu};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
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

/// The loss and every weight's gradient of one training step on autodiff backend `A`, the
/// weights read from `path`.
fn training_step<A: AutodiffBackend>(
    cfg: &transfusion_model::TransfusionConfig,
    path: &std::path::Path,
) -> (f64, Vec<Option<Vec<f64>>>) {
    let dev = Default::default();
    let mut model = cfg.init::<A>(&dev);
    model
        .load_from(&mut SafetensorsStore::from_file(path))
        .unwrap();
    let loss = model.forward_loss(mixed_batch::<A>(cfg, &dev)).total;
    let value = loss.clone().into_scalar().elem::<f64>();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    (value, collect(&model, &grads))
}

/// The largest difference of one weight's gradients relative to the largest gradient of
/// that weight, over all weights.
fn worst_relative_gradient(a: &[Option<Vec<f64>>], b: &[Option<Vec<f64>>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (Some(x), Some(y)) = (x, y) else {
            assert_eq!(
                x.is_some(),
                y.is_some(),
                "weight {i}: a gradient on one side only"
            );
            continue;
        };
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        let diff = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

/// Weights of `cfg` saved to a file in `dir`, for every backend to load.
fn saved_weights(
    cfg: &transfusion_model::TransfusionConfig,
    dir: &std::path::Path,
    name: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    cfg.init::<NdArray>(&Default::default())
        .save_into(&mut SafetensorsStore::from_file(&path))
        .unwrap();
    path
}

/// `flex` (fused kernels forward and backward) and `ndarray` (Burn's operations) give the
/// same training step: the loss within 1e-5 relative (measured 0 to 1e-7) and every
/// weight's gradient within 2e-4 of its largest value (measured 4e-5 to 8e-5, most of it
/// `ndarray`'s RMSNorm backward, see the `fused` tests), with the linear adapter and with
/// the U-Net.
#[test]
fn flex_and_ndarray_give_the_same_loss_and_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let unet = tweak(|c| {
        c.image_io = transfusion_model::ImageIoConfig::Unet(transfusion_model::UNetConfig {
            channels: vec![8, 16],
            blocks_per_level: 1,
            norm_groups: 4,
        })
    });
    for (name, cfg) in [("linear", test_config()), ("unet", unet)] {
        let path = saved_weights(&cfg, dir.path(), name);
        let (flex_loss, flex_grads) = training_step::<Autodiff<Flex>>(&cfg, &path);
        let (nd_loss, nd_grads) = training_step::<Autodiff<NdArray>>(&cfg, &path);
        let loss_diff = (flex_loss - nd_loss).abs() / nd_loss.abs();
        let grad_diff = worst_relative_gradient(&nd_grads, &flex_grads);
        eprintln!("{name}: loss {loss_diff:e} relative, gradients {grad_diff:e}");
        assert!(
            loss_diff < 1e-5,
            "{name}: flex {flex_loss} vs ndarray {nd_loss}"
        );
        assert!(
            grad_diff < 2e-4,
            "{name}: gradients differ by {grad_diff:e}"
        );
    }
}

/// wgpu gives `flex`'s training step: the loss within 1e-5 absolute and every weight's
/// gradient within 1e-5 of its largest value (lavapipe's tiled products and attention
/// reduce in other orders; measured 1e-6 and 7e-7).
#[test]
fn flex_and_wgpu_give_the_same_loss_and_gradients() {
    if wgpu_adapter().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config();
    let path = saved_weights(&cfg, dir.path(), "linear");
    let (flex_loss, flex_grads) = training_step::<Autodiff<Flex>>(&cfg, &path);
    let (gpu_loss, gpu_grads) = training_step::<Autodiff<Gpu>>(&cfg, &path);
    let grad_diff = worst_relative_gradient(&flex_grads, &gpu_grads);
    eprintln!(
        "wgpu: loss {:e}, gradients {grad_diff:e}",
        (flex_loss - gpu_loss).abs()
    );
    assert!(
        (flex_loss - gpu_loss).abs() < 1e-3,
        "flex {flex_loss} vs wgpu {gpu_loss}"
    );
    assert!(grad_diff < 1e-5, "gradients differ by {grad_diff:e}");
}
