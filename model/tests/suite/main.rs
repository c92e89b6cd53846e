//! The model crate's integration tests, in one binary: each file below used to be its own
//! test binary, and compiling and linking them one by one cost minutes of every CI run.
//!
//! Run one file's tests with its module name as the filter, e.g.
//! `cargo test --release -p transfusion-model --test suite schedule::`.

mod common;

mod attention_forms;
mod backends;
mod blockwise;
mod consistency;
mod fused;
mod fused_reference;
mod mask;
mod model;
mod patch;
mod precision;
mod prediction;
mod recompute;
mod schedule;
mod trigflow;
mod vae_diffusers;
mod vae_network;
