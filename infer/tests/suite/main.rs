//! The infer crate's integration tests, in one binary: each file below used to be its own
//! test binary, and compiling and linking them one by one cost minutes of every CI run.
//!
//! Run one file's tests with its module name as the filter, e.g.
//! `cargo test --release -p transfusion-infer --test suite cli::`.

mod common;

mod bench;
mod cli;
mod error_report;
mod pipeline;
mod threads;
mod vae_pipeline;
