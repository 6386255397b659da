//! When hone may learn: the user's [`Schedule`] (idle threshold, CPU load, time windows,
//! minutes per session and per day, power, battery, temperature, memory, threads, nice) and
//! [`decide`], which reads the signals (`crate::signals`) and says yes or no with a human reason
//! for every condition that fails, plus what it read, for `hone schedule show`.
//!
//! The schedule is stored as JSON in the store's `settings` table under [`SETTING_KEY`]; this
//! module only converts it to and from that text ([`Schedule::from_setting`],
//! [`Schedule::to_setting`]) and reads it from a store it is handed ([`Schedule::load`]).
//!
//! It must NOT read files or run commands itself (signals come through the traits), open the
//! database, print, or start or stop learning: it answers "may learning run now?" and nothing
//! else. Missing signals are handled conservatively, per signal, as documented on [`decide`].

use std::fmt;

use chrono::{DateTime, Local, NaiveTime, TimeDelta, TimeZone as _};
use serde::{Deserialize, Serialize};

use crate::signals::{Clock, SystemProbe};
use crate::store::{Store, StoreError};

use crate::units::{self, format_bytes};

/// The key of the schedule in the store's `settings` table.
pub const SETTING_KEY: &str = "schedule";

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("bad time window {input:?}: {reason}; write it as HH:MM-HH:MM, e.g. 22:00-07:00")]
    BadWindow { input: String, reason: String },
    #[error("nothing to change; see `hone schedule set --help` for the options")]
    NothingToChange,
    #[error("bad size {input:?}: write a number of bytes with an optional unit, e.g. 600MiB, 1.5GiB, 800MB or 1000000")]
    BadBytes { input: String },
    #[error("bad {what} {input:?}: {expected}")]
    BadValue {
        what: &'static str,
        input: String,
        expected: &'static str,
    },
    #[error("{field} = {value} is out of range: {expected}")]
    OutOfRange {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the stored schedule is not valid JSON ({source}); set it again with `hone schedule set --reset`")]
    BadSetting {
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "unknown condition {input:?}; one of window, daily_limit, session_limit, recent_request, \
             user_active, cpu_load, power, battery, temperature, memory"
    )]
    UnknownCondition { input: String },
    /// Reading the setting failed (its message says which file and what to do).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A daily time window in local time, `start` inclusive, `end` exclusive. A window whose end is
/// before its start runs across midnight (22:00-07:00); start == end means the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl Window {
    /// Whether the local time `t` is inside the window.
    pub fn contains(&self, t: NaiveTime) -> bool {
        use std::cmp::Ordering::*;
        match self.start.cmp(&self.end) {
            Equal => true,
            Less => t >= self.start && t < self.end,
            Greater => t >= self.start || t < self.end,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            self.start.format("%H:%M"),
            self.end.format("%H:%M")
        )
    }
}

impl std::str::FromStr for Window {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_window(s)
    }
}

impl TryFrom<String> for Window {
    type Error = ScheduleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        parse_window(&s)
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

/// When learning may run. Every field has a default, so a stored schedule missing fields (or
/// none at all) still loads; fields this version does not know are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Schedule {
    /// Minutes without a hone request (ask, chat, server) before learning may start; 0 = none.
    pub idle_minutes: u32,
    /// Highest CPU load from other processes, as a fraction of all CPUs (0.5 = half busy).
    pub max_cpu_load: f32,
    /// Local time windows when learning may run; empty = any time.
    pub windows: Vec<Window>,
    /// Longest single learning session in minutes; 0 = no limit.
    pub max_minutes_per_session: u32,
    /// Most learning minutes per calendar day (local); 0 = no limit.
    pub max_minutes_per_day: u32,
    /// Learn only on external power.
    pub ac_only: bool,
    /// When learning on battery is allowed (`ac_only` false): the lowest charge, 0–100.
    pub min_battery_percent: f32,
    /// Hottest sensor allowed, °C; `None` = no limit.
    pub max_temperature_c: Option<f32>,
    /// Minutes the user must have been away from keyboard and mouse (logind / HIDIdleTime);
    /// 0 = not required (servers and boards never report it).
    pub user_idle_minutes: u32,
    /// Memory learning may use, bytes; `None` = the device profile's budget.
    pub memory_budget_bytes: Option<u64>,
    /// Compute threads for learning; `None` = the device profile's.
    pub threads: Option<usize>,
    /// CPU priority of the learning process (0 = normal, 19 = lowest).
    pub nice: i32,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            idle_minutes: 10,
            max_cpu_load: 0.5,
            windows: Vec::new(),
            max_minutes_per_session: 60,
            max_minutes_per_day: 240,
            ac_only: true,
            min_battery_percent: 50.0,
            max_temperature_c: Some(80.0),
            user_idle_minutes: 0,
            memory_budget_bytes: None,
            threads: None,
            nice: 10,
        }
    }
}

/// Changes for `hone schedule set`: `None` leaves a field as it is. For the fields that may
/// be unset, `Some(None)` sets "auto" (budget, threads) or "no limit" (temperature).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduleUpdate {
    pub idle_minutes: Option<u32>,
    pub max_cpu_load: Option<f32>,
    /// Replaces all windows; `Some(vec![])` = any time.
    pub windows: Option<Vec<Window>>,
    pub max_minutes_per_session: Option<u32>,
    pub max_minutes_per_day: Option<u32>,
    pub ac_only: Option<bool>,
    pub min_battery_percent: Option<f32>,
    pub max_temperature_c: Option<Option<f32>>,
    pub user_idle_minutes: Option<u32>,
    pub memory_budget_bytes: Option<Option<u64>>,
    pub threads: Option<Option<usize>>,
    pub nice: Option<i32>,
}

impl ScheduleUpdate {
    pub fn is_empty(&self) -> bool {
        *self == ScheduleUpdate::default()
    }
}

impl Schedule {
    /// The schedule stored in `store` (under [`SETTING_KEY`]); the default when none is.
    pub fn load(store: &Store) -> Result<Schedule, ScheduleError> {
        Schedule::from_setting(store.get_setting(SETTING_KEY)?.as_deref())
    }

