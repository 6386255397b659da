//! What `hone daemon status` shows, gathered in one call ([`report`]): whether a daemon holds
//! the lock, its status file, the schedule's decision now (with a fresh CPU reading), the
//! minutes learned today, the notes waiting, and where the log is.
//!
//! It renders the report as the text the command line prints (`Display`) and as the JSON
//! object for scripts ([`Report::to_json`]). It must NOT print, change anything, or take longer
//! than the CPU reading's 300 ms.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value};

use super::status::{learned_minutes, read_status, status_path, Status};
use super::system::decision_measured;
use crate::daemon_lock;
use crate::device;
use crate::home::Home;
use crate::logfile;
use crate::schedule::{Decision, Schedule};
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

impl std::fmt::Display for Report {
    /// `hone daemon status`: whether a daemon runs and what it does, the last cycle and pause,
    /// the minutes learned today, the notes waiting, the estimate, the log, and the decision.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (st, schedule) = (self.status.as_ref(), &self.schedule);
        let (learned, pending) = (self.learned_today_minutes, self.pending_notes);
        match (self.pid, self.current()) {
            (Some(pid), Some(s)) => {
                let since = local_time(&s.started_at);
                writeln!(f, "daemon          running (pid {pid}, since {since})")?;
                write_doing(f, s)?;
            }
            (Some(pid), None) => writeln!(f, "daemon          running (pid {pid}), starting up")?,
            (None, _) => writeln!(
                f,
                "daemon          not running (start it with `hone daemon run`, or `hone daemon install` to start it at login)"
            )?,
        }
        if let Some(r) = st.and_then(|s| s.last_result.as_ref()) {
            writeln!(f, "last cycle      {r} ({})", local_time(&r.at))?;
        }
        if let Some(ms) = st.and_then(|s| s.last_pause_ms) {
            writeln!(
                f,
                "last pause      the cycle stopped {ms} ms after it was asked to"
            )?;
        }
        if schedule.max_minutes_per_day > 0 {
            let max = schedule.max_minutes_per_day;
            writeln!(f, "learned today   {learned:.0} of {max} min")?;
        } else {
            writeln!(f, "learned today   {learned:.0} min (no daily limit)")?;
        }
        writeln!(f, "notes waiting   {pending}")?;
        if let Some(e) = st.and_then(|s| s.estimate_s) {
            writeln!(
                f,
                "cycle estimate  about {:.1} min, measured on this machine when the last cycle started (`hone learn --estimate` measures now)",
                e / 60.0
            )?;
        }
        writeln!(f, "log             {}", self.log.display())?;
        writeln!(f)?;
        writeln!(f, "{:#}", self.decision)
    }
}

/// The running daemon's phase line (and, when paused, which cycle continues later).
fn write_doing(f: &mut std::fmt::Formatter<'_>, s: &Status) -> std::fmt::Result {
    let mut line = format!("doing           {}", s.phase.as_str());
    if let Some(p) = s.progress.as_ref().filter(|_| s.phase.is_learning()) {
        if p.total > 0 {
            line.push_str(&format!(" ({}/{})", p.done, p.total));
        }
    }
    if !s.detail.is_empty() {
        line.push_str(&format!(" — {}", s.detail));
    }
    line.push_str(&format!(" (since {})", local_time(&s.since)));
    writeln!(f, "{line}")?;
    if s.phase == super::DaemonPhase::Paused {
        if let Some(c) = s.cycle {
            writeln!(
                f,
                "                cycle {c} continues from its checkpoint when learning may run again"
            )?;
        }
    }
    Ok(())
}

/// A stored RFC 3339 time in local time, to the second (as stored when it does not parse).
fn local_time(rfc3339: &str) -> String {
    crate::schedule::parse_stored_time(rfc3339)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| rfc3339.to_string())
}

/// Gathers the [`Report`] for the data directory `home`, with the device profile `device`
/// (else the detected one).
pub fn report(home: &Home, device: Option<&str>) -> Result<Report> {
    let store = Store::open(&home.db_path())?;
    let pid = daemon_lock::holder(home.root())?;
    let status = read_status(&status_path(home.root()))?;
    let (profile, _) = device::for_home(home.root(), device)?;
    let (schedule, decision) = decision_measured(home.root(), &store, &profile)?;
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
