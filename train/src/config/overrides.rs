//! `--set KEY=VALUE` overrides of an experiment config: a dotted TOML key and a TOML value,
//! applied over the resolved config and checked like a config file.

use super::{ConfigError, ExperimentConfig};

/// One override, parsed from `KEY=VALUE` (e.g. `data.noise_limit=250`,
/// `schedule.lr=1e-3`, `data.tokenizer=assets/tokenizer.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigOverride {
    /// The dotted key, as in the TOML file (`training.min_snr_gamma`).
    pub key: Vec<String>,
    /// The value: TOML (`250`, `true`, `"text"`, `[100, 500]`); a bare word that is not
    /// TOML is taken as a string.
    pub value: toml::Value,
}

impl std::str::FromStr for ConfigOverride {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}` is not KEY=VALUE (e.g. data.noise_limit=250)"))?;
        let key: Vec<String> = key
            .trim()
            .split('.')
            .map(|k| k.trim().to_string())
            .collect();
        if key.iter().any(String::is_empty) {
            return Err(format!("`{text}`: the key has an empty part"));
        }
        let value = value.trim();
        let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t
                .remove("v")
                .expect("the table holds the key it was parsed with"),
            Err(_) => toml::Value::String(value.to_string()),
        };
        Ok(Self { key, value })
    }
}

impl ExperimentConfig {
    /// This config with `overrides` applied in order; a key the config does not have, or a
    /// value of the wrong type, is an error naming the key.
    pub fn with_overrides(&self, overrides: &[ConfigOverride]) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let text = toml::to_string(self).expect("an experiment config serialises to TOML");
        let mut root: toml::Table = toml::from_str(&text).expect("its own TOML parses");
        for o in overrides {
            let (last, parents) = o.key.split_last().expect("a key has at least one part");
            let mut table = &mut root;
            for (depth, part) in parents.iter().enumerate() {
                let entry = table
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry.as_table_mut().ok_or_else(|| ConfigError {
                    key: o.key[..=depth].join("."),
                    message: "is a value, not a table".into(),
                })?;
            }
            // `schedule.lr=1` means the float 1.0 where the config holds a float.
            let value = match (table.get(last), &o.value) {
                (Some(toml::Value::Float(_)), toml::Value::Integer(i)) => {
                    toml::Value::Float(*i as f64)
                }
                _ => o.value.clone(),
            };
            table.insert(last.clone(), value);
        }
        let text = toml::to_string(&root).expect("a TOML table serialises");
        Self::from_toml_str(&text)
    }
}
