//! Rendering sequences and rows, and describing sources.

use crate::dataset_util::{test_image, write_png, ToyTokenizer, SPECIAL};
use transfusion_data::inspect::{describe_sources, render_row, render_sequence};
use transfusion_data::packing::PackedRow;
use transfusion_data::sequence::{pair_sequence, text_sequence, PairChoice, PairOrder};
use transfusion_data::source::{parse_source_spec, SourceOptions};

#[test]
fn render_shows_special_tokens_text_and_image_spans() {
    let tok = ToyTokenizer::default();
    let choice = PairChoice {
        order: PairOrder::CaptionFirst,
        drop_caption: false,
        t: 412,
    };
    let seq = pair_sequence(
        &[10, 11, 12],
        vec![0.0; 3 * 4 * 4],
        [3, 4, 4],
        &choice,
        2,
        &SPECIAL,
    )
    .unwrap();
    assert_eq!(
        render_sequence(&seq, &tok),
        "<|bos|> a red circle <|boi|> [img 0: 4 patches, 3x4x4, t=412] <|eoi|> <|eos|>"
    );

    let mut row = PackedRow::new(20, SPECIAL.pad);
    row.try_push(text_sequence(&[16, 17], &SPECIAL)).unwrap();
    row.try_push(seq).unwrap();
    assert_eq!(
        render_row(&row, &tok),
        "doc 1 (positions 0..4): <|bos|> the cat <|eos|>\n\
         doc 2 (positions 4..15): <|bos|> a red circle <|boi|> [img 0: 4 patches, 3x4x4, t=412] <|eoi|> <|eos|>\n\
         padding: 5 of 20 positions\n"
    );
}

#[test]
fn describe_sources_counts_and_lists_skips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("ok.png"), &test_image(4, 4, 0));
    std::fs::write(d.join("bad.png"), b"nope").unwrap();
    std::fs::write(
        d.join("metadata.jsonl"),
        "{\"file_name\": \"ok.png\", \"text\": \"a red circle\"}\n{\"file_name\": \"bad.png\", \"text\": \"x\"}\n",
    )
    .unwrap();
    std::fs::write(d.join("t.jsonl"), "{\"text\": \"the cat\"}\n").unwrap();
    let specs = vec![
        parse_source_spec(&format!("imagefolder:{}@3", d.display())).unwrap(),
        parse_source_spec(&format!("text:{}", d.join("t.jsonl").display())).unwrap(),
    ];
    let out = describe_sources(
        &specs,
        &SourceOptions::default(),
        100,
        Some(&ToyTokenizer::default()),
    )
    .unwrap();
    assert!(out.contains("source 1/2: imagefolder:"), "{out}");
    assert!(out.contains("(share 75.0%)"), "{out}");
    assert!(
        out.contains("checked 2 records: 0 text documents, 1 pairs; 3.0 tokens per caption"),
        "{out}"
    );
    assert!(
        out.contains("skipped 1 file: ") && out.contains("bad.png ("),
        "{out}"
    );
    assert!(
        out.contains("checked 1 records: 1 text documents, 0 pairs; 2.0 tokens per document"),
        "{out}"
    );
    assert!(out.contains("no files skipped"), "{out}");
}

#[test]
fn real_tokenizer_builds_and_renders_a_shapes_pair() {
    use std::sync::Arc;
    use transfusion_data::datasets::synthetic::ShapesSource;
    use transfusion_data::datasets::{Sample, SampleSource};
    use transfusion_data::encoder::PixelEncoder;
    use transfusion_data::rng::Rng64;
    use transfusion_data::sequence::{SequenceBuilder, SequenceConfig};
    use transfusion_data::synthetic::shapes::ShapesGenerator;
    use transfusion_data::tokenizer::TextTokenizer;

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tokenizer.json");
    let tok = Arc::new(TextTokenizer::from_file(path).unwrap());
    let cfg = SequenceConfig {
        p_caption_first: 1.0,
        caption_dropout: 0.0,
        patch_size: 4,
        ..Default::default()
    };
    let b = SequenceBuilder::new(cfg, tok.clone(), Arc::new(PixelEncoder::new(32))).unwrap();
    let sample = ShapesSource::new(ShapesGenerator::new(1), 1)
        .get(0, 0)
        .unwrap()
        .unwrap();
    let Sample::Pair { caption, .. } = &sample else {
        panic!()
    };
    let caption = caption.clone();
    let seq = b.build(sample, &mut Rng64::new(3)).unwrap();
    let special = *tok.special();
    assert_eq!(
        (seq.tokens[0], *seq.tokens.last().unwrap()),
        (special.bos, special.eos)
    );
    let t = seq.images[0].t;
    assert_eq!(
        render_sequence(&seq, tok.as_ref()),
        format!("<|bos|> {caption} <|boi|> [img 0: 64 patches, 3x32x32, t={t}] <|eoi|> <|eos|>")
    );
}
