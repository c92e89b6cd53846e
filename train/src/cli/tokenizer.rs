//! `transfusion-train tokenizer`: train a byte-level BPE tokenizer on text files.

use std::path::PathBuf;

use clap::Args;

/// Flags of `tokenizer`.
#[derive(Args, Debug)]
pub struct TokenizerArgs {
    /// Text files (any name; `.jsonl`: JSON lines with a `text` or `caption` field) or
    /// directories, searched recursively for `.txt` and `.jsonl` files.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Vocabulary size (256 bytes + 5 special tokens + merges).
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
    /// Output file (refused when it exists, unless --overwrite).
    #[arg(long, default_value = "tokenizer.json")]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
}

/// Trains and writes the tokenizer.
pub fn run(a: TokenizerArgs) -> anyhow::Result<()> {
    // Checked before the training: a checkpoint's tokenizer.json overwritten by mistake
    // leaves a checkpoint that no longer loads.
    if a.out.exists() && !a.overwrite {
        anyhow::bail!(
            "--out {} already exists: choose another path, or pass --overwrite to replace it",
            a.out.display()
        );
    }
    let trained = transfusion_data::tokenizer::train_bpe(&a.input, a.vocab_size)?;
    if !trained.skipped.is_empty() {
        let note = transfusion_data::datasets::skipped_note(&trained.skipped);
        println!("not read:{note}");
    }
    let tok = trained.tokenizer;
    tok.save(&a.out)?;
    println!("wrote {} ({} ids)", a.out.display(), tok.vocab_size());
    Ok(())
}
