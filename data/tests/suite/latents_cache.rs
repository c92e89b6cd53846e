//! Latent cache: write, read back equal, use as a source, detect damage.

use transfusion_data::datasets::synthetic::ShapesSource;
use transfusion_data::datasets::text::{TextSource, TextSplit};
use transfusion_data::datasets::{ImageData, Sample, SampleSource};
use transfusion_data::encoder::{FnEncoder, ImageEncoder, PixelEncoder};
use transfusion_data::latent_cache::{cache_latents, LatentCacheSource, INDEX_FILE};
use transfusion_data::source::{open_source, parse_source_spec, SourceOptions};
use transfusion_data::synthetic::shapes::ShapesGenerator;

fn pair_parts(s: Option<Sample>) -> (ImageData, String) {
    match s {
        Some(Sample::Pair { image, caption }) => (image, caption),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cache_round_trips_latents_and_captions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cache");
    let src = ShapesSource::new(ShapesGenerator::new(2).with_image_size(16), 10);
    let enc = PixelEncoder::new(8);
    let mut calls = Vec::new();
    let index =
        cache_latents(&src, &enc, &out, 4, |done, total| calls.push((done, total))).unwrap();
    assert_eq!(
        (index.count, index.shape, index.text_skipped),
        (10, [3, 8, 8], 0)
    );
    assert_eq!(
        index.shards.iter().map(|s| s.count).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    assert!(index.encoder.contains("pixels 8x8"));
    assert_eq!(calls.len(), 10);
    assert_eq!(calls.last(), Some(&(10, Some(10))));
    assert!(out.join("shard-00002.safetensors").is_file() && out.join(INDEX_FILE).is_file());

    let cache = open_source(
        &parse_source_spec(&format!("latents:{}", out.display())).unwrap(),
        &SourceOptions::default(),
    )
    .unwrap();
    assert_eq!(cache.num_records(), Some(10));
    for i in 0..10 {
        let (img, caption) = pair_parts(src.get(0, i).unwrap());
        let ImageData::Pixels(img) = img else {
            panic!()
        };
        let (lat, cached_caption) = pair_parts(cache.get(0, i).unwrap());
        assert_eq!(cached_caption, caption);
        assert_eq!(
            lat,
            ImageData::Latent {
                data: enc.encode(&img).unwrap(),
                shape: [3, 8, 8]
            }
        );
    }
    assert!(cache.get(0, 10).is_err());

    // The shard is a standard safetensors file.
    let bytes = std::fs::read(out.join("shard-00001.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("latents").unwrap().shape(), &[4, 3, 8, 8]);
}

#[test]
fn cache_of_a_cache_copies_latents_and_text_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let enc = FnEncoder {
        shape: [1, 2, 2],
        description: "mean of red, 2x2".into(),
        f: |img: &image::RgbImage| Ok(vec![img.get_pixel(0, 0).0[0] as f32; 4]),
    };
    let src = ShapesSource::new(ShapesGenerator::new(3), 3);
    cache_latents(&src, &enc, &dir.path().join("a"), 1024, |_, _| {}).unwrap();
    let a = LatentCacheSource::open(&dir.path().join("a")).unwrap();
    assert_eq!(a.index().encoder, "mean of red, 2x2");
    let index = cache_latents(&a, &enc, &dir.path().join("b"), 2, |_, _| {}).unwrap();
    let b = LatentCacheSource::open(&dir.path().join("b")).unwrap();
    assert_eq!(index.count, 3);
    for i in 0..3 {
        assert_eq!(a.get(0, i).unwrap(), b.get(0, i).unwrap());
    }

    std::fs::write(
        dir.path().join("t.jsonl"),
        "{\"text\": \"x\"}\n{\"text\": \"y\"}\n",
    )
    .unwrap();
    let text = TextSource::open(&dir.path().join("t.jsonl"), TextSplit::File, false).unwrap();
    let index = cache_latents(&text, &enc, &dir.path().join("c"), 2, |_, _| {}).unwrap();
    assert_eq!(
        (index.count, index.text_skipped, index.shards.len()),
        (0, 2, 0)
    );
}

#[test]
fn damaged_caches_are_reported_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cache");
    let src = ShapesSource::new(ShapesGenerator::new(2), 5);
    cache_latents(&src, &PixelEncoder::new(4), &out, 2, |_, _| {}).unwrap();
    let shard = out.join("shard-00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let e = LatentCacheSource::open(&out).unwrap_err().to_string();
    assert!(
        e.contains("shard-00001.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // An index naming a shard outside the cache directory is refused.
    std::fs::write(&shard, &bytes).unwrap();
    assert!(LatentCacheSource::open(&out).is_ok());
    let index = std::fs::read_to_string(out.join(INDEX_FILE)).unwrap();
    for outside in ["../shard-00001.safetensors", "/etc/passwd"] {
        let edited = index.replace("shard-00001.safetensors", outside);
        assert_ne!(edited, index);
        std::fs::write(out.join(INDEX_FILE), edited).unwrap();
        let e = LatentCacheSource::open(&out).unwrap_err().to_string();
        assert!(
            e.contains(INDEX_FILE) && e.contains(outside) && e.contains("inside the cache"),
            "{e}"
        );
    }

    std::fs::remove_file(out.join(INDEX_FILE)).unwrap();
    let e = LatentCacheSource::open(&out).unwrap_err().to_string();
    assert!(e.contains(INDEX_FILE), "{e}");
}
