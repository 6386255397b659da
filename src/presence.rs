//! A user request (`hone ask`, `hone chat`) announces itself so background learning yields at
//! once, and the daemon can tell that a request is running and when the last one ended.
//!
//! The mechanism: for its whole duration a request holds a *shared* `flock` on
//! `$HONE_HOME/user.lock` ([`UserRequest::begin`]) and sends `SIGUSR1` to the daemon named by
//! `daemon_lock::holder`. The daemon's watcher ([`UserWatch::active`]) tries to take that file
//! *exclusively* without waiting, every ~100 ms: when it cannot, a request is running. Shared
//! locks do not conflict with each other, so any number of requests run at once; the kernel
//! drops a lock when its process dies, so a crashed request never keeps learning paused. The
//! request touches the file's modification time when it starts and ends, which is the "last
//! request" the idle threshold counts from ([`last_request`]).
//!
//! It must NOT block a request: every step is non-blocking and best effort (a request whose
//! announcement fails still runs; the failure is logged). It does not decide whether learning
//! may run (`schedule`) or stop anything itself (the daemon does).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::daemon_lock::{self, try_flock};

/// The file requests hold a shared lock on, inside the data directory.
pub const USER_LOCK_FILE: &str = "user.lock";

/// A running user request; dropping it (or the process ending) ends the announcement.
#[derive(Debug)]
pub struct UserRequest {
    file: Option<File>,
    /// Whether the daemon was sent SIGUSR1 (for tests and logs).
    pub signalled: Option<u32>,
}

impl UserRequest {
    /// Announces a request in the data directory `home`: takes the shared lock (retrying for at
    /// most ~20 ms while the daemon's momentary exclusive probe holds it) and signals the daemon
    /// if one runs. Never waits longer than that and never fails.
    pub fn begin(home: &Path) -> UserRequest {
        let path = home.join(USER_LOCK_FILE);
        let file = match open(&path, true) {
            Ok(f) => {
                let mut locked = false;
                for _ in 0..20 {
                    match try_flock(&f, libc::LOCK_SH) {
                        Ok(true) => {
                            locked = true;
                            break;
                        }
                        Ok(false) => std::thread::sleep(Duration::from_millis(1)),
                        Err(e) => {
                            tracing::warn!("cannot lock {}: {e}", path.display());
                            break;
                        }
                    }
                }
                if locked {
                    touch(&f, &path);
                    Some(f)
                } else {
                    None
                }
            }
            Err(e) => {
                tracing::warn!(
                    "cannot open {}: {e}; background learning will notice this request later",
                    path.display()
                );
                None
            }
        };
        let signalled = signal_daemon(home);
        UserRequest { file, signalled }
    }

    /// Whether the shared lock is held (false when the file could not be opened or locked).
    pub fn is_announced(&self) -> bool {
        self.file.is_some()
    }
}

impl Drop for UserRequest {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            // The end of this request is the new "last request".
            let _ = f.set_modified(SystemTime::now());
            // SAFETY: flock on a descriptor we own.
            unsafe {
                libc::flock(f.as_raw_fd(), libc::LOCK_UN);
            }
        }
    }
}

/// Sends SIGUSR1 to the daemon of `home`, if one holds the daemon lock; returns its pid.
fn signal_daemon(home: &Path) -> Option<u32> {
    let pid = match daemon_lock::holder(home) {
        Ok(Some(pid)) => pid,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!("no daemon to tell: {e}");
            return None;
        }
    };
    // 0 means "pid unreadable"; kill(0) would signal our own process group.
    let raw = libc::pid_t::try_from(pid).ok().filter(|&p| p > 0)?;
    // SAFETY: kill takes no pointers. The pid is the live holder of the daemon lock (the kernel
    // drops the lock when that process dies, and the holder writes its own pid).
    let rc = unsafe { libc::kill(raw, libc::SIGUSR1) };
    if rc != 0 {
        tracing::debug!(
            "could not signal the daemon (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(pid)
}

/// The daemon's side: tells whether a request holds the user lock right now.
#[derive(Debug)]
pub struct UserWatch {
    path: PathBuf,
    file: Option<File>,
}

impl UserWatch {
    /// Watches `home`'s user lock. The file is opened lazily (it is created by the first
    /// request, so the daemon starting does not count as a request).
    pub fn new(home: &Path) -> UserWatch {
        UserWatch {
            path: home.join(USER_LOCK_FILE),
            file: None,
        }
    }

    /// Whether a request holds the lock: tries to take it exclusively without waiting and
    /// releases it at once. Unreadable or missing file → false.
    pub fn active(&mut self) -> bool {
        if self.file.is_none() {
            self.file = open(&self.path, false).ok();
        }
        let Some(f) = &self.file else {
            return false;
        };
        match try_flock(f, libc::LOCK_EX) {
            Ok(true) => {
                // SAFETY: flock on a descriptor we own.
                unsafe {
                    libc::flock(f.as_raw_fd(), libc::LOCK_UN);
                }
                false
            }
            Ok(false) => true,
            Err(_) => false,
        }
    }
}

/// When the last request started or ended (the user lock's modification time), if any.
pub fn last_request(home: &Path) -> Option<SystemTime> {
    std::fs::metadata(home.join(USER_LOCK_FILE))
        .and_then(|m| m.modified())
        .ok()
}

fn open(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

fn touch(f: &File, path: &Path) {
    if let Err(e) = f.set_modified(SystemTime::now()) {
        tracing::debug!("cannot touch {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_request_is_seen_while_it_runs_and_dates_the_last_request() {
        let home = tempfile::tempdir().unwrap();
        let mut watch = UserWatch::new(home.path());
        // Nothing yet: no file, no request, no last request; the watcher creates nothing.
        assert!(!watch.active());
        assert!(last_request(home.path()).is_none());
        assert!(!home.path().join(USER_LOCK_FILE).exists());

        let before = SystemTime::now() - Duration::from_secs(1);
        let r = UserRequest::begin(home.path());
        assert!(r.is_announced());
        assert_eq!(r.signalled, None, "no daemon runs");
        assert!(watch.active());
        // Two requests at once: both get the shared lock.
        let r2 = UserRequest::begin(home.path());
        assert!(r2.is_announced());
        drop(r);
        assert!(watch.active(), "the second request still runs");
        drop(r2);
        assert!(!watch.active());
        let last = last_request(home.path()).unwrap();
        assert!(last >= before, "{last:?}");
        let mode = std::fs::metadata(home.path().join(USER_LOCK_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_missing_data_directory_does_not_stop_the_request() {
        let home = tempfile::tempdir().unwrap();
        let r = UserRequest::begin(&home.path().join("missing"));
        assert!(!r.is_announced());
        let mut w = UserWatch::new(&home.path().join("missing"));
        assert!(!w.active());
    }
}
