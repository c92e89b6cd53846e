//! A distillation micro-batch: the training stream's packed rows, with every generation
//! image re-noised at an sCM proposal step, and the rows the teacher's unconditional
//! velocity needs.
//!
//! A *generation image* is an image that ends its document (`... BOI image EOI EOS`): the
//! image of a caption-first pair (its caption dropped or not). Image-first pairs keep the
//! stream's own timestep and noise: they train captioning through the LM loss.

use crate::error::Result;
use burn::prelude::*;
use transfusion_data::batcher::TransfusionBatcher;
use transfusion_data::packing::PackedRow;
use transfusion_data::rng::Rng64;
use transfusion_data::sequence::{ImageSlot, MixedSequence};
use transfusion_data::tokenizer::SpecialTokens;
use transfusion_model::consistency::{proposal_step, PROPOSAL_MEAN, PROPOSAL_STD};
use transfusion_model::{NoiseSchedule, TransfusionBatch};

/// Stream id of the distillation's own random draws (angles and noise).
const DISTILL_STREAM: u64 = 0x5c0d;

/// One distillation micro-batch, on the backend without autodiff (the engine lifts what
/// the student trains on).
#[derive(Clone, Debug)]
pub struct DistillBatch<B: Backend> {
    /// The packed rows: the student's input and the teacher's conditional one. Generation
    /// images carry their proposal step in `timesteps` and fresh noise in `noise`.
    pub packed: TransfusionBatch<B>,
    /// One row `BOS BOI image EOI EOS` per generation image, in their order: the
    /// unconditional branch of the teacher's guided velocity (`None` without generation
    /// images).
    pub unconditional: Option<TransfusionBatch<B>>,
    /// Index (in the packed batch's image order) of each generation image.
    pub generation: Vec<usize>,
    /// The grid step of each generation image (the same as in `packed.timesteps`).
    pub steps: Vec<usize>,
    /// Text targets of the LM loss (counted on the host, before the batch is on the device).
    pub text_targets: u64,
}

/// The images of `rows` that end their document, as indices in batch image order.
pub fn generation_images(rows: &[PackedRow], special: &SpecialTokens) -> Vec<usize> {
    let mut found = Vec::new();
    let mut index = 0;
    for row in rows {
        for slot in &row.images {
            let eos = slot.offset + slot.n_patches + 1;
            let ends_document = row.tokens.get(eos) == Some(&special.eos)
                && row.doc_ids.get(eos) == row.doc_ids.get(slot.offset);
            if ends_document {
                found.push(index);
            }
            index += 1;
        }
    }
    found
}

/// Builds the micro-batch of `rows`: every generation image gets a proposal step (sCM's
/// log-normal proposal on the angle, rounded to the grid, see
/// [`transfusion_model::consistency::proposal_step`]) and fresh noise, drawn from the
/// stream `(seed, draw)`, so a resumed run draws the same. Steps keep `span` steps from
/// either end of the schedule (the derivative's neighbours).
pub fn distill_batch<B: Backend>(
    rows: &[PackedRow],
    batcher: &TransfusionBatcher,
    special: &SpecialTokens,
    (schedule, span): (&NoiseSchedule, usize),
    (seed, draw): (u64, u64),
    device: &B::Device,
) -> Result<DistillBatch<B>> {
    let generation = generation_images(rows, special);
    let mut arrays = batcher.arrays(rows)?;
    let per_image = if arrays.n_img > 0 {
        arrays.latents.len() / arrays.n_img
    } else {
        0
    };
    let mut rng = Rng64::from_parts(&[seed, DISTILL_STREAM, draw]);
    let mut steps = Vec::with_capacity(generation.len());
    let mut normal = [0f32; 2];
    for &img in &generation {
        rng.fill_normal(&mut normal);
        let tau = PROPOSAL_MEAN + PROPOSAL_STD * normal[0] as f64;
        let t = proposal_step(schedule, tau, span);
        steps.push(t);
        arrays.timesteps[img] = t as i64;
        rng.fill_normal(&mut arrays.noise[img * per_image..(img + 1) * per_image]);
    }
    let unconditional = (!generation.is_empty())
        .then(|| unconditional_rows(rows, &generation, special))
        .map(|uncond| -> Result<_> {
            Ok(batcher.to_tensors::<B>(batcher.arrays(&uncond)?, device))
        })
        .transpose()?;
    let text_targets = arrays.text_targets.len() as u64;
    Ok(DistillBatch {
        text_targets,
        packed: batcher.to_tensors::<B>(arrays, device),
        unconditional,
        generation,
        steps,
    })
}

/// One row `BOS BOI [pad]*n EOI EOS` per generation image (the caption dropped), holding
/// the same latent.
fn unconditional_rows(
    rows: &[PackedRow],
    generation: &[usize],
    special: &SpecialTokens,
) -> Vec<PackedRow> {
    let slots: Vec<&ImageSlot> = rows.iter().flat_map(|r| r.images.iter()).collect();
    generation
        .iter()
        .map(|&img| {
            let slot = slots[img];
            let n = slot.n_patches;
            let mut tokens = vec![special.bos, special.boi];
            tokens.resize(2 + n, special.pad);
            tokens.extend([special.eoi, special.eos]);
            let seq = MixedSequence {
                tokens,
                images: vec![ImageSlot {
                    offset: 2,
                    ..slot.clone()
                }],
            };
            let mut row = PackedRow::new(n + 4, special.pad);
            row.try_push(seq)
                .expect("an unconditional image document fills its own row exactly");
            row
        })
        .collect()
}
