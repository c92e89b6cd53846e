//! Reading the experiment config from TOML, with errors that name the key, its table and
//! the line.

use std::path::Path;

use super::{bad, ConfigError, ExperimentConfig};
use crate::error::{Result, TrainError};

impl ExperimentConfig {
    /// Parses TOML text (unknown keys are errors naming the key).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let value: toml::Value = toml::from_str(text).map_err(|e| ConfigError {
            key: "<file>".into(),
            message: format!("is not valid TOML: {e}"),
        })?;
        check_model_config_keys(&value)?;
        toml::from_str::<Self>(text).map_err(|e| {
            let msg = e.message().to_string();
            // serde names the unknown field; report it with its table.
            let table = table_at(text, e.span());
            let key = match (unknown_key(&msg).or_else(|| key_at(text, e.span())), table) {
                (Some(k), Some(t)) => format!("{t}.{k}"),
                (Some(k), None) => k,
                (None, Some(t)) => t,
                (None, None) => "<file>".into(),
            };
            ConfigError {
                key,
                message: format!("{msg}{}", span_hint(text, e.span())),
            }
        })
    }

    /// Reads and parses a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
        Self::from_toml_str(&text)
            .map_err(|e| TrainError::from(e).within(path.display().to_string()))
    }
}

/// Rejects unknown keys inside `[model.config]` (the model crate's config type accepts
/// them silently): every key must round-trip through `TransfusionConfig`.
fn check_model_config_keys(value: &toml::Value) -> Result<(), ConfigError> {
    let Some(table) = value
        .get("model")
        .and_then(|m| m.get("config"))
        .and_then(|c| c.as_table())
    else {
        return Ok(());
    };
    // Every field of the config type, as it serialises (so a new field is known here).
    let fields = serde_json::to_value(transfusion_model::TransfusionConfig::tiny(8))
        .expect("a config serialises");
    let known: Vec<&str> = fields
        .as_object()
        .expect("a config serialises to an object")
        .keys()
        .map(String::as_str)
        .collect();
    for k in table.keys() {
        if !known.contains(&k.as_str()) {
            return bad(
                format!("model.config.{k}"),
                format!("is not a model config key (known: {})", known.join(", ")),
            );
        }
    }
    Ok(())
}

/// Turns serde's "unknown field `x`, expected ..." into the key `x` with its table.
fn unknown_key(msg: &str) -> Option<String> {
    let rest = msg.split("unknown field `").nth(1)?;
    let field = rest.split('`').next()?;
    Some(field.to_string())
}

/// The key assigned on the line where a value error points (`steps = "ten"` -> `steps`).
fn key_at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let start = span?.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    (!key.is_empty() && key.chars().all(plain)).then(|| key.to_string())
}

/// The `[table]` header above the error position, without brackets.
fn table_at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let start = span?.start.min(text.len());
    text[..start]
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .map(|l| l.trim().trim_matches(|c| c == '[' || c == ']').to_string())
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    match table_at(text, Some(span)) {
        Some(t) => format!(" (line {line}, in [{t}])"),
        None => format!(" (line {line})"),
    }
}
