//! WebDataset tar shards: members `{key}.jpg|jpeg|png|webp` + `{key}.txt`, grouped by key
//! (the member path up to the first `.` of its file name), read as a stream.
//!
//! Shards are read in order (shuffled per epoch when asked) by a background thread that
//! decodes images ahead of the consumer. A record is one key group; a member with an
//! absolute or `..` path is rejected as a bad record of its own; an unreadable shard is
//! one bad record. All of these are skipped and counted, or errors in strict mode.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

use super::brace::expand_braces;
use super::skip::reason_of;
use super::{collect_files, is_safe_relative, ImageData, RecordIter, Sample, SampleSource};
use super::{SkipPolicy, SkipReport};
use crate::error::DataError;
use crate::rng::Rng64;

/// File extensions (lower case) taken as the image of a group.
pub const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Records decoded ahead of the consumer.
const PREFETCH: usize = 32;

#[derive(Debug)]
struct Inner {
    pattern: String,
    shards: Vec<PathBuf>,
    shuffle: bool,
    seed: u64,
    policy: SkipPolicy,
}

/// A WebDataset: a brace-expanded list of tar shards.
#[derive(Clone, Debug)]
pub struct WdsSource {
    inner: Arc<Inner>,
}

impl WdsSource {
    /// Expands `pattern` (see [`expand_braces`]); every shard must exist. A pattern naming a
    /// directory means every `.tar` file under it (recursive, sorted by path).
    /// With `shuffle`, each epoch reads the shards in a seeded random order (members stay
    /// in their order within a shard).
    pub fn open(pattern: &str, shuffle: bool, seed: u64, strict: bool) -> Result<Self, DataError> {
        let shards: Vec<PathBuf> = if Path::new(pattern).is_dir() {
            let dir = Path::new(pattern);
            collect_files(dir, &["tar"])?
                .require_some(dir, ".tar shards")?
                .files
        } else {
            expand_braces(pattern)?
                .into_iter()
                .map(PathBuf::from)
                .collect()
        };
        if let Some(dir) = shards.iter().find(|p| p.is_dir()) {
            return Err(DataError::invalid(
                dir,
                format!("is a directory, not a tar shard (from pattern `{pattern}`)"),
            ));
        }
        if let Some(missing) = shards.iter().find(|p| !p.is_file()) {
            return Err(DataError::invalid(
                missing,
                format!("shard does not exist (from pattern `{pattern}`)"),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                pattern: pattern.to_string(),
                shards,
                shuffle,
                seed,
                policy: SkipPolicy::new(strict),
            }),
        })
    }

    /// The shard files, in pattern order.
    pub fn shards(&self) -> &[PathBuf] {
        &self.inner.shards
    }

    fn shard_order(&self, epoch: u64) -> Vec<PathBuf> {
        let shards = &self.inner.shards;
        if !self.inner.shuffle {
            return shards.clone();
        }
        let mut rng = Rng64::from_parts(&[self.inner.seed, epoch, 0x5AAD]);
        rng.permutation(shards.len())
            .into_iter()
            .map(|i| shards[i as usize].clone())
            .collect()
    }
}

type Item = Result<Option<Sample>, DataError>;

/// Longest tar error text kept in a message.
const MAX_PROBLEM_CHARS: usize = 120;

/// A tar reader's error as a readable message: the `tar` crate quotes the header bytes it
/// failed on, which for a file that is not a tar archive are binary garbage, so every run
/// of characters other than printable ASCII becomes one `?` and the text is cut at
/// [`MAX_PROBLEM_CHARS`].
fn tar_problem(e: &std::io::Error) -> String {
    let mut text = String::new();
    for c in e.to_string().chars() {
        if text.len() >= MAX_PROBLEM_CHARS {
            text.push_str("...");
            break;
        }
        if c == ' ' || c.is_ascii_graphic() {
            text.push(c);
        } else if !text.ends_with('?') {
            text.push('?');
        }
    }
    format!("not a valid tar archive (tar error: {text})")
}

/// One key group: the members of a sample.
#[derive(Default)]
struct Group {
    key: String,
    members: Vec<(String, Vec<u8>)>, // (extension, bytes)
}

struct Reader {
    tx: SyncSender<Item>,
    policy: SkipPolicy,
    /// Records still to pass over without decoding (resume from an offset).
    skip: usize,
}

