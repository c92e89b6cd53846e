//! Text, image-folder, COCO and shapes sources on small files written by the tests,
//! including broken ones.

use std::fs;
use std::path::Path;

use crate::dataset_util::{test_image, write_png};
use transfusion_data::datasets::coco::{CocoCaptions, CocoSource};
use transfusion_data::datasets::imagefolder::ImageFolderSource;
use transfusion_data::datasets::text::{TextSource, TextSplit};
use transfusion_data::datasets::{ImageData, Sample, SampleSource};
use transfusion_data::source::{open_source, parse_source_spec, SourceOptions};

fn all_records(src: &dyn SampleSource) -> Vec<Option<Sample>> {
    src.iter_epoch(0, 0).unwrap().map(|r| r.unwrap()).collect()
}

fn text(s: &str) -> Option<Sample> {
    Some(Sample::Text(s.to_string()))
}

fn write_text_corpus(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a.txt"), "hello world\n").unwrap();
    fs::write(dir.join("sub/b.txt"), "para one\nline2\n\n  \npara two\n").unwrap();
    fs::write(
        dir.join("c.jsonl"),
        "{\"text\": \"doc1\"}\n\n{\"text\": broken\n{\"text\": 5}\n{\"text\": \"doc2\", \"id\": 7}\n",
    )
    .unwrap();
    fs::write(dir.join("notes.md"), "ignored").unwrap();
    fs::write(dir.join("empty.txt"), "").unwrap();
}

#[test]
fn text_files_and_jsonl_recursive_sorted_with_bad_lines_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_text_corpus(dir.path());
    let src = TextSource::open(dir.path(), TextSplit::File, false).unwrap();
    assert_eq!(src.num_files(), 4); // a.txt, c.jsonl, empty.txt, sub/b.txt (not notes.md)
    assert_eq!(src.num_records(), Some(6)); // blank jsonl line and empty file are not records
    let recs = all_records(&src);
    assert_eq!(
        recs,
        vec![
            text("hello world"),
            text("doc1"),
            None,
            None,
            text("doc2"),
            text("para one\nline2\n\n  \npara two"),
        ]
    );
    let skips = src.skips();
    assert_eq!(skips.count, 2);
    assert!(skips.examples[0].0.ends_with("c.jsonl:3"), "{skips}");
    assert!(skips.examples[0].1.contains("invalid JSON"), "{skips}");
    assert!(skips.examples[1].0.ends_with("c.jsonl:4"), "{skips}");
    // A second epoch meets the same bad lines: still counted once each.
    let _ = src.iter_epoch(1, 0).unwrap().count();
    assert_eq!(src.skips().count, 2);
    assert!(src.skips().to_string().starts_with("skipped 2 files: "));
    // The walk names the file it did not read.
    let described = SampleSource::describe(&src);
    assert!(
        described.contains("skipped 1 file of other types") && described.contains("notes.md"),
        "{described}"
    );
}

#[test]
fn text_paragraph_split_and_strict_mode() {
    let dir = tempfile::tempdir().unwrap();
    write_text_corpus(dir.path());
    let src = TextSource::open(&dir.path().join("sub/b.txt"), TextSplit::Paragraph, false).unwrap();
    assert_eq!(
        all_records(&src),
        vec![text("para one\nline2"), text("para two")]
    );

    let strict = TextSource::open(dir.path(), TextSplit::File, true).unwrap();
    let err = strict.get(0, 2).unwrap_err().to_string();
    assert!(
        err.contains("c.jsonl:3") && err.contains("invalid JSON"),
        "{err}"
    );
    // A file named explicitly is read as plain text whatever its extension.
    let notes = TextSource::open(&dir.path().join("notes.md"), TextSplit::File, false).unwrap();
    assert_eq!(all_records(&notes), vec![text("ignored")]);
    let missing = TextSource::open(&dir.path().join("missing"), TextSplit::File, false);
    assert!(missing.unwrap_err().to_string().contains("missing"));
}

