//! The system signals the learning schedule looks at: the time, CPU load, power source and
//! battery, temperature, how long the user has been away, and available memory. Each sits
//! behind a small trait ([`Clock`], [`SystemProbe`]) so tests inject fixed values or point the
//! Linux reader at a fake `/proc` and `/sys` tree.
//!
//! Readers: [`LinuxProbe`] (files under a configurable root, plus logind through `loginctl`),
//! [`MacProbe`] (`pmset`, `ioreg`, `sysctl`, `vm_stat`; its parsers are pure functions over the
//! commands' text, so they are tested on any OS), and [`FixedProbe`] for tests.
//!
//! It must NOT decide anything (that is `crate::schedule`), change the system (priorities,
//! threads), or fail: a signal that cannot be read is `None`, never an error or a panic.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Local};
use serde::{Deserialize, Serialize};

/// Where "now" comes from. Local time, because the allowed windows are local wall-clock times.
pub trait Clock {
    fn now(&self) -> DateTime<Local>;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Local> {
        Local::now()
    }
}

/// A clock that always says the same time (for tests and for "what if" displays).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub DateTime<Local>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Local> {
        self.0
    }
}

/// The power source, as far as it can be read.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Power {
    /// Whether the machine has a (system) battery at all. Boards and desktops do not, and run
    /// from mains by definition.
    pub has_battery: bool,
    /// Running from an external supply (mains, USB-C charger): `Some(true)`; from the battery:
    /// `Some(false)`; cannot tell: `None`.
    pub on_ac: Option<bool>,
    /// Charge of the system battery (average over several), 0–100.
    pub battery_percent: Option<f32>,
}

/// Readings of the machine's state. Every method answers `None` when the signal is not
/// available here (no such file, no such command, unparsable output).
pub trait SystemProbe: Send + Sync {
    /// Fraction of all CPUs kept busy by other processes, 0.0–1.0 (a load-average estimate can
    /// exceed 1.0 on an overloaded machine).
    fn cpu_load(&self) -> Option<f32>;
    /// Power source and battery. `None` when it cannot be read at all.
    fn power(&self) -> Option<Power>;
    /// The hottest temperature sensor, in °C.
    fn max_temperature_c(&self) -> Option<f32>;
    /// Seconds since the user last touched keyboard or mouse (logind's IdleHint, macOS
    /// HIDIdleTime). `Some(0)` when the session says it is not idle.
    fn user_idle_seconds(&self) -> Option<u64>;
    /// Memory the system could give to a new workload without swapping, in bytes.
    fn memory_available_bytes(&self) -> Option<u64>;
    /// Whether the OS is slowing the CPU down for heat (macOS thermal state). Linux reports
    /// temperatures instead, so the default is `None`.
    fn thermal_throttled(&self) -> Option<bool> {
        None
    }
}

/// The probe for this operating system: [`LinuxProbe`] on Linux, [`MacProbe`] on macOS,
/// and a probe that knows nothing elsewhere.
pub fn system_probe() -> Box<dyn SystemProbe> {
    if cfg!(target_os = "macos") {
        Box::new(MacProbe::new())
    } else if cfg!(target_os = "linux") {
        Box::new(LinuxProbe::system())
    } else {
        Box::new(FixedProbe::default())
    }
}

/// A probe that answers fixed values; `FixedProbe::default()` knows nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FixedProbe {
    pub cpu_load: Option<f32>,
    pub power: Option<Power>,
    pub max_temperature_c: Option<f32>,
    pub user_idle_seconds: Option<u64>,
    pub memory_available_bytes: Option<u64>,
    pub thermal_throttled: Option<bool>,
}

impl FixedProbe {
    /// A quiet desktop: load 5%, mains without battery, 45 °C, user away an hour, 8 GiB free.
    pub fn idle_desktop() -> Self {
        FixedProbe {
            cpu_load: Some(0.05),
            power: Some(Power {
                has_battery: false,
                on_ac: Some(true),
                battery_percent: None,
            }),
            max_temperature_c: Some(45.0),
            user_idle_seconds: Some(3600),
            memory_available_bytes: Some(8 << 30),
            thermal_throttled: None,
        }
    }
}