    /// Applies `update` to the stored schedule (to the defaults with `reset`), stores the result
    /// and returns it (`hone schedule set`); an empty update without `reset` is refused.
    pub fn save_update(
        store: &Store,
        update: &ScheduleUpdate,
        reset: bool,
    ) -> Result<Schedule, ScheduleError> {
        let base = if reset {
            Schedule::default()
        } else {
            Schedule::load(store)?
        };
        if update.is_empty() && !reset {
            return Err(ScheduleError::NothingToChange);
        }
        let s = base.updated(update)?;
        store.set_setting(SETTING_KEY, &s.to_setting())?;
        Ok(s)
    }

    /// The schedule from the stored setting text; the default when nothing is stored.
    pub fn from_setting(value: Option<&str>) -> Result<Schedule, ScheduleError> {
        let Some(v) = value else {
            return Ok(Schedule::default());
        };
        let s: Schedule =
            serde_json::from_str(v).map_err(|source| ScheduleError::BadSetting { source })?;
        s.validate()?;
        Ok(s)
    }

    /// The text to store under [`SETTING_KEY`].
    pub fn to_setting(&self) -> String {
        // A struct of numbers, strings and options always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let range = |field, value: String, expected| {
            Err(ScheduleError::OutOfRange {
                field,
                value,
                expected,
            })
        };
        if !(self.max_cpu_load > 0.0 && self.max_cpu_load <= 1.0) {
            return range(
                "max_cpu_load",
                self.max_cpu_load.to_string(),
                "a fraction above 0 and at most 1 (or a percentage such as 50%)",
            );
        }
        if !(0.0..=100.0).contains(&self.min_battery_percent) {
            return range(
                "min_battery_percent",
                self.min_battery_percent.to_string(),
                "0 to 100",
            );
        }
        if let Some(t) = self.max_temperature_c {
            if !(t > 0.0 && t < 150.0) {
                return range(
                    "max_temperature_c",
                    t.to_string(),
                    "above 0 and below 150 °C",
                );
            }
        }
        if self.threads == Some(0) {
            return range("threads", "0".into(), "at least 1 (or auto)");
        }
        if self.memory_budget_bytes == Some(0) {
            return range("memory_budget", "0".into(), "more than 0 bytes (or auto)");
        }
        if !(0..=19).contains(&self.nice) {
            return range(
                "nice",
                self.nice.to_string(),
                "0 (normal priority) to 19 (lowest)",
            );
        }
        Ok(())
    }

    /// This schedule with `changes` applied and checked; `self` is unchanged on error.
    pub fn updated(&self, u: &ScheduleUpdate) -> Result<Schedule, ScheduleError> {
        let mut s = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = u.$f.clone() { s.$f = v; } )* };
        }
        set!(
            idle_minutes,
            max_cpu_load,
            windows,
            max_minutes_per_session,
            max_minutes_per_day,
            ac_only,
            min_battery_percent,
            max_temperature_c,
            user_idle_minutes,
            memory_budget_bytes,
            threads,
            nice
        );
        s.validate()?;
        Ok(s)
    }

    /// This schedule with "auto" fields filled in from the device profile.
    pub fn with_defaults(&self, memory_budget_bytes: u64, threads: usize) -> Schedule {
        let mut s = self.clone();
        s.memory_budget_bytes.get_or_insert(memory_budget_bytes);
        s.threads.get_or_insert(threads.max(1));
        s
    }

    /// Whether local time `t` is inside an allowed window (always, when there are none).
    pub fn in_window(&self, t: NaiveTime) -> bool {
        self.windows.is_empty() || self.windows.iter().any(|w| w.contains(t))
    }

    /// Minutes a learning session that starts at `now` may run before a limit stops it: the end
    /// of the current window, the session limit, what is left of the daily limit after
    /// `learned_today` minutes. `None` when nothing limits it.
    pub fn minutes_left(&self, now: DateTime<Local>, learned_today: f64) -> Option<f64> {
        let mut left: Option<f64> = None;
        let mut take = |m: f64| left = Some(left.map_or(m, |l: f64| l.min(m)));
        if self.max_minutes_per_session > 0 {
            take(self.max_minutes_per_session as f64);
        }
        if self.max_minutes_per_day > 0 {
            take((self.max_minutes_per_day as f64 - learned_today).max(0.0));
        }
        let t = now.time();
        let ends: Vec<f64> = self
            .windows
            .iter()
            .filter(|w| w.contains(t) && w.start != w.end)
            .map(|w| {
                let secs = (w.end - t).num_seconds();
                let secs = if secs <= 0 { secs + 86_400 } else { secs };
                secs as f64 / 60.0
            })
            .collect();
        // Inside several overlapping windows, the one that ends last is what counts.
        if let Some(m) = ends.into_iter().reduce(f64::max) {
            take(m);
        }
        left
    }

    /// The next moment after `now` when an allowed window opens; `None` when there are no
    /// windows (any time is allowed).
    pub fn next_window_start(&self, now: DateTime<Local>) -> Option<DateTime<Local>> {
        let today = now.date_naive();
        let mut best: Option<DateTime<Local>> = None;
        for w in &self.windows {
            for days in 0..=2 {
                let Some(date) = today.checked_add_days(chrono::Days::new(days)) else {
                    continue;
                };
                // A start that falls in a daylight-saving gap has no local time; skip it.
                let Some(at) = Local
                    .from_local_datetime(&date.and_time(w.start))
                    .earliest()
                else {
                    continue;
                };
                if at > now && best.is_none_or(|b| at < b) {
                    best = Some(at);
                }
            }
        }
        best
    }

    fn windows_text(&self) -> String {
        self.windows
            .iter()
            .map(Window::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Schedule {
    /// The settings, one per line, for `hone schedule show`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = |m: u32| {
            if m == 0 {
                "no limit".to_string()
            } else {
                format!("{m} min")
            }
        };
        writeln!(
            f,
            "idle:            {} min without a hone request, CPU load of other processes at most {:.0}%",
            self.idle_minutes,
            self.max_cpu_load * 100.0
        )?;
        if self.user_idle_minutes > 0 {
            writeln!(
                f,
                "user away:       at least {} min (keyboard and mouse)",
                self.user_idle_minutes
            )?;
        }
        writeln!(
            f,
            "windows:         {}",
            if self.windows.is_empty() {
                "any time".to_string()
            } else {
                self.windows_text()
            }
        )?;
        writeln!(
            f,
            "limits:          {} per session, {} per day",
            limit(self.max_minutes_per_session),
            limit(self.max_minutes_per_day)
        )?;
        if self.ac_only {
            writeln!(f, "power:           on AC only")?;
        } else if self.min_battery_percent > 0.0 {
            writeln!(
                f,
                "power:           AC, or battery at {:.0}% or more",
                self.min_battery_percent
            )?;
        } else {
            writeln!(f, "power:           AC or battery")?;
        }
        match self.max_temperature_c {
            Some(t) => writeln!(f, "temperature:     at most {t:.0} °C")?,
            None => writeln!(f, "temperature:     no limit")?,
        }
        match self.memory_budget_bytes {
            Some(b) => writeln!(f, "memory budget:   {}", format_bytes(b))?,
            None => writeln!(f, "memory budget:   auto (device profile)")?,
        }
        match self.threads {
            Some(t) => writeln!(f, "threads:         {t}")?,
            None => writeln!(f, "threads:         auto (device profile)")?,
        }
        write!(f, "nice:            {}", self.nice)
    }
}

