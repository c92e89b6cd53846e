//! Bad samples: skipped and counted, or (strict mode) a hard error.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::DataError;

/// How many skipped names a [`SkipReport`] keeps for display.
pub const SKIP_EXAMPLES: usize = 8;

/// What a source skipped: how many distinct records and the first few, with the reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkipReport {
    /// Distinct records skipped so far (a bad file met again in a later epoch counts once).
    pub count: usize,
    /// The first [`SKIP_EXAMPLES`] skipped records as `(name, reason)`.
    pub examples: Vec<(String, String)>,
}

impl SkipReport {
    /// Adds another report's counts and examples to this one.
    pub fn merge(&mut self, other: &SkipReport) {
        self.count += other.count;
        for e in &other.examples {
            if self.examples.len() < SKIP_EXAMPLES {
                self.examples.push(e.clone());
            }
        }
    }
}

impl fmt::Display for SkipReport {
    /// `skipped 3 files: a.png (not an image), b.png (missing), c.txt (not UTF-8)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return write!(f, "no files skipped");
        }
        let noun = if self.count == 1 { "file" } else { "files" };
        write!(f, "skipped {} {noun}: ", self.count)?;
        for (i, (name, reason)) in self.examples.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{name} ({reason})")?;
        }
        if self.count > self.examples.len() {
            write!(f, ", ...")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct SkipLog {
    seen: HashSet<String>,
    report: SkipReport,
}

/// Shared policy for bad records: in strict mode they are errors, otherwise they are
/// recorded (once per name) and skipped. Cloning shares the same log.
#[derive(Clone, Debug, Default)]
pub struct SkipPolicy {
    strict: bool,
    log: Arc<Mutex<SkipLog>>,
}

impl SkipPolicy {
    /// A fresh policy with an empty log.
    pub fn new(strict: bool) -> Self {
        Self {
            strict,
            log: Arc::default(),
        }
    }

    /// Whether bad records are errors.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// Handles a bad record `name` with `reason`: `Err` in strict mode, else records it
    /// and returns `Ok(None)` (the "skipped" value of a source's record iterator).
    pub fn bad<T>(&self, name: &str, reason: impl Into<String>) -> Result<Option<T>, DataError> {
        let reason = reason.into();
        if self.strict {
            return Err(DataError::invalid(name, reason));
        }
        let mut log = self
            .log
            .lock()
            .expect("skip log lock should not be poisoned");
        if log.seen.insert(name.to_string()) {
            log.report.count += 1;
            if log.report.examples.len() < SKIP_EXAMPLES {
                log.report.examples.push((name.to_string(), reason));
            }
        }
        Ok(None)
    }

    /// A snapshot of what was skipped so far.
    pub fn report(&self) -> SkipReport {
        self.log
            .lock()
            .expect("skip log lock should not be poisoned")
            .report
            .clone()
    }
}

/// The reason part of a data error (without the file name the report already shows).
pub fn reason_of(err: &DataError) -> String {
    match err {
        DataError::Invalid { message, .. } => message.clone(),
        DataError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}