impl SystemProbe for FixedProbe {
    fn cpu_load(&self) -> Option<f32> {
        self.cpu_load
    }
    fn power(&self) -> Option<Power> {
        self.power
    }
    fn max_temperature_c(&self) -> Option<f32> {
        self.max_temperature_c
    }
    fn user_idle_seconds(&self) -> Option<u64> {
        self.user_idle_seconds
    }
    fn memory_available_bytes(&self) -> Option<u64> {
        self.memory_available_bytes
    }
    fn thermal_throttled(&self) -> Option<bool> {
        self.thermal_throttled
    }
}

// ---------------------------------------------------------------------------------------------
// Linux

/// One reading of `/proc/stat` (all CPUs) and `/proc/self/stat`, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct StatSample {
    at: Instant,
    busy: u64,
    total: u64,
    own: u64,
}

#[derive(Debug, Default)]
struct LoadState {
    last: Option<StatSample>,
    last_value: Option<f32>,
}

/// Reads the signals from `/proc` and `/sys` under a root folder (`/` for the real system, a
/// fake tree in tests) and, for the real system only, logind's idle hint via `loginctl`.
///
/// CPU load is measured between two calls from `/proc/stat` deltas, *minus this process's own
/// CPU time* (so a learning cycle does not count as "the machine is busy"); the first call,
/// with nothing to compare, uses the 1-minute load average divided by the CPU count.
#[derive(Debug)]
pub struct LinuxProbe {
    root: PathBuf,
    logind: bool,
    min_sample_interval: Duration,
    load: Mutex<LoadState>,
    /// The last logind answer and when it was read (asking costs a process start).
    idle_cache: Mutex<Option<(Instant, Option<u64>)>>,
}

impl LinuxProbe {
    /// The real system: root `/`, logind asked for the idle hint.
    pub fn system() -> Self {
        let mut p = Self::at("/");
        p.logind = true;
        p
    }

    /// Files under `root` (e.g. a tempdir holding `proc/loadavg`); logind is not asked.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        LinuxProbe {
            root: root.into(),
            logind: false,
            min_sample_interval: Duration::from_millis(250),
            load: Mutex::new(LoadState::default()),
            idle_cache: Mutex::new(None),
        }
    }

    /// Two `/proc/stat` readings closer together than this give the previous value again
    /// (default 250 ms; tests set zero).
    pub fn with_min_sample_interval(mut self, d: Duration) -> Self {
        self.min_sample_interval = d;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }

    fn sample(&self) -> Option<StatSample> {
        let stat = self.read("proc/stat")?;
        let (busy, total) = parse_proc_stat_totals(&stat)?;
        let own = self
            .read("proc/self/stat")
            .and_then(|s| parse_self_stat_ticks(&s))
            .unwrap_or(0);
        Some(StatSample {
            at: Instant::now(),
            busy,
            total,
            own,
        })
    }

    fn loadavg_fraction(&self) -> Option<f32> {
        let load1 = parse_loadavg(&self.read("proc/loadavg")?)?;
        let n = self
            .read("proc/stat")
            .map(|s| count_cpus(&s))
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        Some(load1 / n as f32)
    }
}

impl SystemProbe for LinuxProbe {
    fn cpu_load(&self) -> Option<f32> {
        let now = self.sample();
        let Ok(mut st) = self.load.lock() else {
            return self.loadavg_fraction();
        };
        if let (Some(prev), Some(cur)) = (st.last, now) {
            if cur.at.duration_since(prev.at) < self.min_sample_interval {
                if let Some(v) = st.last_value {
                    return Some(v);
                }
            }
            if cur.total > prev.total && cur.busy >= prev.busy {
                let total = (cur.total - prev.total) as f64;
                let busy = (cur.busy - prev.busy) as f64;
                let own = cur.own.saturating_sub(prev.own) as f64;
                let v = ((busy - own).max(0.0) / total).clamp(0.0, 1.0) as f32;
                st.last = Some(cur);
                st.last_value = Some(v);
                return Some(v);
            }
        }
        if now.is_some() {
            st.last = now;
        }
        let v = self.loadavg_fraction();
        st.last_value = v;
        v
    }