#[test]
fn imagefolder_metadata_jsonl_skips_corrupt_missing_and_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = test_image(20, 10, 3);
    write_png(&d.join("good.png"), &good);
    fs::write(d.join("bad.png"), b"this is not a png").unwrap();
    fs::write(
        d.join("metadata.jsonl"),
        [
            r#"{"file_name": "good.png", "text": "a red circle"}"#,
            r#"{"file_name": "bad.png", "text": "broken"}"#,
            r#"{"file_name": "missing.png", "text": "gone"}"#,
            r#"{"file_name": "../escape.png", "text": "evil"}"#,
            r#"{"file_name": "good.png"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let src = ImageFolderSource::open(d, false).unwrap();
    assert_eq!(src.num_records(), Some(2));
    assert_eq!(src.skips().count, 3);
    let recs = all_records(&src);
    assert_eq!(
        recs[0],
        Some(Sample::Pair {
            image: ImageData::Pixels(good),
            caption: "a red circle".into()
        })
    );
    assert_eq!(recs[1], None);
    let report = src.skips();
    assert_eq!(report.count, 4);
    let shown = report.to_string();
    assert!(shown.starts_with("skipped 4 files: "), "{shown}");
    for needle in [
        "missing.png (missing image file)",
        "../escape.png",
        "bad.png (",
    ] {
        assert!(shown.contains(needle), "{needle} not in {shown}");
    }

    // Strict: the first bad line is an error naming it.
    let err = ImageFolderSource::open(d, true).unwrap_err().to_string();
    assert!(err.contains("missing.png"), "{err}");
}

/// Documented behaviour: an image that is a symbolic link is read through the link, even
/// when it points outside the folder (a folder of links into a shared store).
#[cfg(unix)]
#[test]
fn imagefolder_follows_symlinked_images() {
    let store = tempfile::tempdir().unwrap();
    let image = test_image(6, 6, 4);
    write_png(&store.path().join("blob"), &image);
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(store.path().join("blob"), dir.path().join("a.png")).unwrap();
    fs::write(
        dir.path().join("metadata.jsonl"),
        r#"{"file_name": "a.png", "text": "linked"}"#,
    )
    .unwrap();
    let src = ImageFolderSource::open(dir.path(), true).unwrap();
    assert_eq!(
        src.get(0, 0).unwrap(),
        Some(Sample::Pair {
            image: ImageData::Pixels(image),
            caption: "linked".into()
        })
    );
}

#[test]
fn imagefolder_captions_jsonl_and_strict_corrupt_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("x.png"), &test_image(8, 8, 1));
    fs::write(d.join("y.png"), b"garbage").unwrap();
    fs::write(
        d.join("captions.jsonl"),
        "{\"image\": \"x.png\", \"caption\": \"the cat\"}\n{\"image\": \"y.png\", \"caption\": \"a dog\"}\n",
    )
    .unwrap();
    let src = ImageFolderSource::open(d, true).unwrap();
    assert!(
        matches!(src.get(0, 0).unwrap(), Some(Sample::Pair { caption, .. }) if caption == "the cat")
    );
    let err = src.get(0, 1).unwrap_err().to_string();
    assert!(err.contains("y.png"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = ImageFolderSource::open(empty.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metadata.jsonl") && err.contains("captions.jsonl"),
        "{err}"
    );
}

fn write_coco(d: &Path) -> std::path::PathBuf {
    fs::create_dir_all(d.join("images")).unwrap();
    write_png(&d.join("images/1.png"), &test_image(6, 6, 1));
    write_png(&d.join("images/2.png"), &test_image(6, 6, 2));
    let ann = serde_json::json!({
        "info": {"description": "test"},
        "images": [
            {"id": 1, "file_name": "1.png", "width": 6, "height": 6},
            {"id": 2, "file_name": "2.png"},
            {"id": 3, "file_name": "3.png"},
            {"id": 4, "file_name": "4.png"}
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "one a"},
            {"id": 11, "image_id": 2, "caption": "two a"},
            {"id": 12, "image_id": 1, "caption": "one b"},
            {"id": 13, "image_id": 1, "caption": "one c "},
            {"id": 14, "image_id": 2, "caption": "two b"},
            {"id": 15, "image_id": 3, "caption": "three"}
        ]
    });
    let path = d.join("captions_train.json");
    fs::write(&path, ann.to_string()).unwrap();
    path
}

