//! Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling, on the
//! host over one row of logits, with a seeded SplitMix64 stream per row.

use transfusion_data::rng::Rng64;

use crate::error::{InferError, Result};

/// Options of text decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct TextOptions {
    /// Most new tokens to produce (EOS ends earlier).
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0: no limit).
    pub top_p: f32,
    /// Seed of the sampling streams.
    pub seed: u64,
    /// Added to the logits of the given token ids before sampling (e.g. a positive bias
    /// on BOI makes interleaved generation produce images sooner).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            seed: 0,
            logit_bias: vec![],
        }
    }
}

impl TextOptions {
    /// Refuses values that would sample garbage silently: a temperature that is negative or
    /// not finite, `top_p` outside `(0, 1]`, a non-finite logit bias.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(InferError::Options(format!(
                "temperature must be a finite number >= 0 (0: greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferError::Options(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(InferError::Options(format!(
                "the logit bias of token {id} must be finite, got {b}"
            )));
        }
        Ok(())
    }

    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// Picks the next token of one row.
#[derive(Clone, Debug)]
pub struct TokenSampler {
    rng: Rng64,
}

impl TokenSampler {
    /// The stream of row `row` under `seed`.
    pub fn new(seed: u64, row: u64) -> Self {
        Self {
            rng: Rng64::from_parts(&[seed, 0x7E47, row]),
        }
    }

    /// Samples a token id from `logits` (one per vocabulary entry); `banned` ids are never
    /// chosen.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32], opts: &TextOptions) -> u32 {
        let biased;
        let logits = if opts.logit_bias.is_empty() {
            logits
        } else {
            let mut l = logits.to_vec();
            for &(id, b) in &opts.logit_bias {
                if let Some(v) = l.get_mut(id as usize) {
                    *v += b;
                }
            }
            biased = l;
            &biased[..]
        };
        let allowed = |i: usize| !banned.contains(&(i as u32)) && logits[i].is_finite();
        if opts.temperature <= 0.0 {
            return argmax(logits, allowed);
        }
        let mut cand: Vec<(usize, f32)> = (0..logits.len())
            .filter(|&i| allowed(i))
            .map(|i| (i, logits[i] / opts.temperature))
            .collect();
        if cand.is_empty() {
            return argmax(logits, |_| true);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if opts.top_k > 0 {
            cand.truncate(opts.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| ((l - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if opts.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (j, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= opts.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        // Draw over the kept tokens in id order, not logit order: two near-tied logits that a
        // rounding difference swaps (cached vs recomputed, CPU vs GPU) then move only the
        // boundary between their intervals, not the intervals themselves.
        let mut kept: Vec<(usize, f64)> = cand.iter().map(|c| c.0).zip(probs).collect();
        kept.sort_by_key(|k| k.0);
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for &(id, p) in &kept {
            acc += p;
            if u < acc {
                return id as u32;
            }
        }
        kept[kept.len() - 1].0 as u32
    }
}

fn argmax(logits: &[f32], allowed: impl Fn(usize) -> bool) -> u32 {
    let mut best = None;
    for (i, &l) in logits.iter().enumerate() {
        if allowed(i) && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Incremental detokenization for streaming: emits only the new text each time a token
/// arrives (BPE pieces may complete a multi-byte character only with a later token).
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: String,
}

impl StreamDecoder {
    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32, decode: impl Fn(&[u32]) -> String) -> String {
        self.ids.push(id);
        let text = decode(&self.ids);
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return String::new();
        }
        let new = text[self.emitted.len()..].to_string();
        self.emitted = text;
        new
    }

    /// Ends the stream: returns whatever text was held back (an incomplete UTF-8
    /// sequence decodes to U+FFFD here), so the pieces add up to the full decode.
    pub fn finish(&mut self, decode: impl Fn(&[u32]) -> String) -> String {
        let text = decode(&self.ids);
        let new = match text.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            None => text.clone(),
        };
        self.emitted = text;
        new
    }

    /// The ids so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_skips_banned_tokens() {
        let mut s = TokenSampler::new(0, 0);
        let opts = TextOptions::greedy(1);
        assert_eq!(s.sample(&[0.1, 5.0, 1.0], &[], &opts), 1);
        assert_eq!(s.sample(&[0.1, 5.0, 1.0], &[1], &opts), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let logits = [0.3, 0.2, 2.0, 0.1];
        let opts = TextOptions {
            top_k: 1,
            temperature: 1.0,
            ..TextOptions::default()
        };
        assert_eq!(TokenSampler::new(3, 0).sample(&logits, &[], &opts), 2);
        let opts = TextOptions {
            temperature: 1.0,
            top_p: 1.0,
            ..TextOptions::default()
        };
        let draw = |seed| {
            let mut s = TokenSampler::new(seed, 0);
            (0..20)
                .map(|_| s.sample(&logits, &[], &opts))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn swapping_two_near_tied_logits_does_not_change_the_draws() {
        // A rounding-sized change that reorders two near-equal logits (as cached and recomputed
        // forwards may) must leave the drawn tokens alone: the draw walks tokens in id order.
        let opts = TextOptions {
            temperature: 1.0,
            top_p: 1.0,
            ..TextOptions::default()
        };
        let a = [1.0, 1.0 + 1e-6, 0.5, -1.0];
        let b = [1.0 + 1e-6, 1.0, 0.5, -1.0];
        let draw = |logits: &[f32]| {
            let mut s = TokenSampler::new(11, 0);
            (0..500)
                .map(|_| s.sample(logits, &[], &opts))
                .collect::<Vec<_>>()
        };
        let (da, db) = (draw(&a), draw(&b));
        assert_eq!(da, db);
        assert!(
            da.contains(&0) && da.contains(&1),
            "both tied tokens are drawn"
        );
    }

    #[test]
    fn tiny_top_p_keeps_only_the_most_likely_token() {
        let opts = TextOptions {
            temperature: 1.0,
            top_p: 0.01,
            ..TextOptions::default()
        };
        let mut s = TokenSampler::new(1, 0);
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 1.0, 3.0, 2.0], &[], &opts), 2);
        }
    }
}
