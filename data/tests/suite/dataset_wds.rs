//! WebDataset shards, brace expansion and path-traversal rejection.

use std::fs::File;
use std::path::Path;

use crate::dataset_util::{png_bytes, test_image};
use transfusion_data::datasets::brace::expand_braces;
use transfusion_data::datasets::wds::WdsSource;
use transfusion_data::datasets::{ImageData, Sample, SampleSource};

#[test]
fn brace_ranges_keep_padding_and_lists_multiply() {
    assert_eq!(
        expand_braces("shards/{0000..0003}.tar").unwrap(),
        [
            "shards/0000.tar",
            "shards/0001.tar",
            "shards/0002.tar",
            "shards/0003.tar"
        ]
    );
    assert_eq!(
        expand_braces("s{8..11}").unwrap(),
        ["s8", "s9", "s10", "s11"]
    );
    assert_eq!(
        expand_braces("s{08..11}").unwrap(),
        ["s08", "s09", "s10", "s11"]
    );
    assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
    assert_eq!(
        expand_braces("{a,b}/{0..1}.tar").unwrap(),
        ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    );
    assert_eq!(
        expand_braces("x{a,b{1,2}}y").unwrap(),
        ["xay", "xb1y", "xb2y"]
    );
    assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
    assert_eq!(expand_braces("{single}").unwrap(), ["{single}"]);
    assert_eq!(expand_braces("{000..099}").unwrap().len(), 100);
    assert_eq!(expand_braces("{-1..1}").unwrap(), ["-1", "0", "1"]);
    // Bounds whose distance overflows i64, and bounds beyond i64.
    for bad in [
        "a{0..3",
        "a}b",
        "{0..99999999}",
        "{-9223372036854775808..9223372036854775807}",
        "{0..99999999999999999999}",
    ] {
        let e = expand_braces(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
    }
}

/// Appends a regular file member (the raw header path is written as given, so `../x`
/// and `/abs` names can be produced for the traversal test).
fn append(builder: &mut tar::Builder<File>, name: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    {
        let raw = header.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
    }
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

fn write_shard(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut b = tar::Builder::new(File::create(path).unwrap());
    for (name, data) in members {
        append(&mut b, name, data);
    }
    b.finish().unwrap();
}

fn shard_fixture(dir: &Path) {
    let img = |s| png_bytes(&test_image(8, 8, s));
    write_shard(
        &dir.join("shard-00.tar"),
        &[
            ("s/000.png", img(0)),
            ("s/000.txt", b"zero".to_vec()),
            ("s/001.png", b"corrupt bytes".to_vec()),
            ("s/001.txt", b"one".to_vec()),
            ("s/002.PNG", img(2)),
            ("s/002.txt", b" two \n".to_vec()),
        ],
    );
    write_shard(
        &dir.join("shard-01.tar"),
        &[
            ("../evil.png", img(9)),
            ("s/003.txt", b"three, no image".to_vec()),
            ("s/004.png", img(4)),
            ("s/004.json", b"{}".to_vec()),
            ("s/004.txt", b"four".to_vec()),
        ],
    );
}

fn caption(rec: Option<Sample>) -> Option<String> {
    rec.map(|s| match s {
        Sample::Pair {
            caption,
            image: ImageData::Pixels(img),
        } => {
            assert_eq!(img.dimensions(), (8, 8));
            caption
        }
        other => panic!("{other:?}"),
    })
}

#[test]
fn wds_reads_shards_in_order_and_skips_bad_members() {
    let dir = tempfile::tempdir().unwrap();
    shard_fixture(dir.path());
    let pattern = format!("{}/shard-{{00..01}}.tar", dir.path().display());
    let src = WdsSource::open(&pattern, false, 0, false).unwrap();
    assert_eq!(src.shards().len(), 2);
    assert!(!src.is_indexed());
    let recs: Vec<Option<String>> = src
        .iter_epoch(0, 0)
        .unwrap()
        .map(|r| caption(r.unwrap()))
        .collect();
    assert_eq!(
        recs,
        vec![
            Some("zero".into()),
            None, // corrupt image
            Some("two".into()),
            None, // ../evil.png
            None, // 003 has no image
            Some("four".into()),
        ]
    );
    let report = src.skips();
    assert_eq!(report.count, 3, "{report}");
    let shown = report.to_string();
    assert!(shown.contains("shard-00.tar:s/001.png"), "{shown}");
    assert!(shown.contains("../evil.png (unsafe member path"), "{shown}");
    assert!(shown.contains("s/003 (no image"), "{shown}");

    // Resume from a record offset: the same tail.
    let tail: Vec<Option<String>> = src
        .iter_epoch(0, 2)
        .unwrap()
        .map(|r| caption(r.unwrap()))
        .collect();
    assert_eq!(tail, recs[2..].to_vec());

    // Strict: the corrupt member is an error naming it.
    let strict = WdsSource::open(&pattern, false, 0, true).unwrap();
    let results: Vec<_> = strict.iter_epoch(0, 0).unwrap().collect();
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("s/001.png"), "{err}");
}

#[test]
fn wds_missing_shard_and_shuffled_order() {
    let dir = tempfile::tempdir().unwrap();
    shard_fixture(dir.path());
    let missing = format!("{}/shard-{{00..02}}.tar", dir.path().display());
    let err = WdsSource::open(&missing, false, 0, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard-02.tar") && err.contains("does not exist"),
        "{err}"
    );

    // A directory means the shards in it, sorted by name.
    let whole = WdsSource::open(&dir.path().display().to_string(), false, 0, false).unwrap();
    let names: Vec<_> = whole
        .shards()
        .iter()
        .filter_map(|p| p.file_name())
        .collect();
    assert_eq!(names, ["shard-00.tar", "shard-01.tar"]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = WdsSource::open(&empty.display().to_string(), false, 0, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty") && err.contains("no .tar shards"),
        "{err}"
    );

    let pattern = format!("{}/shard-{{00,01}}.tar", dir.path().display());
    let src = WdsSource::open(&pattern, true, 3, false).unwrap();
    let firsts: std::collections::BTreeSet<String> = (0..16)
        .map(|e| {
            src.iter_epoch(e, 0)
                .unwrap()
                .find_map(|r| caption(r.unwrap()))
                .unwrap()
        })
        .collect();
    // Shuffled shard order: some epochs start with shard 00 ("zero"), some with 01 ("four").
    assert_eq!(firsts.into_iter().collect::<Vec<_>>(), ["four", "zero"]);
}

#[test]
fn wds_truncated_shard_is_one_skipped_record() {
    let dir = tempfile::tempdir().unwrap();
    shard_fixture(dir.path());
    let path = dir.path().join("shard-00.tar");
    let bytes = std::fs::read(&path).unwrap();
    let png_len = png_bytes(&test_image(8, 8, 0)).len().div_ceil(512) * 512;
    let cut = 512 + png_len + 512 + 100; // inside the padding after "zero"
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let src = WdsSource::open(&path.display().to_string(), false, 0, false).unwrap();
    let recs: Vec<Option<String>> = src
        .iter_epoch(0, 0)
        .unwrap()
        .map(|r| caption(r.unwrap()))
        .collect();
    // Cut in the padding after `s/000.txt`: group 000 is whole and kept; the tar error
    // ends the shard as one skipped record.
    assert_eq!(recs, vec![Some("zero".to_string()), None]);
    assert!(
        src.skips().to_string().contains("shard-00.tar"),
        "{}",
        src.skips()
    );

    // A file of random bytes: one skipped record whose reason is printable text.
    let garbage = dir.path().join("garbage.tar");
    let mut rng = transfusion_data::rng::Rng64::new(5);
    let bytes: Vec<u8> = (0..3000).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&garbage, bytes).unwrap();
    let src = WdsSource::open(&garbage.display().to_string(), false, 0, false).unwrap();
    assert_eq!(src.iter_epoch(0, 0).unwrap().map(|r| r.unwrap()).count(), 1);
    let report = src.skips();
    assert_eq!(report.count, 1);
    let (name, reason) = &report.examples[0];
    assert!(name.ends_with("garbage.tar"), "{name}");
    assert!(reason.starts_with("not a valid tar archive"), "{reason}");
    assert!(
        reason.len() < 240 && reason.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
        "{reason}"
    );
}
