//! Loading diffusers `AutoencoderKL` weights: a `.safetensors` file written here with the
//! diffusers key names and shapes of a tiny config loads, every tensor lands where it
//! should, legacy attention names / 1x1-conv shapes / f16 load the same, and mismatched
//! files fail naming the keys. No file is downloaded.

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::ModuleSnapshot;
use transfusion_model::vae::diffusers::{burn_path, diffusers_key, load_diffusers_files};
use transfusion_model::vae::{load_diffusers_vae, AutoencoderKl, VaeConfig, VaeLoadError};

type B = NdArray;

/// Channels per level, layers per block, latent channels of the test file.
const CH: [usize; 2] = [32, 64];
const LAYERS: usize = 1;
const LATENT: usize = 4;

/// How the attention of the written file is named and shaped.
#[derive(Clone, Copy, PartialEq)]
enum Attn {
    /// `to_q`, `to_k`, `to_v`, `to_out.0`, Linear `[out, in]`.
    Linear,
    /// `query`, `key`, `value`, `proj_attn`, 1x1 conv `[out, in, 1, 1]`.
    LegacyConv,
}

/// Diffusers tensor names and shapes.
type Keys = Vec<(String, Vec<usize>)>;

fn conv(t: &mut Keys, name: &str, i: usize, o: usize, k: usize) {
    t.push((format!("{name}.weight"), vec![o, i, k, k]));
    t.push((format!("{name}.bias"), vec![o]));
}

fn norm(t: &mut Keys, name: &str, c: usize) {
    t.push((format!("{name}.weight"), vec![c]));
    t.push((format!("{name}.bias"), vec![c]));
}

fn resnet(t: &mut Keys, p: &str, i: usize, o: usize) {
    norm(t, &format!("{p}.norm1"), i);
    conv(t, &format!("{p}.conv1"), i, o, 3);
    norm(t, &format!("{p}.norm2"), o);
    conv(t, &format!("{p}.conv2"), o, o, 3);
    if i != o {
        conv(t, &format!("{p}.conv_shortcut"), i, o, 1);
    }
}

fn mid(t: &mut Keys, attn_kind: Attn, p: &str, c: usize) {
    resnet(t, &format!("{p}.mid_block.resnets.0"), c, c);
    let a = format!("{p}.mid_block.attentions.0");
    norm(t, &format!("{a}.group_norm"), c);
    let (names, shape) = match attn_kind {
        Attn::Linear => (["to_q", "to_k", "to_v", "to_out.0"], vec![c, c]),
        Attn::LegacyConv => (["query", "key", "value", "proj_attn"], vec![c, c, 1, 1]),
    };
    for n in names {
        t.push((format!("{a}.{n}.weight"), shape.clone()));
        t.push((format!("{a}.{n}.bias"), vec![c]));
    }
    resnet(t, &format!("{p}.mid_block.resnets.1"), c, c);
}

/// The resolution levels `{blocks}.{i}` of one side, from `prev` channels: `resnets` ResNet
/// blocks each, and a 3x3 `{resampler}.0.conv` after every level but the last.
fn levels(
    t: &mut Keys,
    blocks: &str,
    resampler: &str,
    channels: &[usize],
    resnets: usize,
    prev: usize,
) {
    let mut prev = prev;
    for (i, &c) in channels.iter().enumerate() {
        for j in 0..resnets {
            let p = format!("{blocks}.{i}.resnets.{j}");
            resnet(t, &p, if j == 0 { prev } else { c }, c);
        }
        if i + 1 < channels.len() {
            conv(t, &format!("{blocks}.{i}.{resampler}.0.conv"), c, c, 3);
        }
        prev = c;
    }
}

