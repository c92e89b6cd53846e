//! Matrix products of f32 `flex` tensors straight through `gemm`, into buffers the caller
//! owns.
//!
//! Burn `flex`'s own product allocates its output as zeroed bytes and then copies them
//! once more to reach the buffer alignment it wants (a memset and a memcpy of every
//! output, about 7% of a tiny training step); here the output is one `Vec<f32>` that
//! `gemm` writes without reading, the product can be scaled for free (`gemm` multiplies by
//! a scalar as it writes), and the fused kernels can keep working in the same buffer.

use burn::backend::flex::FlexTensor;
use burn::tensor::Shape;
use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::flex_from;

/// Multiply-adds from which one product is split over the thread pool (below it the
/// threads' start-up costs more than they save).
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// Total multiply-adds from which a batch of small products is spread over the pool.
const PARALLEL_BATCH: usize = 64 * 64 * 64;

/// `scale * a b` as a contiguous `flex` tensor.
///
/// # Shapes
/// - `a`: `[.., m, k]`, `b`: `[.., k, n]` with the same leading (batch) dimensions; any
///   strides (transposed views are read in place)
/// - output: `[.., m, n]`
pub(super) fn matmul(a: &FlexTensor, b: &FlexTensor, scale: f32) -> FlexTensor {
    let (values, shape) = matmul_values(a, b, scale);
    flex_from(values, shape)
}

/// [`matmul`]'s values, row-major, and their shape.
pub(super) fn matmul_values(a: &FlexTensor, b: &FlexTensor, scale: f32) -> (Vec<f32>, Shape) {
    let (a, b) = (positive_strides(a), positive_strides(b));
    let (sa, sb) = (a.layout().shape(), b.layout().shape());
    let d = sa.num_dims();
    assert!(
        d >= 2 && sb.num_dims() == d,
        "matmul: ranks {d} and {}",
        sb.num_dims()
    );
    let (m, k, n) = (sa[d - 2], sa[d - 1], sb[d - 1]);
    assert!(
        sb[d - 2] == k && sa[..d - 2] == sb[..d - 2],
        "matmul: shapes {sa:?} and {sb:?} do not chain"
    );
    let batch: usize = sa[..d - 2].iter().product();
    let mut dims = sa.to_vec();
    dims[d - 1] = n;
    let shape = Shape::from(dims);
    let len = batch * m * n;
    if m * n == 0 || k == 0 {
        // An empty sum.
        return (vec![0.0f32; len], shape);
    }
    // Not zeroed first: `gemm` writes every element without reading it (`read_dst` false).
    let mut out = Vec::with_capacity(len);
    let product = Product {
        m,
        n,
        k,
        a: a.storage::<f32>().as_ptr(),
        b: b.storage::<f32>().as_ptr(),
        a_at: batch_offsets(&a, batch),
        b_at: batch_offsets(&b, batch),
        a_strides: last_two_strides(&a),
        b_strides: last_two_strides(&b),
        scale,
    };
    let dst = Dst(out.as_mut_ptr());
    let each = m * n * k;
    let threads = rayon::current_num_threads();
    if batch > 1 && each < PARALLEL_PRODUCT && batch * each >= PARALLEL_BATCH {
        (0..batch)
            .into_par_iter()
            .for_each(|i| product.run(i, 0..m, 0..n, &dst));
    } else if each >= PARALLEL_PRODUCT && threads > 1 {
        // One part per thread along the longer side of the output. `gemm`'s own split
        // (`Parallelism::Rayon`) was measured slower on these shapes: a [1024, 128] x
        // [128, 384] product took 0.69-0.99 ms on 2 threads, no faster than on one,
        // against 0.47-0.51 ms split here.
        for i in 0..batch {
            let parts = split(if m >= n { m } else { n }, threads);
            parts.into_par_iter().for_each(|part| {
                if m >= n {
                    product.run(i, part, 0..n, &dst)
                } else {
                    product.run(i, 0..m, part, &dst)
                }
            });
        }
    } else {
        for i in 0..batch {
            product.run(i, 0..m, 0..n, &dst);
        }
    }
    // SAFETY: the products above wrote all `batch * m * n` values.
    unsafe { out.set_len(len) };
    (out, shape)
}

/// The output buffer, shared by the threads that write disjoint blocks of it.
struct Dst(*mut f32);

// SAFETY: each thread writes its own block of the buffer (see `Product::run`).
unsafe impl Sync for Dst {}

/// One batched product `scale * a b`, row-major output `[batch, m, n]`.
struct Product {
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    /// Element offset of each batch item's matrix in `a` and `b`.
    a_at: Vec<usize>,
    b_at: Vec<usize>,
    /// `(row stride, column stride)` of `a` and `b`, in elements.
    a_strides: (isize, isize),
    b_strides: (isize, isize),
    scale: f32,
}

