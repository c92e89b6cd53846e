//! Text decoding on a [`Pipeline`]: continuing a prompt ([`Pipeline::text`]) and
//! captioning images ([`Pipeline::caption`]), both over [`Rows`] with per-row token
//! samplers.

use crate::error::Result;
use burn::prelude::*;
use image::RgbImage;

use crate::context::Rows;
use crate::pipeline::Pipeline;
use crate::text::{StreamDecoder, TextOptions, TokenSampler};

impl<B: Backend> Pipeline<B> {
    /// Tokens never sampled in text mode (BOI is allowed only in interleaved generation).
    pub(crate) fn text_banned(&self, allow_boi: bool) -> Vec<u32> {
        let s = &self.meta.special_tokens;
        let mut v = vec![s.bos, s.pad, s.eoi];
        if !allow_boi {
            v.push(s.boi);
        }
        v
    }

    /// Host copy of `[b, v]` logits of the hidden states `[b, d]`.
    pub(crate) fn logits(&self, hidden: Tensor<B, 2>) -> Vec<Vec<f32>> {
        let logits = self.model.lm_logits(hidden);
        let [b, v] = logits.dims();
        let flat: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("logits should convert to f32");
        (0..b).map(|r| flat[r * v..(r + 1) * v].to_vec()).collect()
    }

    /// Decodes up to `opts.max_tokens` tokens for every row, stopping a row at EOS (not
    /// included) and all rows when every row stopped. `on_token(row, id)` sees each token.
    pub(crate) fn decode_rows(
        &self,
        rows: &mut Rows<B>,
        mut hidden: Tensor<B, 2>,
        opts: &TextOptions,
        banned: &[u32],
        mut on_token: impl FnMut(usize, u32),
    ) -> Vec<Vec<u32>> {
        let b = rows.len();
        let eos = self.meta.special_tokens.eos;
        let pad = self.meta.special_tokens.pad;
        let mut samplers: Vec<TokenSampler> = (0..b)
            .map(|r| TokenSampler::new(opts.seed, r as u64))
            .collect();
        let mut out = vec![vec![]; b];
        let mut done = vec![false; b];
        for step in 0..opts.max_tokens {
            let logits = self.logits(hidden);
            let mut next = vec![pad; b];
            for r in 0..b {
                if done[r] {
                    continue;
                }
                let id = samplers[r].sample(&logits[r], banned, opts);
                if id == eos {
                    done[r] = true;
                } else {
                    out[r].push(id);
                    on_token(r, id);
                    next[r] = id;
                }
            }
            if done.iter().all(|&d| d) || step + 1 == opts.max_tokens {
                break;
            }
            hidden = rows.push_tokens(&self.model, &next, self.tr());
        }
        out
    }

    /// Continues `prompt` with text (no images).
    pub fn text(&self, prompt: &str, opts: &TextOptions) -> Result<String> {
        self.text_stream(prompt, opts, |_| {})
    }

    /// Like [`Pipeline::text`], calling `on_text` with each new piece of text as it is
    /// decoded.
    pub fn text_stream(
        &self,
        prompt: &str,
        opts: &TextOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<String> {
        let mut stream = StreamDecoder::default();
        let out = self.decode_prompt(prompt, opts, |id| {
            let piece = stream.push(id, |ids| self.tokenizer.decode(ids));
            if !piece.is_empty() {
                on_text(&piece);
            }
        })?;
        let rest = stream.finish(|ids| self.tokenizer.decode(ids));
        if !rest.is_empty() {
            on_text(&rest);
        }
        Ok(self.tokenizer.decode(&out))
    }

    /// Decodes text after `prompt` (one row, KV cached per the policy), calling
    /// `on_token` with each new id.
    fn decode_prompt(
        &self,
        prompt: &str,
        opts: &TextOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        opts.validate()?;
        let ids = self.encode_prompt(prompt)?;
        let (mut rows, hidden) = Rows::start(
            &self.model,
            &[ids],
            self.cache_policy,
            self.meta.special_tokens.pad,
            self.tr(),
        );
        let banned = self.text_banned(false);
        Ok(self
            .decode_rows(&mut rows, hidden, opts, &banned, |_, id| on_token(id))
            .remove(0))
    }

    /// The token ids [`Pipeline::text`] would produce.
    pub fn text_tokens(&self, prompt: &str, opts: &TextOptions) -> Result<Vec<u32>> {
        self.decode_prompt(prompt, opts, |_| {})
    }

    /// One caption per image, all images in one batch.
    pub fn caption(&self, images: &[RgbImage], opts: &TextOptions) -> Result<Vec<String>> {
        Ok(self
            .caption_tokens(images, opts)?
            .iter()
            .map(|ids| self.tokenizer.decode(ids))
            .collect())
    }

    /// The token ids of [`Pipeline::caption`].
    pub fn caption_tokens(&self, images: &[RgbImage], opts: &TextOptions) -> Result<Vec<Vec<u32>>> {
        opts.validate()?;
        if images.is_empty() {
            return Ok(vec![]);
        }
        let special = self.meta.special_tokens;
        let x0 = self.from_images(images);
        let n = images.len();
        let (rows, _) = Rows::start(
            &self.model,
            &[vec![special.bos, special.boi]],
            self.cache_policy,
            special.pad,
            self.tr(),
        );
        let mut rows = rows.select(&vec![0; n]);
        rows.push_image(&self.model, x0, self.tr());
        let hidden = rows.push_tokens(&self.model, &vec![special.eoi; n], self.tr());
        let banned = self.text_banned(false);
        Ok(self.decode_rows(&mut rows, hidden, opts, &banned, |_, _| {}))
    }
}
