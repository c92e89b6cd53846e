//! The threads that run tensor work on the CPU backends, and the start of the binaries' `main`.

/// Runs `work` on a thread of a compute pool of its own and returns what it returns.
///
/// The CPU backends spread a large kernel (a product, a row-wise pass) over rayon's
/// threads. Started from a thread outside any pool, every such kernel hands its pieces to
/// the pool's threads and puts the caller to sleep until they are done, so each one pays
/// two thread wake-ups; from one of the pool's threads, the caller works on the kernel
/// itself and the other threads join in. On a 2-core host, a row-wise pass over 48k
/// floats took 28-32 us called from outside and 11-14 us from inside (the same pass
/// 150 times over, in separate processes).
///
/// The pool has rayon's usual size (`RAYON_NUM_THREADS`, else one thread per core) and
/// 16 MiB stacks (8 MiB is the main thread's). Threads that `work` starts itself (data
/// prefetchers, data-parallel replicas) use rayon's global pool as before, so waiting on
/// them cannot starve it. Where the pool cannot be made, `work` runs on the calling thread.
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("compute-{i}"))
        .stack_size(16 << 20)
        .build();
    match pool {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
    }
}

/// The start of both binaries' `main`: the host allocator's settings
/// ([`crate::allocator::keep_freed_buffers`]) and the quiet Vulkan probe
/// ([`crate::device::quiet_headless_vulkan`]), both made while the process has one thread
/// (the second sets an environment variable), then `work` on the compute pool
/// ([`on_compute_pool`]).
pub fn run_binary<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    crate::allocator::keep_freed_buffers();
    crate::device::quiet_headless_vulkan();
    on_compute_pool(work)
}
