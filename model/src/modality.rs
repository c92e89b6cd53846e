//! Untied modality weights and frozen text weights (starting from a pretrained language
//! model: LMFusion's recipe).

use burn::module::Module;
use burn::prelude::*;

use crate::block::LayerWeights;
use crate::config::ModalityWeights;
use crate::model::Transfusion;

impl<B: Backend> Transfusion<B> {
    /// Gives every decoder layer image weights that are a copy of its text weights (new
    /// parameters with the same values), replacing any it had: the model computes exactly
    /// what it did with shared weights until training moves them apart.
    pub fn untie_modalities(mut self) -> Self {
        for block in &mut self.blocks {
            let text = LayerWeights {
                attn_norm: block.attn_norm.clone(),
                attn: block.attn.clone(),
                mlp_norm: block.mlp_norm.clone(),
                mlp: block.mlp.clone(),
            };
            block.image = Some(text.copy());
        }
        self
    }

    /// Whether image positions have their own decoder weights.
    pub fn modality_weights(&self) -> ModalityWeights {
        if self.blocks.iter().any(|b| b.image.is_some()) {
            ModalityWeights::Untied
        } else {
            ModalityWeights::Shared
        }
    }

    /// Marks the text weights (token embedding, every layer's text norms, attention
    /// projections and MLP, the final norm and the LM head) as not requiring gradients: an
    /// optimizer never sees them, so they stay bit-identical. The image adapters and the
    /// layers' image weights still train.
    pub fn freeze_text(mut self) -> Self {
        self.tok_emb = self.tok_emb.no_grad();
        self.norm = self.norm.no_grad();
        self.lm_head = self.lm_head.no_grad();
        for block in &mut self.blocks {
            block.attn_norm = block.attn_norm.clone().no_grad();
            block.attn = block.attn.clone().no_grad();
            block.mlp_norm = block.mlp_norm.clone().no_grad();
            block.mlp = block.mlp.clone().no_grad();
        }
        self
    }
}
