//! The embedding and LM-head rows of the tokens the language model did not have.

use transfusion_data::tokenizer::{BOS, EOS};

/// How the rows of the new special tokens are filled (see the module docs of
/// [`super`]).
pub struct NewRows<'a> {
    /// The special tokens that are new, with their ids.
    pub new_ids: &'a [(&'static str, u32)],
    /// The language model's own BOS id.
    pub bos: Option<u32>,
    /// The language model's own EOS id.
    pub eos: Option<u32>,
}

impl NewRows<'_> {
    /// The row a new token copies from the language model, if any: `<|bos|>` its BOS,
    /// `<|eos|>` its EOS (when the ids exist in the `hf_vocab` rows).
    fn source(&self, token: &str, hf_vocab: usize) -> Option<usize> {
        let id = match token {
            BOS => self.bos,
            EOS => self.eos,
            _ => None,
        }?;
        ((id as usize) < hf_vocab).then_some(id as usize)
    }

    /// The `[v, d]` embedding table: the language model's `[hf_vocab, d]` rows; the new
    /// tokens' rows copied (BOS, EOS) or `fresh` rows (drawn from N(0, 0.02^2)) rescaled to
    /// the table's standard deviation; `fresh` rows likewise beyond `hf_vocab`.
    pub fn embedding(
        &self,
        hf: &[f32],
        hf_vocab: usize,
        v: usize,
        d: usize,
        fresh: &[f32],
    ) -> Vec<f32> {
        let n = hf.len() as f64;
        let mean = hf.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (hf.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let scale = (std / 0.02) as f32;
        let mut out: Vec<f32> = fresh.iter().map(|x| x * scale).collect();
        out[..hf_vocab * d].copy_from_slice(hf);
        for &(token, id) in self.new_ids {
            let row = id as usize * d;
            match self.source(token, hf_vocab) {
                Some(src) => {
                    let from = hf[src * d..(src + 1) * d].to_vec();
                    out[row..row + d].copy_from_slice(&from);
                }
                None => {
                    let drawn: Vec<f32> = fresh[row..row + d].iter().map(|x| x * scale).collect();
                    out[row..row + d].copy_from_slice(&drawn);
                }
            }
        }
        debug_assert_eq!(out.len(), v * d);
        out
    }

    /// The `[v, d]` LM-head rows: the language model's rows; `<|eos|>` (when new) copies its
    /// EOS row; every other new row, and every row beyond `hf_vocab`, is the mean row.
    pub fn lm_head(&self, hf: &[f32], hf_vocab: usize, v: usize, d: usize) -> Vec<f32> {
        let mut mean = vec![0f64; d];
        for row in hf.chunks_exact(d) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / hf_vocab as f64) as f32).collect();
        let mut out = Vec::with_capacity(v * d);
        out.extend_from_slice(hf);
        for _ in hf_vocab..v {
            out.extend_from_slice(&mean);
        }
        for &(token, id) in self.new_ids {
            let row = id as usize * d;
            let from = match (token == EOS)
                .then(|| self.source(token, hf_vocab))
                .flatten()
            {
                Some(src) => hf[src * d..(src + 1) * d].to_vec(),
                None => mean.clone(),
            };
            out[row..row + d].copy_from_slice(&from);
        }
        out
    }
}
