//! The data crate's integration tests, in one binary: each file below used to be its own
//! test binary, and linking them one by one cost minutes of every CI run.
//!
//! Run one file's tests with its module name as the filter, e.g.
//! `cargo test --release -p transfusion-data --test suite batcher_pipeline::`.

mod dataset_util;

mod batcher_bench;
mod batcher_bench_numbers;
mod batcher_pipeline;
mod batcher_roundtrip;
mod dataset_formats;
mod dataset_mixture;
mod dataset_spec;
mod dataset_wds;
mod digits_dataset;
mod image_io;
mod latents_cache;
mod packing_invariants;
mod sequence_inspect;
mod sequence_layout;
mod shapes_dataset;
mod tokenizer_assets;
mod tokenizer_bpe;
