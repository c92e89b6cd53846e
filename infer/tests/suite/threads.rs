//! The compute pool the binaries run their work on.

use transfusion_runtime::threads::on_compute_pool;

/// The work runs on a thread of a pool (so the CPU kernels it starts take that thread
/// along instead of putting it to sleep), with rayon's usual number of threads, and its
/// result comes back to the caller.
#[test]
fn work_runs_on_a_pool_thread_of_the_usual_size() {
    let outside = rayon::current_num_threads();
    assert_eq!(
        rayon::current_thread_index(),
        None,
        "the test thread is no pool's"
    );
    let (index, threads, name, sum) = on_compute_pool(|| {
        let sum: u64 = rayon::join(|| (0..1000u64).sum::<u64>(), || 1000u64).0;
        (
            rayon::current_thread_index(),
            rayon::current_num_threads(),
            std::thread::current().name().map(str::to_owned),
            sum,
        )
    });
    assert!(index.is_some(), "the work ran outside the pool");
    assert_eq!(threads, outside);
    assert!(
        name.as_deref().is_some_and(|n| n.starts_with("compute-")),
        "{name:?}"
    );
    assert_eq!(sum, 499_500);
}

/// A panic in the work reaches the caller as a panic, not as a hang or an abort.
#[test]
fn a_panic_in_the_work_reaches_the_caller() {
    let caught = std::panic::catch_unwind(|| on_compute_pool(|| panic!("inside the pool")));
    let message = caught.expect_err("the panic was lost");
    assert_eq!(message.downcast_ref::<&str>(), Some(&"inside the pool"));
}
