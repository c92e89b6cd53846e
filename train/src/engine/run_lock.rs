//! One process per run directory: [`RunLock`], an exclusive OS lock on `OUT/run.lock`
//! held for the whole run.
//!
//! The lock belongs to the open file, so the operating system drops it when the process
//! ends in any way (a crash or `kill -9` included): a killed run never leaves a stale
//! lock behind, and the file itself may stay.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;

use transfusion_data::files::create_dir;

use crate::error::{Result, TrainError};

/// The lock file's name in a run directory.
pub const LOCK_FILE: &str = "run.lock";

/// The exclusive lock of a run directory, released when dropped (or when the process
/// ends).
#[derive(Debug)]
pub struct RunLock {
    /// The open lock file (holding it holds the lock).
    _file: File,
}

impl RunLock {
    /// Locks `out` (created if missing) for this process, writing its pid into the lock
    /// file; refuses, naming the holder's pid, when another process holds it.
    pub fn acquire(out: &Path) -> Result<Self> {
        create_dir(out)?;
        let path = out.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| TrainError::io("open", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .map_or("pid unknown".to_string(), |pid| format!("pid {pid}"));
                return Err(TrainError::Run(format!(
                    "{} is in use by another run ({holder}): wait for it to end, or choose \
                     another --out",
                    out.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(TrainError::io("lock", &path, e)),
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| TrainError::io("write", &path, e))?;
        Ok(Self { _file: file })
    }
}
