//! The background learner behind `hone daemon run`: it waits until the schedule allows
//! learning and there are notes not yet learned, runs the learning cycle on a worker thread,
//! and stops it — within a second — as soon as a user request arrives, a condition stops
//! holding, or the session's or day's minutes are used up. An interrupted cycle keeps its state
//! (the cycle checkpoints), and the next run continues it once the conditions hold again.
//!
//! The loop ([`run_loop`]) sees the world only through two traits, so tests drive it with real
//! threads and a real cancel flag but fake conditions and a fake cycle:
//! [`Surroundings`] (stop signal, user requests, `schedule::decide`, pending notes, minutes
//! learned, status reports) and [`CycleRunner`] (one call of `learn::run_cycle`).
//! [`SystemSurroundings`] and [`LearnRunner`] are the real ones; [`run`] puts them together
//! with the one-daemon lock, nice, threads and signal handlers.
//!
//! What it leaves behind for `hone daemon status`: `$HONE_HOME/daemon.status.json` (0600,
//! replaced atomically: phase, since when, why, progress, the last cycle's result), and the
//! minutes learned per day in the store's settings ([`LEARNED_MINUTES_KEY`]), which the
//! schedule's daily limit reads.
//!
//! Test hooks (hidden flags of `hone daemon run`): `--ignore-idle` drops the idle threshold
//! after a request (requests still preempt learning), `--ignore-condition NAME,…` drops other
//! schedule conditions (e.g. `cpu_load` on a busy test machine), `--check-every-ms` sets how
//! often the conditions are read while waiting.
//!
//! It must NOT train or write self-edits itself (that is `learn`), decide the policy (that is
//! `schedule`; this module only acts on its decision), print to the terminal, or run
//! `systemctl`/`launchctl`. It never keeps running a cycle after a stop request, and never
//! leaves without letting the cycle reach its checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Local, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::daemon_lock::DaemonLock;
use crate::device::{self, Profile};
use crate::home::Home;
use crate::interrupt::{self, StopFlags};
use crate::learn::{self, CycleOutcome, LearnOptions, Phase, Progress};
use crate::presence::{self, UserWatch};
use crate::schedule::{self, Condition, Schedule};
use crate::signals::{self, Clock as _, SystemClock, SystemProbe};
use crate::store::{now_rfc3339, Store};

/// The status file's name in the data directory.
pub const STATUS_FILE: &str = "daemon.status.json";
/// The setting holding the minutes learned today: `{"date":"2025-01-31","minutes":12.5}`.
pub const LEARNED_MINUTES_KEY: &str = "learned_minutes";

// ---------------------------------------------------------------------------------------------
// Status

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

// ---------------------------------------------------------------------------------------------
// The loop

/// How often the loop looks at things.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// How often the stop flag and user requests are looked at (the user lock is one `flock`).
    pub tick: Duration,
    /// How often the schedule's conditions and the notes are read while nothing runs.
    pub check_every: Duration,
    /// How often the conditions are read while a cycle runs (a failing one stops it).
    pub check_every_running: Duration,
    /// After a session reached its limit, how long before the next may start.
    pub rest_after_session: Duration,
    /// After a cycle failed, how long before it is tried again.
    pub error_backoff: Duration,
    /// Progress within one phase is written to the status at most this often.
    pub progress_every: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            tick: Duration::from_millis(50),
            check_every: Duration::from_secs(5),
            check_every_running: Duration::from_secs(1),
            rest_after_session: Duration::from_secs(15 * 60),
            error_backoff: Duration::from_secs(5 * 60),
            progress_every: Duration::from_secs(1),
        }
    }
}

/// The answer to "may learning run now?".
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub allowed: bool,
    /// Why not, for people (empty when allowed).
    pub reason: String,
}

/// Everything outside the loop: the real system in the daemon, fakes in tests.
pub trait Surroundings {
    /// SIGTERM / SIGINT arrived.
    fn stop_requested(&mut self) -> bool;
    /// A user request is running or was announced since the last call.
    fn user_active(&mut self) -> bool;
    /// The schedule's decision; `running` when a cycle is in progress (the memory it holds
    /// does not count against it).
    fn check(&mut self, running: bool) -> Check;
    /// The reason to end a session that has lasted `session`, if its limit is reached.
    fn session_over(&mut self, session: Duration) -> Option<String>;
    /// Notes not yet learned.
    fn pending_notes(&mut self) -> Result<usize>;
    /// `d` more of learning (for the daily limit).
    fn add_learning_time(&mut self, d: Duration);
    /// The status changed.
    fn report(&mut self, status: &Status);
}

/// One call of the learning cycle: runs or continues it until done or `cancel` is set.
pub trait CycleRunner: Send {
    fn run(
        &mut self,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<CycleOutcome>;
}

/// Why the loop cancelled a running cycle.
#[derive(Debug, Clone, PartialEq)]
enum StopCause {
    Stop,
    User,
    Conditions(String),
    SessionLimit(String),
}

/// Keeps the status and reports it when it changes.
struct Reporter<'a> {
    env: &'a mut dyn Surroundings,
    status: Status,
}

