//! Hand-built batches for the model tests (the data crate builds real ones).
#![allow(dead_code)]

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use transfusion_model::{Transfusion, TransfusionBatch, TransfusionConfig};

/// A piece of a document.
#[derive(Clone, Debug)]
pub enum Seg {
    /// Text tokens.
    Text(Vec<i64>),
    /// One image (its patches), at timestep `t`.
    Image(i64),
}

pub const PAD: i64 = 0;

/// The tiny test config: 8x8 RGB latents in 4x4 patches (n = 4), vocabulary 32.
pub fn test_config() -> TransfusionConfig {
    let mut cfg = TransfusionConfig::tiny(32);
    cfg.latent_size = 8;
    cfg.d_model = 64;
    cfg.n_layers = 2;
    cfg.d_hidden = 128;
    cfg
}

/// The test config with one change.
pub fn tweak(f: impl FnOnce(&mut TransfusionConfig)) -> TransfusionConfig {
    let mut cfg = test_config();
    f(&mut cfg);
    cfg
}

/// Lays out rows of documents (each a list of segments) into a batch of row length `s`.
/// Latents and noise come from a fixed formula so tests are deterministic.
pub fn build_batch<B: Backend>(
    rows: &[Vec<Vec<Seg>>],
    s: usize,
    cfg: &TransfusionConfig,
    device: &B::Device,
) -> TransfusionBatch<B> {
    let n = cfg.patches_per_image();
    let b = rows.len();
    let (mut tokens, mut positions, mut span, mut doc) = (vec![], vec![], vec![], vec![]);
    let mut is_patch = vec![];
    let mut timesteps = vec![];
    let mut patch_positions = vec![];
    for (r, row) in rows.iter().enumerate() {
        let start = tokens.len();
        let mut image_k = 0;
        for (di, document) in row.iter().enumerate() {
            let mut pos = 0;
            for seg in document {
                match seg {
                    Seg::Text(ids) => {
                        for &id in ids {
                            tokens.push(id);
                            positions.push(pos);
                            span.push(0);
                            doc.push(di as i64 + 1);
                            is_patch.push(false);
                            pos += 1;
                        }
                    }
                    Seg::Image(t) => {
                        image_k += 1;
                        timesteps.push(*t);
                        for _ in 0..n {
                            patch_positions.push(tokens.len() as i64);
                            tokens.push(PAD);
                            positions.push(pos);
                            span.push(image_k);
                            doc.push(di as i64 + 1);
                            is_patch.push(true);
                            pos += 1;
                        }
                    }
                }
            }
        }
        let used = tokens.len() - start;
        assert!(used <= s, "row {r} too long");
        for _ in used..s {
            tokens.push(PAD);
            positions.push(0);
            span.push(0);
            doc.push(0);
            is_patch.push(false);
        }
    }
    let total = b * s;
    let mut targets = vec![PAD; total];
    let mut lm_mask = vec![0f32; total];
    for i in 0..total {
        let next = i + 1;
        if next % s != 0 && doc[i] != 0 && doc[next] == doc[i] && !is_patch[i] && !is_patch[next] {
            targets[i] = tokens[next];
            lm_mask[i] = 1.0;
        }
    }
    let n_img = timesteps.len();
    let mut source_index: Vec<i64> = (0..total as i64).collect();
    for (j, &p) in patch_positions.iter().enumerate() {
        source_index[p as usize] = (total + j) as i64;
    }
    let (c, h) = (cfg.latent_channels, cfg.latent_size);
    let numel = n_img * c * h * h;
    let latents: Vec<f32> = (0..numel)
        .map(|i| ((i as f32) * 0.37).sin() * 0.8)
        .collect();
    let noise: Vec<f32> = (0..numel)
        .map(|i| ((i as f32) * 1.13 + 0.5).cos())
        .collect();
    let int2 = |v: Vec<i64>| Tensor::<B, 1, Int>::from_ints(v.as_slice(), device).reshape([b, s]);
    let text_targets: Vec<i64> = (0..lm_mask.len() as i64)
        .filter(|&i| lm_mask[i as usize] > 0.0)
        .collect();
    TransfusionBatch {
        tokens: int2(tokens),
        targets: int2(targets),
        text_targets: Tensor::from_ints(text_targets.as_slice(), device),
        positions: int2(positions),
        span_ids: int2(span),
        doc_ids: int2(doc),
        latents: Tensor::<B, 1>::from_floats(latents.as_slice(), device).reshape([n_img, c, h, h]),
        noise: Tensor::<B, 1>::from_floats(noise.as_slice(), device).reshape([n_img, c, h, h]),
        timesteps: Tensor::from_ints(timesteps.as_slice(), device),
        source_index: Tensor::from_ints(source_index.as_slice(), device),
        patch_positions: Tensor::from_ints(patch_positions.as_slice(), device),
    }
}

/// A mixed batch: row 0 is a caption-first pair; row 1 packs a text document and an
/// image-first pair.
pub fn mixed_batch<B: Backend>(cfg: &TransfusionConfig, device: &B::Device) -> TransfusionBatch<B> {
    use Seg::*;
    let rows = vec![
        vec![vec![
            Text(vec![1, 5, 6, 7, 3]),
            Image(420),
            Text(vec![4, 2]),
        ]],
        vec![
            vec![Text(vec![1, 9, 10, 11, 12, 2])],
            vec![Text(vec![1, 3]), Image(150), Text(vec![4, 13, 14, 2])],
        ],
    ];
    build_batch(&rows, 20, cfg, device)
}

/// Max absolute difference of two float tensors.
pub fn max_abs_diff<B: Backend, B2: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B2, D>,
) -> f32 {
    let a = a.into_data().to_vec::<f32>().unwrap();
    let b = b.into_data().to_vec::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rows of 1100 positions (two documents of text, an image, text): long enough for the
/// blockwise attention at its default threshold.
pub fn long_batch<B: Backend>(cfg: &TransfusionConfig, dev: &B::Device) -> TransfusionBatch<B> {
    use Seg::*;
    let text = |n: usize, at: i64| Text((0..n as i64).map(|i| 4 + (i * 7 + at) % 27).collect());
    let doc = |at: i64| vec![text(300, at), Image(300 + at), text(200, at + 1)];
    build_batch::<B>(&[vec![doc(0), doc(5)]], 1100, cfg, dev)
}

/// Every weight's gradient (`None`: no gradient), in visiting order.
pub struct Collect<'a> {
    grads: &'a GradientsParams,
    out: Vec<Option<Vec<f64>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = self.grads.get::<B::InnerBackend, D>(param.id);
        self.out
            .push(g.map(|g| g.into_data().convert::<f64>().to_vec::<f64>().unwrap()));
    }
}

/// Every weight's gradient in `grads` (`None`: no gradient), in the model's visiting order.
pub fn collect<B: AutodiffBackend>(
    model: &Transfusion<B>,
    grads: &GradientsParams,
) -> Vec<Option<Vec<f64>>> {
    let mut c = Collect {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}
