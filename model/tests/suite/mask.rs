//! The Transfusion mask: exact values on small rows, and the tensor version agrees with the
//! reference.

use burn::backend::NdArray;
use burn::prelude::*;
use transfusion_model::mask::{
    allowed_reference, transfusion_mask, transfusion_mask_heads, SpanMeta,
};

type B = NdArray;

fn tensor_mask(span: &[i64], doc: &[i64]) -> Vec<Vec<bool>> {
    let dev = Default::default();
    let s = span.len();
    let t = |v: &[i64]| Tensor::<B, 1, Int>::from_ints(v, &dev).reshape([1, s]);
    let meta = SpanMeta::full_rows(t(span), t(doc));
    let masked = transfusion_mask(&meta, &meta)
        .into_data()
        .to_vec::<bool>()
        .unwrap();
    // The model's dense per-head mask is the same mask for every head.
    let heads = transfusion_mask_heads(&meta, &meta, 3)
        .into_data()
        .to_vec::<bool>()
        .unwrap();
    assert_eq!(
        heads,
        [masked.clone(), masked.clone(), masked.clone()].concat()
    );
    (0..s)
        .map(|i| (0..s).map(|j| !masked[i * s + j]).collect())
        .collect()
}

#[test]
fn causal_text_with_one_image_is_bidirectional_inside_the_image() {
    // text text [img img img] text pad
    let span = [0, 0, 1, 1, 1, 0, 0];
    let doc = [1, 1, 1, 1, 1, 1, 0];
    let expected: Vec<Vec<bool>> = [
        "1000000", //
        "1100000", //
        "1111100", // first patch sees its whole image
        "1111100", //
        "1111100", //
        "1111110", // text after the image sees everything before it
        "0000001", // padding sees only itself
    ]
    .iter()
    .map(|r| r.chars().map(|c| c == '1').collect())
    .collect();
    assert_eq!(allowed_reference(&span, &doc), expected);
    assert_eq!(tensor_mask(&span, &doc), expected);
}

#[test]
fn a_patch_sees_its_whole_image_and_nothing_later() {
    let span = [0, 1, 1, 0, 2, 2, 0];
    let doc = [1; 7];
    let m = tensor_mask(&span, &doc);
    // Patches of image 1 (positions 1, 2): see 0..=2, not 3.. (text and image 2 later).
    for i in [1, 2] {
        assert_eq!(m[i], vec![true, true, true, false, false, false, false]);
    }
    // Patches of image 2 see image 1 (earlier) and each other.
    for i in [4, 5] {
        assert_eq!(m[i], vec![true, true, true, true, true, true, false]);
    }
}

#[test]
fn packed_documents_do_not_see_each_other() {
    let span = [0, 0, 0, 1, 1, 0, 0];
    let doc = [1, 1, 2, 2, 2, 2, 0];
    let m = tensor_mask(&span, &doc);
    assert_eq!(m[2], vec![false, false, true, false, false, false, false]);
    assert_eq!(m[3], vec![false, false, true, true, true, false, false]);
    assert_eq!(m[5], vec![false, false, true, true, true, true, false]);
    // No row is fully masked (softmax stays finite), padding included.
    assert!(m.iter().all(|row| row.iter().any(|&a| a)));
}

#[test]
fn tensor_mask_matches_reference_on_random_layouts() {
    let mut state = 12345u64;
    let mut next = |m: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % m
    };
    for _ in 0..20 {
        let s = 12;
        let (mut span, mut doc) = (vec![], vec![]);
        let (mut d, mut k) = (1, 0);
        while span.len() < s {
            match next(4) {
                0 => {
                    k += 1;
                    for _ in 0..(1 + next(3)).min((s - span.len()) as u64) {
                        span.push(k);
                        doc.push(d);
                    }
                }
                1 => d += 1,
                2 if span.len() > s / 2 => {
                    while span.len() < s {
                        span.push(0);
                        doc.push(0);
                    }
                }
                _ => {
                    span.push(0);
                    doc.push(d);
                }
            }
        }
        assert_eq!(
            tensor_mask(&span, &doc),
            allowed_reference(&span, &doc),
            "span {span:?} doc {doc:?}"
        );
    }
}