/// Which condition a [`Reason`] is about, so the daemon can act on it (e.g. sleep until the
/// next window) without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Window,
    DailyLimit,
    SessionLimit,
    RecentRequest,
    UserActive,
    CpuLoad,
    Power,
    Battery,
    Temperature,
    Memory,
}

/// One condition that does not hold, with a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub condition: Condition,
    pub message: String,
}

impl Reason {
    fn new(condition: Condition, message: impl Into<String>) -> Self {
        Reason {
            condition,
            message: message.into(),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The answer of [`decide`]. `{}` prints one line ("would learn now: no — on battery (41%)");
/// `{:#}` adds what was read, one signal per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub reasons: Vec<Reason>,
    /// What was read, as (name, value) for display; unreadable signals say "unknown".
    pub signals: Vec<(String, String)>,
}

impl Decision {
    /// Whether learning could run if the conditions in `ignore` did not count (e.g. a running
    /// cycle ignores [`Condition::Memory`], since the memory it holds is not "available").
    pub fn allowed_ignoring(&self, ignore: &[Condition]) -> bool {
        self.reasons.iter().all(|r| ignore.contains(&r.condition))
    }

    /// Whether a reason about `c` is among the failures.
    pub fn blocked_by(&self, c: Condition) -> bool {
        self.reasons.iter().any(|r| r.condition == c)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allowed {
            write!(f, "would learn now: yes")?;
        } else {
            let reasons: Vec<&str> = self.reasons.iter().map(|r| r.message.as_str()).collect();
            write!(f, "would learn now: no — {}", reasons.join("; "))?;
        }
        if f.alternate() {
            let width = self.signals.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in &self.signals {
                write!(f, "\n  {k:<width$}  {v}")?;
            }
        }
        Ok(())
    }
}

/// Whether learning may run now.
///
/// `last_request` is the time of the most recent hone request (ask, chat, server), `None` if
/// there was none; `used_today_minutes` is the learning time already spent today (local day).
///
/// Missing signals, per signal:
/// - CPU load unknown → not allowed (learning could slow down whatever is running).
/// - Power unknown → not allowed when `ac_only` or a minimum battery is set. No battery at all
///   (desktop, board) → on mains. A battery whose source cannot be told → not allowed.
/// - Battery level unknown while on battery with a minimum set → not allowed.
/// - User idle unknown → not allowed only when `user_idle_minutes` > 0.
/// - Temperature unknown → allowed (many VMs and boards have no sensor), shown as "unknown".
/// - Available memory unknown → allowed (learning keeps to its budget), shown as "unknown".
pub fn decide(
    schedule: &Schedule,
    probe: &dyn SystemProbe,
    clock: &dyn Clock,
    last_request: Option<DateTime<Local>>,
    used_today_minutes: f64,
) -> Decision {
    let now = clock.now();
    let s = schedule;
    let mut reasons = Vec::new();
    let mut signals: Vec<(String, String)> = Vec::new();
    let mut signal = |k: &str, v: String| signals.push((k.to_string(), v));

    // Time windows.
    let t = now.time();
    let hhmm = now.format("%H:%M").to_string();
    if s.windows.is_empty() {
        signal("time", format!("{hhmm} (any time allowed)"));
    } else if s.in_window(t) {
        signal("time", format!("{hhmm} (inside {})", s.windows_text()));
    } else {
        let next = s
            .next_window_start(now)
            .map(|n| {
                format!(
                    "; next opens {}, in {}",
                    n.format("%H:%M"),
                    format_minutes((n - now).num_minutes())
                )
            })
            .unwrap_or_default();
        signal(
            "time",
            format!("{hhmm} (outside {}{next})", s.windows_text()),
        );
        reasons.push(Reason::new(
            Condition::Window,
            format!("outside the allowed windows {}", s.windows_text()),
        ));
    }

    // Minutes per day.
    let used = used_today_minutes.max(0.0);
    if s.max_minutes_per_day > 0 {
        signal(
            "learned today",
            format!("{:.0} of {} min", used, s.max_minutes_per_day),
        );
        if used >= f64::from(s.max_minutes_per_day) {
            reasons.push(Reason::new(
                Condition::DailyLimit,
                format!(
                    "used {:.0} of {} minutes today",
                    used, s.max_minutes_per_day
                ),
            ));
        }
    } else {
        signal("learned today", format!("{used:.0} min (no daily limit)"));
    }

    // Last hone request.
    match last_request {
        None => signal("last request", "none yet".into()),
        Some(at) => {
            let ago = (now - at).max(TimeDelta::zero());
            let mins = ago.num_minutes();
            signal("last request", format!("{} ago", format_minutes(mins)));
            if ago < TimeDelta::minutes(i64::from(s.idle_minutes)) {
                reasons.push(Reason::new(
                    Condition::RecentRequest,
                    format!(
                        "last request {} ago (needs {} idle minutes)",
                        format_minutes(mins),
                        s.idle_minutes
                    ),
                ));
            }
        }
    }

    // The user at the keyboard.
    let user_idle = probe.user_idle_seconds();
    signal(
        "user idle",
        match user_idle {
            Some(0) => "no (active now)".into(),
            Some(secs) => format_minutes((secs / 60) as i64),
            None => "unknown".into(),
        },
    );
    if s.user_idle_minutes > 0 {
        let need = u64::from(s.user_idle_minutes) * 60;
        match user_idle {
            Some(secs) if secs >= need => {}
            Some(secs) => reasons.push(Reason::new(
                Condition::UserActive,
                format!(
                    "user active {} ago (needs {} idle minutes)",
                    format_minutes((secs / 60) as i64),
                    s.user_idle_minutes
                ),
            )),
            None => reasons.push(Reason::new(
                Condition::UserActive,
                format!(
                    "cannot tell whether the user is away (needs {} idle minutes)",
                    s.user_idle_minutes
                ),
            )),
        }
    }

    // Power and battery.
    let needs_power_info = s.ac_only || s.min_battery_percent > 0.0;
    let pct = |p: Option<f32>| p.map(|p| format!("{p:.0}%"));
    match probe.power() {
        None => {
            signal("power", "unknown".into());
            if needs_power_info {
                reasons.push(Reason::new(Condition::Power, "power source unknown"));
            }
        }
        Some(p) if !p.has_battery => signal("power", "mains (no battery)".into()),
        Some(p) => {
            let level = pct(p.battery_percent);
            match p.on_ac {
                Some(true) => signal(
                    "power",
                    format!(
                        "AC, battery {}",
                        level.as_deref().unwrap_or("level unknown")
                    ),
                ),
                Some(false) => {
                    signal(
                        "power",
                        format!("battery {}", level.as_deref().unwrap_or("level unknown")),
                    );
                    if s.ac_only {
                        reasons.push(Reason::new(
                            Condition::Power,
                            match &level {
                                Some(l) => format!("on battery ({l})"),
                                None => "on battery".to_string(),
                            },
                        ));
                    } else if s.min_battery_percent > 0.0 {
                        match p.battery_percent {
                            Some(b) if b >= s.min_battery_percent => {}
                            Some(b) => reasons.push(Reason::new(
                                Condition::Battery,
                                format!("battery {b:.0}% is below {:.0}%", s.min_battery_percent),
                            )),
                            None => reasons
                                .push(Reason::new(Condition::Battery, "on battery, level unknown")),
                        }
                    }
                }
                None => {
                    signal(
                        "power",
                        format!(
                            "source unknown, battery {}",
                            level.as_deref().unwrap_or("level unknown")
                        ),
                    );
                    let battery_ok = !s.ac_only
                        && p.battery_percent
                            .is_some_and(|b| b >= s.min_battery_percent);
                    if needs_power_info && !battery_ok {
                        reasons.push(Reason::new(
                            Condition::Power,
                            "power source unknown (the device has a battery)",
                        ));
                    }
                }
            }
        }
    }

    // CPU load.
    let limit_pct = (s.max_cpu_load * 100.0).round();
    match probe.cpu_load() {
        Some(load) => {
            let pct = (load * 100.0).round();
            signal("CPU load", format!("{pct:.0}% (limit {limit_pct:.0}%)"));
            if load > s.max_cpu_load {
                reasons.push(Reason::new(
                    Condition::CpuLoad,
                    format!("CPU load {pct:.0}% is above {limit_pct:.0}%"),
                ));
            }
        }
        None => {
            signal("CPU load", "unknown".into());
            reasons.push(Reason::new(Condition::CpuLoad, "CPU load unknown"));
        }
    }

    // Temperature.
    match probe.max_temperature_c() {
        Some(c) => {
            signal("temperature", format!("{c:.0} °C"));
            if let Some(max) = s.max_temperature_c {
                if c > max {
                    reasons.push(Reason::new(
                        Condition::Temperature,
                        format!("temperature {c:.0} °C is above {max:.0} °C"),
                    ));
                }
            }
        }
        None => signal("temperature", "unknown".into()),
    }
    if let Some(throttled) = probe.thermal_throttled() {
        signal(
            "thermal throttling",
            if throttled { "yes" } else { "no" }.into(),
        );
        if throttled && s.max_temperature_c.is_some() {
            reasons.push(Reason::new(
                Condition::Temperature,
                "the system is slowing the CPU down for heat",
            ));
        }
    }

    // Memory.
    let budget = s.memory_budget_bytes;
    match probe.memory_available_bytes() {
        Some(avail) => {
            signal(
                "memory available",
                match budget {
                    Some(b) => format!("{} (budget {})", format_bytes(avail), format_bytes(b)),
                    None => format_bytes(avail),
                },
            );
            if let Some(b) = budget {
                if avail < b {
                    reasons.push(Reason::new(
                        Condition::Memory,
                        format!(
                            "only {} of memory available, learning needs {}",
                            format_bytes(avail),
                            format_bytes(b)
                        ),
                    ));
                }
            }
        }
        None => signal("memory available", "unknown".into()),
    }

    Decision {
        allowed: reasons.is_empty(),
        reasons,
        signals,
    }
}

/// The reason to end a running session that has lasted `session_minutes`, if its limit is
/// reached (0 = no limit).
pub fn session_limit_reached(schedule: &Schedule, session_minutes: f64) -> Option<Reason> {
    let max = schedule.max_minutes_per_session;
    (max > 0 && session_minutes >= f64::from(max)).then(|| {
        Reason::new(
            Condition::SessionLimit,
            format!("this session has run {session_minutes:.0} of {max} minutes"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers for the command line.

/// `"22:00-07:00"` → a [`Window`]. Hours may have one digit (`7:00`); `24:00` is accepted as
/// an end (midnight).
pub fn parse_window(s: &str) -> Result<Window, ScheduleError> {
    let bad = |reason: &str| ScheduleError::BadWindow {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| bad("no '-' between start and end"))?;
    let time = |x: &str| -> Result<NaiveTime, ScheduleError> {
        let x = x.trim();
        if x == "24:00" {
            return Ok(NaiveTime::MIN);
        }
        NaiveTime::parse_from_str(x, "%H:%M").map_err(|_| bad(&format!("{x:?} is not a time")))
    };
    let start = time(a)?;
    if a.trim() == "24:00" {
        return Err(bad("a window cannot start at 24:00; use 00:00"));
    }
    let end = time(b)?;
    Ok(Window { start, end })
}

/// `"600MiB"` → bytes (see [`units::parse_bytes`]), as a schedule error.
pub fn parse_bytes(s: &str) -> Result<u64, ScheduleError> {
    units::parse_bytes(s).map_err(|_| ScheduleError::BadBytes {
        input: s.to_string(),
    })
}

/// `"50%"` or `"0.5"` → 0.5.
pub fn parse_fraction(s: &str) -> Result<f32, ScheduleError> {
    let bad = || ScheduleError::BadValue {
        what: "fraction",
        input: s.to_string(),
        expected: "a percentage such as 50% or a fraction such as 0.5",
    };
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f32>().map_err(|_| bad())? / 100.0,
        None => t.parse::<f32>().map_err(|_| bad())?,
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(bad())
    }
}

/// A value that may also be "auto" (or "off"): `OrUnset(None)`. For clap value parsers, which
/// cannot produce `Option<Option<T>>` directly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrUnset<T>(pub Option<T>);

fn is_unset_word(s: &str) -> bool {
    matches!(
        s.trim().to_ascii_lowercase().as_str(),
        "auto" | "off" | "none" | "default"
    )
}

/// `"auto"` or a size (see [`parse_bytes`]).
pub fn parse_budget(s: &str) -> Result<OrUnset<u64>, ScheduleError> {
    if is_unset_word(s) {
        return Ok(OrUnset(None));
    }
    parse_bytes(s).map(|b| OrUnset(Some(b)))
}

/// `"auto"` or a thread count.
pub fn parse_threads(s: &str) -> Result<OrUnset<usize>, ScheduleError> {
    if is_unset_word(s) {
        return Ok(OrUnset(None));
    }
    s.trim()
        .parse::<usize>()
        .map(|n| OrUnset(Some(n)))
        .map_err(|_| ScheduleError::BadValue {
            what: "thread count",
            input: s.to_string(),
            expected: "a whole number such as 3, or auto",
        })
}

/// `"off"` or a temperature in °C (`80`, `80C`, `80°C`).
pub fn parse_temperature(s: &str) -> Result<OrUnset<f32>, ScheduleError> {
    if is_unset_word(s) {
        return Ok(OrUnset(None));
    }
    let t = s.trim();
    let t = t
        .strip_suffix(['C', 'c'])
        .map(|x| x.trim_end().trim_end_matches('°'))
        .unwrap_or(t);
    t.trim()
        .parse::<f32>()
        .ok()
        .filter(|v| v.is_finite())
        .map(|v| OrUnset(Some(v)))
        .ok_or_else(|| ScheduleError::BadValue {
            what: "temperature",
            input: s.to_string(),
            expected: "degrees Celsius such as 80, or off",
        })
}

/// A [`Condition`] by its name (`cpu_load`, as in the JSON of a decision).
pub fn parse_condition(s: &str) -> Result<Condition, ScheduleError> {
    serde_json::from_value(serde_json::Value::String(s.trim().to_string())).map_err(|_| {
        ScheduleError::UnknownCondition {
            input: s.to_string(),
        }
    })
}

/// An RFC 3339 time as stored in the database (`2025-01-31T12:00:00.123Z`) in local time, for
/// the `last_request` of [`decide`]; `None` if it does not parse.
pub fn parse_stored_time(s: &str) -> Option<DateTime<Local>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Local))
}

/// Minutes for people: "3 min", "2 h 5 min".
fn format_minutes(m: i64) -> String {
    let m = m.max(0);
    if m >= 60 {
        format!("{} h {} min", m / 60, m % 60)
    } else {
        format!("{m} min")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{FixedClock, FixedProbe, LinuxProbe, Power};
    use chrono::NaiveDate;
    use std::fs;
    use std::path::Path;

    /// 2025-01-15 (no daylight-saving change near it in any zone) at hh:mm local time.
    fn at(hh: u32, mm: u32) -> DateTime<Local> {
        let n = NaiveDate::from_ymd_opt(2025, 1, 15)
            .unwrap()
            .and_hms_opt(hh, mm, 0)
            .unwrap();
        Local.from_local_datetime(&n).earliest().unwrap()
    }

    fn night() -> Schedule {
        Schedule {
            windows: vec![parse_window("22:00-07:00").unwrap()],
            ..Schedule::default()
        }
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// A quiet laptop on AC, 45 °C, 2 GiB available, load 0.2 on 2 CPUs.
    fn fake_laptop(root: &Path) {
        write(root, "proc/loadavg", "0.40 0.30 0.20 1/200 999\n");
        write(
            root,
            "proc/stat",
            "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 5 0 5 50 0\ncpu1 5 0 5 50 0\n",
        );
        write(
            root,
            "proc/meminfo",
            "MemTotal: 16000000 kB\nMemAvailable: 2097152 kB\n",
        );
        write(root, "sys/class/power_supply/AC/type", "Mains\n");
        write(root, "sys/class/power_supply/AC/online", "1\n");
        write(root, "sys/class/power_supply/BAT0/type", "Battery\n");
        write(root, "sys/class/power_supply/BAT0/capacity", "90\n");
        write(root, "sys/class/power_supply/BAT0/status", "Charging\n");
        write(root, "sys/class/thermal/thermal_zone0/temp", "45000\n");
    }

    fn decide_at(s: &Schedule, probe: &dyn SystemProbe, t: DateTime<Local>) -> Decision {
        decide(s, probe, &FixedClock(t), None, 0.0)
    }

    #[test]
    fn windows_across_midnight() {
        let w = parse_window("22:00-07:00").unwrap();
        let t = |h, m| NaiveTime::from_hms_opt(h, m, 0).unwrap();
        assert!(w.contains(t(23, 30)));
        assert!(w.contains(t(22, 0)));
        assert!(w.contains(t(0, 0)));
        assert!(w.contains(NaiveTime::from_hms_opt(6, 59, 59).unwrap()));
        assert!(!w.contains(t(7, 0)));
        assert!(!w.contains(t(12, 0)));
        assert!(!w.contains(t(21, 59)));
        let day = parse_window("9:00-17:30").unwrap();
        assert!(day.contains(t(9, 0)) && !day.contains(t(17, 30)) && !day.contains(t(8, 59)));
        assert!(parse_window("00:00-00:00").unwrap().contains(t(13, 0)));
        assert_eq!(
            parse_window("18:00-24:00").unwrap().to_string(),
            "18:00-00:00"
        );
    }

    #[test]
    fn decision_windows_with_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        fake_laptop(dir.path());
        let probe = LinuxProbe::at(dir.path());
        let s = night();
        let d = decide_at(&s, &probe, at(23, 30));
        assert!(d.allowed, "{d:#}");
        assert_eq!(d.to_string(), "would learn now: yes");
        let d = decide_at(&s, &probe, at(12, 0));
        assert!(!d.allowed);
        assert_eq!(
            d.to_string(),
            "would learn now: no — outside the allowed windows 22:00-07:00"
        );
        assert!(d.blocked_by(Condition::Window));
        assert!(format!("{d:#}").contains("next opens 22:00, in 10 h 0 min)"));
        assert!(!decide_at(&s, &probe, at(7, 0)).allowed);
        assert!(decide_at(&s, &probe, at(6, 59)).allowed);
        assert!(decide_at(&s, &probe, at(22, 0)).allowed);
        // Several windows.
        let s2 = Schedule {
            windows: vec![
                parse_window("12:00-13:00").unwrap(),
                parse_window("22:00-07:00").unwrap(),
            ],
            ..Schedule::default()
        };
        assert!(decide_at(&s2, &probe, at(12, 30)).allowed);
        let d = decide_at(&s2, &probe, at(14, 0));
        assert_eq!(
            d.reasons[0].message,
            "outside the allowed windows 12:00-13:00, 22:00-07:00"
        );
        // No windows: any time.
        assert!(decide_at(&Schedule::default(), &probe, at(12, 0)).allowed);
    }

    #[test]
    fn next_window_start() {
        let s = night();
        assert_eq!(s.next_window_start(at(12, 0)), Some(at(22, 0)));
        let next = s.next_window_start(at(23, 0)).unwrap();
        assert_eq!(next - at(23, 0), TimeDelta::hours(23));
        assert_eq!(Schedule::default().next_window_start(at(12, 0)), None);
    }

    #[test]
    fn battery() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_laptop(root);
        let ps = "sys/class/power_supply";
        write(root, &format!("{ps}/AC/online"), "0\n");
        write(root, &format!("{ps}/BAT0/capacity"), "41\n");
        write(root, &format!("{ps}/BAT0/status"), "Discharging\n");
        let probe = LinuxProbe::at(root);
        let s = Schedule::default();
        let d = decide_at(&s, &probe, at(12, 0));
        assert_eq!(d.to_string(), "would learn now: no — on battery (41%)");
        // Battery allowed above 50%: 41% is not enough, 60% is.
        let s = Schedule {
            ac_only: false,
            ..Schedule::default()
        };
        let d = decide_at(&s, &probe, at(12, 0));
        assert_eq!(d.reasons[0].message, "battery 41% is below 50%");
        write(root, &format!("{ps}/BAT0/capacity"), "60\n");
        assert!(decide_at(&s, &probe, at(12, 0)).allowed);
        // Back on AC.
        write(root, &format!("{ps}/AC/online"), "1\n");
        write(root, &format!("{ps}/BAT0/status"), "Charging\n");
        write(root, &format!("{ps}/BAT0/capacity"), "10\n");
        let d = decide_at(&Schedule::default(), &probe, at(12, 0));
        assert!(d.allowed, "{d:#}");
        assert!(format!("{d:#}").contains("AC, battery 10%"));
    }

    #[test]
    fn no_battery_is_mains_but_unreadable_battery_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_laptop(root);
        fs::remove_dir_all(root.join("sys/class/power_supply")).unwrap();
        let probe = LinuxProbe::at(root);
        let d = decide_at(&Schedule::default(), &probe, at(12, 0));
        assert!(d.allowed, "{d:#}");
        assert!(format!("{d:#}").contains("mains (no battery)"));
        // A battery folder whose files say nothing useful.
        write(root, "sys/class/power_supply/BAT0/type", "Battery\n");
        let d = decide_at(&Schedule::default(), &probe, at(12, 0));
        assert_eq!(
            d.to_string(),
            "would learn now: no — power source unknown (the device has a battery)"
        );
        // The probe could not read power at all.
        let p = FixedProbe {
            power: None,
            ..FixedProbe::idle_desktop()
        };
        let d = decide_at(&Schedule::default(), &p, at(12, 0));
        assert_eq!(d.reasons[0].message, "power source unknown");
        // ... which does not matter when battery use is allowed without a minimum.
        let s = Schedule {
            ac_only: false,
            min_battery_percent: 0.0,
            ..Schedule::default()
        };
        assert!(decide_at(&s, &p, at(12, 0)).allowed);
    }

    #[test]
    fn thermal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_laptop(root);
        write(root, "sys/class/thermal/thermal_zone1/temp", "85000\n");
        let probe = LinuxProbe::at(root);
        let d = decide_at(&Schedule::default(), &probe, at(12, 0));
        assert_eq!(
            d.to_string(),
            "would learn now: no — temperature 85 °C is above 80 °C"
        );
        let off = Schedule {
            max_temperature_c: None,
            ..Schedule::default()
        };
        assert!(decide_at(&off, &probe, at(12, 0)).allowed);
        // No sensors: allowed, shown as unknown.
        fs::remove_dir_all(root.join("sys/class/thermal")).unwrap();
        let d = decide_at(&Schedule::default(), &probe, at(12, 0));
        assert!(d.allowed);
        assert!(d
            .signals
            .contains(&("temperature".to_string(), "unknown".to_string())));
        // macOS-style throttling.
        let p = FixedProbe {
            thermal_throttled: Some(true),
            ..FixedProbe::idle_desktop()
        };
        let d = decide_at(&Schedule::default(), &p, at(12, 0));
        assert!(d.blocked_by(Condition::Temperature));
    }

    #[test]
    fn load() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_laptop(root);
        write(root, "proc/loadavg", "1.46 1.00 1.00 3/200 999\n");
        let probe = LinuxProbe::at(root);
        let d = decide_at(&Schedule::default(), &probe, at(12, 0));
        assert_eq!(
            d.to_string(),
            "would learn now: no — CPU load 73% is above 50%"
        );
        let lenient = Schedule {
            max_cpu_load: 0.8,
            ..Schedule::default()
        };
        assert!(decide_at(&lenient, &LinuxProbe::at(root), at(12, 0)).allowed);
    }