    fn power(&self) -> Option<Power> {
        let dir = self.root.join("sys/class/power_supply");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // No power-supply class at all: a board or desktop on mains.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some(Power {
                    has_battery: false,
                    on_ac: Some(true),
                    battery_percent: None,
                })
            }
            Err(_) => return None,
        };
        let mut supplies = Vec::new();
        for entry in entries.flatten() {
            let p = entry.path();
            let get = |name: &str| {
                std::fs::read_to_string(p.join(name))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            supplies.push(SupplyInfo {
                kind: get("type").unwrap_or_default(),
                scope: get("scope"),
                online: get("online"),
                present: get("present"),
                capacity: get("capacity"),
                status: get("status"),
            });
        }
        Some(power_from_supplies(&supplies))
    }

    fn max_temperature_c(&self) -> Option<f32> {
        let dir = self.root.join("sys/class/thermal");
        let mut best: Option<f32> = None;
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("thermal_zone")
            {
                continue;
            }
            let Some(t) = std::fs::read_to_string(entry.path().join("temp"))
                .ok()
                .and_then(|s| parse_millidegrees(&s))
            else {
                continue;
            };
            best = Some(best.map_or(t, |b| b.max(t)));
        }
        best
    }

    fn user_idle_seconds(&self) -> Option<u64> {
        if !self.logind {
            return None;
        }
        let mut cache = self.idle_cache.lock().ok();
        if let Some((at, v)) = cache.as_deref().and_then(|c| *c) {
            let age = at.elapsed();
            // Re-ask every 5 s; where logind is missing, every minute.
            let ttl = if v.is_some() { 5 } else { 60 };
            if age < Duration::from_secs(ttl) {
                return v.map(|secs| if secs > 0 { secs + age.as_secs() } else { 0 });
            }
        }
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let v = run_command(
            "loginctl",
            &[
                "show-user",
                &uid.to_string(),
                "-p",
                "IdleHint",
                "-p",
                "IdleSinceHint",
            ],
        )
        .and_then(|out| {
            let now_us = u64::try_from(Local::now().timestamp_micros()).ok()?;
            parse_logind_idle(&out, now_us)
        });
        if let Some(c) = cache.as_deref_mut() {
            *c = Some((Instant::now(), v));
        }
        v
    }

    fn memory_available_bytes(&self) -> Option<u64> {
        parse_meminfo_available(&self.read("proc/meminfo")?)
    }
}

/// One `/sys/class/power_supply/*` entry, trimmed file contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SupplyInfo {
    /// `type`: "Mains", "Battery", "USB", "USB_C", "UPS", "Wireless", …
    pub kind: String,
    /// `scope`: "Device" for a mouse's or headset's battery, absent or "System" otherwise.
    pub scope: Option<String>,
    pub online: Option<String>,
    pub present: Option<String>,
    pub capacity: Option<String>,
    pub status: Option<String>,
}

/// Combines the power-supply entries into one [`Power`]: any external supply online means AC;
/// with no external supply listed, the battery's status decides ("Discharging" = battery).
pub fn power_from_supplies(supplies: &[SupplyInfo]) -> Power {
    let mut has_battery = false;
    let mut percents = Vec::new();
    let mut discharging = false;
    let mut charging_or_full = false;
    let mut external_seen = false;
    let mut external_online = false;
    for s in supplies {
        let device_scope = s
            .scope
            .as_deref()
            .is_some_and(|x| x.eq_ignore_ascii_case("device"));
        if s.kind.eq_ignore_ascii_case("battery") {
            if device_scope || s.present.as_deref() == Some("0") {
                continue;
            }
            has_battery = true;
            if let Some(p) = s
                .capacity
                .as_deref()
                .and_then(|c| c.parse::<f32>().ok())
                .filter(|p| (0.0..=100.0).contains(p))
            {
                percents.push(p);
            }
            match s.status.as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("discharging") => discharging = true,
                Some("charging") | Some("full") | Some("not charging") => charging_or_full = true,
                _ => {}
            }
        } else if !s.kind.is_empty() && !device_scope {
            // Mains, USB, USB_C, USB_PD, Wireless, UPS: anything that feeds the machine.
            if let Some(o) = s.online.as_deref() {
                external_seen = true;
                if o == "1" {
                    external_online = true;
                }
            }
        }
    }
    let battery_percent = if percents.is_empty() {
        None
    } else {
        Some(percents.iter().sum::<f32>() / percents.len() as f32)
    };
    // An external supply online wins; then the battery's own status; an external supply
    // listed but offline means battery.
    let on_ac = if !has_battery || external_online {
        Some(true)
    } else if discharging || external_seen {
        Some(false)
    } else if charging_or_full {
        Some(true)
    } else {
        None
    };
    Power {
        has_battery,
        on_ac,
        battery_percent,
    }
}

