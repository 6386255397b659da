//! The daemon's loop ([`run_loop`]): it waits until learning may run and notes wait, runs one
//! call of the learning cycle at a time on a worker thread while it watches (every tick) for a
//! stop, a user request, a session limit and (every second) the schedule's conditions, and
//! cancels the cycle within a second when one of them says so. An interrupted cycle is
//! continued by the next call once the conditions hold again.
//!
//! It sees the world only through two traits, so tests drive it with real threads and a real
//! cancel flag but fake conditions and a fake cycle: [`Surroundings`] (stop signal, user
//! requests, the schedule's decision, pending notes, minutes learned, status reports) and
//! [`CycleRunner`] (one call of the cycle).
//!
//! It must NOT read the system, the store or the schedule itself (that is the `Surroundings`),
//! train (that is the `CycleRunner`), or print. It never starts a cycle after a stop request,
//! and never returns while a cycle runs: a stop cancels it and waits for its checkpoint.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::status::{DaemonPhase, LastResult, ProgressView, Status};
use crate::learn::{CycleOutcome, Progress};
use crate::store::now_rfc3339;

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

impl StopCause {
    /// The phase and detail the status shows while the cycle reaches its checkpoint.
    fn announcement(&self) -> (DaemonPhase, String) {
        match self {
            StopCause::Stop => (DaemonPhase::Stopping, "stop requested".to_string()),
            StopCause::User => (DaemonPhase::Pausing, "a hone request arrived".into()),
            StopCause::Conditions(r) | StopCause::SessionLimit(r) => {
                (DaemonPhase::Pausing, r.clone())
            }
        }
    }
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

    /// The time from cancelling the cycle to its return, at a pause.
    fn pause_took(&mut self, latency: Option<Duration>) {
        if let Some(d) = latency {
            let ms = d.as_millis() as u64;
            tracing::info!("the cycle stopped {ms} ms after it was asked to");
            self.status.last_pause_ms = Some(ms);
        }
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
    let mut st = LoopState {
        interrupted: None,
        session: None,
        hold_until: None,
        next_eval: Instant::now(),
    };
    loop {
        if rep.env.stop_requested() {
            break;
        }
        if rep.env.user_active() {
            st.yield_to_request(&mut rep);
            std::thread::sleep(cfg.tick);
            continue;
        }
        let now = Instant::now();
        if !st.due(now) {
            std::thread::sleep(cfg.tick);
            continue;
        }
        st.next_eval = now + cfg.check_every;
        let Some(session_start) = st.may_start(&mut rep, cfg, now) else {
            continue;
        };
        let resuming = st.announce_cycle(&mut rep);
        let w = run_watched(&mut rep, runner, cfg, session_start);
        rep.pause_took(w.pause_latency);
        let failed = st.record_outcome(&mut rep, w.result, resuming);
        if st.after_cycle(&mut rep, cfg, w.cause, failed).is_break() {
            break;
        }
    }
    rep.set(DaemonPhase::Stopped, "");
    rep.status
}

/// What the loop remembers from one turn to the next.
struct LoopState {
    /// The cycle an interruption left, to be continued.
    interrupted: Option<i64>,
    /// When the current learning session started.
    session: Option<Instant>,
    /// Resting or backing off until then.
    hold_until: Option<Instant>,
    /// When the conditions and the notes are read next.
    next_eval: Instant,
}

impl LoopState {
    /// The phase while learning may not run: paused if a cycle waits to be continued.
    fn waiting(&self) -> DaemonPhase {
        if self.interrupted.is_some() {
            DaemonPhase::Paused
        } else {
            DaemonPhase::Waiting
        }
    }

    /// A request runs: the session ends, and the conditions are read as soon as it ends.
    fn yield_to_request(&mut self, rep: &mut Reporter<'_>) {
        self.session = None;
        // Look at the conditions again as soon as the request ends.
        self.next_eval = Instant::now();
        rep.set(self.waiting(), "a hone request is running");
    }

    /// Whether it is time to read the conditions: no rest or back-off holds, and the last
    /// reading is old enough (a hold that ends makes it so at once).
    fn due(&mut self, now: Instant) -> bool {
        if let Some(until) = self.hold_until {
            if now < until {
                return false;
            }
            self.hold_until = None;
            self.next_eval = now;
        }
        now >= self.next_eval
    }