impl Reader {
    /// Sends one record; `false` when the consumer is gone.
    fn emit(&mut self, make: impl FnOnce(&SkipPolicy) -> Item) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return true;
        }
        self.tx.send(make(&self.policy)).is_ok()
    }

    fn run(mut self, shards: Vec<PathBuf>) {
        for shard in shards {
            if !self.read_shard(&shard) {
                return;
            }
        }
    }

    /// Reads one shard; `false` when the consumer is gone.
    fn read_shard(&mut self, shard: &PathBuf) -> bool {
        let sname = shard.display().to_string();
        let file = match File::open(shard) {
            Ok(f) => f,
            Err(e) => return self.emit(|p| p.bad(&sname, format!("cannot open shard: {e}"))),
        };
        let mut archive = tar::Archive::new(BufReader::new(file));
        let entries = match archive.entries() {
            Ok(e) => e,
            Err(e) => return self.emit(|p| p.bad(&sname, tar_problem(&e))),
        };
        let mut group = Group::default();
        for entry in entries {
            let mut entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    // The members read so far are whole: keep their group, then report.
                    if !group.members.is_empty() && !self.emit(|p| decode_group(&sname, group, p)) {
                        return false;
                    }
                    return self.emit(|p| p.bad(&sname, tar_problem(&e)));
                }
            };
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mname = format!("{sname}:{member}");
            if !is_safe_relative(&member) {
                if !self.emit(|p| p.bad(&mname, "unsafe member path (absolute or `..`)")) {
                    return false;
                }
                continue;
            }
            let (key, ext) = split_key(&member);
            if key != group.key && !group.members.is_empty() {
                let g = std::mem::take(&mut group);
                if !self.emit(|p| decode_group(&sname, g, p)) {
                    return false;
                }
            }
            group.key = key.to_string();
            // Always read (the archive is sequential anyway); only decoding is skipped.
            let mut bytes = Vec::new();
            if let Err(e) = entry.read_to_end(&mut bytes) {
                return self.emit(|p| p.bad(&mname, tar_problem(&e)));
            }
            group.members.push((ext.to_ascii_lowercase(), bytes));
        }
        if !group.members.is_empty() {
            return self.emit(|p| decode_group(&sname, group, p));
        }
        true
    }
}

/// WebDataset's key / extension split: the key is the path up to the first `.` of the
/// file name; the extension is the rest.
fn split_key(member: &str) -> (&str, &str) {
    let base_start = member.rfind('/').map(|i| i + 1).unwrap_or(0);
    match member[base_start..].find('.') {
        Some(dot) => (&member[..base_start + dot], &member[base_start + dot + 1..]),
        None => (member, ""),
    }
}

fn decode_group(shard: &str, group: Group, policy: &SkipPolicy) -> Item {
    let name = format!("{shard}:{}", group.key);
    let image = group
        .members
        .iter()
        .find(|(e, _)| IMAGE_EXTS.contains(&e.as_str()));
    let caption = group.members.iter().find(|(e, _)| e == "txt");
    let (Some((ext, img_bytes)), Some((_, txt))) = (image, caption) else {
        let what = match (image.is_some(), caption.is_some()) {
            (false, false) => "no image and no .txt caption",
            (false, true) => "no image (jpg, jpeg, png, webp)",
            _ => "no .txt caption",
        };
        return policy.bad(&name, what);
    };
    let Ok(caption) = String::from_utf8(txt.clone()) else {
        return policy.bad(&format!("{name}.txt"), "caption is not UTF-8");
    };
    let img_name = format!("{name}.{ext}");
    match crate::image::decode_image(img_bytes, std::path::Path::new(&img_name)) {
        Ok(img) => Ok(Some(Sample::Pair {
            image: ImageData::Pixels(img),
            caption: caption.trim().to_string(),
        })),
        Err(e) => policy.bad(&img_name, reason_of(&e)),
    }
}

impl SampleSource for WdsSource {
    fn describe(&self) -> String {
        format!(
            "wds {}: {} shards (streaming)",
            self.inner.pattern,
            self.inner.shards.len()
        )
    }

    fn num_records(&self) -> Option<usize> {
        None
    }

    fn is_indexed(&self) -> bool {
        false
    }

    fn get(&self, _epoch: u64, _index: usize) -> Result<Option<Sample>, DataError> {
        Err(DataError::Spec {
            spec: format!("wds:{}", self.inner.pattern),
            message: "a WebDataset is read as a stream, not by index".into(),
        })
    }

    fn iter_epoch(&self, epoch: u64, start: usize) -> Result<RecordIter, DataError> {
        let (tx, rx) = sync_channel::<Item>(PREFETCH);
        let reader = Reader {
            tx,
            policy: self.inner.policy.clone(),
            skip: start,
        };
        let shards = self.shard_order(epoch);
        std::thread::Builder::new()
            .name("wds-reader".into())
            .spawn(move || reader.run(shards))
            .map_err(|e| DataError::io(&self.inner.shards[0], e))?;
        Ok(Box::new(rx.into_iter()))
    }

    fn skips(&self) -> SkipReport {
        self.inner.policy.report()
    }
}
