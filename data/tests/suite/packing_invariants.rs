//! Packing: rows, document ids, positions, masks, truncation and dropping.

use crate::dataset_util::SPECIAL;
use transfusion_data::batcher::row_targets;
use transfusion_data::packing::{pack_sequences, OverlongText, PackConfig, PackedRow};
use transfusion_data::rng::Rng64;
use transfusion_data::sequence::{
    pair_sequence, text_sequence, MixedSequence, PairChoice, PairOrder,
};

const PAD: u32 = SPECIAL.pad;

fn pair(caption_len: usize, n_side: usize, first: bool, t: u32) -> MixedSequence {
    let caption: Vec<u32> = (0..caption_len as u32).map(|i| 100 + i).collect();
    let order = if first {
        PairOrder::CaptionFirst
    } else {
        PairOrder::ImageFirst
    };
    let choice = PairChoice {
        order,
        drop_caption: false,
        t,
    };
    let shape = [1, n_side, n_side];
    let latent = (0..n_side * n_side).map(|i| i as f32 + t as f32).collect();
    pair_sequence(&caption, latent, shape, &choice, 1, &SPECIAL).unwrap()
}

fn text(len: usize, base: u32) -> MixedSequence {
    let ids: Vec<u32> = (0..len as u32).map(|i| base + i).collect();
    text_sequence(&ids, &SPECIAL)
}

fn random_sequences(n: usize, seed: u64) -> Vec<MixedSequence> {
    let mut rng = Rng64::new(seed);
    (0..n)
        .map(|i| {
            if rng.bernoulli(0.5) {
                text(rng.below(45) as usize, 1000 + 50 * i as u32)
            } else {
                pair(
                    rng.below(12) as usize,
                    2 + rng.below(5) as usize,
                    rng.bernoulli(0.8),
                    i as u32,
                )
            }
        })
        .collect()
}

fn check_row(row: &PackedRow) {
    let s = row.seq_len();
    let used = row.used();
    // Documents are contiguous from 0 with ids 1..=k, then padding.
    let mut expect_doc = 0;
    for i in 0..s {
        let d = row.doc_ids[i];
        if i >= used {
            assert_eq!(
                (d, row.tokens[i], row.positions[i]),
                (0, PAD, 0),
                "padding at {i}"
            );
            continue;
        }
        if i == 0 || d != row.doc_ids[i - 1] {
            expect_doc += 1;
            assert_eq!(d, expect_doc, "doc ids must count up at {i}");
            assert_eq!(
                row.positions[i], 0,
                "positions restart at a document start ({i})"
            );
            assert_eq!(row.tokens[i], SPECIAL.bos);
        } else {
            assert_eq!(row.positions[i], row.positions[i - 1] + 1);
        }
    }
    assert_eq!(expect_doc as usize, row.num_docs());
    // Images lie inside the row and inside one document, framed by BOI / EOI.
    for img in &row.images {
        let end = img.offset + img.n_patches;
        assert!(end < used, "image must not straddle the row end");
        assert!(row.doc_ids[img.offset..=end]
            .iter()
            .all(|&d| d == row.doc_ids[img.offset]));
        assert_eq!(row.tokens[img.offset - 1], SPECIAL.boi);
        assert_eq!(row.tokens[end], SPECIAL.eoi);
        assert!(row.tokens[img.offset..end].iter().all(|&t| t == PAD));
    }
}