    /// Whether a cycle may start now: the conditions hold, notes wait (or a cycle waits to be
    /// continued), and the session has time left. Gives when the session started; if not,
    /// the status says why.
    fn may_start(
        &mut self,
        rep: &mut Reporter<'_>,
        cfg: &LoopConfig,
        now: Instant,
    ) -> Option<Instant> {
        let c = rep.env.check(false);
        if !c.allowed {
            self.session = None;
            rep.set(self.waiting(), c.reason);
            return None;
        }
        if self.interrupted.is_none() && !self.notes_wait(rep, cfg, now) {
            return None;
        }
        let start = *self.session.get_or_insert(now);
        if let Some(msg) = rep.env.session_over(start.elapsed()) {
            self.rest(rep, cfg, now, msg);
            return None;
        }
        Some(start)
    }

    /// Whether notes wait to be learned; if not, or if they cannot be counted (then it backs
    /// off), the status says so.
    fn notes_wait(&mut self, rep: &mut Reporter<'_>, cfg: &LoopConfig, now: Instant) -> bool {
        match rep.env.pending_notes() {
            Ok(0) => {
                self.session = None;
                rep.set(
                    DaemonPhase::NothingToLearn,
                    "every note is learned; new ones are learned when the schedule allows",
                );
                false
            }
            Ok(_) => true,
            Err(e) => {
                tracing::error!("cannot count the notes to learn: {e:#}");
                rep.set(DaemonPhase::Error, format!("{e:#}"));
                self.hold_until = Some(now + cfg.error_backoff);
                false
            }
        }
    }

    /// The session's limit is reached: no learning until the rest is over.
    fn rest(&mut self, rep: &mut Reporter<'_>, cfg: &LoopConfig, now: Instant, msg: String) {
        self.session = None;
        self.hold_until = Some(now + cfg.rest_after_session);
        rep.set(
            DaemonPhase::Resting,
            format!(
                "{msg}; the next session may start in {} min",
                cfg.rest_after_session.as_secs().div_ceil(60)
            ),
        );
    }

    /// Reports that a cycle starts or continues; gives the cycle it continues, if any.
    fn announce_cycle(&self, rep: &mut Reporter<'_>) -> Option<i64> {
        let resuming = self.interrupted;
        rep.status.cycle = resuming;
        rep.set(
            DaemonPhase::Learning,
            match resuming {
                Some(c) => format!("continuing cycle {c}"),
                None => "starting a cycle".to_string(),
            },
        );
        resuming
    }

    /// Records how the cycle call ended (`resuming`: the cycle it continued); true if it failed.
    fn record_outcome(
        &mut self,
        rep: &mut Reporter<'_>,
        result: Result<CycleOutcome>,
        resuming: Option<i64>,
    ) -> bool {
        match result {
            Ok(CycleOutcome::Interrupted { cycle }) => {
                self.interrupted = Some(cycle);
                rep.status.cycle = Some(cycle);
                rep.result("interrupted", Some(cycle), None, String::new());
            }
            Ok(CycleOutcome::Done {
                cycle,
                activated,
                reason,
                ..
            }) => {
                self.interrupted = None;
                rep.status.cycle = None;
                tracing::info!("cycle {cycle} done: {reason}");
                rep.result("done", Some(cycle), activated, reason);
            }
            Ok(CycleOutcome::Forgotten { message }) => {
                self.interrupted = None;
                rep.status.cycle = None;
                tracing::info!("{message}");
                rep.result("done", None, None, message);
            }
            Ok(CycleOutcome::NothingToLearn | CycleOutcome::DryRun(_)) => {
                self.interrupted = None;
                rep.status.cycle = None;
                rep.result("nothing_to_learn", None, None, String::new());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!("the learning cycle failed: {msg}");
                rep.result("error", resuming, None, msg);
                return true;
            }
        }
        false
    }

