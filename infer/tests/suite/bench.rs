//! The op counts of `transfusion bench`: counted on the autodiff backend as the difference
//! between two runs, they are the same whichever pair of runs is compared (a per-step
//! figure, not one that includes the setup), positive, and guidance adds ops.
//!
//! The autodiff node counter is process-wide; no other test in this binary runs an
//! autodiff backend.

use burn::backend::{Autodiff, NdArray};
use transfusion_infer::bench::{op_counts, BenchOptions, BenchReport};
use transfusion_infer::pipeline::{ImageOptions, Pipeline};
use transfusion_infer::sampler::SamplerKind;
use transfusion_runtime::op_count::float_ops;

type AD = Autodiff<NdArray>;

#[test]
fn op_counts_are_per_step_and_guidance_adds_ops() {
    let dir = crate::common::checkpoint();
    let mut pipe = Pipeline::<AD>::load(dir.path(), &Default::default()).unwrap();
    let ops = |pipe: &Pipeline<AD>, steps: usize, cfg: f64| {
        let o = ImageOptions {
            num: 1,
            steps,
            sampler: SamplerKind::Ddim,
            cfg,
            seed: 0,
        };
        let (img, n) = float_ops(|| pipe.image_tensor("a red circle", &o, |_, _| {}));
        img.unwrap();
        n
    };
    let guided: Vec<u64> = (1..=3).map(|s| ops(&pipe, s, 3.0)).collect();
    let per_step = guided[1] - guided[0];
    assert!(per_step > 0);
    assert_eq!(guided[2] - guided[1], per_step, "{guided:?}");
    let plain = ops(&pipe, 2, 1.0) - ops(&pipe, 1, 1.0);
    assert!(plain > 0 && plain < per_step, "{plain} vs {per_step}");

    let opts = BenchOptions {
        prompt_tokens: 8,
        cfg: 3.0,
        ..BenchOptions::default()
    };
    let mut report = BenchReport::default();
    op_counts(&mut pipe, &opts, &mut report).unwrap();
    let step = report
        .get("float tensor ops per diffusion step (kv cache, with CFG)")
        .unwrap();
    // The bench's prompt differs from the one above; the per-step count does not.
    assert_eq!(step, per_step as f64);
    let token = report
        .get("float tensor ops per text token (kv cache)")
        .unwrap();
    assert!(token > 0.0);
}