impl Reporter<'_> {
    fn set(&mut self, phase: DaemonPhase, detail: impl Into<String>) {
        let detail = detail.into();
        if self.status.phase == phase && self.status.detail == detail {
            return;
        }
        if self.status.phase != phase {
            tracing::info!(
                "{} → {}: {detail}",
                self.status.phase.as_str(),
                phase.as_str()
            );
            self.status.since = now_rfc3339();
            if !phase.is_learning() {
                self.status.progress = None;
                self.status.session_minutes = None;
            }
        }
        self.status.phase = phase;
        self.status.detail = detail;
        self.flush();
    }

    fn flush(&mut self) {
        self.status.updated_at = now_rfc3339();
        self.env.report(&self.status);
    }

    fn result(&mut self, outcome: &str, cycle: Option<i64>, activated: Option<i64>, msg: String) {
        self.status.last_result = Some(LastResult {
            at: now_rfc3339(),
            outcome: outcome.to_string(),
            cycle,
            activated,
            message: msg,
        });
    }
}

/// What happened to one watched cycle call.
struct Watched {
    result: Result<CycleOutcome>,
    cause: Option<StopCause>,
    /// From setting the cancel flag to the cycle returning.
    pause_latency: Option<Duration>,
}

/// Runs until a stop is requested; returns the final status (phase `Stopped`). Never leaves
/// while a cycle runs: a stop cancels it and waits for it to return.
pub fn run_loop(
    env: &mut dyn Surroundings,
    runner: &mut dyn CycleRunner,
    cfg: &LoopConfig,
) -> Status {
    let mut rep = Reporter {
        env,
        status: Status::new(std::process::id()),
    };
    rep.flush();
    // The cycle an interruption left, to be continued.
    let mut interrupted: Option<i64> = None;
    let mut session: Option<Instant> = None;
    // Resting or backing off until then.
    let mut hold_until: Option<Instant> = None;
    let mut next_eval = Instant::now();
    let waiting = |interrupted: Option<i64>| {
        if interrupted.is_some() {
            DaemonPhase::Paused
        } else {
            DaemonPhase::Waiting
        }
    };
    loop {
        if rep.env.stop_requested() {
            break;
        }
        if rep.env.user_active() {
            session = None;
            // Look at the conditions again as soon as the request ends.
            next_eval = Instant::now();
            rep.set(waiting(interrupted), "a hone request is running");
            std::thread::sleep(cfg.tick);
            continue;
        }
        let now = Instant::now();
        if let Some(until) = hold_until {
            if now < until {
                std::thread::sleep(cfg.tick);
                continue;
            }
            hold_until = None;
            next_eval = now;
        }
        if now < next_eval {
            std::thread::sleep(cfg.tick);
            continue;
        }
        next_eval = now + cfg.check_every;
        let c = rep.env.check(false);
        if !c.allowed {
            session = None;
            rep.set(waiting(interrupted), c.reason);
            continue;
        }
        if interrupted.is_none() {
            match rep.env.pending_notes() {
                Ok(0) => {
                    session = None;
                    rep.set(
                        DaemonPhase::NothingToLearn,
                        "every note is learned; new ones are learned when the schedule allows",
                    );
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("cannot count the notes to learn: {e:#}");
                    rep.set(DaemonPhase::Error, format!("{e:#}"));
                    hold_until = Some(now + cfg.error_backoff);
                    continue;
                }
            }
        }
        let start = *session.get_or_insert(now);
        if let Some(msg) = rep.env.session_over(start.elapsed()) {
            session = None;
            hold_until = Some(now + cfg.rest_after_session);
            rep.set(
                DaemonPhase::Resting,
                format!(
                    "{msg}; the next session may start in {} min",
                    cfg.rest_after_session.as_secs().div_ceil(60)
                ),
            );
            continue;
        }

        let resuming = interrupted;
        rep.status.cycle = resuming;
        rep.set(
            DaemonPhase::Learning,
            match resuming {
                Some(c) => format!("continuing cycle {c}"),
                None => "starting a cycle".to_string(),
            },
        );
        let w = run_watched(&mut rep, runner, cfg, start);
        if let Some(d) = w.pause_latency {
            let ms = d.as_millis() as u64;
            tracing::info!("the cycle stopped {ms} ms after it was asked to");
            rep.status.last_pause_ms = Some(ms);
        }
        let mut failed = false;
        match w.result {
            Ok(CycleOutcome::Interrupted { cycle }) => {
                interrupted = Some(cycle);
                rep.status.cycle = Some(cycle);
                rep.result("interrupted", Some(cycle), None, String::new());
            }
            Ok(CycleOutcome::Done {
                cycle,
                activated,
                reason,
                ..
            }) => {
                interrupted = None;
                rep.status.cycle = None;
                tracing::info!("cycle {cycle} done: {reason}");
                rep.result("done", Some(cycle), activated, reason);
            }
            Ok(CycleOutcome::NothingToLearn | CycleOutcome::DryRun(_)) => {
                interrupted = None;
                rep.status.cycle = None;
                rep.result("nothing_to_learn", None, None, String::new());
            }
            Err(e) => {
                failed = true;
                let msg = format!("{e:#}");
                tracing::error!("the learning cycle failed: {msg}");
                rep.result("error", resuming, None, msg);
            }
        }
        let now = Instant::now();
        match w.cause {
            Some(StopCause::Stop) => break,
            _ if failed => {
                session = None;
                hold_until = Some(now + cfg.error_backoff);
                let msg = rep
                    .status
                    .last_result
                    .as_ref()
                    .map(|r| r.message.clone())
                    .unwrap_or_default();
                rep.set(
                    DaemonPhase::Error,
                    format!(
                        "{msg} (trying again in {} min)",
                        cfg.error_backoff.as_secs().div_ceil(60)
                    ),
                );
            }
            Some(StopCause::User) => {
                session = None;
                next_eval = now;
                rep.set(waiting(interrupted), "a hone request arrived");
            }
            Some(StopCause::Conditions(reason)) => {
                session = None;
                next_eval = now + cfg.check_every;
                rep.set(waiting(interrupted), reason);
            }
            Some(StopCause::SessionLimit(msg)) => {
                session = None;
                hold_until = Some(now + cfg.rest_after_session);
                rep.set(
                    DaemonPhase::Resting,
                    format!(
                        "{msg}; the next session may start in {} min",
                        cfg.rest_after_session.as_secs().div_ceil(60)
                    ),
                );
            }
            None => {
                if interrupted.is_some() {
                    // It stopped without being asked to: do not spin on it.
                    session = None;
                    next_eval = now + cfg.check_every;
                    rep.set(DaemonPhase::Paused, "the cycle stopped by itself");
                } else {
                    // Done: the next cycle, in the same session, if notes are waiting.
                    next_eval = now;
                }
            }
        }
    }
    rep.set(DaemonPhase::Stopped, "");
    rep.status
}

