//! One daemon per data directory, and the service files that start it at login.
//!
//! [`DaemonLock`] holds `$HONE_HOME/daemon.lock` with `flock(LOCK_EX | LOCK_NB)` and writes the
//! holder's pid into it; a second daemon gets [`LockError::Held`] naming that pid. The kernel
//! drops an flock when its process dies, even by SIGKILL, so a crash never leaves a stale lock;
//! the file itself stays (removing it would let two daemons lock two different files).
//!
//! [`unit_files`] writes the text of a systemd user unit and a launchd agent for
//! `hone daemon install`; [`install_paths`] and [`enable_commands`] say where they go and how
//! to turn them on.
//!
//! It must NOT run learning, read the schedule, or run `systemctl`/`launchctl` itself
//! (`daemon::service` hands the commands to the command line to print, or runs them for
//! `--now`); and it never deletes a lock file.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "daemon.lock";
/// The systemd unit's file name.
pub const SYSTEMD_UNIT: &str = "hone.service";
/// The launchd agent's label (and file name without `.plist`).
pub const LAUNCHD_LABEL: &str = "dev.hone.daemon";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another hone daemon is already running for {} (pid {}); stop it first, or give this one another HONE_HOME", home.display(), pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    Held { home: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}: {source}; check that the data directory is on a local disk and writable", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("the path {} cannot go into a service file: {reason}; move hone or the data directory to a plain path", path.display())]
    BadPath { path: PathBuf, reason: &'static str },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process ending in any way) releases it.
#[derive(Debug)]
pub struct DaemonLock {
    file: File,
    path: PathBuf,
}

impl DaemonLock {
    /// Takes the lock of the data directory `home` (which must exist) without waiting.
    pub fn acquire(home: &Path) -> Result<DaemonLock, LockError> {
        let path = home.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // std opens with O_CLOEXEC, so helper programs the daemon starts do not inherit the
        // descriptor (and with it the lock).
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        if !try_flock(&file, libc::LOCK_EX).map_err(io)? {
            return Err(LockError::Held {
                home: home.to_path_buf(),
                pid: read_pid_patiently(&mut file),
            });
        }
        let pid = std::process::id();
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{pid}").map_err(io)?;
        file.flush().map_err(io)?;
        Ok(DaemonLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        // Empty the file first, so nobody reads this pid as a holder's later on. Closing the
        // file releases the lock too; unlocking makes it immediate even if the descriptor was
        // duplicated somewhere.
        let _ = self.file.set_len(0);
        // SAFETY: flock on a descriptor we own.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// The pid of the daemon holding `home`'s lock, or `None` when no daemon runs (for
/// `hone daemon status` and `schedule show`). Never takes the lock for longer than the check.
pub fn holder(home: &Path) -> Result<Option<u32>, LockError> {
    let path = home.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if try_flock(&file, libc::LOCK_SH).map_err(io)? {
        // SAFETY: flock on a descriptor we own.
        unsafe {
            libc::flock(file.as_raw_fd(), libc::LOCK_UN);
        }
        return Ok(None);
    }
    Ok(Some(read_pid_patiently(&mut file).unwrap_or(0)))
}

/// `flock(op | LOCK_NB)`: `Ok(true)` locked, `Ok(false)` held by someone else.
pub(crate) fn try_flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// The pid in the lock file. The holder writes it right after locking, so an empty file is
/// read again a few times before giving up.
fn read_pid_patiently(file: &mut File) -> Option<u32> {
    for _ in 0..10 {
        let mut s = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut s).is_ok() {
            if let Ok(pid) = s.trim().parse::<u32>() {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Service files

/// The service files' text.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitFiles {
    /// `~/.config/systemd/user/hone.service`
    pub systemd_unit: String,
    /// `~/Library/LaunchAgents/dev.hone.daemon.plist`
    pub launchd_plist: String,
}

/// Where the service files go.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallPaths {
    pub systemd_unit: PathBuf,
    pub launchd_plist: PathBuf,
}

/// The service manager of this OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceManager {
    Systemd,
    Launchd,
}

impl ServiceManager {
    /// launchd on macOS, systemd elsewhere.
    pub fn for_this_os() -> ServiceManager {
        if cfg!(target_os = "macos") {
            ServiceManager::Launchd
        } else {
            ServiceManager::Systemd
        }
    }
}

/// The service files that run `exe daemon run` with `HONE_HOME=home` at CPU priority `nice`.
/// Both paths must be absolute, valid UTF-8 and free of control characters.
pub fn unit_files(exe: &Path, home: &Path, nice: i32) -> Result<UnitFiles, UnitError> {
    let exe_s = plain_path(exe)?;
    let home_s = plain_path(home)?;
    let nice = nice.clamp(-20, 19);
    let systemd_unit = format!(
        "# Written by `hone daemon install`; remove with `hone daemon uninstall`.\n\
[Unit]\n\
Description=hone: learn from your notes while the device is idle\n\
\n\
[Service]\n\
Type=simple\n\
ExecStart={exec} daemon run\n\
Environment={env}\n\
Nice={nice}\n\
IOSchedulingClass=idle\n\
Restart=on-failure\n\
RestartSec=30\n\
KillSignal=SIGTERM\n\
TimeoutStopSec=20\n\
\n\
[Install]\n\
WantedBy=default.target\n",
        exec = systemd_quote(exe_s, true),
        env = systemd_quote(&format!("HONE_HOME={home_s}"), false),
    );
    let log = |name: &str| xml_escape(&home.join(name).to_string_lossy());
    let launchd_plist = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Written by `hone daemon install`; remove with `hone daemon uninstall`. -->
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{label}</string>
  <key>ProgramArguments</key>
  <array>
    <string>{exe}</string>
    <string>daemon</string>
    <string>run</string>
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>HONE_HOME</key>
    <string>{home}</string>
  </dict>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>ThrottleInterval</key>
  <integer>30</integer>
  <key>ProcessType</key>
  <string>Background</string>
  <key>LowPriorityIO</key>
  <true/>
  <key>Nice</key>
  <integer>{nice}</integer>
  <key>StandardErrorPath</key>
  <string>{stderr}</string>
</dict>
</plist>
"#,
        label = LAUNCHD_LABEL,
        exe = xml_escape(exe_s),
        home = xml_escape(home_s),
        stderr = log("daemon.stderr.log"),
    );
    Ok(UnitFiles {
        systemd_unit,
        launchd_plist,
    })
}

/// Where the files go for a user whose home folder is `user_home`; `xdg_config_home` is
/// `$XDG_CONFIG_HOME` if set (systemd looks there first).
pub fn install_paths(user_home: &Path, xdg_config_home: Option<&Path>) -> InstallPaths {
    let config = xdg_config_home
        .filter(|p| p.is_absolute())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| user_home.join(".config"));
    InstallPaths {
        systemd_unit: config.join("systemd/user").join(SYSTEMD_UNIT),
        launchd_plist: user_home
            .join("Library/LaunchAgents")
            .join(format!("{LAUNCHD_LABEL}.plist")),
    }
}

/// The commands that start the installed service now and at every login (`uid` for launchd's
/// `gui/UID` domain). Printed by `hone daemon install`.
pub fn enable_commands(m: ServiceManager, paths: &InstallPaths, uid: u32) -> Vec<String> {
    match m {
        ServiceManager::Systemd => vec![
            "systemctl --user daemon-reload".into(),
            format!("systemctl --user enable --now {SYSTEMD_UNIT}"),
            "# optional, to keep learning while you are logged out:".into(),
            "loginctl enable-linger \"$USER\"".into(),
        ],
        ServiceManager::Launchd => vec![format!(
            "launchctl bootstrap gui/{uid} {}",
            shell_quote(&paths.launchd_plist.to_string_lossy())
        )],
    }
}

/// The commands that stop the service and keep it from starting again (before the file is
/// removed by `hone daemon uninstall`).
pub fn disable_commands(m: ServiceManager, uid: u32) -> Vec<String> {
    match m {
        ServiceManager::Systemd => vec![
            format!("systemctl --user disable --now {SYSTEMD_UNIT}"),
            "systemctl --user daemon-reload".into(),
        ],
        ServiceManager::Launchd => vec![format!("launchctl bootout gui/{uid}/{LAUNCHD_LABEL}")],
    }
}

/// Writes a service file (creating its folder), replacing it atomically.
pub fn write_unit(path: &Path, text: &str) -> Result<(), UnitError> {
    let err = |source| UnitError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp-hone");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Removes a service file; `Ok(false)` if it was not there.
pub fn remove_unit(path: &Path) -> Result<bool, UnitError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(UnitError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn plain_path(p: &Path) -> Result<&str, UnitError> {
    let bad = |reason| UnitError::BadPath {
        path: p.to_path_buf(),
        reason,
    };
    let s = p.to_str().ok_or_else(|| bad("it is not valid UTF-8"))?;
    if !p.is_absolute() {
        return Err(bad("it is not absolute"));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("it contains a control character"));
    }
    Ok(s)
}

/// Quotes a systemd unit value: double quotes with `\` and `"` escaped, `%` doubled
/// (specifiers), and for command lines `$` doubled (variable expansion).
fn systemd_quote(s: &str, command: bool) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '%' => out.push_str("%%"),
            '$' if command => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};

    /// Runs in a child process (started by the test below): takes the lock named by
    /// HONE_LOCK_CHILD, says so on stdout, and waits to be killed.
    #[test]
    fn lock_holder_child() {
        let Some(home) = std::env::var_os("HONE_LOCK_CHILD") else {
            return;
        };
        let lock = DaemonLock::acquire(Path::new(&home)).unwrap();
        println!("LOCKED {}", std::process::id());
        std::thread::sleep(Duration::from_secs(120));
        drop(lock);
    }

    #[test]
    fn second_lock_names_the_holder_and_sigkill_releases_it() {
        let home = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "daemon_lock::tests::lock_holder_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HONE_LOCK_CHILD", home.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        /// Kills the child if an assertion fails before the test does.
        struct KillOnDrop(std::process::Child);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut child = KillOnDrop(child);
        let mut locked = false;
        for line in stdout.lines() {
            let line = line.unwrap();
            // libtest may print "test … ... " before it on the same line.
            if let Some(pid) = line.split("LOCKED ").nth(1) {
                assert_eq!(pid.trim().parse::<u32>().unwrap(), child.0.id());
                locked = true;
                break;
            }
        }
        assert!(locked, "the child never took the lock");

        let err = DaemonLock::acquire(home.path()).unwrap_err();
        match &err {
            LockError::Held { pid, .. } => assert_eq!(*pid, Some(child.0.id())),
            e => panic!("unexpected {e}"),
        }
        assert!(
            err.to_string().contains(&format!("pid {}", child.0.id())),
            "{err}"
        );
        assert_eq!(holder(home.path()).unwrap(), Some(child.0.id()));

        // SIGKILL: no destructor runs, the kernel drops the flock.
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        assert_eq!(holder(home.path()).unwrap(), None);
        let lock = DaemonLock::acquire(home.path()).unwrap();
        let text = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
    }

    #[test]
    fn lock_in_process_and_release_on_drop() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(holder(home.path()).unwrap(), None);
        let lock = DaemonLock::acquire(home.path()).unwrap();
        // A second open file description in the same process conflicts too.
        assert!(matches!(
            DaemonLock::acquire(home.path()),
            Err(LockError::Held { pid: Some(p), .. }) if p == std::process::id()
        ));
        assert_eq!(holder(home.path()).unwrap(), Some(std::process::id()));
        drop(lock);
        assert_eq!(holder(home.path()).unwrap(), None);
        let again = DaemonLock::acquire(home.path()).unwrap();
        assert!(again.path().ends_with(LOCK_FILE));
        // The file stays after release, emptied.
        drop(again);
        let left = std::fs::read_to_string(home.path().join(LOCK_FILE)).unwrap();
        assert_eq!(left, "");
        // A data directory that does not exist is an I/O error, not a panic.
        assert!(matches!(
            DaemonLock::acquire(&home.path().join("missing")),
            Err(LockError::Io { .. })
        ));
    }

    #[test]
    fn unit_files_name_the_exe_and_home() {
        let u = unit_files(
            Path::new("/usr/local/bin/hone"),
            Path::new("/home/ada/.local/share/hone"),
            10,
        )
        .unwrap();
        let s = &u.systemd_unit;
        assert!(
            s.contains("ExecStart=\"/usr/local/bin/hone\" daemon run\n"),
            "{s}"
        );
        assert!(
            s.contains("Environment=\"HONE_HOME=/home/ada/.local/share/hone\"\n"),
            "{s}"
        );
        assert!(
            s.contains("Nice=10\n") && s.contains("Restart=on-failure\n"),
            "{s}"
        );
        assert!(s.contains("WantedBy=default.target"), "{s}");
        let p = &u.launchd_plist;
        assert!(p.contains("<string>/usr/local/bin/hone</string>"), "{p}");
        assert!(
            p.contains("<key>HONE_HOME</key>\n    <string>/home/ada/.local/share/hone</string>"),
            "{p}"
        );
        for key in ["KeepAlive", "LowPriorityIO", "ProcessType", "RunAtLoad"] {
            assert!(p.contains(&format!("<key>{key}</key>")), "{key}");
        }
        assert!(p.contains("<string>Background</string>"));
        assert!(p.contains("<integer>10</integer>"));
    }

    #[test]
    fn awkward_paths_are_quoted_or_refused() {
        let u = unit_files(
            Path::new("/opt/my apps/100% \"hone\"/hone$1"),
            Path::new("/data/a&b <c>"),
            5,
        )
        .unwrap();
        assert!(
            u.systemd_unit
                .contains(r#"ExecStart="/opt/my apps/100%% \"hone\"/hone$$1" daemon run"#),
            "{}",
            u.systemd_unit
        );
        assert!(u
            .systemd_unit
            .contains(r#"Environment="HONE_HOME=/data/a&b <c>""#));
        assert!(u
            .launchd_plist
            .contains("<string>/data/a&amp;b &lt;c&gt;</string>"));
        assert!(unit_files(Path::new("relative/hone"), Path::new("/h"), 0).is_err());
        assert!(unit_files(
            Path::new("/bin/hone"),
            Path::new("/h\nExecStart=/bin/sh"),
            0
        )
        .is_err());
    }

    #[test]
    fn paths_commands_and_writing() {
        let p = install_paths(Path::new("/home/ada"), None);
        assert_eq!(
            p.systemd_unit,
            Path::new("/home/ada/.config/systemd/user/hone.service")
        );
        assert_eq!(
            p.launchd_plist,
            Path::new("/home/ada/Library/LaunchAgents/dev.hone.daemon.plist")
        );
        let x = install_paths(Path::new("/home/ada"), Some(Path::new("/cfg")));
        assert_eq!(x.systemd_unit, Path::new("/cfg/systemd/user/hone.service"));
        let on = enable_commands(ServiceManager::Systemd, &p, 1000);
        assert!(on.contains(&"systemctl --user enable --now hone.service".to_string()));
        let on = enable_commands(ServiceManager::Launchd, &p, 501);
        assert_eq!(
            on,
            vec![
                "launchctl bootstrap gui/501 /home/ada/Library/LaunchAgents/dev.hone.daemon.plist"
            ]
        );
        assert_eq!(
            disable_commands(ServiceManager::Launchd, 501),
            vec!["launchctl bootout gui/501/dev.hone.daemon"]
        );
        assert!(disable_commands(ServiceManager::Systemd, 0)[0].contains("disable --now"));

        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/hone.service");
        write_unit(&target, "x").unwrap();
        write_unit(&target, "y").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "y");
        assert!(remove_unit(&target).unwrap());
        assert!(!remove_unit(&target).unwrap());
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}
