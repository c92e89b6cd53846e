//! Writing files with errors that name the path (the OS error alone, e.g. "Permission
//! denied (os error 13)", does not say which file of a run failed).

use std::path::Path;

use crate::error::DataError;

/// Creates `dir` and its parents; an error names `dir`.
pub fn create_dir(dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::write(dir, e))
}

/// Writes `contents` to `path`, creating its parent directories first; an error names
/// the path that failed (the parent directory or the file).
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), DataError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent)?;
    }
    std::fs::write(path, contents).map_err(|e| DataError::write(path, e))
}

/// Writes `value` as pretty-printed JSON to `path` (see [`write_file`]).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), DataError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| DataError::invalid(path, format!("cannot serialise to JSON: {e}")))?;
    write_file(path, text)
}
