//! The Transfusion attention mask: causal everywhere, bidirectional inside each image, and
//! block-diagonal over packed documents.
//!
//! Query position `i` may attend to key position `j` when both belong to the same document
//! and either `j <= i` (causal) or both lie in the same image (`span(i) == span(j) != 0`).
//! Padding has document id 0, so a padding position sees only earlier padding (at least
//! itself) and no row of the mask is ever fully masked.

use burn::prelude::*;

/// Per-position metadata the mask is built from. All tensors have shape `[b, l]`.
#[derive(Clone, Debug)]
pub struct SpanMeta<B: Backend> {
    /// Absolute index of the position in its row (causality is decided on it).
    pub index: Tensor<B, 2, Int>,
    /// Image span id: 0 for text, `k >= 1` for the k-th image of the row.
    pub span: Tensor<B, 2, Int>,
    /// Document id: `>= 1` for documents, 0 for padding.
    pub doc: Tensor<B, 2, Int>,
}

impl<B: Backend> SpanMeta<B> {
    /// Metadata of a full row: index `0..s`, with the given span and document ids.
    ///
    /// # Shapes
    /// `span`, `doc`: `[b, s]`
    pub fn full_rows(span: Tensor<B, 2, Int>, doc: Tensor<B, 2, Int>) -> Self {
        let [b, s] = span.dims();
        let index = Tensor::<B, 1, Int>::arange(0..s as i64, &span.device())
            .reshape([1, s])
            .expand([b, s]);
        Self { index, span, doc }
    }

    /// Applies `f` to each of the three `[b, l]` tensors (index, span, doc).
    pub fn map(self, f: impl Fn(Tensor<B, 2, Int>) -> Tensor<B, 2, Int>) -> Self {
        Self {
            index: f(self.index),
            span: f(self.span),
            doc: f(self.doc),
        }
    }

    /// Concatenates blocks along `dim` (0: rows, 1: the sequence), field by field.
    fn cat_along(parts: Vec<Self>, dim: usize) -> Self {
        let field = |f: fn(&Self) -> &Tensor<B, 2, Int>| {
            Tensor::cat(parts.iter().map(|m| f(m).clone()).collect(), dim)
        };
        Self {
            index: field(|m| &m.index),
            span: field(|m| &m.span),
            doc: field(|m| &m.doc),
        }
    }

    /// Concatenates two metadata blocks along the sequence (keys of a cache, then new keys).
    ///
    /// # Shapes
    /// `[b, l1]` and `[b, l2]` -> `[b, l1 + l2]`
    pub fn cat(self, other: Self) -> Self {
        Self::cat_along(vec![self, other], 1)
    }

    /// Stacks blocks of the same length row-wise (one batch made of several).
    ///
    /// # Shapes
    /// `[b_i, l]` each -> `[sum b_i, l]`
    pub fn cat_rows(parts: Vec<Self>) -> Self {
        Self::cat_along(parts, 0)
    }

    /// Keeps the first `len` positions.
    ///
    /// # Shapes
    /// `[b, l] -> [b, len]`
    pub fn truncate(self, len: usize) -> Self {
        self.map(|t| t.narrow(1, 0, len))
    }

    /// The rows `idx` (repeats allowed).
    ///
    /// # Shapes
    /// `[b, l]`, `idx`: `[b']` -> `[b', l]`
    pub fn select(self, idx: Tensor<B, 1, Int>) -> Self {
        self.map(|t| t.select(0, idx.clone()))
    }

    /// Prepends `n` padding positions to every row: index, span and document id 0, so the
    /// mask keeps real positions from seeing them.
    ///
    /// # Shapes
    /// `[b, l] -> [b, n + l]`
    pub fn pad_left(self, n: usize) -> Self {
        if n == 0 {
            return self;
        }
        self.map(|t| {
            let b = t.dims()[0];
            Tensor::cat(vec![Tensor::zeros([b, n], &t.device()), t], 1)
        })
    }

    /// Number of positions `l`.
    pub fn len(&self) -> usize {
        self.index.dims()[1]
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds the boolean mask, `true` = masked (the convention of `module::attention`).
///
/// # Shapes
/// - `query`: `[b, l_q]` tensors; `key`: `[b, l_k]` tensors
/// - output: `[b, l_q, l_k]`
pub fn transfusion_mask<B: Backend>(query: &SpanMeta<B>, key: &SpanMeta<B>) -> Tensor<B, 3, Bool> {
    allowed(query, key).bool_not()
}

/// [`transfusion_mask`] for `heads` attention heads, dense: built once per forward pass and
/// shared by every layer (masking against a broadcast view makes CPU backends copy it in
/// every layer, forward and backward).
///
/// # Shapes
/// - `query`: `[b, l_q]` tensors; `key`: `[b, l_k]` tensors
/// - output: `[b, heads, l_q, l_k]`
pub fn transfusion_mask_heads<B: Backend>(
    query: &SpanMeta<B>,
    key: &SpanMeta<B>,
    heads: usize,
) -> Tensor<B, 4, Bool> {
    let masked = allowed(query, key).bool_not();
    let [b, lq, lk] = masked.dims();
    // [b, l_q, l_k] -> [b, heads, l_q, l_k], repeated rather than expanded: the CPU
    // backends copy whole blocks for a repeat but walk a broadcast view element by element
    masked.reshape([b, 1, lq, lk]).repeat_dim(1, heads)
}

/// `true` where a query position may attend to a key position.
///
/// # Shapes
/// `[b, l_q]`, `[b, l_k]` tensors -> `[b, l_q, l_k]`
fn allowed<B: Backend>(query: &SpanMeta<B>, key: &SpanMeta<B>) -> Tensor<B, 3, Bool> {
    let [b, lq] = query.index.dims();
    let lk = key.index.dims()[1];
    // Materialised by repeats (see `transfusion_mask_heads`), so that the comparisons
    // read contiguous operands.
    let q = |t: &Tensor<B, 2, Int>| t.clone().reshape([b, lq, 1]).repeat_dim(2, lk);
    let k = |t: &Tensor<B, 2, Int>| t.clone().reshape([b, 1, lk]).repeat_dim(1, lq);

    let causal = k(&key.index).lower_equal(q(&query.index));
    let q_span = q(&query.span);
    let same_image = q_span
        .clone()
        .equal(k(&key.span))
        .bool_and(q_span.not_equal_elem(0));
    let same_doc = q(&query.doc).equal(k(&key.doc));
    causal.bool_or(same_image).bool_and(same_doc)
}

/// Reference implementation on plain slices, one row: `allowed[i][j]`.
///
/// Used by the tests and handy for printing a mask; the tensor version above is what the
/// model runs.
pub fn allowed_reference(span: &[i64], doc: &[i64]) -> Vec<Vec<bool>> {
    let s = span.len();
    (0..s)
        .map(|i| {
            (0..s)
                .map(|j| doc[i] == doc[j] && (j <= i || (span[i] != 0 && span[i] == span[j])))
                .collect()
        })
        .collect()
}