/// `/proc/stat`'s first line → (busy ticks, total ticks) over all CPUs. Busy excludes idle and
/// iowait; guest time is already inside user time, so only the first 8 fields are summed.
pub fn parse_proc_stat_totals(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// The number of `cpuN` lines in `/proc/stat`.
pub fn count_cpus(stat: &str) -> usize {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count()
}

/// `/proc/self/stat` → utime + stime of this process (all its threads), in clock ticks.
pub fn parse_self_stat_ticks(s: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `/proc/loadavg` → the 1-minute load average.
pub fn parse_loadavg(s: &str) -> Option<f32> {
    s.split_whitespace()
        .next()?
        .parse::<f32>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// `/proc/meminfo` → MemAvailable in bytes (older kernels: MemFree + Buffers + Cached).
pub fn parse_meminfo_available(s: &str) -> Option<u64> {
    meminfo_field(s, "MemAvailable").or_else(|| {
        Some(
            meminfo_field(s, "MemFree")?
                + meminfo_field(s, "Buffers").unwrap_or(0)
                + meminfo_field(s, "Cached").unwrap_or(0),
        )
    })
}

/// One `/proc/meminfo` field ("MemTotal", …) in bytes.
pub fn meminfo_field(s: &str, key: &str) -> Option<u64> {
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut it = v.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        match it.next() {
            Some("kB") | Some("KB") | Some("kb") => n.checked_mul(1024),
            None => Some(n),
            Some(_) => None,
        }
    })
}

/// A thermal zone's `temp` (millidegrees Celsius) → °C. Sensors that report nonsense
/// (disconnected ones say -273 °C or 0xFFFF) are dropped.
pub fn parse_millidegrees(s: &str) -> Option<f32> {
    let v: i64 = s.trim().parse().ok()?;
    let c = v as f32 / 1000.0;
    (c > -40.0 && c < 150.0).then_some(c)
}

/// `loginctl show-user UID -p IdleHint -p IdleSinceHint` output → seconds idle, given now in
/// microseconds since the Unix epoch. `IdleHint=no` means the user is there: `Some(0)`.
pub fn parse_logind_idle(out: &str, now_us: u64) -> Option<u64> {
    let mut hint = None;
    let mut since = None;
    for line in out.lines() {
        match line.trim().split_once('=') {
            Some(("IdleHint", v)) => hint = Some(v.trim() == "yes"),
            Some(("IdleSinceHint", v)) => since = v.trim().parse::<u64>().ok(),
            _ => {}
        }
    }
    match hint? {
        false => Some(0),
        true => {
            let since = since.filter(|&s| s > 0)?;
            Some(now_us.saturating_sub(since) / 1_000_000)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// macOS

/// Reads the signals on macOS through `sysctl`, `pmset`, `ioreg` and `vm_stat`. It compiles
/// everywhere (elsewhere every command fails and every signal is `None`). macOS gives no
/// temperature in °C without root, so [`SystemProbe::max_temperature_c`] is `None` and
/// [`SystemProbe::thermal_throttled`] reports the OS's own thermal state instead.
#[derive(Debug, Default)]
pub struct MacProbe;

impl MacProbe {
    pub fn new() -> Self {
        MacProbe
    }
}

impl SystemProbe for MacProbe {
    fn cpu_load(&self) -> Option<f32> {
        let load1 = parse_sysctl_loadavg(&run_command("sysctl", &["-n", "vm.loadavg"])?)?;
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Some(load1 / n as f32)
    }
    fn power(&self) -> Option<Power> {
        parse_pmset_batt(&run_command("pmset", &["-g", "batt"])?)
    }
    fn max_temperature_c(&self) -> Option<f32> {
        None
    }
    fn user_idle_seconds(&self) -> Option<u64> {
        parse_ioreg_idle_seconds(&run_command("ioreg", &["-c", "IOHIDSystem", "-d", "4"])?)
    }
    fn memory_available_bytes(&self) -> Option<u64> {
        parse_vm_stat_available(&run_command("vm_stat", &[])?)
    }
    fn thermal_throttled(&self) -> Option<bool> {
        parse_pmset_therm(&run_command("pmset", &["-g", "therm"])?)
    }
}

/// `pmset -g batt` output → [`Power`]. Example:
///
/// ```text
/// Now drawing from 'Battery Power'
///  -InternalBattery-0 (id=4653155)    41%; discharging; 3:12 remaining present: true
/// ```
pub fn parse_pmset_batt(out: &str) -> Option<Power> {
    let mut lines = out.lines();
    let first = lines.next()?;
    let source = first.split('\'').nth(1)?;
    let on_ac = match source {
        "AC Power" => Some(true),
        "Battery Power" => Some(false),
        // A UPS feeding a desktop is still an external supply.
        "UPS Power" => Some(true),
        _ => None,
    };
    let mut percents = Vec::new();
    let mut has_battery = false;
    for l in lines {
        if !l.contains("InternalBattery") {
            continue;
        }
        if l.contains("present: false") {
            continue;
        }
        has_battery = true;
        // "...\t41%; discharging; ..."
        if let Some(p) = l
            .split(';')
            .next()
            .and_then(|head| head.rsplit(|c: char| c.is_whitespace()).next())
            .and_then(|tok| tok.strip_suffix('%'))
            .and_then(|n| n.parse::<f32>().ok())
            .filter(|p| (0.0..=100.0).contains(p))
        {
            percents.push(p);
        }
    }
    let battery_percent =
        (!percents.is_empty()).then(|| percents.iter().sum::<f32>() / percents.len() as f32);
    Some(Power {
        has_battery,
        on_ac: if has_battery { on_ac } else { Some(true) },
        battery_percent,
    })
}

/// `ioreg -c IOHIDSystem` output → seconds since the last keyboard/mouse event
/// (`"HIDIdleTime" = <nanoseconds>`).
pub fn parse_ioreg_idle_seconds(out: &str) -> Option<u64> {
    out.lines().find_map(|l| {
        let (_, rest) = l.split_once("\"HIDIdleTime\"")?;
        let v = rest.trim_start().strip_prefix('=')?.trim();
        let ns: u64 = v.parse().ok()?;
        Some(ns / 1_000_000_000)
    })
}

/// `pmset -g therm` output → whether the OS is limiting the CPU for heat. Example of a hot
/// machine: `CPU_Speed_Limit \t= 70`; a cool one says `CPU_Speed_Limit = 100` or
/// `Note: No thermal warning level has been recorded`.
pub fn parse_pmset_therm(out: &str) -> Option<bool> {
    let mut answer = None;
    for l in out.lines() {
        if let Some((k, v)) = l.split_once('=') {
            if k.trim() == "CPU_Speed_Limit" {
                let v: u32 = v.trim().parse().ok()?;
                return Some(v < 100);
            }
        }
        let lower = l.to_ascii_lowercase();
        if lower.contains("no thermal warning level has been recorded") {
            answer = Some(false);
        } else if lower.contains("thermal warning level") {
            // e.g. "Thermal warning level set to 1." (0 would be "none")
            let level = lower
                .split(|c: char| !c.is_ascii_digit())
                .find(|t| !t.is_empty())
                .and_then(|t| t.parse::<u32>().ok());
            if let Some(level) = level {
                answer = Some(level > 0);
            }
        }
    }
    answer
}

/// `sysctl -n vm.loadavg` output (`{ 1.52 1.70 1.78 }`) → the 1-minute load average.
pub fn parse_sysctl_loadavg(out: &str) -> Option<f32> {
    out.trim()
        .trim_start_matches('{')
        .split_whitespace()
        .next()?
        .parse::<f32>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// `vm_stat` output → bytes in free, inactive and speculative pages (what macOS can hand out
/// without compressing or swapping).
pub fn parse_vm_stat_available(out: &str) -> Option<u64> {
    let first = out.lines().next()?;
    let page: u64 = first
        .split("page size of")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let field = |name: &str| -> Option<u64> {
        out.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name)
                .then(|| v.trim().trim_end_matches('.').parse::<u64>().ok())
                .flatten()
        })
    };
    let pages = field("Pages free")?
        + field("Pages inactive").unwrap_or(0)
        + field("Pages speculative").unwrap_or(0);
    pages.checked_mul(page)
}

// ---------------------------------------------------------------------------------------------

/// How long a helper command (`loginctl`, `pmset`, …) may take before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a helper command and returns its standard output if it succeeded within
/// [`COMMAND_TIMEOUT`]; anything else (missing program, failure, hang) is `None`.
pub(crate) fn run_command(program: &str, args: &[&str]) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("LC_ALL", "C")
        .spawn()
        .ok()?;
    // Read in a thread so a chatty command cannot block on a full pipe while we wait.
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let buf = reader.join().ok()?;
    status
        .success()
        .then(|| String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    const STAT: &str = "cpu  100 0 100 700 100 0 0 0 0 0\n\
cpu0 50 0 50 350 50 0 0 0 0 0\n\
cpu1 50 0 50 350 50 0 0 0 0 0\n\
intr 1 2 3\n";

    #[test]
    fn load_from_loadavg_then_from_stat_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "proc/loadavg", "1.50 0.80 0.40 2/300 1234\n");
        write(root, "proc/stat", STAT);
        let p = LinuxProbe::at(root).with_min_sample_interval(Duration::ZERO);
        // First call: 1.5 / 2 CPUs.
        assert!((p.cpu_load().unwrap() - 0.75).abs() < 1e-6);
        // Between calls: 300 ticks busy out of 1000.
        write(
            root,
            "proc/stat",
            "cpu  250 0 250 1300 200 0 0 0 0 0\ncpu0 1\ncpu1 1\n",
        );
        assert!((p.cpu_load().unwrap() - 0.3).abs() < 1e-6);
        // No new ticks: falls back to the load average again.
        assert!((p.cpu_load().unwrap() - 0.75).abs() < 1e-6);
    }

    #[test]
    fn own_cpu_time_is_not_counted_as_load() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "proc/loadavg", "2.00 2.00 2.00 2/300 1234\n");
        write(root, "proc/stat", STAT);
        write(
            root,
            "proc/self/stat",
            "42 (hone (x)) R 1 2 3 4 5 6 7 8 9 10 100 20 0 0 20 0 9 0\n",
        );
        let p = LinuxProbe::at(root).with_min_sample_interval(Duration::ZERO);
        p.cpu_load();
        // 800 of 1000 new ticks busy, 600 of them this process's.
        write(
            root,
            "proc/stat",
            "cpu  500 0 500 900 100 0 0 0 0 0\ncpu0 1\ncpu1 1\n",
        );
        write(
            root,
            "proc/self/stat",
            "42 (hone (x)) R 1 2 3 4 5 6 7 8 9 10 500 220 0 0 20 0 9 0\n",
        );
        assert!((p.cpu_load().unwrap() - 0.2).abs() < 1e-6);
    }

    #[test]
    fn missing_files_are_none() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "sys/class/thermal/.keep", "");
        let p = LinuxProbe::at(dir.path());
        assert_eq!(p.cpu_load(), None);
        assert_eq!(p.max_temperature_c(), None);
        assert_eq!(p.memory_available_bytes(), None);
        assert_eq!(p.user_idle_seconds(), None);
        // No power_supply class at all: a board on mains.
        assert_eq!(
            p.power(),
            Some(Power {
                has_battery: false,
                on_ac: Some(true),
                battery_percent: None
            })
        );
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "proc/loadavg", "\u{0}\u{1}garbage");
        write(root, "proc/stat", "cpu  x y z\n");
        write(root, "proc/meminfo", "MemAvailable: lots\n");
        write(root, "sys/class/thermal/thermal_zone0/temp", "hot\n");
        write(root, "sys/class/power_supply/BAT0/type", "Battery\n");
        write(root, "sys/class/power_supply/BAT0/capacity", "-5\n");
        let p = LinuxProbe::at(root);
        assert_eq!(p.cpu_load(), None);
        assert_eq!(p.memory_available_bytes(), None);
        assert_eq!(p.max_temperature_c(), None);
        let power = p.power().unwrap();
        assert!(power.has_battery);
        assert_eq!(power.on_ac, None);
        assert_eq!(power.battery_percent, None);
    }

    #[test]
    fn meminfo_and_thermal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "proc/meminfo",
            "MemTotal:        3884376 kB\nMemFree:          100000 kB\nMemAvailable:    2000000 kB\n",
        );
        write(root, "sys/class/thermal/thermal_zone0/temp", "45500\n");
        write(root, "sys/class/thermal/thermal_zone1/temp", "85000\n");
        write(root, "sys/class/thermal/thermal_zone2/temp", "-273000\n");
        write(root, "sys/class/thermal/cooling_device0/cur_state", "0\n");
        let p = LinuxProbe::at(root);
        assert_eq!(p.memory_available_bytes(), Some(2_000_000 * 1024));
        assert_eq!(p.max_temperature_c(), Some(85.0));
        assert_eq!(
            parse_meminfo_available("MemFree: 10 kB\nBuffers: 5 kB\nCached: 1 kB\n"),
            Some(16 * 1024)
        );
    }

    #[test]
    fn power_supplies() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ps = "sys/class/power_supply";
        write(root, &format!("{ps}/AC/type"), "Mains\n");
        write(root, &format!("{ps}/AC/online"), "0\n");
        write(root, &format!("{ps}/BAT0/type"), "Battery\n");
        write(root, &format!("{ps}/BAT0/capacity"), "41\n");
        write(root, &format!("{ps}/BAT0/status"), "Discharging\n");
        // A wireless mouse's battery does not count.
        write(root, &format!("{ps}/hidpp_battery_0/type"), "Battery\n");
        write(root, &format!("{ps}/hidpp_battery_0/scope"), "Device\n");
        write(root, &format!("{ps}/hidpp_battery_0/capacity"), "5\n");
        let p = LinuxProbe::at(root);
        assert_eq!(
            p.power(),
            Some(Power {
                has_battery: true,
                on_ac: Some(false),
                battery_percent: Some(41.0)
            })
        );
        write(root, &format!("{ps}/AC/online"), "1\n");
        write(root, &format!("{ps}/BAT0/status"), "Charging\n");
        assert_eq!(p.power().unwrap().on_ac, Some(true));
        // Empty folder: no supplies, no battery.
        let empty = tempfile::tempdir().unwrap();
        fs::create_dir_all(empty.path().join(ps)).unwrap();
        let p = LinuxProbe::at(empty.path());
        assert!(!p.power().unwrap().has_battery);
    }

    #[test]
    fn battery_status_decides_without_a_mains_entry() {
        let bat = |status: &str| SupplyInfo {
            kind: "Battery".into(),
            capacity: Some("80".into()),
            status: Some(status.into()),
            ..Default::default()
        };
        assert_eq!(power_from_supplies(&[bat("Full")]).on_ac, Some(true));
        assert_eq!(
            power_from_supplies(&[bat("Discharging")]).on_ac,
            Some(false)
        );
        assert_eq!(power_from_supplies(&[bat("Unknown")]).on_ac, None);
    }

    #[test]
    fn proc_stat_parsing() {
        assert_eq!(parse_proc_stat_totals(STAT), Some((200, 1000)));
        assert_eq!(count_cpus(STAT), 2);
        assert_eq!(parse_proc_stat_totals(""), None);
        assert_eq!(parse_self_stat_ticks("1 (a) R"), None);
        assert_eq!(parse_loadavg("0.5 0.1 0.1 1/2 3"), Some(0.5));
        assert_eq!(parse_loadavg("nan 0.1"), None);
    }

    #[test]
    fn logind_idle() {
        let now = 1_700_000_600_000_000;
        assert_eq!(
            parse_logind_idle("IdleHint=yes\nIdleSinceHint=1700000000000000\n", now),
            Some(600)
        );
        assert_eq!(
            parse_logind_idle("IdleHint=no\nIdleSinceHint=0\n", now),
            Some(0)
        );
        assert_eq!(
            parse_logind_idle("IdleHint=yes\nIdleSinceHint=0\n", now),
            None
        );
        assert_eq!(parse_logind_idle("", now), None);
    }

    #[test]
    fn pmset_batt() {
        let battery = "Now drawing from 'Battery Power'\n -InternalBattery-0 (id=4653155)\t41%; discharging; 3:12 remaining present: true\n";
        assert_eq!(
            parse_pmset_batt(battery),
            Some(Power {
                has_battery: true,
                on_ac: Some(false),
                battery_percent: Some(41.0)
            })
        );
        let ac = "Now drawing from 'AC Power'\n -InternalBattery-0 (id=4653155)\t100%; charged; 0:00 remaining present: true\n";
        let p = parse_pmset_batt(ac).unwrap();
        assert_eq!(p.on_ac, Some(true));
        assert_eq!(p.battery_percent, Some(100.0));
        // A Mac mini: no battery line.
        let mini = parse_pmset_batt("Now drawing from 'AC Power'\n").unwrap();
        assert!(!mini.has_battery);
        assert_eq!(mini.on_ac, Some(true));
        assert_eq!(parse_pmset_batt(""), None);
        assert_eq!(parse_pmset_batt("garbage"), None);
    }

    #[test]
    fn ioreg_idle() {
        let out = "+-o IOHIDSystem  <class IOHIDSystem, id 0x100000373>\n    {\n      \"HIDIdleTime\" = 754000000000\n      \"HIDParameters\" = {}\n    }\n";
        assert_eq!(parse_ioreg_idle_seconds(out), Some(754));
        assert_eq!(parse_ioreg_idle_seconds("\"HIDIdleTime\" = x"), None);
        assert_eq!(parse_ioreg_idle_seconds(""), None);
    }

    #[test]
    fn pmset_therm() {
        let cool = "Note: No thermal warning level has been recorded\nNote: No performance warning level has been recorded\nNote: No CPU power status has been recorded\n";
        assert_eq!(parse_pmset_therm(cool), Some(false));
        let hot = "CPU_Scheduler_Limit \t= 100\nCPU_Available_CPUs \t= 8\nCPU_Speed_Limit \t= 70\n";
        assert_eq!(parse_pmset_therm(hot), Some(true));
        let normal = "CPU_Scheduler_Limit \t= 100\nCPU_Speed_Limit \t= 100\n";
        assert_eq!(parse_pmset_therm(normal), Some(false));
        assert_eq!(
            parse_pmset_therm("Thermal warning level set to 2.\n"),
            Some(true)
        );
        assert_eq!(parse_pmset_therm(""), None);
    }

    #[test]
    fn mac_load_and_memory() {
        assert_eq!(parse_sysctl_loadavg("{ 1.52 1.70 1.78 }\n"), Some(1.52));
        let vm = "Mach Virtual Memory Statistics: (page size of 16384 bytes)\nPages free:                               10000.\nPages active:                            200000.\nPages inactive:                           5000.\nPages speculative:                        1000.\nPages wired down:                         90000.\n";
        assert_eq!(parse_vm_stat_available(vm), Some(16000 * 16384));
        assert_eq!(parse_vm_stat_available("nothing"), None);
    }

    #[test]
    fn fixed_clock_and_probe() {
        let t = Local::now();
        assert_eq!(FixedClock(t).now(), t);
        let p = FixedProbe::idle_desktop();
        assert_eq!(p.cpu_load(), Some(0.05));
        assert_eq!(FixedProbe::default().thermal_throttled(), None);
    }

    #[test]
    fn helper_commands_time_out_or_fail_quietly() {
        assert_eq!(run_command("hone-no-such-program", &[]), None);
        assert_eq!(run_command("false", &[]), None);
        assert_eq!(run_command("echo", &["hi"]).as_deref(), Some("hi\n"));
        let t = Instant::now();
        assert_eq!(run_command("sleep", &["10"]), None);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
