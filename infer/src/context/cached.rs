//! [`CachePolicy::Cached`](super::CachePolicy::Cached): the prefix lives in a [`KvCache`];
//! tokens and clean images are appended with `CacheMode::Append`, diffusion steps run only
//! the `n` image tokens with `CacheMode::ReadOnly`.

use burn::prelude::*;
use transfusion_model::kv_cache::{CacheMode, KvCache};
use transfusion_model::mask::SpanMeta;
use transfusion_model::pass::PassPlan;
use transfusion_model::Transfusion;

use super::padding::{ints, logical_meta, LeftPadded};
use super::{record, ForwardKind, ForwardRecord, Rows, Trace};

impl<B: Backend> Rows<B> {
    /// Encodes the left-padded prompts into a new cache; returns the hidden states
    /// `[b, l, d]`.
    pub(super) fn cached_prefix(
        &mut self,
        model: &Transfusion<B>,
        prompts: &[Vec<u32>],
        trace: Option<&Trace>,
    ) -> Tensor<B, 3> {
        let layout = LeftPadded::text(prompts.iter().map(Vec::len));
        let tokens = prompts.iter().map(|p| p.iter().map(|&t| t as i64));
        let tokens = ints::<B>(
            layout.values(tokens, self.pad as i64),
            layout.shape(),
            &self.device,
        );
        let (positions, meta) = layout.meta(&self.device);
        self.cache = Some(KvCache::new(model.n_layers()));
        let x = model.embed_tokens(tokens);
        self.append(model, x, positions, meta, ForwardKind::Prefix, trace)
    }

    /// Appends one token per row; returns the hidden states `[b, 1, d]`.
    pub(super) fn cached_tokens(
        &mut self,
        model: &Transfusion<B>,
        tokens: &[u32],
        trace: Option<&Trace>,
    ) -> Tensor<B, 3> {
        let b = self.len();
        let dev = &self.device;
        let tok = ints::<B>(tokens.iter().map(|&t| t as i64).collect(), [b, 1], dev);
        let pos = self.next_pos.iter().map(|&p| p as i64).collect();
        let (positions, meta) = logical_meta(
            ints::<B>(pos, [b, 1], dev),
            Tensor::zeros([b, 1], dev),
            Tensor::ones([b, 1], dev),
        );
        let x = model.embed_tokens(tok);
        self.append(model, x, positions, meta, ForwardKind::Tokens, trace)
    }

    /// The plan of a read-only pass over `n` image tokens after each row (every diffusion
    /// step of the next image runs it).
    pub(super) fn step_plan(&self, model: &Transfusion<B>, n: usize) -> PassPlan<B> {
        let (positions, meta) = self.image_meta(n);
        model.plan_pass(positions, meta, self.cache.as_ref())
    }

    /// One diffusion step's hidden states `[b, n, d]` of the noisy patches `[b, n, d]`
    /// after each row, in one read-only pass over the `n` image tokens planned by
    /// [`Rows::step_plan`].
    pub(super) fn cached_step(
        &self,
        model: &Transfusion<B>,
        patches: Tensor<B, 3>,
        plan: &PassPlan<B>,
        trace: Option<&Trace>,
    ) -> Tensor<B, 3> {
        let input = patches.dims();
        let cache = self.cache.as_ref().expect("cached rows have a cache");
        // A read-only pass never writes to the cache; a cheap clone (reference
        // counted tensors) satisfies the `&mut` of the model's signature.
        let mut view = cache.clone();
        let h = model.forward_planned(patches, plan, Some(&mut view), CacheMode::ReadOnly);
        debug_assert_eq!(view.len(), cache.len(), "read-only pass grew the cache");
        record(
            trace,
            ForwardRecord {
                kind: ForwardKind::DiffusionStep,
                input,
                cached_before: cache.len(),
                cached_after: view.len(),
            },
        );
        h
    }

    /// Appends the clean images `x0 [b, c, H, W]` (encoded at `t = 0`) of `n` patches each.
    pub(super) fn cached_image(
        &mut self,
        model: &Transfusion<B>,
        x0: Tensor<B, 4>,
        n: usize,
        trace: Option<&Trace>,
    ) {
        let tt = Tensor::<B, 1>::zeros([self.len()], &self.device);
        let (patches, _) = model.embed_image(x0, tt);
        let (positions, meta) = self.image_meta(n);
        self.append(model, patches, positions, meta, ForwardKind::Image, trace);
    }

    /// Runs the embeddings `x [b, s, d]` over the cache, appending them; returns the
    /// hidden states `[b, s, d]`.
    fn append(
        &mut self,
        model: &Transfusion<B>,
        x: Tensor<B, 3>,
        positions: Tensor<B, 2, Int>,
        meta: SpanMeta<B>,
        kind: ForwardKind,
        trace: Option<&Trace>,
    ) -> Tensor<B, 3> {
        let input = x.dims();
        let cache = self.cache.as_mut().expect("cached rows have a cache");
        let before = cache.len();
        let h = model.forward_embeddings(x, positions, meta, Some(cache), CacheMode::Append);
        record(
            trace,
            ForwardRecord {
                kind,
                input,
                cached_before: before,
                cached_after: cache.len(),
            },
        );
        h
    }

    /// Positions and metadata of `n` image tokens appended to every row.
    ///
    /// # Shapes
    /// both `[b, n]`
    fn image_meta(&self, n: usize) -> (Tensor<B, 2, Int>, SpanMeta<B>) {
        let b = self.len();
        let dev = &self.device;
        let pos: Vec<i64> = self
            .next_pos
            .iter()
            .flat_map(|&p| (p as i64)..(p + n) as i64)
            .collect();
        let span: Vec<i64> = self
            .images
            .iter()
            .flat_map(|&k| std::iter::repeat_n(k as i64 + 1, n))
            .collect();
        logical_meta(
            ints::<B>(pos, [b, n], dev),
            ints::<B>(span, [b, n], dev),
            Tensor::ones([b, n], dev),
        )
    }
}