    #[test]
    fn missing_files() {
        // An empty tree: no /proc, no /sys.
        let dir = tempfile::tempdir().unwrap();
        let probe = LinuxProbe::at(dir.path());
        let d = decide_at(&Schedule::default(), &probe, at(12, 0));
        // Load unknown blocks; no power class = mains; temperature and memory unknown pass.
        assert_eq!(d.to_string(), "would learn now: no — CPU load unknown");
        let shown = format!("{d:#}");
        assert!(shown.contains("temperature"), "{shown}");
        for k in ["CPU load", "temperature", "memory available", "user idle"] {
            assert!(
                d.signals.contains(&(k.to_string(), "unknown".to_string())),
                "{k}: {shown}"
            );
        }
    }

    #[test]
    fn minutes_per_day_and_session() {
        let p = FixedProbe::idle_desktop();
        let s = Schedule {
            max_minutes_per_day: 60,
            ..Schedule::default()
        };
        let c = FixedClock(at(12, 0));
        assert!(decide(&s, &p, &c, None, 59.4).allowed);
        let d = decide(&s, &p, &c, None, 62.0);
        assert_eq!(
            d.to_string(),
            "would learn now: no — used 62 of 60 minutes today"
        );
        let unlimited = Schedule {
            max_minutes_per_day: 0,
            ..Schedule::default()
        };
        assert!(decide(&unlimited, &p, &c, None, 10_000.0).allowed);
        assert!(session_limit_reached(&s, 59.0).is_none());
        assert_eq!(
            session_limit_reached(&s, 60.0).unwrap().message,
            "this session has run 60 of 60 minutes"
        );
    }