fn caption_of(s: Option<Sample>) -> String {
    match s {
        Some(Sample::Pair { caption, .. }) => caption,
        other => panic!("expected a pair, got {other:?}"),
    }
}

#[test]
fn coco_all_pairs_and_missing_image_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ann = write_coco(dir.path());
    let src = CocoSource::open(
        &dir.path().join("images"),
        &ann,
        CocoCaptions::AllPairs,
        0,
        false,
    )
    .unwrap();
    assert_eq!(src.num_records(), Some(5));
    let caps: Vec<String> = all_records(&src).into_iter().map(caption_of).collect();
    assert_eq!(caps, ["one a", "one b", "one c", "two a", "two b"]);
    // Image 3 is listed with a caption but missing; image 4 has no caption (not a record).
    assert_eq!(src.skips().count, 1);
    assert!(src.skips().examples[0].0.ends_with("3.png"));

    // Every image missing: the error says why each was left out.
    let empty = dir.path().join("no-images");
    fs::create_dir(&empty).unwrap();
    let err = CocoSource::open(&empty, &ann, CocoCaptions::AllPairs, 0, false)
        .unwrap_err()
        .to_string();
    for needle in [
        "captions_train.json",
        "no captioned images found",
        "4 images and 6 captions listed",
        "1 images have no caption",
        "skipped 3 files",
        "1.png (missing image file)",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    assert!(CocoSource::open(
        &dir.path().join("images"),
        &ann,
        CocoCaptions::AllPairs,
        0,
        true
    )
    .is_err());
}

#[test]
fn coco_one_caption_per_epoch_varies_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let ann = write_coco(dir.path());
    let images = dir.path().join("images");
    let a = CocoSource::open(&images, &ann, CocoCaptions::OnePerEpoch, 7, false).unwrap();
    let b = CocoSource::open(&images, &ann, CocoCaptions::OnePerEpoch, 7, false).unwrap();
    assert_eq!(a.num_records(), Some(2));
    let mut seen = std::collections::BTreeSet::new();
    for epoch in 0..30 {
        let ca = caption_of(a.get(epoch, 0).unwrap());
        assert_eq!(ca, caption_of(b.get(epoch, 0).unwrap()));
        assert!(ca.starts_with("one "));
        seen.insert(ca);
    }
    assert_eq!(
        seen.len(),
        3,
        "all three captions of image 1 should appear over 30 epochs"
    );
}

#[test]
fn coco_and_shapes_through_specs() {
    let dir = tempfile::tempdir().unwrap();
    let ann = write_coco(dir.path());
    let spec = parse_source_spec(&format!(
        "coco:{},{}",
        dir.path().join("images").display(),
        ann.display()
    ))
    .unwrap();
    let src = open_source(&spec, &SourceOptions::default()).unwrap();
    assert_eq!(src.num_records(), Some(5));

    let opts = SourceOptions {
        shapes_image_size: 24,
        ..Default::default()
    };
    let shapes = open_source(&parse_source_spec("shapes:7").unwrap(), &opts).unwrap();
    assert_eq!(shapes.num_records(), Some(7));
    match shapes.get(0, 6).unwrap() {
        Some(Sample::Pair {
            image: ImageData::Pixels(img),
            caption,
        }) => {
            assert_eq!(img.dimensions(), (24, 24));
            assert!(!caption.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(shapes.get(0, 7).is_err());
}