/// The diffusers keys and shapes of `AutoencoderKL(block_out_channels=CH,
/// layers_per_block=LAYERS, latent_channels=LATENT)`, written out by hand (independent
/// of the loader's mapping table).
fn diffusers_tensors(attn_kind: Attn) -> Keys {
    let mut t = Keys::new();
    let top = CH[CH.len() - 1];
    conv(&mut t, "encoder.conv_in", 3, CH[0], 3);
    levels(
        &mut t,
        "encoder.down_blocks",
        "downsamplers",
        &CH,
        LAYERS,
        CH[0],
    );
    mid(&mut t, attn_kind, "encoder", top);
    norm(&mut t, "encoder.conv_norm_out", top);
    conv(&mut t, "encoder.conv_out", top, 2 * LATENT, 3);
    conv(&mut t, "quant_conv", 2 * LATENT, 2 * LATENT, 1);
    conv(&mut t, "post_quant_conv", LATENT, LATENT, 1);
    conv(&mut t, "decoder.conv_in", LATENT, top, 3);
    mid(&mut t, attn_kind, "decoder", top);
    let reversed: Vec<usize> = CH.iter().rev().copied().collect();
    levels(
        &mut t,
        "decoder.up_blocks",
        "upsamplers",
        &reversed,
        LAYERS + 1,
        top,
    );
    norm(&mut t, "decoder.conv_norm_out", CH[0]);
    conv(&mut t, "decoder.conv_out", CH[0], 3, 3);
    t
}

/// Element `j` of the `k`-th tensor: `k + j * 1e-6` (the first element names the tensor).
fn tagged(k: usize, j: usize) -> f32 {
    k as f32 + j as f32 * 1e-6
}

/// Element `j` of the `k`-th tensor, exactly representable in f16.
fn f16_exact(k: usize, j: usize) -> f32 {
    ((k * 13 + j) % 17) as f32 / 16.0
}

/// Writes a safetensors file (8-byte little-endian header length, JSON header, data).
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, TensorData)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, tensor) in tensors {
        let bytes = tensor.as_bytes();
        let dtype = match tensor.dtype {
            DType::F32 => "F32",
            DType::F16 => "F16",
            other => panic!("unexpected dtype {other:?}"),
        };
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [data.len(), data.len() + bytes.len()],
            }),
        );
        data.extend_from_slice(bytes);
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut json = serde_json::to_string(&header).unwrap().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&json);
    file.extend_from_slice(&data);
    std::fs::write(path, file).unwrap();
}

/// The tensors of a file: `value(k, j)` for element `j` of tensor `k`, in `dtype`.
fn make_tensors(
    keys: Vec<(String, Vec<usize>)>,
    value: fn(usize, usize) -> f32,
    dtype: DType,
) -> Vec<(String, Vec<usize>, TensorData)> {
    keys.into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|j| value(k, j)).collect();
            let data = TensorData::new(values, shape.clone()).convert_dtype(dtype);
            (name, shape, data)
        })
        .collect()
}

