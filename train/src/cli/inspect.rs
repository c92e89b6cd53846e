//! `transfusion-train inspect`: describe data sources, optionally measure data throughput.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use transfusion_data::source::{SourceOptions, SourceSpec};
use transfusion_train::data::resolve_path;

/// Flags of `inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Data source KIND:LOCATION[@WEIGHT] (repeatable).
    #[arg(long = "data", required = true)]
    pub data: Vec<SourceSpec>,
    /// Records to read (and decode) per source.
    #[arg(long, default_value_t = 100)]
    pub check: usize,
    /// Tokenizer used for token counts.
    #[arg(long, default_value = "assets/tokenizer.json")]
    pub tokenizer: PathBuf,
    /// Also measure data throughput (JPEG decoding, batch building) on 1 and N threads.
    #[arg(long)]
    pub bench: bool,
    /// Worker threads for --bench (besides 1).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// Prints the description (and the throughput figures).
pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let tok_path = resolve_path(&a.tokenizer, None);
    let tok = transfusion_data::tokenizer::TextTokenizer::from_file(&tok_path).ok();
    if tok.is_none() {
        eprintln!(
            "(no tokenizer at {}: token counts left out)",
            tok_path.display()
        );
    }
    let report = transfusion_data::inspect::describe_sources(
        &a.data,
        &SourceOptions::default(),
        a.check,
        tok.as_ref()
            .map(|t| t as &dyn transfusion_data::sequence::TokenSource),
    )?;
    println!("{report}");
    if a.bench {
        let threads = [1, a.threads.max(1)];
        for r in transfusion_data::bench::bench_decode(64, 256, 32, &threads)? {
            println!("{r}");
        }
        if let Some(t) = tok {
            let t: Arc<dyn transfusion_data::sequence::TokenSource> = Arc::new(t);
            let cfg = transfusion_data::bench::BatchBench {
                image_size: 32,
                patch_size: 4,
                seq_len: 128,
                batch_size: 8,
                batches: 20,
            };
            for r in transfusion_data::bench::bench_batches(t, &cfg, &threads)? {
                println!("{r}");
            }
        }
    }
    Ok(())
}
