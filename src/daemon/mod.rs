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
//! with the one-daemon lock, nice, threads and signal handlers (`crate::interrupt`).
//!
//! The parts: `run_loop` (the loop and its watcher, and the two traits), `status` (the status
//! file and the minutes ledger), `system` (the real surroundings and cycle), `report` (what
//! `hone daemon status` shows), `log` (its log file, installed as the process's logger); this
//! file holds [`run`] and re-exports what they make public,
//! so every item is `daemon::NAME`. [`service`] writes and removes the service file that
//! starts the daemon at login (`hone daemon install|uninstall`).
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
//! `systemctl`/`launchctl` (only [`service`] does, and only for `--now`). It never keeps running a cycle after a stop request, and never
//! leaves without letting the cycle reach its checkpoint.

mod log;
mod report;
mod run_loop;
pub mod service;
mod status;
mod system;

pub use log::{init_file_logging, EXIT_TARGET};
pub use report::{report, Report};
pub use run_loop::{run_loop, Check, CycleRunner, LoopConfig, Surroundings};
pub use status::{
    add_learned_minutes, last_request, learned_minutes, read_status, status_path, write_status,
    DaemonPhase, LastResult, ProgressView, Status, LEARNED_MINUTES_KEY, STATUS_FILE,
};
pub use system::{
    decision_measured, decision_now, effective_schedule, LearnRunner, SystemSurroundings,
};

use anyhow::{Context as _, Result};

use crate::daemon_lock::DaemonLock;
use crate::device;
use crate::home::Home;
use crate::interrupt;
use crate::schedule::Condition;
use crate::store::Store;

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
    let (profile, _) = device::for_home(home.root(), opts.device.as_deref())?;
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