fn write_config(dir: &Path) {
    let config = serde_json::json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "block_out_channels": CH,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "force_upcast": true,
        "in_channels": 3,
        "latent_channels": LATENT,
        "layers_per_block": LAYERS,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 32,
        "scaling_factor": 0.5,
        "shift_factor": 0.125,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Every parameter of a model by Burn path.
fn params(model: &AutoencoderKl<B>) -> BTreeMap<String, TensorData> {
    model
        .collect(None, None, false)
        .into_iter()
        .map(|s| (s.full_path(), s.to_data().unwrap()))
        .collect()
}

fn values(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn diffusers_file_loads_and_every_tensor_lands() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let keys = diffusers_tensors(Attn::Linear);
    let index: BTreeMap<String, usize> = keys
        .iter()
        .enumerate()
        .map(|(k, (n, _))| (n.clone(), k))
        .collect();
    let shapes: BTreeMap<String, Vec<usize>> = keys.iter().cloned().collect();
    write_safetensors(
        &dir.path().join("diffusion_pytorch_model.safetensors"),
        &make_tensors(keys.clone(), tagged, DType::F32),
    );

    let device = Default::default();
    let (cfg, vae) = load_diffusers_vae::<B>(dir.path(), &device).expect("loads");
    assert_eq!(cfg.block_out_channels(), CH.to_vec());
    assert_eq!(cfg.latent_channels, LATENT);
    assert_eq!(cfg.norm_groups, 8);
    assert_eq!(cfg.scaling_factor, 0.5);
    assert_eq!(cfg.shift_factor, 0.125);
    assert_eq!(cfg.param_count(), vae.num_params());

    // Every parameter came from the file tensor of its diffusers name (first element =
    // tensor index), and every file tensor was used once.
    let loaded = params(&vae);
    assert_eq!(loaded.len(), keys.len());
    for (path, data) in &loaded {
        let key = diffusers_key(path);
        let k = *index
            .get(&key)
            .unwrap_or_else(|| panic!("{path} -> {key} is not a diffusers key"));
        assert_eq!(burn_path(&key), *path);
        let first = data.to_vec::<f32>().unwrap()[0];
        assert_eq!(first, tagged(k, 0), "{path} holds the wrong tensor");
        let mut want = shapes[&key].clone();
        if want.len() == 2 {
            want.reverse(); // Linear: Burn [in, out]
        }
        assert_eq!(data.shape.to_vec(), want, "{path}");
    }

    // A few values by hand.
    let k = index["encoder.conv_in.weight"];
    let w: Vec<f32> = vae
        .encoder
        .conv_in
        .weight
        .val()
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(w[5], tagged(k, 5));
    assert_eq!(vae.encoder.conv_in.weight.dims(), [32, 3, 3, 3]);
    let k = index["encoder.down_blocks.1.resnets.0.norm1.weight"];
    let gamma = vae.encoder.down_blocks[1].resnets[0]
        .norm1
        .gamma
        .as_ref()
        .unwrap();
    assert_eq!(values(gamma.val())[7], tagged(k, 7));
    let k = index["encoder.down_blocks.1.resnets.0.conv_shortcut.bias"];
    let shortcut = vae.encoder.down_blocks[1].resnets[0]
        .shortcut
        .as_ref()
        .unwrap();
    assert_eq!(
        values(shortcut.bias.as_ref().unwrap().val())[3],
        tagged(k, 3)
    );
    let k = index["encoder.down_blocks.0.downsamplers.0.conv.bias"];
    let down = vae.encoder.down_blocks[0].downsampler.as_ref().unwrap();
    assert_eq!(
        values(down.conv.bias.as_ref().unwrap().val())[1],
        tagged(k, 1)
    );
    // Linear weights are transposed: torch [o, i] -> Burn [i, o].
    let k = index["decoder.mid_block.attentions.0.to_q.weight"];
    let q = vae.decoder.mid_block.attentions[0].to_q.weight.val();
    let q_oi = q.slice([2..3, 1..2]).into_scalar();
    assert_eq!(q_oi, tagged(k, 64 + 2)); // torch element [1, 2]
    let k = index["decoder.mid_block.attentions.0.to_out.0.bias"];
    let out_bias = vae.decoder.mid_block.attentions[0]
        .to_out
        .bias
        .as_ref()
        .unwrap();
    assert_eq!(values(out_bias.val())[0], tagged(k, 0));
    let k = index["decoder.up_blocks.0.upsamplers.0.conv.weight"];
    let up = vae.decoder.up_blocks[0].upsampler.as_ref().unwrap();
    assert_eq!(up.conv.weight.dims(), [64, 64, 3, 3]);
    let k2: f32 = up
        .conv
        .weight
        .val()
        .slice([0..1, 0..1, 0..1, 1..2])
        .into_scalar();
    assert_eq!(k2, tagged(k, 1));
    let k = index["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"];
    let shortcut = vae.decoder.up_blocks[1].resnets[0]
        .shortcut
        .as_ref()
        .unwrap();
    assert_eq!(shortcut.weight.dims(), [32, 64, 1, 1]);
    assert_eq!(
        shortcut
            .weight
            .val()
            .slice([0..1, 0..1, 0..1, 0..1])
            .into_scalar(),
        tagged(k, 0)
    );
    let k = index["post_quant_conv.bias"];
    let pq = vae.post_quant_conv.as_ref().unwrap();
    assert_eq!(values(pq.bias.as_ref().unwrap().val())[2], tagged(k, 2));
    let k = index["decoder.conv_norm_out.bias"];
    let beta = vae.decoder.conv_norm_out.beta.as_ref().unwrap();
    assert_eq!(values(beta.val())[31], tagged(k, 31));
}

#[test]
fn legacy_attention_names_and_f16_load_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let modern = dir.path().join("modern.safetensors");
    let legacy = dir.path().join("legacy.safetensors");
    write_safetensors(
        &modern,
        &make_tensors(diffusers_tensors(Attn::Linear), f16_exact, DType::F32),
    );
    write_safetensors(
        &legacy,
        &make_tensors(diffusers_tensors(Attn::LegacyConv), f16_exact, DType::F16),
    );
    let device = Default::default();
    let config = dir.path().join("config.json");
    let (_, a) = load_diffusers_files::<B>(&modern, &config, &device).expect("modern loads");
    let (_, b) = load_diffusers_files::<B>(&legacy, &config, &device).expect("legacy loads");
    let (pa, pb) = (params(&a), params(&b));
    assert_eq!(pa.len(), pb.len());
    for (path, data) in &pa {
        assert_eq!(pb[path].dtype, DType::F32, "{path}");
        assert_eq!(*data, pb[path], "{path}");
    }
    // Same weights, same function.
    let x = Tensor::<B, 4>::ones([1, 3, 8, 8], &device) * 0.1;
    let (ya, yb) = (a.encode(x.clone()).mean, b.encode(x).mean);
    assert_eq!(ya.dims(), [1, LATENT, 4, 4]);
    ya.into_data()
        .assert_approx_eq::<f32>(&yb.into_data(), burn::tensor::Tolerance::default());
}