#[test]
fn packed_rows_keep_every_invariant_and_every_document() {
    let seqs = random_sequences(300, 1);
    let cfg = PackConfig::new(40);
    let (rows, stats) = pack_sequences(seqs.clone(), &cfg, PAD);
    for row in &rows {
        assert_eq!(row.seq_len(), 40);
        check_row(row);
    }
    let too_long_pairs = seqs
        .iter()
        .filter(|s| s.len() > 40 && !s.images.is_empty())
        .count();
    let too_long_text = seqs
        .iter()
        .filter(|s| s.len() > 40 && s.images.is_empty())
        .count();
    assert!(
        too_long_pairs > 0 && too_long_text > 0,
        "fixture should exercise both"
    );
    assert_eq!(stats.sequences, 300);
    assert_eq!(stats.dropped as usize, too_long_pairs);
    assert_eq!(stats.truncated as usize, too_long_text);

    // Every kept document comes back exactly once (truncated ones as their prefix).
    let mut expected: Vec<MixedSequence> = seqs
        .into_iter()
        .filter(|s| s.len() <= 40 || s.images.is_empty())
        .map(|s| {
            if s.len() > 40 {
                MixedSequence {
                    tokens: s.tokens[..40].to_vec(),
                    images: vec![],
                }
            } else {
                s
            }
        })
        .collect();
    let mut got: Vec<MixedSequence> = rows.iter().flat_map(PackedRow::documents).collect();
    let key = |s: &MixedSequence| (s.tokens.clone(), s.images.first().map(|i| i.t));
    expected.sort_by_key(key);
    got.sort_by_key(key);
    assert_eq!(got, expected);
    // First-fit fills rows well.
    let fill: usize = rows.iter().map(PackedRow::used).sum();
    assert!(fill as f64 / (40 * rows.len()) as f64 > 0.85);
}

#[test]
fn targets_and_lm_mask_are_exact() {
    let mut row = PackedRow::new(12, PAD);
    let choice = PairChoice {
        order: PairOrder::CaptionFirst,
        drop_caption: false,
        t: 3,
    };
    let p = pair_sequence(&[10], vec![0.0; 2], [1, 1, 2], &choice, 1, &SPECIAL).unwrap();
    row.try_push(p).unwrap();
    row.try_push(text(1, 16)).unwrap();
    let (bos, eos, boi, eoi) = (SPECIAL.bos, SPECIAL.eos, SPECIAL.boi, SPECIAL.eoi);
    assert_eq!(
        row.tokens,
        vec![bos, 10, boi, PAD, PAD, eoi, eos, bos, 16, eos, PAD, PAD]
    );
    assert_eq!(row.positions, vec![0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 0]);
    assert_eq!(row.doc_ids, vec![1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]);
    assert_eq!(row.span_ids(), vec![0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]);
    let (targets, mask) = row_targets(&row);
    assert_eq!(
        targets,
        vec![10, boi, PAD, PAD, eoi, eos, bos, 16, eos, PAD, PAD, PAD]
    );
    //            BOS>10 10>BOI BOI>p p>p p>EOI EOI>EOS EOS>BOS BOS>16 16>EOS EOS>pad pad pad
    assert_eq!(
        mask,
        vec![1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn overlong_documents_truncate_split_or_drop() {
    let long = text(20, 500); // 22 tokens
    let mut cfg = PackConfig::new(8);
    let (rows, stats) = pack_sequences(vec![long.clone(), pair(2, 3, true, 0)], &cfg, PAD);
    assert_eq!((stats.truncated, stats.dropped), (1, 1)); // the pair needs 2+9+4 = 15 > 8
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].tokens, long.tokens[..8].to_vec());

    cfg.overlong_text = OverlongText::Split;
    let (rows, _) = pack_sequences(vec![long.clone()], &cfg, PAD);
    assert_eq!(rows.len(), 3);
    let joined: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.tokens[..r.used()].to_vec())
        .collect();
    assert_eq!(joined, long.tokens);
    assert_eq!(rows[2].used(), 6);
    assert_eq!(rows[1].positions, (0..8).collect::<Vec<u32>>());
}

#[test]
fn first_fit_uses_earlier_rows_with_room() {
    let cfg = PackConfig::new(10);
    let seqs = vec![text(6, 10), text(6, 20), text(1, 30), text(0, 40)]; // 8, 8, 3, 2 tokens
    let (rows, _) = pack_sequences(seqs, &cfg, PAD);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].num_docs(), 2); // 8 + 2
    assert_eq!(rows[1].num_docs(), 1); // 8
    assert_eq!(rows[2].num_docs(), 1); // 3 did not fit rows 0 (2 free) or 1 (2 free)
    assert_eq!(rows[0].free(), 0);
}
