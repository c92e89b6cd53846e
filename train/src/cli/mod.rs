//! The subcommands of `transfusion-train`, one file each: its flags and what it runs.

pub mod bench;
pub mod cache;
pub mod ddp;
pub mod demo;
pub mod inspect;
pub mod plot;
pub mod run;
pub mod tokenizer;
pub mod vae;
pub mod vae_bench;
