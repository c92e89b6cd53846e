//! Which keys each block of queries may see: the query blocks of a pass and, for each, the
//! one contiguous range of key positions that holds every key its queries may attend to.
//!
//! The ranges come from the positions' metadata on the host (a few integers per position,
//! read once per forward pass and shared by every layer); the exact mask inside a block is
//! computed on the device from the same metadata ([`BlockPlan::masked`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use burn::prelude::*;

use crate::mask::{transfusion_mask, SpanMeta};

/// Score elements (`b · h · rows · keys`) one block may hold: 16 Mi f32 values, 64 MiB.
pub const BLOCK_ELEMENTS: usize = 1 << 24;

/// Fewest and most query rows per block.
const ROWS: Range<usize> = 16..512;

/// Query rows per block for `b` rows and `heads` heads over `keys` keys: as many as keep
/// a block's scores within [`BLOCK_ELEMENTS`], between 16 and 512.
pub fn rows_per_block(b: usize, heads: usize, keys: usize) -> usize {
    (BLOCK_ELEMENTS / (b * heads * keys).max(1)).clamp(ROWS.start, ROWS.end)
}

/// One block of queries and the keys they may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryBlock {
    /// The block's query positions.
    pub rows: Range<usize>,
    /// The key positions that hold every key a query of the block may see (empty when
    /// none may see any).
    pub keys: Range<usize>,
}

/// How a blockwise attention pass walks the queries and keys.
#[derive(Clone, Debug)]
pub struct BlockPlan<B: Backend> {
    /// The queries' metadata, `[b, s]` tensors.
    pub query: SpanMeta<B>,
    /// The keys' metadata, `[b, lk]` tensors.
    pub key: SpanMeta<B>,
    /// The query blocks, in order, covering `0..s`.
    pub blocks: Arc<Vec<QueryBlock>>,
}

impl<B: Backend> BlockPlan<B> {
    /// The plan for `heads` attention heads over queries `query` and keys `key`, with
    /// blocks of at most [`BLOCK_ELEMENTS`] scores.
    ///
    /// # Shapes
    /// `query`: `[b, s]` tensors, `key`: `[b, lk]` tensors
    pub fn new(query: SpanMeta<B>, key: SpanMeta<B>, heads: usize) -> Self {
        let [b, lk] = key.index.dims();
        Self::with_rows(query, key, rows_per_block(b, heads, lk))
    }

    /// The plan with blocks of `rows` query rows (the last one may be shorter).
    pub fn with_rows(query: SpanMeta<B>, key: SpanMeta<B>, rows: usize) -> Self {
        let host = |m: &SpanMeta<B>| {
            let read = |t: &Tensor<B, 2, Int>| {
                let [b, l] = t.dims();
                let v: Vec<i64> = t.to_data().convert::<i64>().to_vec().expect("int metadata");
                (0..b)
                    .map(|r| v[r * l..(r + 1) * l].to_vec())
                    .collect::<Vec<_>>()
            };
            HostMeta {
                index: read(&m.index),
                span: read(&m.span),
                doc: read(&m.doc),
            }
        };
        let blocks = key_ranges(&host(&query), &host(&key), rows.max(1));
        Self {
            query,
            key,
            blocks: Arc::new(blocks),
        }
    }

    /// `true` where a query of `block` may not see a key of its range.
    ///
    /// # Shapes
    /// output `[b, rows, keys]`
    pub fn masked(&self, block: &QueryBlock) -> Tensor<B, 3, Bool> {
        let narrow =
            |m: &SpanMeta<B>, r: &Range<usize>| m.clone().map(|t| t.narrow(1, r.start, r.len()));
        transfusion_mask(
            &narrow(&self.query, &block.rows),
            &narrow(&self.key, &block.keys),
        )
    }

    /// The same plan with its metadata on backend `E` (`convert` maps each `[b, l]` tensor).
    pub fn map_backend<E: Backend>(
        &self,
        convert: impl Fn(Tensor<B, 2, Int>) -> Tensor<E, 2, Int>,
    ) -> BlockPlan<E> {
        let meta = |m: &SpanMeta<B>| SpanMeta {
            index: convert(m.index.clone()),
            span: convert(m.span.clone()),
            doc: convert(m.doc.clone()),
        };
        BlockPlan {
            query: meta(&self.query),
            key: meta(&self.key),
            blocks: self.blocks.clone(),
        }
    }
}

/// The metadata of a pass on the host, one vector per row.
struct HostMeta {
    index: Vec<Vec<i64>>,
    span: Vec<Vec<i64>>,
    doc: Vec<Vec<i64>>,
}

/// The first and last position of each id in `ids`.
fn extents(ids: &[i64]) -> HashMap<i64, (usize, usize)> {
    let mut out = HashMap::new();
    for (pos, &id) in ids.iter().enumerate() {
        out.entry(id)
            .and_modify(|e: &mut (usize, usize)| e.1 = pos)
            .or_insert((pos, pos));
    }
    out
}

/// The query blocks of `rows` rows and the key range of each.
///
/// A query sees keys of its own document only, at or before its index or in its own
/// image; so the keys it may see lie between the first key of its document and the later
/// of the last key at or before its index and the last key of its image. Where the keys'
/// indices are not in order, every block gets every key.
fn key_ranges(query: &HostMeta, key: &HostMeta, rows: usize) -> Vec<QueryBlock> {
    let s = query.index.first().map_or(0, Vec::len);
    let lk = key.index.first().map_or(0, Vec::len);
    let ordered = key.index.iter().all(|r| r.windows(2).all(|w| w[0] <= w[1]));
    let docs: Vec<_> = key.doc.iter().map(|d| extents(d)).collect();
    let spans: Vec<_> = key.span.iter().map(|d| extents(d)).collect();
    (0..s)
        .step_by(rows)
        .map(|start| {
            let block = start..(start + rows).min(s);
            if !ordered {
                return QueryBlock {
                    rows: block,
                    keys: 0..lk,
                };
            }
            let (mut first, mut end) = (lk, 0);
            for r in 0..query.index.len() {
                for i in block.clone() {
                    let Some(&(doc_first, _)) = docs[r].get(&query.doc[r][i]) else {
                        continue;
                    };
                    let idx = query.index[r][i];
                    let mut last = key.index[r].partition_point(|&k| k <= idx);
                    let span = query.span[r][i];
                    if span != 0 {
                        if let Some(&(_, span_last)) = spans[r].get(&span) {
                            last = last.max(span_last + 1);
                        }
                    }
                    if last > doc_first {
                        first = first.min(doc_first);
                        end = end.max(last);
                    }
                }
            }
            let keys = if first < end { first..end } else { 0..0 };
            QueryBlock { rows: block, keys }
        })
        .collect()
}
