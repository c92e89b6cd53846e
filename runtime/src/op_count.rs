//! Counting the float tensor operations a piece of work runs (the benchmarks' op counts).

/// The next value of the autodiff graph's node counter: every float tensor made on an
/// autodiff backend (an op's output or a leaf) takes one id from one process-wide counter.
fn autodiff_node_counter() -> u64 {
    burn::backend::autodiff::NodeId::new().value
}

/// `f`'s result and the float tensor ops it ran on autodiff backends: one graph node per
/// float op output or leaf tensor (matrix products, element-wise ops, reductions, reshapes
/// and copies alike; integer and boolean ops are not counted). The counter is
/// process-wide: nothing else may run autodiff ops meanwhile.
pub fn float_ops<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = autodiff_node_counter();
    let out = f();
    (out, autodiff_node_counter() - before - 1)
}
