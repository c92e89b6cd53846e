//! One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`; with untied
//! modality weights ([`crate::config::ModalityWeights::Untied`]) image positions use their
//! own norms, projections and MLP, while attention stays one over the whole sequence.

use burn::module::{ModuleMapper, Param, ParamId};
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;

use crate::attention::{Attention, AttentionConfig, LayerContext};
use crate::kv_cache::LayerKv;
use crate::mlp::{SwiGluMlp, SwiGluMlpConfig};
use crate::ops::rms_norm;
use crate::params::materialize;

/// Configuration of [`DecoderBlock`].
#[derive(Config, Debug)]
pub struct DecoderBlockConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// SwiGLU hidden width.
    pub d_hidden: usize,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// A second set of weights for image positions, initialised as a copy of the text set.
    #[config(default = false)]
    pub untied: bool,
}

impl DecoderBlockConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DecoderBlock<B> {
        let text = self.layer_weights(device);
        let image = self.untied.then(|| text.copy());
        DecoderBlock::from_weights(text, image)
    }

    /// The layer as a skeleton to load weights into: untied image weights are fresh
    /// parameters, not a copy of the text weights, so no parameter is drawn (Burn draws
    /// them at first use; loading replaces them unread).
    pub fn init_unloaded<B: Backend>(&self, device: &B::Device) -> DecoderBlock<B> {
        let image = self.untied.then(|| self.layer_weights(device));
        DecoderBlock::from_weights(self.layer_weights(device), image)
    }

    /// One modality's weights, not drawn yet.
    fn layer_weights<B: Backend>(&self, device: &B::Device) -> LayerWeights<B> {
        let norm = || {
            RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        LayerWeights {
            attn_norm: norm(),
            attn: AttentionConfig::new(self.d_model, self.n_heads, self.n_kv_heads).init(device),
            mlp_norm: norm(),
            mlp: SwiGluMlpConfig::new(self.d_model, self.d_hidden).init(device),
        }
    }
}

/// One modality's weights of a layer.
#[derive(Module, Debug)]
pub struct LayerWeights<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// The attention projections (the attention itself is shared by the modalities).
    pub attn: Attention<B>,
    /// Norm before the MLP.
    pub mlp_norm: RmsNorm<B>,
    /// SwiGLU MLP.
    pub mlp: SwiGluMlp<B>,
}

impl<B: Backend> LayerWeights<B> {
    /// The same values as new parameters (their own ids, so they train apart).
    pub fn copy(&self) -> Self {
        materialize(self);
        struct Fresh;
        impl<B: Backend> ModuleMapper<B> for Fresh {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let (_, tensor, _) = param.consume();
                Param::initialized(ParamId::new(), tensor)
            }
        }
        self.clone().map(&mut Fresh)
    }
}

/// A Llama-style decoder layer.
#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm before the MLP.
    pub mlp_norm: RmsNorm<B>,
    /// SwiGLU MLP.
    pub mlp: SwiGluMlp<B>,
    /// The image positions' own weights (untied modality weights); `None`: shared.
    pub image: Option<LayerWeights<B>>,
}

impl<B: Backend> DecoderBlock<B> {
    /// The layer of `text` weights, with `image` weights when untied.
    fn from_weights(text: LayerWeights<B>, image: Option<LayerWeights<B>>) -> Self {
        Self {
            attn_norm: text.attn_norm,
            attn: text.attn,
            mlp_norm: text.mlp_norm,
            mlp: text.mlp,
            image,
        }
    }

    /// # Shapes
    /// - `x`: `[b, s, d]`, `ctx.mask`: `[b, s, past + s]`; output `[b, s, d]`
    ///
    /// Norms and the residual stream stay in f32; attention and MLP products run in
    /// `ctx.precision`. Also returns the new positions' keys/values (see
    /// [`Attention::forward`]).
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LayerContext<B>) -> (Tensor<B, 3>, LayerKv<B>) {
        let (Some(image), Some(at_image)) = (&self.image, &ctx.image_positions) else {
            let normed = rms_norm(&self.attn_norm, x.clone());
            let (a, kv) = self.attn.forward(normed, ctx);
            let x = x + a;
            let x = x.clone() + self.mlp.forward(rms_norm(&self.mlp_norm, x), ctx.precision);
            return (x, kv);
        };
        let [b, s, d] = x.dims();
        // [b, s] -> [b, s, d]: true where the image weights apply
        let pick = at_image.clone().reshape([b, s, 1]).expand([b, s, d]);
        let choose = |text: Tensor<B, 3>, img: Tensor<B, 3>| text.mask_where(pick.clone(), img);
        let normed = choose(
            rms_norm(&self.attn_norm, x.clone()),
            rms_norm(&image.attn_norm, x.clone()),
        );
        let (q, k, v) = self.attn.project(normed.clone(), ctx);
        let (qi, ki, vi) = image.attn.project(normed, ctx);
        let heads = |t: &Tensor<B, 4>| {
            let [_, h, _, hd] = t.dims();
            // [b, s] -> [b, h, s, hd]
            at_image.clone().reshape([b, 1, s, 1]).expand([b, h, s, hd])
        };
        let (q, k, v) = (
            q.clone().mask_where(heads(&q), qi),
            k.clone().mask_where(heads(&k), ki),
            v.clone().mask_where(heads(&v), vi),
        );
        let (out, kv) = self.attn.attend(q, k, v, ctx);
        let a = choose(
            self.attn.output(out.clone(), ctx),
            image.attn.output(out, ctx),
        );
        let x = x + a;
        let m = choose(
            self.mlp
                .forward(rms_norm(&self.mlp_norm, x.clone()), ctx.precision),
            image
                .mlp
                .forward(rms_norm(&image.mlp_norm, x.clone()), ctx.precision),
        );
        (x + m, kv)
    }
}
