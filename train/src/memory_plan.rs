//! What one training step needs in memory on each device, part by part: weights,
//! gradients, optimizer state, the activations each layer keeps for the backward pass,
//! the attention's own tensors, and the LM head's logits.
//!
//! The parts follow what the model records (see `transfusion_model::ops::blockwise` for the
//! attention); the per-position constants were fitted to the process's peak on the CPU
//! (`bench --memory`: the tiny and `paper_160m` presets, dense and blockwise attention,
//! with and without layer recomputation, 160 to 4096 positions); the test
//! `memory_plan_is_within_a_quarter_of_the_measured_peak` checks four of them.

use std::fmt;

use transfusion_model::ops::blockwise::plan::rows_per_block;
use transfusion_model::ops::blockwise::takes_blockwise;
use transfusion_model::{Precision, TransfusionConfig};

use crate::config::{ExperimentConfig, Recompute};

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// The shape of one training step: the model and what each device runs.
#[derive(Clone, Debug)]
pub struct StepShape {
    /// The model.
    pub model: TransfusionConfig,
    /// Rows per micro-batch on each device.
    pub batch_size: usize,
    /// Positions per row.
    pub seq_len: usize,
    /// Type of the decoder's matrix products.
    pub precision: Precision,
    /// An exponential moving average of the weights is kept.
    pub ema: bool,
    /// Passes of this many keys or more take the blockwise attention.
    pub blockwise_from: usize,
    /// What the backward pass recomputes instead of keeping.
    pub recompute: Recompute,
    /// Passes shorter than `blockwise_from` take `flex`'s fused attention, which keeps each
    /// row's log-sum-exp rather than the probabilities (the CPU in f32); otherwise the
    /// composed attention keeps the `[b, h, s, s]` probabilities per layer.
    pub fused_attention: bool,
}

/// Estimated bytes per device of one training step, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    /// The f32 weights.
    pub weights: f64,
    /// Their gradients.
    pub gradients: f64,
    /// AdamW's two moments (and the EMA of the weights, when kept).
    pub optimizer: f64,
    /// What the decoder keeps for the backward pass: every layer's activations, or with
    /// recomputation every layer's input and one layer's activations at a time.
    pub activations: f64,
    /// One layer's activations.
    pub activations_per_layer: f64,
    /// Whether layers are recomputed in the backward pass.
    pub recompute: bool,
    /// The attention's tensors besides the layer's: the dense mask and the backward
    /// pass's score gradients, or the blockwise attention's per-block workspace.
    pub attention_workspace: f64,
    /// The LM head's logits and their gradient, and the embeddings around the decoder.
    pub head: f64,
    /// Whether the attention is blockwise (memory linear in the sequence).
    pub blockwise: bool,
}