/// Runs one cycle call on a worker thread while this thread watches for reasons to cancel it.
fn run_watched(
    rep: &mut Reporter<'_>,
    runner: &mut dyn CycleRunner,
    cfg: &LoopConfig,
    session_start: Instant,
) -> Watched {
    let cancel = AtomicBool::new(false);
    let latest: Mutex<Option<Progress>> = Mutex::new(None);
    let generation = AtomicU64::new(0);
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut on_progress = |p: &Progress| {
                if let Ok(mut l) = latest.lock() {
                    *l = Some(p.clone());
                }
                generation.fetch_add(1, Ordering::Release);
            };
            runner.run(&cancel, &mut on_progress)
        });
        let mut cause: Option<StopCause> = None;
        let mut cancelled_at: Option<Instant> = None;
        let mut accounted = Instant::now();
        let mut last_check = Instant::now();
        let mut seen_generation = 0;
        let mut last_progress_write = Instant::now();
        while !worker.is_finished() {
            std::thread::sleep(cfg.tick);
            if cause.is_none() {
                if rep.env.stop_requested() {
                    cause = Some(StopCause::Stop);
                } else if rep.env.user_active() {
                    cause = Some(StopCause::User);
                } else if let Some(msg) = rep.env.session_over(session_start.elapsed()) {
                    cause = Some(StopCause::SessionLimit(msg));
                } else if last_check.elapsed() >= cfg.check_every_running {
                    last_check = Instant::now();
                    rep.env.add_learning_time(accounted.elapsed());
                    accounted = Instant::now();
                    let c = rep.env.check(true);
                    if !c.allowed {
                        cause = Some(StopCause::Conditions(c.reason));
                    }
                }
                if let Some(c) = &cause {
                    cancel.store(true, Ordering::SeqCst);
                    cancelled_at = Some(Instant::now());
                    let (phase, why) = match c {
                        StopCause::Stop => (DaemonPhase::Stopping, "stop requested".to_string()),
                        StopCause::User => (DaemonPhase::Pausing, "a hone request arrived".into()),
                        StopCause::Conditions(r) | StopCause::SessionLimit(r) => {
                            (DaemonPhase::Pausing, r.clone())
                        }
                    };
                    rep.set(phase, why);
                    continue;
                }
            }
            // Progress into the status: a new phase at once, the rest at most every second.
            let g = generation.load(Ordering::Acquire);
            if g != seen_generation && cause.is_none() {
                seen_generation = g;
                let p = latest.lock().ok().and_then(|l| l.clone());
                if let Some(p) = p {
                    let phase = DaemonPhase::from_learn(p.phase);
                    rep.status.progress = Some(ProgressView::from(&p));
                    if p.estimate_s.is_some() {
                        rep.status.estimate_s = p.estimate_s;
                    }
                    rep.status.session_minutes = Some(session_start.elapsed().as_secs_f64() / 60.0);
                    if phase != rep.status.phase {
                        rep.set(phase, p.message.clone());
                        last_progress_write = Instant::now();
                    } else if last_progress_write.elapsed() >= cfg.progress_every {
                        rep.status.detail = p.message.clone();
                        rep.flush();
                        last_progress_write = Instant::now();
                    }
                }
            }
        }
        let result = match worker.join() {
            Ok(r) => r,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                Err(anyhow::anyhow!("the learning cycle panicked: {msg}"))
            }
        };
        rep.env.add_learning_time(accounted.elapsed());
        Watched {
            result,
            cause,
            pause_latency: cancelled_at.map(|t| t.elapsed()),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The real surroundings and cycle

/// The stored schedule with the device profile's memory budget and threads filled in.
pub fn effective_schedule(store: &Store, profile: &Profile) -> Result<Schedule> {
    Ok(Schedule::load(store)?.with_defaults(
        profile.learn.memory_budget_bytes,
        profile.threads_for(crate::sys::available_cpus()),
    ))
}

/// The decision now, for `hone schedule show` and `hone daemon status`: the stored schedule,
/// the last request, today's minutes and what the system reports.
pub fn decision_now(
    home: &Path,
    store: &Store,
    profile: &Profile,
    probe: &dyn SystemProbe,
) -> Result<(Schedule, schedule::Decision)> {
    let s = effective_schedule(store, profile)?;
    let last = last_request(home, store)?;
    let used = learned_minutes(store, SystemClock.now().date_naive())?;
    let d = schedule::decide(&s, probe, &SystemClock, last, used);
    Ok((s, d))
}

/// The real machine: signals, the user lock, `schedule::decide`, the store and the status file.
pub struct SystemSurroundings {
    home: Home,
    store: Store,
    profile: Profile,
    probe: Box<dyn SystemProbe>,
    watch: UserWatch,
    flags: &'static StopFlags,
    ignore: Vec<Condition>,
    schedule: Schedule,
    status_path: PathBuf,
    /// Learning time not yet written to the store (the write failed; tried again later).
    unsaved: Duration,
    status_write_failed: bool,
    /// Whether the user lock was held at the last look (to log requests starting and ending).
    user_lock_held: bool,
}

impl SystemSurroundings {
    /// `ignore`: schedule conditions that do not count (test hooks).
    pub fn new(
        home: &Home,
        profile: Profile,
        flags: &'static StopFlags,
        ignore: Vec<Condition>,
    ) -> Result<SystemSurroundings> {
        // A short lock wait: this connection is used by the watcher, which must stay quick
        // even while the cycle writes.
        let store = Store::open_with_timeout(&home.db_path(), Duration::from_millis(250))?;
        let schedule = effective_schedule(&store, &profile)?;
        let probe = signals::system_probe();
        // The first CPU reading has nothing to compare with and falls back to the load
        // average; a second one after 300 ms measures the load itself.
        probe.cpu_load();
        std::thread::sleep(Duration::from_millis(300));
        Ok(SystemSurroundings {
            home: home.clone(),
            store,
            profile,
            probe,
            watch: UserWatch::new(home.root()),
            flags,
            ignore,
            schedule,
            status_path: status_path(home.root()),
            unsaved: Duration::ZERO,
            status_write_failed: false,
            user_lock_held: false,
        })
    }
}

impl Surroundings for SystemSurroundings {
    fn stop_requested(&mut self) -> bool {
        self.flags.stop_requested()
    }

    fn user_active(&mut self) -> bool {
        // Both: the signal wakes us even if the lock file cannot be used; the lock says
        // whether the request still runs.
        let signalled = self.flags.take_user_request();
        if signalled {
            tracing::info!("SIGUSR1: a hone request announced itself");
        }
        let held = self.watch.active();
        if held != self.user_lock_held {
            self.user_lock_held = held;
            if held {
                tracing::info!(
                    "a hone request started (it holds {})",
                    presence::USER_LOCK_FILE
                );
            } else {
                tracing::info!("the hone request ended");
            }
        }
        held || signalled
    }

    fn check(&mut self, running: bool) -> Check {
        match effective_schedule(&self.store, &self.profile) {
            Ok(s) => self.schedule = s,
            Err(e) => {
                return Check {
                    allowed: false,
                    reason: format!("{e:#}"),
                }
            }
        }
        let last = match last_request(self.home.root(), &self.store) {
            Ok(l) => l,
            Err(e) => {
                return Check {
                    allowed: false,
                    reason: format!("{e:#}"),
                }
            }
        };
        let today = SystemClock.now().date_naive();
        let used = match learned_minutes(&self.store, today) {
            Ok(m) => m + self.unsaved.as_secs_f64() / 60.0,
            Err(e) => {
                return Check {
                    allowed: false,
                    reason: format!("{e:#}"),
                }
            }
        };
        let d = schedule::decide(
            &self.schedule,
            self.probe.as_ref(),
            &SystemClock,
            last,
            used,
        );
        let mut ignore = self.ignore.clone();
        if running {
            ignore.push(Condition::Memory);
        }
        let reasons: Vec<&str> = d
            .reasons
            .iter()
            .filter(|r| !ignore.contains(&r.condition))
            .map(|r| r.message.as_str())
            .collect();
        Check {
            allowed: reasons.is_empty(),
            reason: reasons.join("; "),
        }
    }

    fn session_over(&mut self, session: Duration) -> Option<String> {
        schedule::session_limit_reached(&self.schedule, session.as_secs_f64() / 60.0)
            .map(|r| r.message)
    }

    fn pending_notes(&mut self) -> Result<usize> {
        learn::pending_notes(&self.store)
    }

    fn add_learning_time(&mut self, d: Duration) {
        self.unsaved += d;
        let today = SystemClock.now().date_naive();
        match add_learned_minutes(&self.store, today, self.unsaved.as_secs_f64() / 60.0) {
            Ok(_) => self.unsaved = Duration::ZERO,
            Err(e) => tracing::warn!("cannot record the minutes learned (kept for later): {e:#}"),
        }
    }

    fn report(&mut self, status: &Status) {
        match write_status(&self.status_path, status) {
            Ok(()) => self.status_write_failed = false,
            Err(e) if !self.status_write_failed => {
                self.status_write_failed = true;
                tracing::warn!(
                    "cannot write {}: {e}; `hone daemon status` will be out of date",
                    self.status_path.display()
                );
            }
            Err(_) => {}
        }
    }
}

/// The real cycle: `learn::run_cycle` with the model and limits read at each call (so a new
/// default model or schedule applies from the next cycle on).
pub struct LearnRunner {
    home: Home,
    store: Store,
    model: Option<String>,
    profile: Profile,
}

impl LearnRunner {
    pub fn new(home: &Home, model: Option<String>, profile: Profile) -> Result<LearnRunner> {
        Ok(LearnRunner {
            home: home.clone(),
            store: Store::open(&home.db_path())?,
            model,
            profile,
        })
    }
}

impl CycleRunner for LearnRunner {
    fn run(
        &mut self,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<CycleOutcome> {
        let s = effective_schedule(&self.store, &self.profile)?;
        let choice = crate::registry::resolve(&self.home, &self.store, self.model.as_deref())?;
        let mut opts = LearnOptions {
            max_memory: s.memory_budget_bytes,
            ..LearnOptions::default()
        };
        let now = SystemClock.now();
        let learned = learned_minutes(&self.store, now.date_naive())?;
        if let Some(left) = s.minutes_left(now, learned) {
            // A new cycle that cannot finish before a limit stops it learns fewer notes (an
            // unfinished one continues as it is: its notes are fixed).
            let note = |message: String, estimate_s: Option<f64>| Progress {
                phase: Phase::Load,
                done: 0,
                total: 1,
                tokens_per_s: 0.0,
                peak_rss: crate::sys::peak_rss_bytes().unwrap_or(0),
                message,
                estimate_s,
            };
            progress(&note("estimating the cycle's time".into(), None));
            if let Some(e) = learn::estimate::estimate(&self.store, &choice, &opts, cancel)? {
                let need = e.total_seconds / 60.0;
                if e.continues.is_none() && need > left && e.notes.len() > 1 {
                    let fit = ((e.notes.len() as f64 * left / need * 0.9).floor() as usize).max(1);
                    tracing::info!(
                        "the cycle for {} notes needs about {need:.0} min, {left:.0} min are left: learning {fit} notes",
                        e.notes.len()
                    );
                    opts.max_notes = fit.min(opts.max_notes);
                } else {
                    tracing::info!(
                        "the cycle for {} notes needs about {need:.0} min ({left:.0} min left)",
                        e.notes.len()
                    );
                }
                progress(&note(
                    format!(
                        "estimated {need:.0} min for {} notes",
                        e.notes.len().min(opts.max_notes)
                    ),
                    Some(e.total_seconds),
                ));
            }
        }
        learn::run_cycle(
            &self.home,
            &mut self.store,
            &choice,
            &opts,
            cancel,
            progress,
        )
    }
}

/// What `hone daemon run` was given.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--model`: the model to learn for (default: the default model, read at each cycle).
    pub model: Option<String>,
    /// `--threads` given on the command line (else the schedule's / profile's).
    pub threads: Option<usize>,
    /// `--device`: the device profile.
    pub device: Option<String>,
    /// Schedule conditions that do not count (test hooks).
    pub ignore: Vec<Condition>,
    pub config: LoopConfig,
}

/// The daemon: signal handlers, nice and threads from the schedule, the one-daemon lock, then
/// [`run_loop`] with the real surroundings until SIGTERM/SIGINT. Returns the final status; the
/// lock is released when it returns.
pub fn run(home: &Home, opts: &RunOptions) -> Result<Status> {
    let flags = interrupt::install_daemon_handlers().context("installing the signal handlers")?;
    home.ensure()?;
    let store = Store::open(&home.db_path())?;
    let (profile, _) = device::resolve(
        Path::new("/"),
        opts.device.as_deref(),
        Some(&device::override_path(home.root())),
    )?;
    let schedule = effective_schedule(&store, &profile)?;
    drop(store);
    // Before any thread starts: on Linux a thread's nice value is inherited from its creator.
    if let Err(e) = crate::sys::set_nice(schedule.nice) {
        tracing::warn!(
            "cannot lower the CPU priority to nice {}: {e}",
            schedule.nice
        );
    }
    let threads = opts
        .threads
        .or(schedule.threads)
        .unwrap_or_else(|| profile.threads_for(crate::sys::available_cpus()));
    crate::sys::set_threads(threads);
    let lock = DaemonLock::acquire(home.root())?;
    tracing::info!(
        "hone daemon {} started (pid {}) for {}: profile {}, nice {}, {threads} threads{}",
        crate::VERSION,
        std::process::id(),
        home.root().display(),
        profile.name,
        schedule.nice,
        if opts.ignore.is_empty() {
            String::new()
        } else {
            format!(
                ", ignoring {}",
                opts.ignore
                    .iter()
                    .map(|c| serde_json::to_value(c)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    let mut env = SystemSurroundings::new(home, profile.clone(), flags, opts.ignore.clone())?;
    let mut runner = LearnRunner::new(home, opts.model.clone(), profile)?;
    let status = run_loop(&mut env, &mut runner, &opts.config);
    tracing::info!("hone daemon stopped");
    drop(lock);
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Shared switches the test flips while the loop runs on another thread.
    #[derive(Default)]
    struct Knobs {
        stop: AtomicBool,
        user: AtomicBool,
        blocked: Mutex<Option<String>>,
        pending: AtomicU64,
        pending_fails: AtomicBool,
        session_limit_ms: AtomicU64,
        learned_ms: AtomicU64,
        phases: Mutex<Vec<(Instant, DaemonPhase, String)>>,
        last: Mutex<Option<Status>>,
    }

    impl Knobs {
        fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Knobs) -> bool) -> Instant {
            let t0 = Instant::now();
            while t0.elapsed() < timeout {
                if f(self) {
                    return Instant::now();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            panic!(
                "timed out waiting for {what}; phases: {:?}",
                self.phases
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|p| (p.1, p.2.clone()))
                    .collect::<Vec<_>>()
            );
        }
        fn phase(&self) -> Option<DaemonPhase> {
            self.phases.lock().unwrap().last().map(|p| p.1)
        }
        /// When the loop first reported `phase` at or after `after`.
        fn reached(&self, phase: DaemonPhase, after: Instant) -> Option<Instant> {
            self.phases
                .lock()
                .unwrap()
                .iter()
                .find(|p| p.1 == phase && p.0 >= after)
                .map(|p| p.0)
        }
    }

    struct FakeEnv(Arc<Knobs>);

    impl Surroundings for FakeEnv {
        fn stop_requested(&mut self) -> bool {
            self.0.stop.load(Ordering::SeqCst)
        }
        fn user_active(&mut self) -> bool {
            self.0.user.load(Ordering::SeqCst)
        }
        fn check(&mut self, _running: bool) -> Check {
            match self.0.blocked.lock().unwrap().clone() {
                Some(r) => Check {
                    allowed: false,
                    reason: r,
                },
                None => Check {
                    allowed: true,
                    reason: String::new(),
                },
            }
        }
        fn session_over(&mut self, session: Duration) -> Option<String> {
            let limit = self.0.session_limit_ms.load(Ordering::SeqCst);
            (limit > 0 && session.as_millis() as u64 >= limit).then(|| "session limit".into())
        }
        fn pending_notes(&mut self) -> Result<usize> {
            if self.0.pending_fails.load(Ordering::SeqCst) {
                anyhow::bail!("the database is locked");
            }
            Ok(self.0.pending.load(Ordering::SeqCst) as usize)
        }
        fn add_learning_time(&mut self, d: Duration) {
            self.0
                .learned_ms
                .fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        }
        fn report(&mut self, s: &Status) {
            let mut p = self.0.phases.lock().unwrap();
            if p.last().map(|l| (l.1, &l.2)) != Some((s.phase, &s.detail)) {
                p.push((Instant::now(), s.phase, s.detail.clone()));
            }
            *self.0.last.lock().unwrap() = Some(s.clone());
        }
    }

    /// A cycle of `steps` steps of `step` each, which checks the cancel flag between steps
    /// (as the trainer does between layers) and keeps its position across calls.
    struct FakeCycle {
        steps: usize,
        step: Duration,
        done: Arc<AtomicU64>,
        calls: Arc<AtomicU64>,
        fail_first: bool,
        knobs: Arc<Knobs>,
    }

    impl CycleRunner for FakeCycle {
        fn run(
            &mut self,
            cancel: &AtomicBool,
            progress: &mut dyn FnMut(&Progress),
        ) -> Result<CycleOutcome> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail_first && call == 0 {
                anyhow::bail!("the model is not pulled");
            }
            loop {
                let done = self.done.load(Ordering::SeqCst) as usize;
                if done >= self.steps {
                    self.knobs.pending.store(0, Ordering::SeqCst);
                    return Ok(CycleOutcome::Done {
                        cycle: 7,
                        activated: Some(3),
                        reason: "probes improved".into(),
                        gate: Default::default(),
                        train_tokens: 0,
                        seconds: 0.0,
                    });
                }
                if cancel.load(Ordering::SeqCst) {
                    return Ok(CycleOutcome::Interrupted { cycle: 7 });
                }
                progress(&Progress {
                    phase: if done == 0 {
                        Phase::SelfEdits
                    } else {
                        Phase::Training
                    },
                    done,
                    total: self.steps,
                    tokens_per_s: 100.0,
                    peak_rss: 1,
                    message: format!("step {done}"),
                    estimate_s: None,
                });
                std::thread::sleep(self.step);
                self.done.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn quick() -> LoopConfig {
        LoopConfig {
            tick: Duration::from_millis(10),
            check_every: Duration::from_millis(50),
            check_every_running: Duration::from_millis(50),
            rest_after_session: Duration::from_millis(400),
            error_backoff: Duration::from_millis(300),
            progress_every: Duration::from_millis(50),
        }
    }

    struct Harness {
        knobs: Arc<Knobs>,
        done: Arc<AtomicU64>,
        calls: Arc<AtomicU64>,
        handle: Option<std::thread::JoinHandle<Status>>,
    }

    fn start(steps: usize, step: Duration, fail_first: bool, cfg: LoopConfig) -> Harness {
        let knobs = Arc::new(Knobs::default());
        knobs.pending.store(3, Ordering::SeqCst);
        let done = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let mut cycle = FakeCycle {
            steps,
            step,
            done: done.clone(),
            calls: calls.clone(),
            fail_first,
            knobs: knobs.clone(),
        };
        let mut env = FakeEnv(knobs.clone());
        let handle = std::thread::spawn(move || run_loop(&mut env, &mut cycle, &cfg));
        Harness {
            knobs,
            done,
            calls,
            handle: Some(handle),
        }
    }

    impl Harness {
        fn stop(&mut self) -> Status {
            self.knobs.stop.store(true, Ordering::SeqCst);
            self.handle.take().unwrap().join().unwrap()
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.knobs.stop.store(true, Ordering::SeqCst);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    const SECOND: Duration = Duration::from_secs(1);
    const PATIENCE: Duration = Duration::from_secs(10);

    #[test]
    fn a_user_request_pauses_within_a_second_and_the_cycle_resumes_where_it_stopped() {
        // 100 steps of 20 ms: 2 s of "training", the cancel flag looked at every 20 ms.
        let mut h = start(100, Duration::from_millis(20), false, quick());
        let k = h.knobs.clone();
        k.wait_for("training", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::Training)
        });
        let before = h.done.load(Ordering::SeqCst);
        let t0 = Instant::now();
        k.user.store(true, Ordering::SeqCst);
        let paused = k.wait_for("paused", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::Paused)
        });
        let pause = paused - t0;
        assert!(pause < SECOND, "paused after {pause:?}");
        let pausing = k.reached(DaemonPhase::Pausing, t0).unwrap();
        assert!(
            pausing - t0 < Duration::from_millis(200),
            "{:?}",
            pausing - t0
        );
        // While the request runs, nothing learns.
        let at_pause = h.done.load(Ordering::SeqCst);
        assert!(at_pause > before && at_pause < 100, "{at_pause}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            h.done.load(Ordering::SeqCst),
            at_pause,
            "learned while paused"
        );
        assert_eq!(h.calls.load(Ordering::SeqCst), 1);
        let s = k.last.lock().unwrap().clone().unwrap();
        assert_eq!(s.cycle, Some(7));
        assert_eq!(s.last_result.as_ref().unwrap().outcome, "interrupted");
        assert!(s.last_pause_ms.unwrap() < 1000);
        assert_eq!(s.detail, "a hone request is running");

        // The request ends: the same cycle continues from its position and finishes.
        k.user.store(false, Ordering::SeqCst);
        k.wait_for("done", PATIENCE, |k| {
            k.last
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|s| s.last_result.clone())
                .is_some_and(|r| r.outcome == "done")
        });
        assert_eq!(h.done.load(Ordering::SeqCst), 100, "steps done once each");
        assert_eq!(h.calls.load(Ordering::SeqCst), 2, "resumed once");
        k.wait_for("nothing to learn", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::NothingToLearn)
        });
        let s = h.stop();
        assert_eq!(s.phase, DaemonPhase::Stopped);
        let r = s.last_result.unwrap();
        assert_eq!((r.cycle, r.activated), (Some(7), Some(3)));
        assert_eq!(s.cycle, None);
        // The learning time was counted: 2 s of steps, give or take the pause.
        let ms = k.learned_ms.load(Ordering::SeqCst);
        assert!((1900..4000).contains(&ms), "{ms} ms");
    }

    #[test]
    fn a_condition_that_stops_holding_pauses_within_a_second_then_learning_continues() {
        let mut h = start(100, Duration::from_millis(20), false, quick());
        let k = h.knobs.clone();
        k.wait_for("training", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::Training)
        });
        let t0 = Instant::now();
        *k.blocked.lock().unwrap() = Some("on battery (41%)".into());
        let paused = k.wait_for("paused", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::Paused)
        });
        assert!(paused - t0 < SECOND, "paused after {:?}", paused - t0);
        assert_eq!(
            k.last.lock().unwrap().as_ref().unwrap().detail,
            "on battery (41%)"
        );
        let at_pause = h.done.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(h.done.load(Ordering::SeqCst), at_pause);
        *k.blocked.lock().unwrap() = None;
        k.wait_for("training again", PATIENCE, |k| {
            k.reached(DaemonPhase::Training, paused).is_some()
        });
        assert_eq!(h.calls.load(Ordering::SeqCst), 2);
        h.stop();
    }

    #[test]
    fn a_stop_request_cancels_the_cycle_and_waits_for_it() {
        // Steps of 150 ms: the stop must wait for the step in progress.
        let mut h = start(100, Duration::from_millis(150), false, quick());
        let k = h.knobs.clone();
        k.wait_for("training", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::Training)
        });
        let t0 = Instant::now();
        let s = h.stop();
        let took = t0.elapsed();
        assert!(took < SECOND, "stopped after {took:?}");
        assert_eq!(s.phase, DaemonPhase::Stopped);
        assert_eq!(s.last_result.unwrap().outcome, "interrupted");
        assert!(k.reached(DaemonPhase::Stopping, t0).is_some());
        assert_eq!(h.calls.load(Ordering::SeqCst), 1, "no cycle after the stop");
        let d = h.done.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(h.done.load(Ordering::SeqCst), d, "the worker is gone");
    }

    #[test]
    fn the_session_limit_stops_the_cycle_and_rests_before_the_next_session() {
        let mut h = start(200, Duration::from_millis(10), false, quick());
        let k = h.knobs.clone();
        k.session_limit_ms.store(300, Ordering::SeqCst);
        let resting = k.wait_for("resting", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::Resting)
        });
        let learning = k
            .reached(DaemonPhase::Learning, Instant::now() - PATIENCE)
            .unwrap();
        let session = resting - learning;
        assert!(
            session >= Duration::from_millis(300) && session < Duration::from_millis(1300),
            "{session:?}"
        );
        let at_rest = h.done.load(Ordering::SeqCst);
        assert_eq!(h.calls.load(Ordering::SeqCst), 1);
        // No learning during the 400 ms rest; then a new session continues the cycle.
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(h.done.load(Ordering::SeqCst), at_rest);
        k.wait_for("second session", PATIENCE, |k| {
            k.reached(DaemonPhase::Learning, resting).is_some()
        });
        let second = k.reached(DaemonPhase::Learning, resting).unwrap();
        assert!(
            second - resting >= Duration::from_millis(400),
            "{:?}",
            second - resting
        );
        // The phase turns to learning just before the worker calls the cycle; give it that
        // moment instead of racing it.
        let t = Instant::now();
        while h.calls.load(Ordering::SeqCst) < 2 && t.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(h.calls.load(Ordering::SeqCst), 2);
        h.stop();
    }

    #[test]
    fn nothing_to_learn_and_blocked_conditions_never_start_a_cycle() {
        let mut h = start(10, Duration::from_millis(10), false, quick());
        let k = h.knobs.clone();
        // Blocked first.
        *k.blocked.lock().unwrap() = Some("outside the allowed windows 22:00-07:00".into());
        k.pending.store(0, Ordering::SeqCst);
        k.wait_for("nothing to learn", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::NothingToLearn)
                || k.phase() == Some(DaemonPhase::Waiting)
        });
        *k.blocked.lock().unwrap() = None;
        k.wait_for("nothing to learn", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::NothingToLearn)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(h.calls.load(Ordering::SeqCst), 0);
        // A user request while idle: reported, nothing started.
        k.user.store(true, Ordering::SeqCst);
        k.wait_for("waiting", PATIENCE, |k| {
            k.phase() == Some(DaemonPhase::Waiting)
        });
        k.user.store(false, Ordering::SeqCst);
        k.pending.store(2, Ordering::SeqCst);
        k.wait_for("done", PATIENCE, h_done);
        assert_eq!(h.calls.load(Ordering::SeqCst), 1);
        h.stop();
    }

    fn h_done(k: &Knobs) -> bool {
        k.last
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|s| s.last_result.clone())
            .is_some_and(|r| r.outcome == "done")
    }

    #[test]
    fn a_failing_cycle_backs_off_and_is_tried_again() {
        let mut h = start(5, Duration::from_millis(10), true, quick());
        let k = h.knobs.clone();
        let err = k.wait_for("error", PATIENCE, |k| k.phase() == Some(DaemonPhase::Error));
        let s = k.last.lock().unwrap().clone().unwrap();
        assert_eq!(s.last_result.unwrap().outcome, "error");
        assert!(s.detail.contains("the model is not pulled"), "{}", s.detail);
        assert_eq!(h.calls.load(Ordering::SeqCst), 1);
        k.wait_for("done", PATIENCE, h_done);
        let second = k.reached(DaemonPhase::Learning, err).unwrap();
        assert!(
            second - err >= Duration::from_millis(300),
            "{:?}",
            second - err
        );
        assert_eq!(h.calls.load(Ordering::SeqCst), 2);
        // A failure to count the notes backs off too, without calling the cycle.
        k.pending.store(1, Ordering::SeqCst);
        k.pending_fails.store(true, Ordering::SeqCst);
        k.wait_for("error", PATIENCE, |k| k.phase() == Some(DaemonPhase::Error));
        assert_eq!(h.calls.load(Ordering::SeqCst), 2);
        h.stop();
    }

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
    fn last_request_is_the_later_of_the_lock_and_the_exchanges() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        assert_eq!(last_request(dir.path(), &store).unwrap(), None);
        drop(presence::UserRequest::begin(dir.path()));
        let t = last_request(dir.path(), &store).unwrap().unwrap();
        assert!((Local::now() - t).num_seconds().abs() < 5);
    }
}
