//! Batches: exact index tensors, round trip back to the rows, noise, zero images, errors.

use crate::dataset_util::SPECIAL;
use burn::backend::NdArray;
use burn::tensor::TensorData;
use transfusion_data::batcher::{row_targets, unpack_batch, TransfusionBatcher};
use transfusion_data::packing::{pack_sequences, PackConfig, PackedRow};
use transfusion_data::rng::Rng64;
use transfusion_data::sequence::{
    pair_sequence, text_sequence, MixedSequence, PairChoice, PairOrder,
};

type B = NdArray<f32>;
const PAD: u32 = SPECIAL.pad;
const SHAPE: [usize; 3] = [2, 4, 4]; // patch 2 -> n = 4

fn pair(caption: &[u32], first: bool, t: u32) -> MixedSequence {
    let order = if first {
        PairOrder::CaptionFirst
    } else {
        PairOrder::ImageFirst
    };
    let latent = (0..32).map(|i| i as f32 * 0.01 + t as f32).collect();
    pair_sequence(
        caption,
        latent,
        SHAPE,
        &PairChoice {
            order,
            drop_caption: false,
            t,
        },
        2,
        &SPECIAL,
    )
    .unwrap()
}

fn fixture_rows() -> Vec<PackedRow> {
    let seqs = vec![
        pair(&[10, 11], true, 7),               // 10 tokens
        text_sequence(&[20, 21, 22], &SPECIAL), // 5
        pair(&[12], false, 300),                // 9
        pair(&[], true, 999),                   // 8
        text_sequence(&[23], &SPECIAL),         // 3
    ];
    let (mut rows, _) = pack_sequences(seqs, &PackConfig::new(16), PAD);
    for (i, r) in rows.iter_mut().enumerate() {
        r.noise_seed = 100 + i as u64;
    }
    rows
}

fn ints(t: TensorData) -> Vec<i64> {
    t.convert::<i64>().to_vec().unwrap()
}

#[test]
fn batch_index_tensors_are_exact_and_round_trip() {
    let rows = fixture_rows();
    assert_eq!(rows.len(), 3);
    let batcher = TransfusionBatcher::new(SHAPE, 2, PAD, 5);
    let dev = Default::default();
    let batch = batcher.batch::<B>(rows.clone(), &dev).unwrap();
    let (b, s, n) = (3usize, 16usize, 4usize);
    assert_eq!(
        (batch.batch_size(), batch.seq_len(), batch.num_images()),
        (b, s, 3)
    );
    assert_eq!(batch.latents.dims(), [3, 2, 4, 4]);
    assert_eq!(batch.noise.dims(), [3, 2, 4, 4]);

    // First-fit into rows of 16: [pair t=7 (10), text (5)], [pair t=300 (9)],
    // [pair t=999 (8), text (3)]. Images are numbered row by row, left to right.
    let offsets: Vec<Vec<usize>> = rows
        .iter()
        .map(|r| r.images.iter().map(|i| i.offset).collect())
        .collect();
    assert_eq!(offsets, vec![vec![4], vec![2], vec![2]]);
    assert_eq!(ints(batch.timesteps.to_data()), vec![7, 300, 999]);
    let pp = ints(batch.patch_positions.to_data());
    let expected_pp: Vec<i64> = rows
        .iter()
        .enumerate()
        .flat_map(|(r, row)| {
            row.images
                .iter()
                .flat_map(move |img| (0..n).map(move |p| (r * s + img.offset + p) as i64))
        })
        .collect();
    assert_eq!(pp, expected_pp);
    let si = ints(batch.source_index.to_data());
    for (i, &x) in si.iter().enumerate() {
        match pp.iter().position(|&q| q == i as i64) {
            Some(j) => assert_eq!(x, (b * s + j) as i64, "patch source at {i}"),
            None => assert_eq!(x, i as i64, "text source at {i}"),
        }
    }
    // Targets and mask as row_targets says; tokens, positions, doc ids as packed.
    let targets = ints(batch.targets.to_data());
    let mut mask = Vec::with_capacity(b * s);
    for (r, row) in rows.iter().enumerate() {
        let (t, m) = row_targets(row);
        assert_eq!(
            targets[r * s..(r + 1) * s],
            t.iter().map(|&x| x as i64).collect::<Vec<_>>()[..]
        );
        mask.extend(m);
    }
    // The text-target rows are exactly the positions the mask counts, in order.
    let rows_counted: Vec<i64> = (0..mask.len() as i64)
        .filter(|&i| mask[i as usize] > 0.0)
        .collect();
    assert!(!rows_counted.is_empty());
    assert_eq!(ints(batch.text_targets.to_data()), rows_counted);
    // Round trip: the same documents, images, latents and timesteps.
    let back = unpack_batch(&batch, PAD).unwrap();
    assert_eq!(back.len(), rows.len());
    for (a, b) in back.iter().zip(&rows) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.positions, b.positions);
        assert_eq!(a.doc_ids, b.doc_ids);
        assert_eq!(a.images, b.images);
        assert_eq!(a.documents(), b.documents());
    }
}

