//! The bench helpers run and report sane numbers (tiny sizes; not a performance test).

use std::sync::Arc;

use crate::dataset_util::ToyTokenizer;
use transfusion_data::bench::{bench_batches, bench_decode, BatchBench};

#[test]
fn bench_decode_and_batches_report_every_thread_count() {
    let r = bench_decode(6, 64, 32, &[1, 2]).unwrap();
    assert_eq!(
        r.iter().map(|x| (x.threads, x.samples)).collect::<Vec<_>>(),
        vec![(1, 6), (2, 6)]
    );
    assert!(r.iter().all(|x| x.samples_per_sec > 0.0 && x.seconds > 0.0));
    assert!(r[0]
        .to_string()
        .contains("decode 64px JPEG + resize to 32: 1 thread(s): 6 samples"));

    let cfg = BatchBench {
        image_size: 16,
        patch_size: 4,
        seq_len: 64,
        batch_size: 2,
        batches: 3,
    };
    let r = bench_batches(Arc::new(ToyTokenizer::default()), &cfg, &[1, 2]).unwrap();
    assert_eq!(r.len(), 2);
    assert!(r[0].samples >= 6, "{:?}", r[0]);
    assert!(r[1].samples >= 2 * r[0].samples - 2);
}