    #[test]
    fn recent_request_and_user_idle() {
        let p = FixedProbe::idle_desktop();
        let c = FixedClock(at(12, 0));
        let s = Schedule::default();
        let d = decide(&s, &p, &c, Some(at(11, 57)), 0.0);
        assert_eq!(
            d.to_string(),
            "would learn now: no — last request 3 min ago (needs 10 idle minutes)"
        );
        assert!(decide(&s, &p, &c, Some(at(11, 50)), 0.0).allowed);
        // A request "in the future" (clock changed) counts as just now.
        assert!(!decide(&s, &p, &c, Some(at(12, 5)), 0.0).allowed);
        let s = Schedule {
            user_idle_minutes: 5,
            ..Schedule::default()
        };
        assert!(decide(&s, &p, &c, None, 0.0).allowed);
        let busy = FixedProbe {
            user_idle_seconds: Some(120),
            ..FixedProbe::idle_desktop()
        };
        assert_eq!(
            decide(&s, &busy, &c, None, 0.0).reasons[0].message,
            "user active 2 min ago (needs 5 idle minutes)"
        );
        let unknown = FixedProbe {
            user_idle_seconds: None,
            ..FixedProbe::idle_desktop()
        };
        assert!(decide(&s, &unknown, &c, None, 0.0).blocked_by(Condition::UserActive));
        // Not required: unknown is fine.
        assert!(decide(&Schedule::default(), &unknown, &c, None, 0.0).allowed);
    }

