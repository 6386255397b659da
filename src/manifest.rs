//! The models hone knows by name: one TOML manifest per model in `models/`, embedded in the
//! binary so it works from any folder. A manifest says where to get the file, its size and
//! sha256, and the model's chat defaults.
//!
//! It must not download anything (that is `pull`) or open model files (that is `gguf`).

use crate::sample::SamplingParams;
use serde::Deserialize;

/// The manifests compiled into the binary.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "smollm2-135m-instruct",
        include_str!("../models/smollm2-135m-instruct.toml"),
    ),
    (
        "qwen2.5-coder-0.5b-instruct",
        include_str!("../models/qwen2.5-coder-0.5b-instruct.toml"),
    ),
    (
        "qwen2.5-coder-1.5b-instruct",
        include_str!("../models/qwen2.5-coder-1.5b-instruct.toml"),
    ),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub architecture: String,
    /// File name inside the data directory's `models/`.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub license: String,
    #[serde(default)]
    pub default: bool,
    pub source: Source,
    pub chat: ChatDefaults,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Only "pypi-wheel" for now: the file (or its parts, concatenated) is inside wheels.
    pub kind: String,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub package: String,
    pub version: String,
    /// Path inside the wheel; a leading "*/" matches any top folder.
    pub member: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatDefaults {
    #[serde(default)]
    pub system: Option<String>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub max_tokens: usize,
    pub context: usize,
}

impl ChatDefaults {
    pub fn sampling(&self, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed,
        }
    }
}

impl Default for ChatDefaults {
    /// For a model registered by path, with no manifest.
    fn default() -> Self {
        Self {
            system: None,
            temperature: 0.2,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.1,
            max_tokens: 256,
            context: 4096,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("embedded manifest {name} is invalid: {source}")]
    Invalid {
        name: String,
        source: toml::de::Error,
    },
    #[error("no embedded manifest is marked default = true")]
    NoDefault,
    #[error("hone does not know a model called {name:?} (known: {known}); to use a GGUF file you have, run `hone pull --file PATH --name NAME`")]
    Unknown { name: String, known: String },
}

/// Every known manifest, in a stable order (the default first).
pub fn all() -> Result<Vec<Manifest>, ManifestError> {
    let mut v = EMBEDDED
        .iter()
        .map(|(name, text)| {
            toml::from_str::<Manifest>(text).map_err(|source| ManifestError::Invalid {
                name: name.to_string(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    v.sort_by_key(|m| !m.default);
    Ok(v)
}

/// The manifest called `name`, if hone knows it.
pub fn find(name: &str) -> Result<Option<Manifest>, ManifestError> {
    Ok(all()?.into_iter().find(|m| m.name == name))
}

/// The known model `hone pull NAME` means: `name`, else the default model.
pub fn named_or_default(name: Option<&str>) -> Result<Manifest, ManifestError> {
    let name = match name {
        Some(n) => n.to_string(),
        None => default_model()?.name,
    };
    find(&name)?.ok_or_else(|| {
        let known: Vec<String> = all()
            .map(|v| v.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        ManifestError::Unknown {
            name,
            known: known.join(", "),
        }
    })
}

/// The default model's manifest.
pub fn default_model() -> Result<Manifest, ManifestError> {
    all()?
        .into_iter()
        .find(|m| m.default)
        .ok_or(ManifestError::NoDefault)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_manifest_parses_and_is_consistent() {
        let all = all().unwrap();
        assert_eq!(all.len(), EMBEDDED.len());
        assert_eq!(all.iter().filter(|m| m.default).count(), 1);
        for m in &all {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m.bytes > 0);
            assert!(!m.source.parts.is_empty());
            assert_eq!(m.source.kind, "pypi-wheel");
            assert!(m.chat.context >= 512);
        }
        assert_eq!(default_model().unwrap().name, "smollm2-135m-instruct");
        assert!(find("qwen2.5-coder-0.5b-instruct").unwrap().is_some());
        assert!(find("nope").unwrap().is_none());
    }
}
