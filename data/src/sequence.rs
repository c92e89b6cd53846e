//! Mixed-modal sequences: text tokens with image spans `BOI p_1 ... p_n EOI`.
//!
//! Layouts (n = number of latent patches, `[pad]` = placeholder id at patch positions):
//! - text document: `BOS text EOS`
//! - caption-first pair (probability `p_caption_first`): `BOS caption BOI [pad]*n EOI EOS`;
//!   with probability `caption_dropout` the caption is left out: `BOS BOI [pad]*n EOI EOS`
//!   (the unconditional branch of classifier-free guidance).
//! - image-first pair: `BOS BOI [pad]*n EOI caption EOS`; its timestep is drawn below
//!   `noise_limit` (captioning learns from mostly clean images).
//!
//! Timesteps: `t ~ U{0 .. T-1}`, or `U{0 .. min(T, noise_limit)-1}` for image-first pairs
//! (drawn uniformly inside the limit, not clamped).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::datasets::{ImageData, Sample};
use crate::encoder::ImageEncoder;
use crate::error::DataError;
use crate::rng::Rng64;
use crate::tokenizer::{SpecialTokens, TextTokenizer};

/// One image inside a [`MixedSequence`].
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSlot {
    /// Index in `tokens` of the first patch position (the BOI token is at `offset - 1`,
    /// EOI at `offset + n_patches`).
    pub offset: usize,
    /// Number of patch positions `n = (H/k) * (W/k)`.
    pub n_patches: usize,
    /// Clean latent `x_0`, `[c, H, W]` row-major.
    pub latent: Vec<f32>,
    /// `[c, H, W]`.
    pub shape: [usize; 3],
    /// Diffusion timestep in `0..T`.
    pub t: u32,
}

/// Text tokens with image spans: the unit that packing puts into rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MixedSequence {
    /// Token ids; patch positions hold the pad id as a placeholder.
    pub tokens: Vec<u32>,
    /// The images, in order of position.
    pub images: Vec<ImageSlot>,
}

impl MixedSequence {
    /// Length in positions.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// `span[i]` = 0 for text, `k >= 1` when position `i` is a patch of the k-th image.
    pub fn span_ids(&self) -> Vec<u32> {
        span_ids(self.tokens.len(), &self.images)
    }
}

/// Image span ids of `len` positions holding `images` (in order): 0 for text (and
/// padding), `k >= 1` at the patches of the k-th image.
pub fn span_ids(len: usize, images: &[ImageSlot]) -> Vec<u32> {
    let mut span = vec![0u32; len];
    for (k, img) in images.iter().enumerate() {
        span[img.offset..img.offset + img.n_patches].fill(k as u32 + 1);
    }
    span
}

/// Settings of sequence building.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SequenceConfig {
    /// Latent patch side `k`: an image of latent `[c, H, W]` takes `(H/k)*(W/k)` positions.
    pub patch_size: usize,
    /// Probability that a pair is laid out caption first (text-to-image). Paper: 0.8.
    pub p_caption_first: f64,
    /// Probability that a caption-first pair loses its caption (for CFG). Default 0.1.
    pub caption_dropout: f64,
    /// Timesteps of image-first pairs are drawn below this (paper: 500); `None`: no limit.
    pub noise_limit: Option<u32>,
    /// Number of training timesteps `T` (paper: 1000).
    pub max_timestep: u32,
}

impl Default for SequenceConfig {
    fn default() -> Self {
        Self {
            patch_size: 2,
            p_caption_first: 0.8,
            caption_dropout: 0.1,
            noise_limit: Some(500),
            max_timestep: 1000,
        }
    }
}

impl SequenceConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |message: String| DataError::Spec {
            spec: "sequence config".into(),
            message,
        };
        if self.patch_size == 0 {
            return Err(bad("patch_size must be >= 1".into()));
        }
        for (name, p) in [
            ("p_caption_first", self.p_caption_first),
            ("caption_dropout", self.caption_dropout),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad(format!("{name} must be in [0, 1], got {p}")));
            }
        }
        if self.max_timestep == 0 {
            return Err(bad("max_timestep must be >= 1".into()));
        }
        if self.noise_limit == Some(0) {
            return Err(bad("noise_limit must be >= 1 (or absent)".into()));
        }
        Ok(())
    }
}

/// Which part of a pair comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairOrder {
    /// `BOS caption BOI patches EOI EOS` (text-to-image).
    CaptionFirst,
    /// `BOS BOI patches EOI caption EOS` (captioning).
    ImageFirst,
}

/// The random decisions for one pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairChoice {
    /// Layout order.
    pub order: PairOrder,
    /// Whether the caption is dropped (only ever for caption-first pairs).
    pub drop_caption: bool,
    /// Diffusion timestep of the image.
    pub t: u32,
}

/// Draws order, caption dropout and timestep for one pair.
pub fn sample_pair_choice(rng: &mut Rng64, config: &SequenceConfig) -> PairChoice {
    let caption_first = rng.bernoulli(config.p_caption_first);
    let (order, drop_caption) = if caption_first {
        (
            PairOrder::CaptionFirst,
            rng.bernoulli(config.caption_dropout),
        )
    } else {
        (PairOrder::ImageFirst, false)
    };
    let t_max = match (order, config.noise_limit) {
        (PairOrder::ImageFirst, Some(limit)) => limit.min(config.max_timestep),
        _ => config.max_timestep,
    };
    PairChoice {
        order,
        drop_caption,
        t: rng.below(t_max as u64) as u32,
    }
}

