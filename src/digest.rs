//! SHA-256 of bytes and of files, in hex: how hone names and checks what it stores (models,
//! adapters, notes, training data).
//!
//! It must not decide what a mismatch means; callers do.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A file that could not be read to the end.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct DigestError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of a file, hex, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String, DigestError> {
    let err = |source| DigestError {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
