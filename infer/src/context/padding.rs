//! Left padding: rows of different lengths end at one column, so new positions are
//! appended at one column for all rows (see the [module docs](super)).
//!
//! Padding positions get RoPE position 0, span id 0 and document id 0; real positions get
//! their *logical* position inside the row (0 at the row's BOS) and document id 1.

use burn::prelude::*;
use transfusion_model::mask::SpanMeta;

/// An int tensor of `shape` from row-major values.
pub(super) fn ints<B: Backend>(
    v: Vec<i64>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints(v.as_slice(), device).reshape(shape)
}

/// An index tensor `[idx.len()]`.
pub(super) fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::<B, 1, Int>::from_ints(v.as_slice(), device)
}

/// Positions and metadata of new positions whose mask index is their (logical) RoPE
/// position.
///
/// # Shapes
/// `positions`, `span`, `doc`: `[b, l]`
pub(super) fn logical_meta<B: Backend>(
    positions: Tensor<B, 2, Int>,
    span: Tensor<B, 2, Int>,
    doc: Tensor<B, 2, Int>,
) -> (Tensor<B, 2, Int>, SpanMeta<B>) {
    let meta = SpanMeta {
        index: positions.clone(),
        span,
        doc,
    };
    (positions, meta)
}

/// The layout of rows left-padded to the longest: `l` columns, row `r` starts with
/// [`LeftPadded::pad`]`(r)` padding columns.
pub(super) struct LeftPadded {
    /// Image span id of every real position (0 for text, `k` in the k-th image), per row.
    spans: Vec<Vec<i64>>,
    /// Padded length `l`.
    len: usize,
}

impl LeftPadded {
    /// The layout of rows with these span ids.
    pub(super) fn new(spans: Vec<Vec<i64>>) -> Self {
        let len = spans.iter().map(Vec::len).max().unwrap_or(0);
        Self { spans, len }
    }

    /// The layout of text-only rows of these lengths.
    pub(super) fn text(lens: impl IntoIterator<Item = usize>) -> Self {
        Self::new(lens.into_iter().map(|n| vec![0; n]).collect())
    }

    /// Shape `[b, l]` of the padded rows.
    pub(super) fn shape(&self) -> [usize; 2] {
        [self.spans.len(), self.len]
    }

    /// Padding columns before row `r`.
    pub(super) fn pad(&self, r: usize) -> usize {
        self.len - self.spans[r].len()
    }

    /// Row-major `[b, l]` values: `fill` in each row's padding, then the row's own values.
    pub(super) fn values<I: IntoIterator<Item = i64>>(
        &self,
        rows: impl IntoIterator<Item = I>,
        fill: i64,
    ) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.spans.len() * self.len);
        for (r, row) in rows.into_iter().enumerate() {
            out.extend(std::iter::repeat_n(fill, self.pad(r)));
            out.extend(row);
        }
        out
    }

    /// RoPE positions and mask metadata of the padded rows (see the module docs).
    ///
    /// # Shapes
    /// both `[b, l]`
    pub(super) fn meta<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 2, Int>, SpanMeta<B>) {
        let shape = self.shape();
        let rows = || self.spans.iter();
        let pos = self.values(rows().map(|s| 0..s.len() as i64), 0);
        let span = self.values(rows().map(|s| s.iter().copied()), 0);
        let doc = self.values(rows().map(|s| std::iter::repeat_n(1, s.len())), 0);
        logical_meta(
            ints::<B>(pos, shape, device),
            ints::<B>(span, shape, device),
            ints::<B>(doc, shape, device),
        )
    }
}
