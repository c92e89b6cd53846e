//! `KIND:LOCATION[@WEIGHT]` parsing, errors and serde spelling.

use serde::{Deserialize, Serialize};
use transfusion_data::source::{parse_source_spec, SourceKind, SourceSpec};

#[test]
fn specs_parse_with_and_without_weights() {
    let s = parse_source_spec("text:corpus/wiki@0.5").unwrap();
    assert_eq!(
        (s.kind, s.location.as_str(), s.weight),
        (SourceKind::Text, "corpus/wiki", 0.5)
    );
    let s = parse_source_spec("wds:shards/{0000..0099}.tar@2").unwrap();
    assert_eq!(
        (s.kind, s.location.as_str(), s.weight),
        (SourceKind::Wds, "shards/{0000..0099}.tar", 2.0)
    );
    let s = parse_source_spec("coco:train2017,annotations/captions_train2017.json").unwrap();
    assert_eq!((s.kind, s.weight), (SourceKind::Coco, 1.0));
    let s = parse_source_spec("imagefolder:/data/me@host/pets").unwrap();
    assert_eq!(
        (s.kind, s.location.as_str(), s.weight),
        (SourceKind::ImageFolder, "/data/me@host/pets", 1.0)
    );
    assert_eq!(
        parse_source_spec("shapes:100").unwrap().kind,
        SourceKind::Shapes
    );
    assert_eq!(
        parse_source_spec("LATENTS:cache").unwrap().kind,
        SourceKind::Latents
    );
}

#[test]
fn bad_specs_say_what_is_wrong() {
    let cases = [
        ("corpus.txt", "expected KIND:LOCATION"),
        ("video:clips", "unknown kind `video`"),
        ("text:a@heavy", "weight `heavy` is not a number"),
        ("text:a@-1", "positive"),
        ("text:a@0", "positive"),
        ("shapes:many", "sample count"),
        ("shapes:0", "N >= 1"),
        ("coco:only_images", "IMAGES_DIR,ANNOTATIONS.json"),
        ("text:", "empty location"),
    ];
    for (spec, needle) in cases {
        let e = parse_source_spec(spec).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains(spec), "`{spec}` -> {e}");
    }
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Config {
    sources: Vec<SourceSpec>,
}

#[test]
fn specs_serialize_as_the_same_string() {
    let text = "sources = [\"text:corpus@0.5\", \"shapes:1000\", \"wds:s/{00..09}.tar@2\"]\n";
    let cfg: Config = toml::from_str(text).unwrap();
    assert_eq!(cfg.sources[0].weight, 0.5);
    assert_eq!(toml::to_string(&cfg).unwrap(), text);
    let json = serde_json::to_string(&cfg.sources[2]).unwrap();
    assert_eq!(json, "\"wds:s/{00..09}.tar@2\"");
    let bad: Result<Config, _> = toml::from_str("sources = [\"nope\"]");
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("expected KIND:LOCATION"));
}