// SAFETY: the operands are only read.
unsafe impl Sync for Product {}

impl Product {
    /// Writes the block `rows x cols` of batch item `i` of the output.
    fn run(&self, i: usize, rows: Range<usize>, cols: Range<usize>, dst: &Dst) {
        let (a_rs, a_cs) = self.a_strides;
        let (b_rs, b_cs) = self.b_strides;
        let (r0, c0) = (rows.start as isize, cols.start as isize);
        // SAFETY: the output holds `batch * m * n` values and the block lies inside item
        // `i`'s `m x n`; the offsets and strides address elements of `a` and `b` inside
        // their buffers (they come from the tensors' layouts, whose strides are
        // non-negative here). Blocks written by different threads do not overlap.
        unsafe {
            gemm::gemm(
                rows.len(),
                cols.len(),
                self.k,
                dst.0
                    .add(i * self.m * self.n)
                    .offset(r0 * self.n as isize + c0),
                1,
                self.n as isize,
                false,
                self.a.add(self.a_at[i]).offset(r0 * a_rs),
                a_cs,
                a_rs,
                self.b.add(self.b_at[i]).offset(c0 * b_cs),
                b_cs,
                b_rs,
                1.0,
                self.scale,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    }
}

/// `0..len` in `parts` ranges of about equal length, each starting at a multiple of 16
/// (whole vector registers of output).
fn split(len: usize, parts: usize) -> Vec<Range<usize>> {
    let step = len.div_ceil(parts).next_multiple_of(16);
    (0..len)
        .step_by(step)
        .map(|start| start..(start + step).min(len))
        .collect()
}

/// `t` itself, or a contiguous copy where a stride is negative (a flipped view).
fn positive_strides(t: &FlexTensor) -> FlexTensor {
    if t.layout().has_positive_strides() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

/// `(row stride, column stride)` of the last two dimensions, in elements.
fn last_two_strides(t: &FlexTensor) -> (isize, isize) {
    let s = t.layout().strides();
    (s[s.len() - 2], s[s.len() - 1])
}

/// The element offset of each matrix of the batch (flat over the leading dimensions).
fn batch_offsets(t: &FlexTensor, batch: usize) -> Vec<usize> {
    let layout = t.layout();
    let (shape, strides) = (layout.shape(), layout.strides());
    let lead = shape.num_dims() - 2;
    (0..batch)
        .map(|mut i| {
            let mut at = layout.start_offset() as isize;
            for dim in (0..lead).rev() {
                at += (i % shape[dim]) as isize * strides[dim];
                i /= shape[dim];
            }
            at as usize
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::Shape;

    use super::{matmul_values, split, PARALLEL_PRODUCT};
    use crate::ops::fused::flex_from;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Products large enough to be split over the threads, wider than tall and taller than
    /// wide, with the left operand a transposed view: every element within the standard
    /// bound of an f32 sum of `k` products, `k eps sum |a| |b|`, of the f64 product.
    #[test]
    fn split_products_match_the_f64_product() {
        for (m, k, n) in [(300, 200, 150), (150, 200, 300)] {
            assert!(m * n * k >= PARALLEL_PRODUCT);
            // a is stored [k, m] and read through its transpose
            let (a, b) = (values(k * m, 1), values(k * n, 2));
            let a_t = flex_from(a.clone(), Shape::from(vec![k, m])).transpose(0, 1);
            let b_t: FlexTensor = flex_from(b.clone(), Shape::from(vec![k, n]));
            let (out, shape) = matmul_values(&a_t, &b_t, 0.5);
            assert_eq!(shape.to_vec(), vec![m, n]);
            let eps = f32::EPSILON as f64;
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut bound) = (0.0f64, 0.0f64);
                    for l in 0..k {
                        let (x, y) = (a[l * m + i] as f64, b[l * n + j] as f64);
                        exact += 0.5 * x * y;
                        bound += (0.5 * x * y).abs();
                    }
                    let err = (out[i * n + j] as f64 - exact).abs();
                    assert!(err <= k as f64 * eps * bound, "({i}, {j}): {err:e}");
                }
            }
        }
    }

    /// The parts cover the range once, in order, each but the last a multiple of 16 long.
    #[test]
    fn split_covers_the_range() {
        for (len, parts) in [(1024, 2), (150, 2), (300, 3), (10, 4), (17, 2)] {
            let ranges = split(len, parts);
            assert_eq!(ranges.first().unwrap().start, 0);
            assert_eq!(ranges.last().unwrap().end, len);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert_eq!(pair[0].len() % 16, 0);
            }
            assert!(ranges.len() <= parts);
        }
    }
}
