//! Finds the model file a command should use: a name from the embedded manifests (pulled into
//! the data directory), a model the user registered by path (`hone pull --file`), or a path to
//! a `.gguf` file given directly.
//!
//! It must not download or load anything; it answers "which file, under which name".

use crate::home::Home;
use crate::manifest::{self, ChatDefaults, Manifest};
use crate::store::Store;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model {name} is not pulled yet; run `hone pull {name}` (it downloads {size})")]
    NotPulled { name: String, size: String },
    #[error("no model called {name:?}; known models: {known}; or register a GGUF file with `hone pull --file PATH --name NAME`")]
    Unknown { name: String, known: String },
    #[error("model {name} was registered from {path}, which is gone; register it again with `hone pull --file PATH --name {name}`")]
    Missing { name: String, path: PathBuf },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A model chosen for a command.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    pub name: String,
    pub path: PathBuf,
    pub manifest: Option<Manifest>,
}

impl ModelChoice {
    pub fn chat_defaults(&self) -> ChatDefaults {
        self.manifest
            .as_ref()
            .map(|m| m.chat.clone())
            .unwrap_or_default()
    }
}

/// The setting that names the default model, when the user changed it.
pub const DEFAULT_MODEL_KEY: &str = "default_model";

/// Makes `name` the default model (`hone pull --default`).
pub fn set_default(store: &Store, name: &str) -> Result<(), crate::store::StoreError> {
    store.set_setting(DEFAULT_MODEL_KEY, name)
}

/// Resolves a teacher model when one is named (`--teacher`); the error names it.
pub fn resolve_teacher(
    home: &Home,
    store: &Store,
    teacher: Option<&str>,
) -> anyhow::Result<Option<ModelChoice>> {
    use anyhow::Context;
    teacher
        .map(|t| resolve(home, store, Some(t)).with_context(|| format!("the teacher model {t:?}")))
        .transpose()
}

/// Resolves `requested` (or the default model) to a file.
pub fn resolve(
    home: &Home,
    store: &Store,
    requested: Option<&str>,
) -> Result<ModelChoice, RegistryError> {
    let name = match requested {
        Some(n) => n.to_string(),
        None => match store.get_setting(DEFAULT_MODEL_KEY)? {
            Some(n) => n,
            None => manifest::default_model()?.name,
        },
    };
    let as_path = Path::new(&name);
    if name.ends_with(".gguf") || as_path.is_file() {
        let stem = as_path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| name.clone());
        // A path may be one of ours: keep its manifest's chat defaults.
        let manifest = manifest::all()?.into_iter().find(|m| {
            as_path
                .file_name()
                .map(|f| f.to_string_lossy() == m.file)
                .unwrap_or(false)
        });
        return Ok(ModelChoice {
            name: manifest.as_ref().map(|m| m.name.clone()).unwrap_or(stem),
            path: as_path.to_path_buf(),
            manifest,
        });
    }
    if let Some(r) = store.registered_model(&name)? {
        let path = PathBuf::from(&r.path);
        if !path.is_file() {
            return Err(RegistryError::Missing { name, path });
        }
        return Ok(ModelChoice {
            name,
            path,
            manifest: None,
        });
    }
    match manifest::find(&name)? {
        Some(m) => {
            let path = crate::pull::model_path(home, &m);
            if !path.is_file() {
                return Err(RegistryError::NotPulled {
                    name,
                    size: crate::sys::human_bytes(m.bytes),
                });
            }
            Ok(ModelChoice {
                name,
                path,
                manifest: Some(m),
            })
        }
        None => {
            let mut known: Vec<String> = manifest::all()?.into_iter().map(|m| m.name).collect();
            known.extend(store.registered_models()?.into_iter().map(|r| r.name));
            Err(RegistryError::Unknown {
                name,
                known: known.join(", "),
            })
        }
    }
}

/// Why a file cannot be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("{path} has no tokenizer hone can use: {source}")]
    Tokenizer {
        path: PathBuf,
        source: crate::tokenizer::TokenizerError,
    },
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Registers a GGUF file the user has under `name` (`hone pull --file PATH --name NAME`): it
/// must open, be of an architecture hone runs and carry a tokenizer; it is hashed once
/// (`on_hashing` is told first: hashing a large file takes a while).
pub fn register_file(
    store: &Store,
    file: &Path,
    name: &str,
    on_hashing: &mut dyn FnMut(&Path),
) -> Result<crate::store::RegisteredModel, RegisterError> {
    let path = std::fs::canonicalize(file).map_err(|source| RegisterError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let gguf = crate::gguf::GgufFile::open(&path)?;
    let arch = gguf.require_supported()?;
    crate::tokenizer::Tokenizer::from_gguf(&gguf).map_err(|source| RegisterError::Tokenizer {
        path: path.clone(),
        source,
    })?;
    on_hashing(&path);
    let r = crate::store::RegisteredModel {
        name: name.to_string(),
        path: path.display().to_string(),
        architecture: arch,
        sha256: Some(crate::digest::sha256_file(&path)?),
        bytes: gguf.file_size(),
        registered_at: crate::store::now_rfc3339(),
    };
    store.register_model(&r)?;
    Ok(r)
}
