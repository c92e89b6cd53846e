//! One decoder pass over new positions: [`PassPlan`], what the pass needs besides the
//! positions' embeddings (RoPE tables, the attention mask over the cached and new
//! positions, the heads' layout), built once and shared by passes over the same positions
//! after the same cache, such as a sampler's diffusion steps.

use burn::prelude::*;

use crate::attention::LayerContext;
use crate::config::ModalityWeights;
use crate::kv_cache::{CacheMode, KvCache, LayerKv};
use crate::mask::SpanMeta;
use crate::model::Transfusion;
use crate::ops::{AttentionMask, HeadLayout};
use crate::precision::Precision;
use crate::rope::{rope_tables, RopeTables};

/// What a decoder pass over `s` new positions per row needs besides their embeddings.
/// It holds for any embeddings at these positions after a cache of the same length and
/// content; see [`Transfusion::plan_pass`].
#[derive(Clone, Debug)]
pub struct PassPlan<B: Backend> {
    /// RoPE tables of the query heads.
    rope_q: RopeTables<B>,
    /// RoPE tables of the key/value heads, where they are fewer than the query heads.
    rope_k: Option<RopeTables<B>>,
    /// Which keys each query may not see, `[b, h, s, past + s]`.
    mask: AttentionMask<B>,
    /// How the heads move between the projections' layout and the attention's.
    head_layout: HeadLayout<B>,
    /// `[b, s]`, `true` at image patches: set for untied modality weights.
    image_positions: Option<Tensor<B, 2, Bool>>,
    /// The new positions' metadata (added to the cache by an appending pass).
    meta: SpanMeta<B>,
    /// Cached positions the plan follows.
    past: usize,
}

impl<B: Backend> PassPlan<B> {
    /// What each decoder layer of the planned pass needs, after `past` cached keys/values.
    pub fn layer_context<'a>(
        &'a self,
        past: Option<&'a LayerKv<B>>,
        precision: Precision,
    ) -> LayerContext<'a, B> {
        LayerContext {
            rope_q: &self.rope_q,
            rope_k: self.rope_k.as_ref().unwrap_or(&self.rope_q),
            mask: &self.mask,
            head_layout: &self.head_layout,
            past,
            precision,
            image_positions: self.image_positions.clone(),
        }
    }
}

impl<B: Backend> Transfusion<B> {
    /// Plans a pass over new positions after `cache` (if any).
    ///
    /// # Shapes
    /// - `positions`: `[b, s]` (RoPE ids), `meta`: `[b, s]` tensors
    pub fn plan_pass(
        &self,
        positions: Tensor<B, 2, Int>,
        meta: SpanMeta<B>,
        cache: Option<&KvCache<B>>,
    ) -> PassPlan<B> {
        let attn = &self.blocks[0].attn;
        let (h, h_kv) = (attn.n_heads, attn.n_kv_heads);
        let device = positions.device();
        let [b, s] = positions.dims();
        let rope_q = rope_tables(positions.clone(), self.head_dim, self.rope_theta, h);
        let rope_k =
            (h_kv != h).then(|| rope_tables(positions, self.head_dim, self.rope_theta, h_kv));
        let keys = match cache.and_then(|c| c.meta.clone()) {
            Some(past) => past.cat(meta.clone()),
            None => meta.clone(),
        };
        let mask = AttentionMask::for_pass(meta.clone(), keys, h, self.blockwise_from);
        // [b, s]: the patch positions, for untied modality weights
        let image_positions = (self.modality_weights() == ModalityWeights::Untied)
            .then(|| meta.span.clone().greater_elem(0));
        PassPlan {
            rope_q,
            rope_k,
            mask,
            head_layout: HeadLayout::for_pass(b, s, h, h_kv, &device),
            image_positions,
            meta,
            past: cache.map_or(0, KvCache::len),
        }
    }

    /// Runs the decoder over new positions, attending to `cache` (if any) and themselves.
    ///
    /// With [`CacheMode::Append`] the new keys and values are added to the cache; with
    /// [`CacheMode::ReadOnly`] the cache is left unchanged.
    ///
    /// # Shapes
    /// - `x`: `[b, s, d]`, `positions`: `[b, s]` (RoPE ids), `meta`: `[b, s]` tensors
    /// - output: the final-normed hidden states `[b, s, d]`
    pub fn forward_embeddings(
        &self,
        x: Tensor<B, 3>,
        positions: Tensor<B, 2, Int>,
        meta: SpanMeta<B>,
        cache: Option<&mut KvCache<B>>,
        mode: CacheMode,
    ) -> Tensor<B, 3> {
        let plan = self.plan_pass(positions, meta, cache.as_deref());
        self.forward_planned(x, &plan, cache, mode)
    }

    /// [`Transfusion::forward_embeddings`] with the pass planned beforehand.
    ///
    /// # Panics
    /// When `cache` is not as long as the cache the plan was made after.
    ///
    /// # Shapes
    /// - `x`: `[b, s, d]` at the planned positions; output `[b, s, d]`
    pub fn forward_planned(
        &self,
        x: Tensor<B, 3>,
        plan: &PassPlan<B>,
        mut cache: Option<&mut KvCache<B>>,
        mode: CacheMode,
    ) -> Tensor<B, 3> {
        let cached = cache.as_ref().map_or(0, |c| c.len());
        assert_eq!(cached, plan.past, "a pass planned after another cache");
        let mut x = x;
        for (l, block) in self.blocks.iter().enumerate() {
            let past = cache.as_ref().and_then(|c| c.layers[l].clone());
            let (out, kv) = block.forward(x, &plan.layer_context(past.as_ref(), self.precision));
            x = out;
            if let (Some(c), CacheMode::Append) = (cache.as_mut(), mode) {
                c.layers[l] = Some(match past {
                    Some(p) => p.append(kv),
                    None => kv,
                });
            }
        }
        if let (Some(c), CacheMode::Append) = (cache, mode) {
            c.append_meta(plan.meta.clone());
        }
        self.final_norm(x)
    }
}