    #[test]
    fn memory_budget() {
        let p = FixedProbe {
            memory_available_bytes: Some(300 << 20),
            ..FixedProbe::idle_desktop()
        };
        let s = Schedule::default().with_defaults(600 << 20, 3);
        let d = decide_at(&s, &p, at(12, 0));
        assert_eq!(
            d.reasons[0].message,
            "only 300 MiB of memory available, learning needs 600 MiB"
        );
        assert!(d.allowed_ignoring(&[Condition::Memory]));
        assert!(!d.allowed_ignoring(&[Condition::CpuLoad]));
        assert_eq!(s.threads, Some(3));
        // A user's own budget wins over the profile's.
        let own = Schedule {
            memory_budget_bytes: Some(100 << 20),
            ..Schedule::default()
        }
        .with_defaults(600 << 20, 3);
        assert!(decide_at(&own, &p, at(12, 0)).allowed);
    }

    #[test]
    fn several_reasons_in_one_line() {
        let p = FixedProbe {
            cpu_load: Some(0.73),
            power: Some(Power {
                has_battery: true,
                on_ac: Some(false),
                battery_percent: Some(41.0),
            }),
            ..FixedProbe::idle_desktop()
        };
        let d = decide_at(&Schedule::default(), &p, at(12, 0));
        assert_eq!(
            d.to_string(),
            "would learn now: no — on battery (41%); CPU load 73% is above 50%"
        );
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"condition\":\"cpu_load\""), "{json}");
    }

    #[test]
    fn setting_round_trip_and_defaults() {
        let s = night();
        let text = s.to_setting();
        assert!(text.contains("\"22:00-07:00\""), "{text}");
        assert_eq!(Schedule::from_setting(Some(&text)).unwrap(), s);
        assert_eq!(Schedule::from_setting(None).unwrap(), Schedule::default());
        // Missing fields take defaults, unknown ones are ignored.
        let partial = Schedule::from_setting(Some(r#"{"idle_minutes": 3, "future": 1}"#)).unwrap();
        assert_eq!(partial.idle_minutes, 3);
        assert_eq!(partial.max_cpu_load, 0.5);
        assert!(matches!(
            Schedule::from_setting(Some("{not json")),
            Err(ScheduleError::BadSetting { .. })
        ));
        assert!(matches!(
            Schedule::from_setting(Some(r#"{"windows": ["25:00-07:00"]}"#)),
            Err(ScheduleError::BadSetting { .. })
        ));
        assert!(Schedule::from_setting(Some(r#"{"nice": 40}"#)).is_err());
    }

    #[test]
    fn load_reads_the_stored_setting_or_gives_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        assert_eq!(Schedule::load(&store).unwrap(), Schedule::default());
        let s = night();
        store.set_setting(SETTING_KEY, &s.to_setting()).unwrap();
        assert_eq!(Schedule::load(&store).unwrap(), s);
        store.set_setting(SETTING_KEY, "{oops").unwrap();
        let e = Schedule::load(&store).unwrap_err();
        assert!(matches!(e, ScheduleError::BadSetting { .. }), "{e}");
        assert!(e.to_string().contains("hone schedule set --reset"), "{e}");
    }

    #[test]
    fn updates() {
        let s = Schedule::default();
        let u = ScheduleUpdate {
            windows: Some(vec![parse_window("22:00-07:00").unwrap()]),
            max_cpu_load: Some(parse_fraction("30%").unwrap()),
            memory_budget_bytes: Some(parse_budget("600MiB").unwrap().0),
            max_temperature_c: Some(parse_temperature("off").unwrap().0),
            ..ScheduleUpdate::default()
        };
        let t = s.updated(&u).unwrap();
        assert_eq!(t.windows.len(), 1);
        assert!((t.max_cpu_load - 0.3).abs() < 1e-6);
        assert_eq!(t.memory_budget_bytes, Some(600 << 20));
        assert_eq!(t.max_temperature_c, None);
        assert_eq!(t.idle_minutes, 10);
        let bad = ScheduleUpdate {
            nice: Some(-5),
            ..ScheduleUpdate::default()
        };
        assert!(matches!(
            s.updated(&bad),
            Err(ScheduleError::OutOfRange { field: "nice", .. })
        ));
        assert!(s
            .updated(&ScheduleUpdate {
                max_cpu_load: Some(1.5),
                ..Default::default()
            })
            .is_err());
        assert!(ScheduleUpdate::default().is_empty());
        let shown = t.to_string();
        assert!(
            shown.contains("22:00-07:00") && shown.contains("600 MiB"),
            "{shown}"
        );
    }

    #[test]
    fn parse_helpers() {
        assert_eq!(parse_condition(" cpu_load").unwrap(), Condition::CpuLoad);
        assert_eq!(
            parse_condition("user_active").unwrap(),
            Condition::UserActive
        );
        let e = parse_condition("cpu").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown condition \"cpu\"; one of window, daily_limit, session_limit, \
             recent_request, user_active, cpu_load, power, battery, temperature, memory"
        );
        assert_eq!(parse_bytes("600MiB").unwrap(), 600 << 20);
        assert_eq!(parse_bytes("600 MiB").unwrap(), 600 << 20);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("2g").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("800MB").unwrap(), 800_000_000);
        assert_eq!(parse_bytes("1000000").unwrap(), 1_000_000);
        assert_eq!(parse_bytes("512 B").unwrap(), 512);
        for bad in [
            "",
            "MiB",
            "-1MiB",
            "1.2.3G",
            "12 parsecs",
            "99999999999999999999TiB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        for bad in [
            "22:00",
            "22:00-",
            "25:00-07:00",
            "ab-cd",
            "24:00-01:00",
            "22:00-07:00-09:00",
        ] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_fraction("0.5").unwrap(), 0.5);
        assert_eq!(parse_fraction("75 %").unwrap(), 0.75);
        assert!(parse_fraction("lots").is_err());
        assert_eq!(parse_threads("auto").unwrap(), OrUnset(None));
        assert_eq!(parse_threads("3").unwrap(), OrUnset(Some(3)));
        assert!(parse_threads("-1").is_err());
        assert_eq!(parse_temperature("80°C").unwrap(), OrUnset(Some(80.0)));
        assert_eq!(parse_temperature("75").unwrap(), OrUnset(Some(75.0)));
        assert!(parse_temperature("hot").is_err());
        assert_eq!(format_bytes(600 << 20), "600 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_minutes(125), "2 h 5 min");
        let t = parse_stored_time("2025-01-31T12:00:00.123Z").unwrap();
        assert_eq!(t.timestamp(), 1_738_324_800);
        assert!(parse_stored_time("yesterday").is_none());
    }

    #[test]
    fn minutes_left_takes_the_nearest_limit() {
        let at = |h: u32, m: u32| {
            Local
                .from_local_datetime(
                    &chrono::NaiveDate::from_ymd_opt(2026, 3, 10)
                        .and_then(|d| d.and_hms_opt(h, m, 0))
                        .expect("a date"),
                )
                .earliest()
                .expect("a local time")
        };
        let mut s = Schedule {
            max_minutes_per_session: 0,
            max_minutes_per_day: 0,
            ..Schedule::default()
        };
        assert_eq!(s.minutes_left(at(12, 0), 0.0), None);
        s.max_minutes_per_session = 60;
        s.max_minutes_per_day = 240;
        assert_eq!(s.minutes_left(at(12, 0), 0.0), Some(60.0));
        assert_eq!(s.minutes_left(at(12, 0), 200.0), Some(40.0));
        assert_eq!(s.minutes_left(at(12, 0), 300.0), Some(0.0));
        // A window across midnight, 22:00-07:00: at 06:30 half an hour is left; at 23:00, eight
        // hours (the session limit, 60, is nearer).
        s.windows = vec![parse_window("22:00-07:00").expect("a window")];
        assert_eq!(s.minutes_left(at(6, 30), 0.0), Some(30.0));
        assert_eq!(s.minutes_left(at(23, 0), 0.0), Some(60.0));
        s.max_minutes_per_session = 0;
        s.max_minutes_per_day = 0;
        assert_eq!(s.minutes_left(at(23, 0), 0.0), Some(480.0));
    }
}
