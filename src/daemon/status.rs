//! What the daemon leaves behind: the status file `$HONE_HOME/daemon.status.json` ([`Status`]:
//! phase, since when, why, progress, the last cycle's result; 0600, replaced atomically) for
//! `hone daemon status` and `hone serve`, and the minutes learned per day in the store's settings
//! ([`LEARNED_MINUTES_KEY`]), which the schedule's daily limit reads. Also when the last hone
//! request was ([`last_request`]).
//!
//! It must NOT decide anything (the loop sets the phases, `schedule` decides), run the loop, or
//! print. A status file it cannot parse is an error naming the file; a damaged minutes setting
//! counts as nothing learned.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Local, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::learn::{Phase, Progress};
use crate::presence;
use crate::schedule;
use crate::store::{now_rfc3339, Store};

/// The status file's name in the data directory.
pub const STATUS_FILE: &str = "daemon.status.json";
/// The setting holding the minutes learned today: `{"date":"2025-01-31","minutes":12.5}`.
pub const LEARNED_MINUTES_KEY: &str = "learned_minutes";

/// What the daemon is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonPhase {
    Starting,
    /// The schedule does not allow learning now (the detail says why).
    Waiting,
    /// Learning is allowed, but every note is learned.
    NothingToLearn,
    /// A cycle is starting or resuming; no progress report yet.
    Learning,
    SelfEdits,
    Anchors,
    Training,
    Gate,
    /// The cancel flag is set; the cycle is reaching its checkpoint.
    Pausing,
    /// A cycle was interrupted and waits for the conditions to hold again.
    Paused,
    /// The session limit was reached; the next session may start after a rest.
    Resting,
    /// The last cycle failed; it is tried again after a pause.
    Error,
    Stopping,
    Stopped,
}

impl DaemonPhase {
    pub fn from_learn(p: Phase) -> DaemonPhase {
        match p {
            Phase::Load | Phase::SelfEdits => DaemonPhase::SelfEdits,
            Phase::Anchors => DaemonPhase::Anchors,
            Phase::Training => DaemonPhase::Training,
            Phase::Gate => DaemonPhase::Gate,
        }
    }

    /// Whether a cycle is running in this phase.
    pub fn is_learning(self) -> bool {
        use DaemonPhase::*;
        matches!(
            self,
            Learning | SelfEdits | Anchors | Training | Gate | Pausing
        )
    }

    pub fn as_str(self) -> &'static str {
        use DaemonPhase::*;
        match self {
            Starting => "starting",
            Waiting => "waiting",
            NothingToLearn => "nothing to learn",
            Learning => "learning",
            SelfEdits => "learning: writing self-edits",
            Anchors => "learning: answering anchor questions",
            Training => "learning: training",
            Gate => "learning: testing the new adapter",
            Pausing => "pausing",
            Paused => "paused",
            Resting => "resting",
            Error => "error",
            Stopping => "stopping",
            Stopped => "stopped",
        }
    }
}

/// A progress report, as shown in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    pub done: usize,
    pub total: usize,
    pub tokens_per_s: f64,
    pub peak_rss: u64,
    pub message: String,
}

impl From<&Progress> for ProgressView {
    fn from(p: &Progress) -> Self {
        ProgressView {
            done: p.done,
            total: p.total,
            tokens_per_s: p.tokens_per_s,
            peak_rss: p.peak_rss,
            message: p.message.clone(),
        }
    }
}

/// How the last cycle call ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastResult {
    /// RFC 3339 UTC.
    pub at: String,
    /// `done`, `interrupted`, `nothing_to_learn` or `error`.
    pub outcome: String,
    pub cycle: Option<i64>,
    /// The adapter version the gate activated, if any.
    pub activated: Option<i64>,
    pub message: String,
}

/// How it ended, for people ("cycle 7 done: adapter v3 activated; probes improved"), as the
/// phases say what the daemon does ([`DaemonPhase::as_str`]).
impl fmt::Display for LastResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cycle = self.cycle.unwrap_or_default();
        match self.outcome.as_str() {
            "done" => {
                write!(f, "cycle {cycle} done: ")?;
                match self.activated {
                    Some(v) => write!(f, "adapter v{v} activated; ")?,
                    None => write!(f, "no new adapter; ")?,
                }
                write!(f, "{}", self.message)
            }
            "interrupted" => write!(
                f,
                "cycle {cycle} interrupted; it continues when learning may run again"
            ),
            "nothing_to_learn" => write!(f, "nothing to learn"),
            _ => write!(f, "failed: {}", self.message),
        }
    }
}

/// The daemon's state for `hone daemon status`, kept in [`STATUS_FILE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub started_at: String,
    pub phase: DaemonPhase,
    /// When this phase began (RFC 3339 UTC, milliseconds).
    pub since: String,
    /// Why it waits or paused, or the cycle's progress message.
    pub detail: String,
    /// The interrupted cycle that the next run continues.
    pub cycle: Option<i64>,
    pub progress: Option<ProgressView>,
    /// Minutes of the current learning session.
    pub session_minutes: Option<f64>,
    pub last_result: Option<LastResult>,
    /// Milliseconds from setting the cancel flag to the cycle returning, at the last pause.
    pub last_pause_ms: Option<u64>,
    /// Seconds the last cycle started was estimated to take (`learn::estimate`).
    #[serde(default)]
    pub estimate_s: Option<f64>,
    pub updated_at: String,
}

impl Status {
    pub fn new(pid: u32) -> Status {
        let now = now_rfc3339();
        Status {
            pid,
            started_at: now.clone(),
            phase: DaemonPhase::Starting,
            since: now.clone(),
            detail: String::new(),
            cycle: None,
            progress: None,
            session_minutes: None,
            last_result: None,
            last_pause_ms: None,
            estimate_s: None,
            updated_at: now,
        }
    }
}

