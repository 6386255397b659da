//! What `hone daemon status` shows, gathered in one call ([`report`]): whether a daemon holds
//! the lock, its status file, the schedule's decision now (with a fresh CPU reading), the
//! minutes learned today, the notes waiting, and where the log is.
//!
//! It must NOT print or format anything for the terminal (the command line does; this gives
//! the data, and the JSON object for scripts), change anything, or take longer than the CPU
//! reading's 300 ms.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use super::status::{learned_minutes, read_status, status_path, Status};
use super::system::decision_now;
use crate::daemon_lock;
use crate::device;
use crate::home::Home;
use crate::logfile;
use crate::schedule::{Decision, Schedule};
use crate::signals;
use crate::store::Store;

/// The daemon and the schedule, now.
#[derive(Debug, Clone)]
pub struct Report {
    /// The pid of the daemon holding the lock, if one runs.
    pub pid: Option<u32>,
    /// The status file, whichever daemon wrote it last.
    pub status: Option<Status>,
    /// The schedule as the daemon applies it (the device profile's defaults filled in).
    pub schedule: Schedule,
    /// Whether learning may run now, and why not.
    pub decision: Decision,
    pub learned_today_minutes: f64,
    pub pending_notes: usize,
    /// The daemon's log file.
    pub log: PathBuf,
}

impl Report {
    /// The status file if it is the running daemon's (it carries its pid).
    pub fn current(&self) -> Option<&Status> {
        self.status.as_ref().filter(|s| Some(s.pid) == self.pid)
    }

    /// The report as one JSON object (`hone daemon status --json`): the status file under
    /// `status` if it is the running daemon's, else under `last_status`.
    pub fn to_json(&self) -> Value {
        let current = self.current();
        json!({
            "running": self.pid.is_some(),
            "pid": self.pid,
            "status": current,
            "last_status": if current.is_none() { self.status.as_ref() } else { None },
            "pending_notes": self.pending_notes,
            "learned_today_minutes": self.learned_today_minutes,
            "max_minutes_per_day": self.schedule.max_minutes_per_day,
            "decision": self.decision,
            "log": self.log,
        })
    }
}

/// Gathers the [`Report`] for the data directory `home`, with the device profile `device`
/// (else the detected one).
pub fn report(home: &Home, device: Option<&str>) -> Result<Report> {
    let store = Store::open(&home.db_path())?;
    let pid = daemon_lock::holder(home.root())?;
    let status = read_status(&status_path(home.root()))?;
    let (profile, _) = device::resolve(
        Path::new("/"),
        device,
        Some(&device::override_path(home.root())),
    )?;
    let probe = signals::system_probe();
    // Two readings 300 ms apart: CPU load from /proc/stat deltas, not the 1-minute average.
    probe.cpu_load();
    std::thread::sleep(Duration::from_millis(300));
    let (schedule, decision) = decision_now(home.root(), &store, &profile, probe.as_ref())?;
    let today = chrono::Local::now().date_naive();
    let learned_today_minutes = learned_minutes(&store, today)?;
    let pending_notes = crate::learn::pending_notes(&store)?;
    Ok(Report {
        pid,
        status,
        schedule,
        decision,
        learned_today_minutes,
        pending_notes,
        log: home.root().join(logfile::DAEMON_LOG),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::write_status;

    #[test]
    fn a_status_file_is_current_only_with_the_running_daemons_pid() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().to_path_buf());
        home.ensure().unwrap();
        let r = report(&home, None).unwrap();
        assert_eq!((r.pid, r.status.is_none()), (None, true));
        assert_eq!(r.pending_notes, 0);
        assert_eq!(r.log, dir.path().join(logfile::DAEMON_LOG));
        write_status(&status_path(dir.path()), &Status::new(4242)).unwrap();
        let mut r = report(&home, None).unwrap();
        assert_eq!(r.status.as_ref().map(|s| s.pid), Some(4242));
        assert!(r.current().is_none(), "no daemon holds the lock");
        let j = r.to_json();
        assert_eq!(
            (j["running"].as_bool(), j["pid"].is_null()),
            (Some(false), true)
        );
        assert!(
            j["status"].is_null() && j["last_status"]["pid"] == 4242,
            "{j}"
        );
        r.pid = Some(4242);
        assert!(r.current().is_some());
        let j = r.to_json();
        assert!(
            j["last_status"].is_null() && j["status"]["pid"] == 4242,
            "{j}"
        );
    }
}