/// Number of patches of a latent `[c, H, W]` with patch side `k`; errors when `k` does not
/// divide `H` and `W`.
pub fn num_patches(shape: [usize; 3], patch_size: usize) -> Result<usize, DataError> {
    let [_, h, w] = shape;
    if patch_size == 0 || h % patch_size != 0 || w % patch_size != 0 || h == 0 || w == 0 {
        return Err(DataError::Spec {
            spec: "sequence config".into(),
            message: format!("patch size {patch_size} does not divide latent shape {shape:?}"),
        });
    }
    Ok(transfusion_model::patch::num_patches(h, w, patch_size))
}

/// `BOS text EOS`.
pub fn text_sequence(text: &[u32], special: &SpecialTokens) -> MixedSequence {
    let mut tokens = Vec::with_capacity(text.len() + 2);
    tokens.push(special.bos);
    tokens.extend_from_slice(text);
    tokens.push(special.eos);
    MixedSequence {
        tokens,
        images: Vec::new(),
    }
}

/// Lays out one pair as [`PairChoice`] says (see the module docs).
pub fn pair_sequence(
    caption: &[u32],
    latent: Vec<f32>,
    shape: [usize; 3],
    choice: &PairChoice,
    patch_size: usize,
    special: &SpecialTokens,
) -> Result<MixedSequence, DataError> {
    let n = num_patches(shape, patch_size)?;
    if latent.len() != shape.iter().product::<usize>() {
        return Err(DataError::Spec {
            spec: "latent".into(),
            message: format!("{} values do not fill shape {shape:?}", latent.len()),
        });
    }
    let caption: &[u32] = if choice.drop_caption { &[] } else { caption };
    let mut tokens = Vec::with_capacity(caption.len() + n + 4);
    tokens.push(special.bos);
    if choice.order == PairOrder::CaptionFirst {
        tokens.extend_from_slice(caption);
    }
    tokens.push(special.boi);
    let offset = tokens.len();
    tokens.resize(offset + n, special.pad);
    tokens.push(special.eoi);
    if choice.order == PairOrder::ImageFirst {
        tokens.extend_from_slice(caption);
    }
    tokens.push(special.eos);
    let slot = ImageSlot {
        offset,
        n_patches: n,
        latent,
        shape,
        t: choice.t,
    };
    Ok(MixedSequence {
        tokens,
        images: vec![slot],
    })
}

/// Text in, token ids out, plus the special token ids: what sequence building and
/// [`crate::inspect::render_sequence`] need from a tokenizer.
pub trait TokenSource: Send + Sync {
    /// Ids of `text` without special tokens added.
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, DataError>;
    /// Text of `ids` (special tokens left out).
    fn decode_text(&self, ids: &[u32]) -> String;
    /// The special token ids.
    fn special_tokens(&self) -> SpecialTokens;

    /// Ids of `text` with every special id removed: a document, caption or prompt that
    /// happens to contain the string `<|boi|>` (tokenizers recognise special token strings
    /// in text) must not forge an image span or an end of sequence. Training data and
    /// inference prompts both go through here.
    fn encode_clean(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let special = self.special_tokens();
        let mut ids = self.encode_text(text)?;
        ids.retain(|&id| !special.contains(id));
        Ok(ids)
    }
}

impl TokenSource for TextTokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, DataError> {
        self.try_encode(text)
    }
    fn decode_text(&self, ids: &[u32]) -> String {
        self.decode(ids)
    }
    fn special_tokens(&self) -> SpecialTokens {
        *self.special()
    }
}

/// Builds sequences from samples: tokenizes text, encodes images, draws the pair layout.
#[derive(Clone)]
pub struct SequenceBuilder {
    /// Layout settings.
    pub config: SequenceConfig,
    /// The tokenizer.
    pub tokenizer: Arc<dyn TokenSource>,
    /// The image encoder (pixels to latents); cached latents must match its shape.
    pub encoder: Arc<dyn ImageEncoder>,
}

impl SequenceBuilder {
    /// A builder; checks the config and that the patch size divides the encoder's latent.
    pub fn new(
        config: SequenceConfig,
        tokenizer: Arc<dyn TokenSource>,
        encoder: Arc<dyn ImageEncoder>,
    ) -> Result<Self, DataError> {
        config.validate()?;
        num_patches(encoder.latent_shape(), config.patch_size)?;
        Ok(Self {
            config,
            tokenizer,
            encoder,
        })
    }

    /// Patches per image.
    pub fn patches_per_image(&self) -> usize {
        num_patches(self.encoder.latent_shape(), self.config.patch_size)
            .expect("SequenceBuilder::new checked the patch size")
    }

    /// One sequence from one sample; `rng` decides the pair layout and timestep.
    pub fn build(&self, sample: Sample, rng: &mut Rng64) -> Result<MixedSequence, DataError> {
        let special = self.tokenizer.special_tokens();
        match sample {
            Sample::Text(text) => Ok(text_sequence(
                &self.tokenizer.encode_clean(&text)?,
                &special,
            )),
            Sample::Pair { image, caption } => {
                let want = self.encoder.latent_shape();
                let latent = match image {
                    ImageData::Pixels(img) => self.encoder.encode(&img)?,
                    ImageData::Latent { data, shape } => {
                        if shape != want {
                            return Err(DataError::Spec {
                                spec: "latent".into(),
                                message: format!(
                                    "cached latent shape {shape:?} differs from the encoder's {want:?} ({})",
                                    self.encoder.describe()
                                ),
                            });
                        }
                        data
                    }
                };
                let choice = sample_pair_choice(rng, &self.config);
                let ids = self.tokenizer.encode_clean(&caption)?;
                pair_sequence(
                    &ids,
                    latent,
                    want,
                    &choice,
                    self.config.patch_size,
                    &special,
                )
            }
        }
    }
}