#[test]
fn mismatched_file_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let mut keys = diffusers_tensors(Attn::Linear);
    keys.retain(|(n, _)| n != "decoder.conv_out.bias");
    for (name, shape) in keys.iter_mut() {
        if name == "encoder.conv_in.weight" {
            *shape = vec![16, 3, 3, 3];
        }
    }
    keys.push(("encoder.extra.weight".into(), vec![2]));
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    write_safetensors(&weights, &make_tensors(keys, tagged, DType::F32));

    let device = Default::default();
    let err = load_diffusers_vae::<B>(&weights, &device)
        .err()
        .expect("a mismatched file should not load");
    let message = err.to_string();
    assert!(matches!(err, VaeLoadError::Mismatch { .. }), "{message}");
    for expected in [
        "shape mismatch for key `encoder.conv_in.weight`: expected [32, 3, 3, 3], found [16, 3, 3, 3]",
        "missing key `decoder.conv_out.bias`",
        "unknown key `encoder.extra.weight`",
    ] {
        assert!(message.contains(expected), "`{expected}` not in:\n{message}");
    }
    assert!(
        message.contains("diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    // Exactly those three problems.
    assert_eq!(message.lines().count(), 4, "{message}");
}

#[test]
fn unsupported_or_unreadable_config_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"block_out_channels": [32, 48], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    let device = Default::default();
    let err = load_diffusers_vae::<B>(dir.path(), &device).err().unwrap();
    assert!(
        err.to_string().contains("block_out_channels [32, 48]"),
        "{err}"
    );

    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let err = load_diffusers_vae::<B>(dir.path(), &device).err().unwrap();
    assert!(matches!(err, VaeLoadError::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    // A config that matches the model preset: the SD VAE config maps to `sd()`.
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    let cfg =
        transfusion_model::vae::DiffusersVaeConfig::from_file(&dir.path().join("config.json"))
            .unwrap()
            .to_vae_config()
            .unwrap();
    let sd = VaeConfig::sd();
    assert_eq!(cfg.block_out_channels(), sd.block_out_channels());
    assert_eq!(cfg.param_count(), sd.param_count());
    assert_eq!(cfg.scaling_factor, sd.scaling_factor);
}