impl MemoryPlan {
    /// The estimated peak of a step.
    pub fn peak(&self) -> f64 {
        self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.attention_workspace
            + self.head
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |x: f64| format!("{:>9.2} GiB", x / GIB);
        writeln!(f, "  weights                {}", g(self.weights))?;
        writeln!(f, "  gradients              {}", g(self.gradients))?;
        writeln!(f, "  optimizer state        {}", g(self.optimizer))?;
        writeln!(
            f,
            "  activations            {} ({} per layer{})",
            g(self.activations),
            g(self.activations_per_layer).trim(),
            if self.recompute {
                ", one layer at a time: recomputed from each layer's input"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "  attention workspace    {} ({})",
            g(self.attention_workspace),
            if self.blockwise {
                "blockwise, linear in the sequence"
            } else {
                "dense, quadratic in the sequence"
            }
        )?;
        writeln!(f, "  logits and embeddings  {}", g(self.head))?;
        write!(f, "  peak per device        {}", g(self.peak()))
    }
}

/// The shape of a step of the run `cfg` of model `model`.
pub fn step_shape(cfg: &ExperimentConfig, model: &TransfusionConfig) -> StepShape {
    StepShape {
        model: model.clone(),
        batch_size: cfg.training.batch_size,
        seq_len: cfg.training.seq_len,
        precision: cfg.training.precision,
        ema: cfg.training.ema_decay > 0.0,
        blockwise_from: transfusion_model::ops::blockwise::MIN_KEYS,
        recompute: cfg.training.recompute,
        fused_attention: false,
    }
}

/// The memory plan of a training step of `shape`.
pub fn plan(shape: &StepShape) -> MemoryPlan {
    let m = &shape.model;
    let params = m.param_count().total() as f64;
    let (b, s) = (shape.batch_size as f64, shape.seq_len as f64);
    let positions = b * s;
    let (d, f) = (m.d_model as f64, m.d_hidden as f64);
    let h = m.n_heads as f64;
    let untied = if m.untied() { 2.0 } else { 1.0 };
    // Per position, f32 values each layer keeps: about 10d + 3f (measured: the residual
    // input and the norms' inputs, queries, keys and values around RoPE and the head
    // layout, the attention output, and the SwiGLU's gate, up and product); untied
    // modality weights run both weight sets' projections and MLP.
    let f32_values = 4.0 * d + untied * (6.0 * d + 3.0 * f);
    // compute-type copies of the products' inputs (bf16/f16: 2 bytes each)
    let compute_copies = match shape.precision {
        Precision::F32 => 0.0,
        _ => untied * (5.0 * d + f) * 2.0,
    };
    let blockwise = takes_blockwise(shape.seq_len, shape.seq_len, shape.blockwise_from);
    let scores = b * h * s * s * 4.0;
    let (per_layer_attention, workspace) = if blockwise {
        // the row log-sum-exp per head; one block's scores and probabilities (f32)
        let rows =
            rows_per_block(shape.batch_size, m.n_heads, shape.seq_len).min(shape.seq_len) as f64;
        (positions * h * 4.0, 2.0 * rows * s * b * h * 4.0)
    } else if shape.fused_attention {
        // the row log-sum-exp per head; the additive mask (f32) and its boolean form once
        // per pass, and in the backward pass the recomputed probabilities and the score
        // gradients (measured: 2 and 6 layers at 2048 positions)
        (positions * h * 4.0, 3.25 * scores)
    } else {
        // the probabilities kept per layer; the additive mask (f32) and its boolean form,
        // once per pass
        (scores, 1.25 * scores)
    };
    let activations_per_layer =
        positions * (f32_values * 4.0 + compute_copies) + per_layer_attention;
    let v = m.vocab_size as f64;
    // logits, their softmax and gradient as if every position were a text target (an
    // upper bound: only text targets are scored); the embeddings and the final norm
    let head = positions * (3.0 * v + 6.0 * d) * 4.0;
    let layers = m.n_layers as f64;
    let recompute = shape.recompute == Recompute::Layers;
    let activations = if recompute {
        // each layer's f32 input, and one layer's activations during its backward pass
        layers * positions * d * 4.0 + activations_per_layer
    } else {
        activations_per_layer * layers
    };
    MemoryPlan {
        weights: params * 4.0,
        gradients: params * 4.0,
        optimizer: params * 4.0 * if shape.ema { 3.0 } else { 2.0 },
        activations,
        recompute,
        activations_per_layer,
        attention_workspace: workspace,
        head,
        blockwise,
    }
}

/// Bytes of memory the CPU has available now (`MemAvailable` of `/proc/meminfo`).
pub fn available_host_memory() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Bytes free on NVIDIA GPU `index` now, as `nvidia-smi` reports them (`None` where it is
/// missing or fails: Burn 0.21's CUDA backend reports no capacity).
pub fn available_gpu_memory(index: usize) -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            &format!("--id={index}"),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    parse_mib(&String::from_utf8_lossy(&out.stdout))
}

/// Bytes of the first line of `nvidia-smi`'s unitless MiB output.
fn parse_mib(text: &str) -> Option<f64> {
    let mib: f64 = text.lines().next()?.trim().parse().ok()?;
    Some(mib * 1024.0 * 1024.0)
}

/// `Err` naming the settings that would make `shape` fit `available` bytes when its
/// plan's peak does not.
pub fn check_fits(shape: &StepShape, available: f64, device: &str) -> Result<(), String> {
    let need = plan(shape).peak();
    if need <= available {
        return Ok(());
    }
    let fits = |s: &StepShape| plan(s).peak() <= available;
    let mut ways = Vec::new();
    let mut smaller = shape.clone();
    while smaller.batch_size > 1 && !fits(&smaller) {
        smaller.batch_size /= 2;
    }
    if fits(&smaller) {
        ways.push(format!(
            "training.batch_size = {} (with grad_accum for the same step)",
            smaller.batch_size
        ));
    }
    let mut shorter = shape.clone();
    while shorter.seq_len > 64 && !fits(&shorter) {
        shorter.seq_len /= 2;
    }
    if fits(&shorter) {
        ways.push(format!("training.seq_len = {}", shorter.seq_len));
    }
    if shape.recompute == Recompute::None {
        let layers = StepShape {
            recompute: Recompute::Layers,
            ..shape.clone()
        };
        if fits(&layers) {
            ways.push("training.recompute = \"layers\"".into());
        }
    }
    if shape.precision == Precision::F32 {
        let bf16 = StepShape {
            precision: Precision::Bf16,
            ..shape.clone()
        };
        if fits(&bf16) {
            ways.push("training.precision = \"bf16\"".into());
        }
    }
    if shape.ema
        && fits(&StepShape {
            ema: false,
            ..shape.clone()
        })
    {
        ways.push("training.ema_decay = 0".into());
    }
    let ways = if ways.is_empty() {
        "no single setting makes it fit: a smaller model".to_string()
    } else {
        format!("it fits with {}", ways.join(", or "))
    };
    Err(format!(
        "a training step of batch_size {} x seq_len {} needs about {:.1} GiB on {device}, \
         which has {:.1} GiB available; {ways} (more devices do not lower the memory per \
         device: each replica holds the whole model and optimizer). The plan:\n{}",
        shape.batch_size,
        shape.seq_len,
        need / GIB,
        available / GIB,
        plan(shape)
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_mib;

    #[test]
    fn nvidia_smi_free_memory_is_read_in_mib() {
        assert_eq!(parse_mib("81037\n"), Some(81037.0 * 1048576.0));
        assert_eq!(parse_mib("  512 \n1024\n"), Some(512.0 * 1048576.0));
        assert_eq!(parse_mib("[N/A]\n"), None);
        assert_eq!(parse_mib(""), None);
    }
}