    /// What comes after a cycle call, by why it stopped: leave (a stop request), back off
    /// (it failed), wait (a request or a condition), rest (the session limit), or look for
    /// the next cycle at once (it was done).
    fn after_cycle(
        &mut self,
        rep: &mut Reporter<'_>,
        cfg: &LoopConfig,
        cause: Option<StopCause>,
        failed: bool,
    ) -> ControlFlow<()> {
        let now = Instant::now();
        match cause {
            Some(StopCause::Stop) => return ControlFlow::Break(()),
            _ if failed => self.back_off(rep, cfg, now),
            Some(StopCause::User) => {
                self.session = None;
                self.next_eval = now;
                rep.set(self.waiting(), "a hone request arrived");
            }
            Some(StopCause::Conditions(reason)) => {
                self.session = None;
                self.next_eval = now + cfg.check_every;
                rep.set(self.waiting(), reason);
            }
            Some(StopCause::SessionLimit(msg)) => self.rest(rep, cfg, now, msg),
            None => {
                if self.interrupted.is_some() {
                    // It stopped without being asked to: do not spin on it.
                    self.session = None;
                    self.next_eval = now + cfg.check_every;
                    rep.set(DaemonPhase::Paused, "the cycle stopped by itself");
                } else {
                    // Done: the next cycle, in the same session, if notes are waiting.
                    self.next_eval = now;
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// The cycle failed: no learning until the back-off is over; the status says why.
    fn back_off(&mut self, rep: &mut Reporter<'_>, cfg: &LoopConfig, now: Instant) {
        self.session = None;
        self.hold_until = Some(now + cfg.error_backoff);
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
        let mut w = Watcher {
            session_start,
            cause: None,
            cancelled_at: None,
            accounted: Instant::now(),
            last_check: Instant::now(),
            seen_generation: 0,
            last_progress_write: Instant::now(),
        };
        while !worker.is_finished() {
            std::thread::sleep(cfg.tick);
            if w.cause.is_none() {
                if let Some(c) = w.reason_to_cancel(rep, cfg) {
                    cancel.store(true, Ordering::SeqCst);
                    w.cancelled_at = Some(Instant::now());
                    let (phase, why) = c.announcement();
                    rep.set(phase, why);
                    w.cause = Some(c);
                    continue;
                }
            }
            // Progress into the status: a new phase at once, the rest at most every second.
            let g = generation.load(Ordering::Acquire);
            if g != w.seen_generation && w.cause.is_none() {
                w.seen_generation = g;
                let p = latest.lock().ok().and_then(|l| l.clone());
                if let Some(p) = p {
                    w.show_progress(rep, cfg, &p);
                }
            }
        }
        let result = match worker.join() {
            Ok(r) => r,
            Err(payload) => Err(anyhow::anyhow!(
                "the learning cycle panicked: {}",
                panic_message(payload.as_ref())
            )),
        };
        rep.env.add_learning_time(w.accounted.elapsed());
        Watched {
            result,
            cause: w.cause,
            pause_latency: w.cancelled_at.map(|t| t.elapsed()),
        }
    })
}

/// What the watcher of one cycle call remembers between its looks.
struct Watcher {
    session_start: Instant,
    /// Why it cancelled the cycle, once it did.
    cause: Option<StopCause>,
    cancelled_at: Option<Instant>,
    /// Learning time up to here is counted.
    accounted: Instant,
    /// The conditions were last read then.
    last_check: Instant,
    /// The last progress report shown.
    seen_generation: u64,
    last_progress_write: Instant,
}

impl Watcher {
    /// A reason to cancel the cycle now, if there is one: a stop, a request, the session
    /// limit, or (every `check_every_running`, when the learning time is also counted) a
    /// condition that stopped holding.
    fn reason_to_cancel(&mut self, rep: &mut Reporter<'_>, cfg: &LoopConfig) -> Option<StopCause> {
        if rep.env.stop_requested() {
            return Some(StopCause::Stop);
        }
        if rep.env.user_active() {
            return Some(StopCause::User);
        }
        if let Some(msg) = rep.env.session_over(self.session_start.elapsed()) {
            return Some(StopCause::SessionLimit(msg));
        }
        if self.last_check.elapsed() >= cfg.check_every_running {
            self.last_check = Instant::now();
            rep.env.add_learning_time(self.accounted.elapsed());
            self.accounted = Instant::now();
            let c = rep.env.check(true);
            if !c.allowed {
                return Some(StopCause::Conditions(c.reason));
            }
        }
        None
    }

    /// Puts a progress report into the status: a new phase at once, the rest at most every
    /// `progress_every`.
    fn show_progress(&mut self, rep: &mut Reporter<'_>, cfg: &LoopConfig, p: &Progress) {
        let phase = DaemonPhase::from_learn(p.phase);
        rep.status.progress = Some(ProgressView::from(p));
        if p.estimate_s.is_some() {
            rep.status.estimate_s = p.estimate_s;
        }
        rep.status.session_minutes = Some(self.session_start.elapsed().as_secs_f64() / 60.0);
        if phase != rep.status.phase {
            rep.set(phase, p.message.clone());
            self.last_progress_write = Instant::now();
        } else if self.last_progress_write.elapsed() >= cfg.progress_every {
            rep.status.detail = p.message.clone();
            rep.flush();
            self.last_progress_write = Instant::now();
        }
    }
}

/// The message of a panic, as far as it has one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::Phase;
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
}
