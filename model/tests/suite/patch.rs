//! Patchify / unpatchify: identity for every patch side, and the documented order.

use burn::backend::NdArray;
use burn::prelude::*;
use transfusion_model::patch::{num_patches, patchify, unpatchify};

type B = NdArray;

#[test]
fn unpatchify_inverts_patchify_for_every_patch_side() {
    let dev = Default::default();
    for c in [3, 4, 8] {
        for k in [1, 2, 4, 8] {
            let (h, w) = (16, 8);
            let x = Tensor::<B, 4>::random(
                [2, c, h, w],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &dev,
            );
            let p = patchify(x.clone(), k);
            assert_eq!(p.dims(), [2, num_patches(h, w, k), c * k * k]);
            let back = unpatchify(p, k, c, h, w);
            assert_eq!(back.into_data(), x.into_data(), "c={c} k={k}");
        }
    }
}

#[test]
fn patches_are_row_major_and_channel_major_inside() {
    let dev = Default::default();
    // One image, 2 channels, 4x4, value = 100*c + 10*y + x.
    let vals: Vec<f32> = (0..2)
        .flat_map(|c| (0..4).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32)))
        .collect();
    let x = Tensor::<B, 1>::from_floats(vals.as_slice(), &dev).reshape([1, 2, 4, 4]);
    let p = patchify(x, 2).into_data().to_vec::<f32>().unwrap();
    // Patch 1 is the top-right 2x2 block: channel 0 then channel 1, rows then columns.
    let patch1 = &p[8..16];
    assert_eq!(patch1, &[2., 3., 12., 13., 102., 103., 112., 113.]);
    // Patch 2 is the bottom-left block.
    assert_eq!(&p[16..20], &[20., 21., 30., 31.]);
}

#[test]
fn patch_position_embedding_encodes_row_then_column() {
    use transfusion_model::patch_position::patch_position_embedding;
    let (grid, d) = (4, 16);
    let e: Vec<f32> = patch_position_embedding::<B>(grid, d, &Default::default())
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(e.len(), grid * grid * d);
    let row = |k: usize| &e[k * d..(k + 1) * d];
    // Patch (0, 0): sin 0 = 0 then cos 0 = 1, for the row half and the column half.
    let q = d / 4;
    for half in 0..2 {
        assert!(row(0)[half * 2 * q..half * 2 * q + q]
            .iter()
            .all(|&v| v == 0.0));
        assert!(row(0)[half * 2 * q + q..(half + 1) * 2 * q]
            .iter()
            .all(|&v| v == 1.0));
    }
    // Patch (1, 2) (raster index 6): the row half encodes 1, the column half 2, at the
    // highest frequency (1).
    assert!((row(6)[0] - 1f32.sin()).abs() < 1e-6);
    assert!((row(6)[2 * q] - 2f32.sin()).abs() < 1e-6);
    // Every patch gets its own embedding.
    for a in 0..grid * grid {
        for b in a + 1..grid * grid {
            let dist: f32 = row(a).iter().zip(row(b)).map(|(x, y)| (x - y).abs()).sum();
            assert!(dist > 1e-3, "patches {a} and {b} share an embedding");
        }
    }
}
