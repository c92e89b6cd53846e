//! [`CachePolicy::Recompute`](super::CachePolicy::Recompute), the reference: every call
//! embeds every row from scratch and re-runs the whole (left-padded) sequence.

use burn::prelude::*;
use transfusion_model::kv_cache::CacheMode;
use transfusion_model::Transfusion;

use super::padding::{ints, LeftPadded};
use super::{record, ForwardKind, ForwardRecord, Rows, Trace};

/// One element of a row's content.
#[derive(Clone, Debug)]
pub(super) enum Item<B: Backend> {
    /// A text token.
    Token(u32),
    /// Clean latent `[1, c, H, W]`, encoded at `t = 0`.
    Image(Tensor<B, 4>),
}

impl<B: Backend> Rows<B> {
    /// Embeds every row from scratch (plus noisy patches `[b, n, d]` at the end of each
    /// row, if any), left-pads to one length and runs the decoder without cache. Returns
    /// the hidden states `[b, l, d]`.
    pub(super) fn full_forward(
        &self,
        model: &Transfusion<B>,
        noisy_patches: Option<Tensor<B, 3>>,
        kind: ForwardKind,
        trace: Option<&Trace>,
    ) -> Tensor<B, 3> {
        let dev = &self.device;
        let (rows_x, rows_span): (Vec<_>, Vec<_>) = self
            .history
            .iter()
            .enumerate()
            .map(|(r, items)| {
                let noisy = noisy_patches.as_ref().map(|p| p.clone().narrow(0, r, 1));
                embed_row(model, items, noisy, dev)
            })
            .unzip();
        let layout = LeftPadded::new(rows_span);
        let xs = rows_x
            .into_iter()
            .enumerate()
            .map(|(r, x)| match layout.pad(r) {
                0 => x,
                padn => {
                    let pad_tok = ints::<B>(vec![self.pad as i64; padn], [1, padn], dev);
                    Tensor::cat(vec![model.embed_tokens(pad_tok), x], 1)
                }
            })
            .collect();
        let x = Tensor::cat(xs, 0);
        let input = x.dims();
        let (positions, meta) = layout.meta(dev);
        let h = model.forward_embeddings(x, positions, meta, None, CacheMode::ReadOnly);
        record(
            trace,
            ForwardRecord {
                kind,
                input,
                cached_before: 0,
                cached_after: 0,
            },
        );
        h
    }
}

/// Embeds one row's items (runs of tokens in one lookup, each image at `t = 0`), then the
/// noisy patches `[1, n, d]` if any. Returns the embeddings `[1, len, d]` and the span id
/// of every position.
fn embed_row<B: Backend>(
    model: &Transfusion<B>,
    items: &[Item<B>],
    noisy: Option<Tensor<B, 3>>,
    dev: &B::Device,
) -> (Tensor<B, 3>, Vec<i64>) {
    let mut pieces: Vec<Tensor<B, 3>> = vec![];
    let mut span: Vec<i64> = vec![];
    let mut run: Vec<i64> = vec![];
    let mut k = 0i64;
    let flush = |run: &mut Vec<i64>, pieces: &mut Vec<Tensor<B, 3>>, span: &mut Vec<i64>| {
        if !run.is_empty() {
            let len = run.len();
            pieces.push(model.embed_tokens(ints::<B>(std::mem::take(run), [1, len], dev)));
            span.extend(std::iter::repeat_n(0, len));
        }
    };
    for item in items {
        match item {
            Item::Token(t) => run.push(*t as i64),
            Item::Image(x0) => {
                flush(&mut run, &mut pieces, &mut span);
                k += 1;
                let (p, _) = model.embed_image(x0.clone(), Tensor::zeros([1], dev));
                span.extend(std::iter::repeat_n(k, p.dims()[1]));
                pieces.push(p);
            }
        }
    }
    flush(&mut run, &mut pieces, &mut span);
    if let Some(p) = noisy {
        span.extend(std::iter::repeat_n(k + 1, p.dims()[1]));
        pieces.push(p);
    }
    (Tensor::cat(pieces, 1), span)
}
