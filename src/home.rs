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

    pub fn adapters_dir(&self) -> PathBuf {
        self.root.join("adapters")
    }

    /// Creates the data directory, `models/` and `adapters/` (0700 on Unix), and tightens
    /// them to 0700 when they exist with looser modes (the data directory itself only when it
    /// holds hone's database, so a HONE_HOME pointed at a shared folder is not changed).
    /// A folder that cannot be created is an error; one that cannot be tightened (read-only,
    /// another owner) is left as it is.
    pub fn ensure(&self) -> Result<(), HomeError> {
        let had_db = self.db_path().exists();
        for dir in [self.root.clone(), self.models_dir(), self.adapters_dir()] {
            if dir.is_dir() && (dir != self.root || had_db) {
                tighten(&dir);
            }
            create_private_dir(&dir)?;
        }
        Ok(())
    }
}

/// Removes group and other permissions from `dir` (best effort).
fn tighten(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(dir) {
            let mode = m.permissions().mode();
            if mode & 0o077 != 0 {
                let _ =
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & !0o077));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn folders_are_created_0700_and_loose_ones_tightened() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::at(t.path().join("h"));
        home.ensure().unwrap();
        for d in [
            home.root().to_path_buf(),
            home.models_dir(),
            home.adapters_dir(),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        // An existing data directory with looser modes (as older versions left adapters/).
        std::fs::write(home.db_path(), b"").unwrap();
        for d in [
            home.root().to_path_buf(),
            home.models_dir(),
            home.adapters_dir(),
        ] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        home.ensure().unwrap();
        for d in [
            home.root().to_path_buf(),
            home.models_dir(),
            home.adapters_dir(),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        // A folder that is not hone's (no hone.db) keeps its mode; hone's folders inside it
        // are still private.
        let shared = Home::at(t.path().join("shared"));
        std::fs::create_dir(shared.root()).unwrap();
        std::fs::set_permissions(shared.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
        shared.ensure().unwrap();
        assert_eq!(mode(shared.root()), 0o755);
        assert_eq!(mode(&shared.adapters_dir()), 0o700);
    }
}
