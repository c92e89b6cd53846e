//! Seeded, reproducible module initialisation.

use burn::module::Module;
use burn::prelude::*;
use transfusion_model::params::{materialize, with_backend_rng};

/// Builds a module with `init` right after seeding the backend's RNG with `seed`, holding
/// the lock on the backend's RNG ([`with_backend_rng`]): Burn's backend RNG is global, so
/// two runs initialising at the same time (tests, the demo) would otherwise interleave
/// their draws and get different weights.
///
/// Burn creates parameters lazily (their values drawn at first use); every parameter is
/// drawn here, before the lock is released. That also makes the module safe to copy (a copy
/// of a lazy parameter would draw its own values): data-parallel replicas are copies.
pub fn seeded_module<B: Backend, M: Module<B>>(
    device: &B::Device,
    seed: u64,
    init: impl FnOnce() -> M,
) -> M {
    with_backend_rng(|| {
        B::seed(device, seed);
        let module = init();
        // Lazy parameters would draw at first use, after the lock is released, from the
        // global RNG another run of the process (a test beside it) may be drawing from at
        // that moment: the Transfusion resume test failed 7 runs in 12 that way. Loading an
        // untied model drew the copies' initial values outside the lock until every draw
        // took it: the same test failed 1 run in 40.
        materialize(&module);
        module
    })
}
