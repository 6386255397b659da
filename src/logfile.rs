//! A log file that rotates by size: `daemon.log` grows to a limit, then becomes `daemon.log.1`
//! (the older ones shift to `.2`, `.3`, …, and the oldest beyond `keep` is removed). Files are
//! created 0600, since log lines may quote the user's notes. A file rotates only at the end
//! of a line. [`RotatingFile`] is a plain
//! `std::io::Write`; wrapped in a `Mutex` it is a `tracing_subscriber` writer.
//!
//! It must NOT decide what is logged or format lines (that is `tracing`), and it never fails a
//! write because rotation failed: it keeps writing to the current file and says so once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The daemon's log file name in the data directory.
pub const DAEMON_LOG: &str = "daemon.log";
/// Default size of one file before it rotates.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 20;
/// Default number of rotated files kept besides the current one.
pub const DEFAULT_KEEP: usize = 4;

/// An append-only file that rotates when it would grow past `max_bytes`.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    len: u64,
    /// Whether the last byte written ended a line: rotation waits for a line's end, so no
    /// line is split across two files.
    at_line_start: bool,
    rotation_failed: bool,
}

impl RotatingFile {
    /// Opens (appending) or creates `path` with mode 0600.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<RotatingFile> {
        let file = open_private(path)?;
        let len = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            len,
            at_line_start: true,
            rotation_failed: false,
        })
    }

    /// The path of the current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name of the `n`th rotated file (`daemon.log.1` is the newest).
    pub fn rotated(path: &Path, n: usize) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(Self::rotated(&self.path, self.keep));
            for n in (1..self.keep).rev() {
                let from = Self::rotated(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, Self::rotated(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, Self::rotated(&self.path, 1))?;
        }
        self.file = open_private(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len > 0 && self.at_line_start && self.len + buf.len() as u64 > self.max_bytes {
            if let Err(e) = self.rotate() {
                if !self.rotation_failed {
                    self.rotation_failed = true;
                    let note = format!(
                        "(cannot rotate {}: {e}; writing on to the same file)\n",
                        self.path.display()
                    );
                    let _ = self.file.write_all(note.as_bytes());
                }
            }
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        if n > 0 {
            self.at_line_start = buf[n - 1] == b'\n';
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn open_private(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    // A file that existed with wider permissions (written by something else) is narrowed.
    let meta = f.metadata()?;
    if meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        for i in 0..10 {
            // 40 bytes a line, written whole (as tracing writes a line): two lines per file.
            f.write_all(format!("{i:039}\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), format!("{:039}\n{:039}\n", 8, 9));
        assert_eq!(
            read(&RotatingFile::rotated(&path, 1)),
            format!("{:039}\n{:039}\n", 6, 7)
        );
        assert_eq!(
            read(&RotatingFile::rotated(&path, 2)),
            format!("{:039}\n{:039}\n", 4, 5)
        );
        assert!(!RotatingFile::rotated(&path, 3).exists());
        for p in [
            path.clone(),
            RotatingFile::rotated(&path, 1),
            RotatingFile::rotated(&path, 2),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        // Reopening appends and counts what is there.
        drop(f);
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        f.write_all(format!("{:039}\n", 10).as_bytes()).unwrap();
        assert!(read(&RotatingFile::rotated(&path, 1)).starts_with(&format!("{:039}", 8)));
        assert_eq!(read(&path), format!("{:039}\n", 10));
        // A line written in pieces is not split: rotation waits for the line's end.
        f.write_all(b"ab").unwrap();
        f.write_all(&[b'c'; 70]).unwrap();
        f.write_all(b"\n").unwrap();
        assert_eq!(read(&path).lines().nth(1).unwrap().len(), 72);
    }

    #[test]
    fn a_wide_existing_file_is_narrowed_and_a_huge_line_still_lands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.log");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut f = RotatingFile::open(&path, 10, 1).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let long = "z".repeat(50);
        f.write_all(long.as_bytes()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), long);
        assert_eq!(
            std::fs::read_to_string(RotatingFile::rotated(&path, 1)).unwrap(),
            "old\n"
        );
    }
}