/// `$HONE_HOME/daemon.status.json`.
pub fn status_path(home: &Path) -> PathBuf {
    home.join(STATUS_FILE)
}

/// Writes the status file atomically (a 0600 temporary file renamed over it).
pub fn write_status(path: &Path, s: &Status) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = serde_json::to_string_pretty(s).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Reads the status file; `None` when there is none (no daemon ever ran here).
pub fn read_status(path: &Path) -> Result<Option<Status>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    serde_json::from_str(&text).map(Some).with_context(|| {
        format!(
            "{} is not a status file this hone understands; the daemon rewrites it when it runs (delete it if it stays)",
            path.display()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Minutes learned per day and the last request

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LearnedMinutes {
    /// The local day, YYYY-MM-DD.
    date: String,
    minutes: f64,
}

fn learned_on(value: Option<&str>, day: NaiveDate) -> f64 {
    let day = day.format("%Y-%m-%d").to_string();
    value
        .and_then(|v| serde_json::from_str::<LearnedMinutes>(v).ok())
        .filter(|m| m.date == day && m.minutes.is_finite())
        .map_or(0.0, |m| m.minutes.max(0.0))
}

/// Minutes learned on the local day `day` (0 when another day is stored, or nothing).
pub fn learned_minutes(store: &Store, day: NaiveDate) -> Result<f64> {
    Ok(learned_on(
        store.get_setting(LEARNED_MINUTES_KEY)?.as_deref(),
        day,
    ))
}

/// Adds `minutes` to the local day `day`'s total (starting a new total on a new day) and
/// returns it.
pub fn add_learned_minutes(store: &Store, day: NaiveDate, minutes: f64) -> Result<f64> {
    let total = learned_minutes(store, day)? + minutes.max(0.0);
    let v = LearnedMinutes {
        date: day.format("%Y-%m-%d").to_string(),
        minutes: total,
    };
    store.set_setting(LEARNED_MINUTES_KEY, &serde_json::to_string(&v)?)?;
    Ok(total)
}

/// The most recent hone request: the later of the user lock's time (set by every `ask` and
/// `chat` turn when it starts and ends) and the newest recorded exchange.
pub fn last_request(home: &Path, store: &Store) -> Result<Option<DateTime<Local>>> {
    let from_lock = presence::last_request(home).map(DateTime::<Local>::from);
    let from_db = store
        .recent_exchanges(1)?
        .first()
        .and_then(|e| schedule::parse_stored_time(&e.created_at));
    Ok(from_lock.max(from_db))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_minutes_add_up_per_day() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        let d1 = NaiveDate::from_ymd_opt(2025, 1, 31).unwrap();
        let d2 = NaiveDate::from_ymd_opt(2025, 2, 1).unwrap();
        assert_eq!(learned_minutes(&store, d1).unwrap(), 0.0);
        assert_eq!(add_learned_minutes(&store, d1, 1.5).unwrap(), 1.5);
        assert_eq!(add_learned_minutes(&store, d1, 2.0).unwrap(), 3.5);
        assert_eq!(learned_minutes(&store, d1).unwrap(), 3.5);
        // A new day starts from zero.
        assert_eq!(learned_minutes(&store, d2).unwrap(), 0.0);
        assert_eq!(add_learned_minutes(&store, d2, 1.0).unwrap(), 1.0);
        assert_eq!(learned_minutes(&store, d1).unwrap(), 0.0);
        // A damaged setting counts as nothing instead of failing.
        store.set_setting(LEARNED_MINUTES_KEY, "{oops").unwrap();
        assert_eq!(learned_minutes(&store, d2).unwrap(), 0.0);
    }

    #[test]
    fn status_file_round_trip_is_private_and_bad_files_name_themselves() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = status_path(dir.path());
        assert!(read_status(&p).unwrap().is_none());
        let mut s = Status::new(42);
        s.phase = DaemonPhase::Training;
        s.progress = Some(ProgressView {
            done: 1,
            total: 2,
            tokens_per_s: 3.0,
            peak_rss: 4,
            message: "m".into(),
        });
        write_status(&p, &s).unwrap();
        assert_eq!(read_status(&p).unwrap(), Some(s));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"phase\": \"training\""), "{text}");
        std::fs::write(&p, "{").unwrap();
        let e = read_status(&p).unwrap_err().to_string();
        assert!(e.contains(STATUS_FILE) && e.contains("delete it"), "{e}");
    }

    #[test]
    fn a_last_result_says_how_the_cycle_ended() {
        let r = |outcome: &str, activated: Option<i64>| LastResult {
            at: now_rfc3339(),
            outcome: outcome.into(),
            cycle: Some(7),
            activated,
            message: "probes improved".into(),
        };
        assert_eq!(
            r("done", Some(3)).to_string(),
            "cycle 7 done: adapter v3 activated; probes improved"
        );
        assert_eq!(
            r("done", None).to_string(),
            "cycle 7 done: no new adapter; probes improved"
        );
        assert_eq!(
            r("interrupted", None).to_string(),
            "cycle 7 interrupted; it continues when learning may run again"
        );
        assert_eq!(r("nothing_to_learn", None).to_string(), "nothing to learn");
        assert_eq!(r("error", None).to_string(), "failed: probes improved");
    }

    #[test]
    fn last_request_is_the_later_of_the_lock_and_the_exchanges() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        assert_eq!(last_request(dir.path(), &store).unwrap(), None);
        drop(presence::UserRequest::begin(dir.path()));
        let t = last_request(dir.path(), &store).unwrap().unwrap();
        assert!((Local::now() - t).num_seconds().abs() < 5);
    }
}
