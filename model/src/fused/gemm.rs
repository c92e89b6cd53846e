//! Matrix products of f32 `flex` tensors straight through `gemm`, into buffers the caller
//! owns.
//!
//! Burn `flex`'s own product allocates its output as zeroed bytes and then copies them
//! once more to reach the buffer alignment it wants (a memset and a memcpy of every
//! output, about 7% of a tiny training step); here the output is one zeroed `Vec<f32>`,
//! the product can be scaled for free (`gemm` multiplies by a scalar as it accumulates),
//! and the fused kernels can keep working in the same buffer.

use burn::backend::flex::FlexTensor;
use burn::tensor::Shape;
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
    let (values, shape) = matmul_values(a, b, scale, None);
    flex_from(values, shape)
}

/// [`matmul`]'s values, row-major, and their shape; with `onto`, the product is added to
/// those values (row-major `[.., m, n]`) instead of to zeros.
pub(super) fn matmul_values(
    a: &FlexTensor,
    b: &FlexTensor,
    scale: f32,
    onto: Option<Vec<f32>>,
) -> (Vec<f32>, Shape) {
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
    let read_dst = onto.is_some();
    let mut out = onto.unwrap_or_else(|| vec![0.0f32; batch * m * n]);
    assert_eq!(out.len(), batch * m * n, "matmul: the buffer to add onto");
    if m * n == 0 || k == 0 {
        return (out, Shape::from(dims));
    }
    let (a_at, b_at) = (batch_offsets(&a, batch), batch_offsets(&b, batch));
    let (a_rs, a_cs) = last_two_strides(&a);
    let (b_rs, b_cs) = last_two_strides(&b);
    let (a_data, b_data) = (a.storage::<f32>(), b.storage::<f32>());
    let product = |i: usize, dst: &mut [f32], parallelism: Parallelism| {
        // SAFETY: `dst` holds the m x n output; the offsets and strides address elements of
        // `a` and `b` inside their buffers (they come from the tensors' layouts, whose
        // strides are non-negative here).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                read_dst,
                a_data.as_ptr().add(a_at[i]),
                a_cs,
                a_rs,
                b_data.as_ptr().add(b_at[i]),
                b_cs,
                b_rs,
                1.0,
                scale,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    let each = m * n * k;
    if batch > 1 && each < PARALLEL_PRODUCT && batch * each >= PARALLEL_BATCH {
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, dst)| product(i, dst, Parallelism::None));
    } else {
        let parallelism = if each >= PARALLEL_PRODUCT {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
        for (i, dst) in out.chunks_mut(m * n).enumerate() {
            product(i, dst, parallelism);
        }
    }
    (out, Shape::from(dims))
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
