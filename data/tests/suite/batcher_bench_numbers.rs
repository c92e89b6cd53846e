//! Throughput numbers of the data side (ignored: run on purpose, release profile):
//! `cargo test --release -p transfusion-data --test suite print_data_throughput -- --ignored --nocapture`

use std::path::Path;
use std::sync::Arc;

use transfusion_data::bench::{bench_batches, bench_decode, BatchBench};
use transfusion_data::tokenizer::TextTokenizer;

#[test]
#[ignore = "benchmark: prints numbers, takes a few seconds"]
fn print_data_throughput() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut counts = vec![1];
    if threads > 1 {
        counts.push(threads);
    }
    for r in bench_decode(256, 256, 256, &counts).unwrap() {
        println!("{r}");
    }
    for r in bench_decode(256, 256, 64, &counts).unwrap() {
        println!("{r}");
    }
    let tok = TextTokenizer::from_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tokenizer.json"),
    )
    .unwrap();
    let cfg = BatchBench {
        image_size: 32,
        patch_size: 2,
        seq_len: 1024,
        batch_size: 8,
        batches: 20,
    };
    for r in bench_batches(Arc::new(tok), &cfg, &counts).unwrap() {
        println!("{r}");
    }
}