#[test]
fn corrupted_index_is_detected_by_unpack() {
    let rows = fixture_rows();
    let batcher = TransfusionBatcher::new(SHAPE, 2, PAD, 5);
    let mut batch = batcher.batch::<B>(rows, &Default::default()).unwrap();
    let mut si = ints(batch.source_index.to_data());
    si.swap(0, 1);
    batch.source_index = burn::tensor::Tensor::from_data(
        TensorData::new(si.clone(), [si.len()]),
        &Default::default(),
    );
    assert!(unpack_batch(&batch, PAD)
        .unwrap_err()
        .to_string()
        .contains("source_index"));
}

#[test]
fn noise_is_seeded_per_row_and_standard_normal() {
    let rows = fixture_rows();
    let a = TransfusionBatcher::new(SHAPE, 2, PAD, 5);
    let full = a.arrays(&rows).unwrap();
    assert_eq!(full, a.arrays(&rows).unwrap());
    // Row 1 alone gets the same noise as inside the full batch (where its image is the second).
    let alone = a.arrays(&rows[1..2]).unwrap();
    let numel = 32;
    assert_eq!(rows[1].images.len(), 1);
    let first_of_row1 = rows[0].images.len(); // = 1
    assert_eq!(
        alone.noise[..],
        full.noise[first_of_row1 * numel..(first_of_row1 + 1) * numel]
    );
    // Another seed, other noise.
    let other = TransfusionBatcher::new(SHAPE, 2, PAD, 6)
        .arrays(&rows)
        .unwrap();
    assert_ne!(other.noise, full.noise);

    let mut v = vec![0.0f32; 200_001];
    Rng64::new(1).fill_normal(&mut v);
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
    assert!(
        mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
        "mean {mean} var {var}"
    );
}

#[test]
fn batch_without_images_has_empty_image_tensors() {
    let (rows, _) = pack_sequences(
        vec![text_sequence(&[5, 6], &SPECIAL)],
        &PackConfig::new(8),
        PAD,
    );
    let batcher = TransfusionBatcher::new(SHAPE, 2, PAD, 0);
    let batch = batcher
        .batch::<B>(rows.clone(), &Default::default())
        .unwrap();
    assert_eq!(batch.num_images(), 0);
    assert_eq!(batch.latents.dims(), [0, 2, 4, 4]);
    assert_eq!(batch.noise.dims(), [0, 2, 4, 4]);
    assert_eq!(batch.timesteps.dims(), [0]);
    assert_eq!(batch.patch_positions.dims(), [0]);
    assert_eq!(
        ints(batch.source_index.to_data()),
        (0..8).collect::<Vec<i64>>()
    );
    let back = unpack_batch(&batch, PAD).unwrap();
    assert_eq!(back[0].documents(), rows[0].documents());
}

#[test]
fn mixed_shapes_and_lengths_are_rejected() {
    let mut rows = fixture_rows();
    let batcher = TransfusionBatcher::new([2, 8, 8], 2, PAD, 0);
    let e = batcher.arrays(&rows).unwrap_err().to_string();
    assert!(
        e.contains("latent shape [2, 4, 4]") && e.contains("[2, 8, 8]"),
        "{e}"
    );
    rows.push(PackedRow::new(20, PAD));
    let e = TransfusionBatcher::new(SHAPE, 2, PAD, 0)
        .arrays(&rows)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 3 has length 20"), "{e}");
    assert!(TransfusionBatcher::new(SHAPE, 2, PAD, 0)
        .arrays(&[])
        .is_err());
}
