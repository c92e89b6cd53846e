//! Parameter counts computed from a config alone (no allocation, so the 7B preset can be
//! counted anywhere), drawing lazily initialised parameters ([`materialize`]) and the lock on
//! Burn's global RNG that every draw takes ([`with_backend_rng`]).

use std::cell::Cell;
use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

use crate::config::{ImageIoConfig, TransfusionConfig};

/// Draws every lazily initialised parameter of `module` now (Burn draws a parameter's
/// values at its first use; a clone of a parameter not drawn yet would draw values of its
/// own). The draws happen under [`with_backend_rng`].
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    with_backend_rng(|| module.visit(&mut Touch));
}

static BACKEND_RNG: Mutex<()> = Mutex::new(());

thread_local! {
    static HOLDS_BACKEND_RNG: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` holding the process-wide lock on Burn's backend RNG.
///
/// Each Burn backend has one global RNG: a seeded initialisation gets its weights only if
/// no other thread draws from that RNG between the seed and the last draw. Every draw in
/// this project (seeded initialisation, materialising parameters, a VAE posterior sample)
/// goes through here, so two runs in one process (tests side by side, a data-parallel
/// replica) cannot take each other's numbers. Re-entrant on one thread: a seeded
/// initialisation may materialise parameters inside it.
pub fn with_backend_rng<R>(f: impl FnOnce() -> R) -> R {
    if HOLDS_BACKEND_RNG.with(Cell::get) {
        return f();
    }
    let _guard = BACKEND_RNG.lock().unwrap_or_else(|e| e.into_inner());
    HOLDS_BACKEND_RNG.with(|h| h.set(true));
    // Cleared on unwind too, so a panicking draw does not leave this thread marked.
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            HOLDS_BACKEND_RNG.with(|h| h.set(false));
        }
    }
    let _release = Release;
    f()
}

/// Parameters of a model, by part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCount {
    /// Token embedding `v * d`.
    pub embedding: usize,
    /// LM head `d * v` (untied).
    pub lm_head: usize,
    /// Decoder layers (both weight sets when the modalities are untied) and the final norm.
    pub decoder: usize,
    /// Image adapter (timestep MLP, patch projections, U-Net).
    pub image_io: usize,
}

impl ParamCount {
    /// Everything.
    pub fn total(&self) -> usize {
        self.embedding + self.lm_head + self.decoder + self.image_io
    }

    /// The language-model part (embedding + decoder + LM head): what the paper's model
    /// sizes (0.16B ... 7B) count.
    pub fn language_model(&self) -> usize {
        self.embedding + self.lm_head + self.decoder
    }
}

fn linear(i: usize, o: usize, bias: bool) -> usize {
    i * o + if bias { o } else { 0 }
}

fn conv3(i: usize, o: usize) -> usize {
    9 * i * o + o
}

fn resnet(c_in: usize, c_out: usize, d_temb: usize) -> usize {
    2 * c_in
        + conv3(c_in, c_out)
        + linear(d_temb, c_out, true)
        + 2 * c_out
        + conv3(c_out, c_out)
        + if c_in != c_out {
            linear(c_in, c_out, true)
        } else {
            0
        }
}

impl TransfusionConfig {
    /// Counts the parameters [`TransfusionConfig::init`] would create.
    pub fn param_count(&self) -> ParamCount {
        let d = self.d_model;
        let kv = self.n_kv_heads * self.head_dim();
        let layer = 2 * d + 2 * d * d + 2 * d * kv + 3 * d * self.d_hidden;
        let sets = if self.untied() { 2 } else { 1 };
        let decoder = self.n_layers * layer * sets + d;
        let temb = |d_out: usize| {
            let hidden = d_out.max(self.d_timestep);
            linear(self.d_timestep, hidden, true) + linear(hidden, d_out, true)
        };
        let image_io = match &self.image_io {
            ImageIoConfig::Linear => {
                let p = self.patch_dim();
                temb(p) + 2 * p * d
            }
            ImageIoConfig::Unet(u) => {
                let d_temb = 4 * u.channels[0];
                let c0 = u.channels[0];
                let mut n = temb(d_temb) + conv3(self.latent_channels, c0);
                let mut prev = c0;
                for (i, &c) in u.channels.iter().enumerate() {
                    for j in 0..u.blocks_per_level {
                        n += resnet(if j == 0 { prev } else { c }, c, d_temb);
                    }
                    prev = c;
                    if i + 1 < u.channels.len() {
                        n += conv3(c, c);
                    }
                }
                let inner = self.patch_size / u.downsampling();
                let d_patch = prev * inner * inner;
                n += linear(d_patch, d, true) + linear(d, d_patch, true);
                for (i, &c) in u.channels.iter().enumerate().rev() {
                    for j in 0..u.blocks_per_level {
                        n += resnet(if j == 0 { prev + c } else { c }, c, d_temb);
                    }
                    prev = c;
                    if i > 0 {
                        n += conv3(c, c);
                    }
                }
                n + 2 * c0 + conv3(c0, self.latent_channels)
            }
        };
        ParamCount {
            embedding: self.vocab_size * d,
            lm_head: d * self.vocab_size,
            decoder,
            image_io,
        }
    }
}
