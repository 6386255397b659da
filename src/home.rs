//! Where hone keeps its files: the data directory (`HONE_HOME`, else the XDG data directory,
//! e.g. `~/.local/share/hone`), with `models/` and the SQLite database `hone.db` inside.
//!
//! It must not open the database or models; it only names and creates folders (mode 0700,
//! since they hold the user's private notes and conversations).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("no data directory: set HONE_HOME to a folder where hone may keep its files")]
    NoDataDir,
    #[error("cannot create {path}: {source}; set HONE_HOME to a folder you can write")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Home {
    /// `HONE_HOME` if set, else `<XDG data dir>/hone`.
    pub fn from_env() -> Result<Self, HomeError> {
        if let Some(h) = std::env::var_os("HONE_HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::at(PathBuf::from(h)));
        }
        let base = dirs::data_dir().ok_or(HomeError::NoDataDir)?;
        Ok(Self::at(base.join("hone")))
    }

    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join("hone.db")
    }

    /// Creates the data directory and `models/` (0700 on Unix).
    pub fn ensure(&self) -> Result<(), HomeError> {
        for dir in [self.root.clone(), self.models_dir()] {
            create_private_dir(&dir)?;
        }
        Ok(())
    }
}

/// Creates `dir` (and parents) with mode 0700 on Unix.
pub fn create_private_dir(dir: &Path) -> Result<(), HomeError> {
    let err = |source| HomeError::Create {
        path: dir.to_path_buf(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir).map_err(err)
    }
}
