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
