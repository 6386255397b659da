//! The real surroundings of the loop. [`SystemSurroundings`] reads the stop and request
//! signals (`interrupt`), the user lock (`presence`), `schedule::decide` over what the system
//! reports (`signals`) and the notes waiting, and writes the minutes learned and the status
//! file. [`LearnRunner`] runs `learn::run_cycle` with the model and limits read at each call.
//! [`effective_schedule`] and [`decision_now`] are the schedule as the daemon applies it, also
//! for `hone schedule show`, `hone daemon status` and `hone serve`.
//!
//! It must NOT decide the policy (it asks `schedule::decide`, and only leaves out the
//! conditions it was told to ignore), drive the loop, or print. Its watcher's store connection
//! waits at most 250 ms for a lock, so the loop stays quick while the cycle writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Result;

use super::run_loop::{Check, CycleRunner, Surroundings};
use super::status::{
    add_learned_minutes, last_request, learned_minutes, status_path, write_status, Status,
};
use crate::device::Profile;
use crate::home::Home;
use crate::interrupt::StopFlags;
use crate::learn::{self, CycleOutcome, LearnOptions, Phase, Progress};
use crate::presence::{self, UserWatch};
use crate::schedule::{self, Condition, Schedule};
use crate::signals::{self, Clock as _, SystemClock, SystemProbe};
use crate::store::Store;

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

/// [`decision_now`] with a fresh CPU reading: two readings 300 ms apart, so the load is from
/// /proc/stat deltas, not the 1-minute average.
pub fn decision_measured(
    home: &Path,
    store: &Store,
    profile: &Profile,
) -> Result<(Schedule, schedule::Decision)> {
    let probe = signals::system_probe();
    probe.cpu_load();
    std::thread::sleep(Duration::from_millis(300));
    decision_now(home, store, profile, probe.as_ref())
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
