//! Device profiles: what hone may use on the board it runs on (threads, learning memory budget,
//! backend, default model, training sequence length, LoRA limits). One TOML file per target in
//! `device-configs/`, embedded in the binary ([`Profile::embedded`]); [`detect`] picks one from
//! `/proc/device-tree/model`, `/proc/cpuinfo`, `/proc/meminfo` (and `sysctl hw.model` on
//! macOS); `--device NAME` picks by name; a user file (`$HONE_HOME/device.toml`) overrides
//! fields ([`resolve`]).
//!
//! It must NOT apply anything (set threads, load models, start learning) or decide when to
//! learn (that is `crate::schedule`); it reads facts and returns a profile with the evidence
//! for the choice. Facts that cannot be read are `None`, never an error.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::schedule::parse_bytes;
use crate::units::format_bytes;

/// The profiles compiled into hone, in matching order (first wins a tie).
const EMBEDDED: &[(&str, &str)] = &[
    (
        "raspberry-pi-4",
        include_str!("../device-configs/raspberry-pi-4.toml"),
    ),
    (
        "raspberry-pi-5",
        include_str!("../device-configs/raspberry-pi-5.toml"),
    ),
    (
        "jetson-orin-nano",
        include_str!("../device-configs/jetson-orin-nano.toml"),
    ),
    (
        "macbook-air-m",
        include_str!("../device-configs/macbook-air-m.toml"),
    ),
    (
        "x86-laptop",
        include_str!("../device-configs/x86-laptop.toml"),
    ),
    ("generic", include_str!("../device-configs/generic.toml")),
];

/// The profile used when nothing matches.
pub const FALLBACK: &str = "generic";

/// The user's override file inside the data directory.
pub const OVERRIDE_FILE: &str = "device.toml";

/// A machine whose memory is below this fraction of a profile's `ram` gets a proportionally
/// smaller learning budget.
const RAM_SLACK: f64 = 0.85;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no device profile named {name:?}; known profiles: {known}")]
    UnknownProfile { name: String, known: String },
    #[error("built-in device profile {name} is invalid: {source}; this is a bug in hone, please report it")]
    BadEmbedded {
        name: &'static str,
        #[source]
        source: toml::de::Error,
    },
    #[error("cannot read the device override {}: {source}; fix its permissions or remove it", path.display())]
    ReadOverride {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the device override {} is not valid: {source}; fix it or remove it (see `hone device` for the fields)", path.display())]
    BadOverride {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Metal,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Metal => "metal",
        })
    }
}

/// Limits for learning (LoRA training) on this device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnLimits {
    /// Memory a learning cycle may use, bytes (TOML: a number or "1GiB").
    #[serde(rename = "memory_budget", deserialize_with = "de_bytes")]
    pub memory_budget_bytes: u64,
    /// Training sequence length in tokens.
    pub sequence_length: usize,
    /// Largest LoRA rank.
    pub max_lora_rank: usize,
    /// Most transformer layers that carry adapters (counted from the top).
    pub max_lora_layers: usize,
}

/// How a profile recognises its device. Filters (`os`, `arch`, `battery`, `min_ram`,
/// `max_ram`) must all hold; if any of the name rules (`device_tree_model`, `cpuinfo`,
/// `hw_model`) is given, one of them must match too. A profile without any rule is never
/// detected (only chosen by name or as the fallback).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchRules {
    /// Substrings of `/proc/device-tree/model` (case-insensitive).
    pub device_tree_model: Vec<String>,
    /// Substrings of `/proc/cpuinfo` (case-insensitive).
    pub cpuinfo: Vec<String>,
    /// `sysctl hw.model` values (macOS); a trailing `*` matches a prefix.
    pub hw_model: Vec<String>,
    /// `std::env::consts::OS` values ("linux", "macos").
    pub os: Vec<String>,
    /// `std::env::consts::ARCH` values ("x86_64", "aarch64").
    pub arch: Vec<String>,
    /// Whether the machine must (true) or must not (false) have a system battery.
    pub battery: Option<bool>,
    #[serde(deserialize_with = "de_opt_bytes")]
    pub min_ram: Option<u64>,
    #[serde(deserialize_with = "de_opt_bytes")]
    pub max_ram: Option<u64>,
}

/// One device profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// The memory of the device this profile is sized for (TOML: "4GiB").
    #[serde(rename = "ram", deserialize_with = "de_bytes")]
    pub ram_bytes: u64,
    /// Compute threads for learning; 0 = half of the logical CPUs.
    pub threads: usize,
    pub backend: Backend,
    /// A model name from hone's manifest.
    pub default_model: String,
    pub learn: LearnLimits,
    #[serde(rename = "match", default)]
    pub rules: MatchRules,
}

impl Profile {
    /// All profiles compiled into hone.
    pub fn embedded() -> Result<Vec<Profile>, DeviceError> {
        EMBEDDED
            .iter()
            .map(|(name, text)| {
                toml::from_str::<Profile>(text)
                    .map_err(|source| DeviceError::BadEmbedded { name, source })
            })
            .collect()
    }

    /// The names of the compiled-in profiles, in order.
    pub fn names() -> Vec<&'static str> {
        EMBEDDED.iter().map(|(n, _)| *n).collect()
    }

    /// The compiled-in profile called `name`.
    pub fn by_name(name: &str) -> Result<Profile, DeviceError> {
        Profile::embedded()?
            .into_iter()
            .find(|p| p.name.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| DeviceError::UnknownProfile {
                name: name.to_string(),
                known: Profile::names().join(", "),
            })
    }

    /// Threads to use on a machine with `available` logical CPUs.
    pub fn threads_for(&self, available: usize) -> usize {
        let available = available.max(1);
        if self.threads == 0 {
            (available / 2).max(1)
        } else {
            self.threads.min(available)
        }
    }

    /// This profile with the user's `changes` applied; returns the names of changed fields.
    pub fn apply(&mut self, o: &ProfileOverride) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! set {
            ($src:expr => $dst:expr, $label:literal) => {
                if let Some(v) = $src.clone() {
                    $dst = v;
                    changed.push($label);
                }
            };
        }
        set!(o.name => self.name, "name");
        set!(o.description => self.description, "description");
        set!(o.ram_bytes => self.ram_bytes, "ram");
        set!(o.threads => self.threads, "threads");
        set!(o.backend => self.backend, "backend");
        set!(o.default_model => self.default_model, "default_model");
        if let Some(l) = &o.learn {
            set!(l.memory_budget_bytes => self.learn.memory_budget_bytes, "learn.memory_budget");
            set!(l.sequence_length => self.learn.sequence_length, "learn.sequence_length");
            set!(l.max_lora_rank => self.learn.max_lora_rank, "learn.max_lora_rank");
            set!(l.max_lora_layers => self.learn.max_lora_layers, "learn.max_lora_layers");
        }
        changed
    }

    fn has_rules(&self) -> bool {
        let r = &self.rules;
        !(r.device_tree_model.is_empty()
            && r.cpuinfo.is_empty()
            && r.hw_model.is_empty()
            && r.os.is_empty()
            && r.arch.is_empty()
            && r.battery.is_none()
            && r.min_ram.is_none()
            && r.max_ram.is_none())
    }

    /// How well this profile fits `facts`: `None` if it does not, else a score (name rules
    /// matched: 10, filters only: 1) and what matched, in words.
    pub fn score(&self, facts: &Facts) -> Option<(u32, String)> {
        if !self.has_rules() {
            return None;
        }
        let r = &self.rules;
        let mut why = Vec::new();
        if !r.os.is_empty() {
            if !r.os.iter().any(|o| o.eq_ignore_ascii_case(&facts.os)) {
                return None;
            }
            why.push(format!("OS {}", facts.os));
        }
        if !r.arch.is_empty() {
            if !r.arch.iter().any(|a| a.eq_ignore_ascii_case(&facts.arch)) {
                return None;
            }
            why.push(format!("architecture {}", facts.arch));
        }
        if let Some(want) = r.battery {
            if facts.has_battery != Some(want) {
                return None;
            }
            why.push(if want { "has a battery" } else { "no battery" }.to_string());
        }
        if r.min_ram.is_some() || r.max_ram.is_some() {
            let ram = facts.mem_total_bytes?;
            if r.min_ram.is_some_and(|m| ram < m) || r.max_ram.is_some_and(|m| ram > m) {
                return None;
            }
            why.push(format!("{} of memory", format_bytes(ram)));
        }
        let named =
            !(r.device_tree_model.is_empty() && r.cpuinfo.is_empty() && r.hw_model.is_empty());
        if !named {
            return Some((1, why.join(", ")));
        }
        let hit = find_substring(
            "device-tree model",
            &facts.device_tree_model,
            &r.device_tree_model,
        )
        .or_else(|| {
            find_substring("/proc/cpuinfo", &facts.cpuinfo, &r.cpuinfo).map(|s| {
                // cpuinfo is long: name only the needle.
                s.split(" contains ")
                    .last()
                    .map(|n| format!("/proc/cpuinfo mentions {n}"))
                    .unwrap_or(s)
            })
        })
        .or_else(|| {
            let model = facts.hw_model.as_deref()?;
            r.hw_model
                .iter()
                .find(|pat| match pat.strip_suffix('*') {
                    Some(prefix) => model.starts_with(prefix),
                    None => model == pat.as_str(),
                })
                .map(|pat| format!("hw.model {model:?} matches {pat:?}"))
        })?;
        why.insert(0, hit);
        Some((10, why.join(", ")))
    }
}

fn find_substring(what: &str, hay: &Option<String>, needles: &[String]) -> Option<String> {
    let hay = hay.as_deref()?;
    let lower = hay.to_lowercase();
    needles
        .iter()
        .find(|n| !n.is_empty() && lower.contains(&n.to_lowercase()))
        .map(|n| format!("{what} {hay:?} contains {n:?}"))
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let threads = if self.threads == 0 {
            "half of the CPUs".to_string()
        } else {
            self.threads.to_string()
        };
        writeln!(f, "profile:        {} ({})", self.name, self.description)?;
        writeln!(f, "backend:        {}", self.backend)?;
        writeln!(f, "threads:        {threads}")?;
        writeln!(f, "default model:  {}", self.default_model)?;
        write!(
            f,
            "learning:       budget {}, sequences of {} tokens, LoRA rank up to {} on up to {} layers",
            format_bytes(self.learn.memory_budget_bytes),
            self.learn.sequence_length,
            self.learn.max_lora_rank,
            self.learn.max_lora_layers
        )
    }
}

/// The user's changes to a profile (`$HONE_HOME/device.toml`). Every field is optional;
/// `base` names the profile to start from instead of the detected one.
///
/// ```toml
/// base = "raspberry-pi-4"
/// threads = 4
/// [learn]
/// memory_budget = "1.5GiB"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileOverride {
    pub base: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(rename = "ram", deserialize_with = "de_opt_bytes")]
    pub ram_bytes: Option<u64>,
    pub threads: Option<usize>,
    pub backend: Option<Backend>,
    pub default_model: Option<String>,
    pub learn: Option<LearnOverride>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnOverride {
    #[serde(rename = "memory_budget", deserialize_with = "de_opt_bytes")]
    pub memory_budget_bytes: Option<u64>,
    pub sequence_length: Option<usize>,
    pub max_lora_rank: Option<usize>,
    pub max_lora_layers: Option<usize>,
}

impl ProfileOverride {
    /// Parses override text; `path` is only for the error message.
    pub fn parse(text: &str, path: &Path) -> Result<Self, DeviceError> {
        toml::from_str(text).map_err(|source| DeviceError::BadOverride {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads the override at `path`; `Ok(None)` when there is no such file.
    pub fn load(path: &Path) -> Result<Option<Self>, DeviceError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DeviceError::ReadOverride {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// What was read about the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Facts {
    pub device_tree_model: Option<String>,
    /// The whole of `/proc/cpuinfo` (matched, not shown).
    #[serde(skip)]
    pub cpuinfo: Option<String>,
    /// The CPU's name as cpuinfo gives it ("model name", "Model" or "Hardware").
    pub cpu_model: Option<String>,
    /// macOS `sysctl hw.model`.
    pub hw_model: Option<String>,
    pub mem_total_bytes: Option<u64>,
    pub has_battery: Option<bool>,
    pub os: String,
    pub arch: String,
    pub logical_cpus: usize,
}

impl Facts {
    /// Reads the facts from the files under `root` (`/` for this machine). `sysctl` is asked
    /// only on macOS with root `/`; OS, architecture and CPU count are this process's.
    pub fn read(root: &Path) -> Facts {
        let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();
        let device_tree_model = read("proc/device-tree/model")
            .or_else(|| read("sys/firmware/devicetree/base/model"))
            .map(|s| {
                s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .to_string()
            })
            .filter(|s| !s.is_empty());
        let cpuinfo = read("proc/cpuinfo");
        let cpu_model = cpuinfo.as_deref().and_then(cpu_model_of);
        let mut mem_total_bytes =
            read("proc/meminfo").and_then(|s| crate::signals::meminfo_field(&s, "MemTotal"));
        let mut hw_model = None;
        if cfg!(target_os = "macos") && root == Path::new("/") {
            hw_model = crate::signals::run_command("sysctl", &["-n", "hw.model"])
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            mem_total_bytes = mem_total_bytes.or_else(|| {
                crate::signals::run_command("sysctl", &["-n", "hw.memsize"])?
                    .trim()
                    .parse()
                    .ok()
            });
        }
        let has_battery = if cfg!(target_os = "macos") && root == Path::new("/") {
            crate::signals::run_command("pmset", &["-g", "batt"])
                .and_then(|s| crate::signals::parse_pmset_batt(&s))
                .map(|p| p.has_battery)
        } else {
            use crate::signals::SystemProbe as _;
            crate::signals::LinuxProbe::at(root)
                .power()
                .map(|p| p.has_battery)
        };
        Facts {
            device_tree_model,
            cpuinfo,
            cpu_model,
            hw_model,
            mem_total_bytes,
            has_battery,
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            logical_cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

fn cpu_model_of(cpuinfo: &str) -> Option<String> {
    for key in ["model name", "Model", "Hardware", "cpu model"] {
        let found = cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_string())
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Why this profile: the facts, how it was chosen, and what was adjusted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    pub facts: Facts,
    /// "--device raspberry-pi-4", "device-tree model \"...\" contains \"Raspberry Pi 4\"", …
    pub chosen_by: String,
    /// Changes made after choosing (memory scaling, the user's override file).
    pub adjustments: Vec<String>,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = || "unknown".to_string();
        let ff = &self.facts;
        writeln!(f, "chosen by:      {}", self.chosen_by)?;
        if let Some(m) = &ff.device_tree_model {
            writeln!(f, "board:          {m}")?;
        }
        if let Some(m) = &ff.hw_model {
            writeln!(f, "model:          {m}")?;
        }
        writeln!(
            f,
            "cpu:            {} ({} logical CPUs, {} {})",
            ff.cpu_model.clone().unwrap_or_else(unknown),
            ff.logical_cpus,
            ff.os,
            ff.arch
        )?;
        writeln!(
            f,
            "memory:         {}",
            ff.mem_total_bytes.map(format_bytes).unwrap_or_else(unknown)
        )?;
        write!(
            f,
            "battery:        {}",
            match ff.has_battery {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            }
        )?;
        for a in &self.adjustments {
            write!(f, "\nadjusted:       {a}")?;
        }
        Ok(())
    }
}

/// Picks the best-matching embedded profile for `facts` (the fallback when none matches).
pub fn choose(facts: &Facts) -> Result<(Profile, String), DeviceError> {
    let mut best: Option<(u32, Profile, String)> = None;
    for p in Profile::embedded()? {
        if let Some((score, why)) = p.score(facts) {
            if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                best = Some((score, p, why));
            }
        }
    }
    match best {
        Some((_, p, why)) => Ok((p, why)),
        None => Ok((
            Profile::by_name(FALLBACK)?,
            "no profile matched this machine".to_string(),
        )),
    }
}

/// Detects the device from the files under `root` (`/` for this machine).
pub fn detect(root: &Path) -> Result<(Profile, Evidence), DeviceError> {
    resolve(root, None, None)
}

/// The profile in use on this machine for the data directory `home`: [`resolve`] with `name`
/// (from `--device`) and the directory's override file.
pub fn for_home(home: &Path, name: Option<&str>) -> Result<(Profile, Evidence), DeviceError> {
    resolve(Path::new("/"), name, Some(&override_path(home)))
}

/// The profile in use: `name` (from `--device`) if given, else the override file's `base`,
/// else detection; then the learning budget is scaled down on a machine with less memory than
/// the profile expects; then the override file's fields are applied. `override_file` is
/// usually `$HONE_HOME/device.toml` ([`override_path`]); a missing file is fine.
pub fn resolve(
    root: &Path,
    name: Option<&str>,
    override_file: Option<&Path>,
) -> Result<(Profile, Evidence), DeviceError> {
    let facts = Facts::read(root);
    let over = match override_file {
        Some(p) => ProfileOverride::load(p)?.map(|o| (p.to_path_buf(), o)),
        None => None,
    };
    let (mut profile, chosen_by) = match (name, over.as_ref().and_then(|(_, o)| o.base.as_deref()))
    {
        (Some(n), _) => (Profile::by_name(n)?, format!("--device {n}")),
        (None, Some(base)) => {
            let path = over
                .as_ref()
                .map(|(p, _)| p.display().to_string())
                .unwrap_or_default();
            (
                Profile::by_name(base)?,
                format!("base = {base:?} in {path}"),
            )
        }
        (None, None) => choose(&facts)?,
    };
    let mut adjustments = Vec::new();
    if let Some(mem) = facts.mem_total_bytes {
        if (mem as f64) < profile.ram_bytes as f64 * RAM_SLACK && profile.ram_bytes > 0 {
            let before = profile.learn.memory_budget_bytes;
            let scaled = (before as f64 * mem as f64 / profile.ram_bytes as f64) as u64;
            profile.learn.memory_budget_bytes = scaled.max(1);
            adjustments.push(format!(
                "learning budget {} → {}: this machine has {} of memory, the profile expects {}",
                format_bytes(before),
                format_bytes(profile.learn.memory_budget_bytes),
                format_bytes(mem),
                format_bytes(profile.ram_bytes)
            ));
        }
    }
    if let Some((path, o)) = &over {
        let changed = profile.apply(o);
        if !changed.is_empty() {
            adjustments.push(format!("{} from {}", changed.join(", "), path.display()));
        }
    }
    Ok((
        profile,
        Evidence {
            facts,
            chosen_by,
            adjustments,
        },
    ))
}

/// `$HONE_HOME/device.toml`.
pub fn override_path(home: &Path) -> PathBuf {
    home.join(OVERRIDE_FILE)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BytesValue {
    Number(u64),
    Text(String),
}

fn bytes_value<E: serde::de::Error>(v: BytesValue) -> Result<u64, E> {
    match v {
        BytesValue::Number(n) => Ok(n),
        BytesValue::Text(s) => parse_bytes(&s).map_err(E::custom),
    }
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    bytes_value(BytesValue::deserialize(d)?)
}

fn de_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<BytesValue>::deserialize(d)? {
        Some(v) => bytes_value(v).map(Some),
        None => Ok(None),
    }
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

    fn board(model: &str, cpuinfo: &str, mem_kb: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // The kernel writes the model NUL-terminated.
        write(root, "proc/device-tree/model", &format!("{model}\0"));
        write(root, "proc/cpuinfo", cpuinfo);
        write(
            root,
            "proc/meminfo",
            &format!(
                "MemTotal:       {mem_kb} kB\nMemAvailable:   {} kB\n",
                mem_kb / 2
            ),
        );
        dir
    }

    const PI_CPUINFO: &str = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";

    #[test]
    fn embedded_profiles_parse_and_are_named_after_their_files() {
        let all = Profile::embedded().unwrap();
        assert_eq!(all.len(), 6);
        for (p, (file, _)) in all.iter().zip(EMBEDDED) {
            assert_eq!(&p.name, file);
            assert!(p.learn.memory_budget_bytes < p.ram_bytes, "{}", p.name);
            assert!(p.learn.sequence_length > 0 && p.learn.max_lora_rank > 0);
            assert!(
                ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
                    .contains(&p.default_model.as_str()),
                "{}",
                p.name
            );
        }
        let mac = Profile::by_name("macbook-air-m").unwrap();
        assert_eq!(mac.backend, Backend::Metal);
        assert_eq!(
            Profile::by_name("raspberry-pi-4")
                .unwrap()
                .learn
                .memory_budget_bytes,
            1 << 30
        );
        assert!(matches!(
            Profile::by_name("toaster"),
            Err(DeviceError::UnknownProfile { .. })
        ));
        assert_eq!(
            Profile::by_name("Raspberry-Pi-5").unwrap().name,
            "raspberry-pi-5"
        );
    }

    #[test]
    fn detects_raspberry_pi_4() {
        let dir = board("Raspberry Pi 4 Model B Rev 1.4", PI_CPUINFO, 3_884_376);
        let (p, ev) = detect(dir.path()).unwrap();
        assert_eq!(p.name, "raspberry-pi-4");
        assert_eq!(p.default_model, "smollm2-135m-instruct");
        assert!(
            ev.chosen_by.contains("Raspberry Pi 4 Model B Rev 1.4"),
            "{ev}"
        );
        assert_eq!(
            ev.facts.device_tree_model.as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
        assert_eq!(
            ev.facts.cpu_model.as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
        // 3.7 GiB is enough for the 4 GiB profile: no scaling.
        assert!(ev.adjustments.is_empty(), "{ev}");
        assert_eq!(p.learn.memory_budget_bytes, 1 << 30);
    }

    #[test]
    fn a_2gb_pi_4_gets_a_smaller_budget() {
        let dir = board("Raspberry Pi 4 Model B Rev 1.2", PI_CPUINFO, 1_942_188);
        let (p, ev) = detect(dir.path()).unwrap();
        assert_eq!(p.name, "raspberry-pi-4");
        assert!(
            p.learn.memory_budget_bytes < 600 << 20,
            "{}",
            p.learn.memory_budget_bytes
        );
        assert_eq!(ev.adjustments.len(), 1, "{ev}");
    }

    #[test]
    fn detects_raspberry_pi_5() {
        let dir = board(
            "Raspberry Pi 5 Model B Rev 1.0",
            "processor\t: 0\nCPU part\t: 0xd0b\nRevision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n",
            8_245_000,
        );
        let (p, ev) = detect(dir.path()).unwrap();
        assert_eq!(p.name, "raspberry-pi-5", "{ev}");
        assert_eq!(p.default_model, "qwen2.5-coder-0.5b-instruct");
        assert!(ev.adjustments.is_empty(), "{ev}");
    }

    #[test]
    fn detects_jetson_orin_nano() {
        let dir = board(
            "NVIDIA Jetson Orin Nano Developer Kit",
            "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nCPU part\t: 0xd42\n",
            7_620_000,
        );
        let (p, ev) = detect(dir.path()).unwrap();
        assert_eq!(p.name, "jetson-orin-nano", "{ev}");
        assert_eq!(p.threads, 5);
        // 7.3 GiB of an 8 GiB profile is within the slack.
        assert!(ev.adjustments.is_empty(), "{ev}");
    }

    #[test]
    fn cpuinfo_alone_is_enough() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "proc/cpuinfo", PI_CPUINFO);
        let (p, ev) = detect(dir.path()).unwrap();
        assert_eq!(p.name, "raspberry-pi-4");
        assert_eq!(ev.chosen_by, "/proc/cpuinfo mentions \"Raspberry Pi 4\"");
    }

    #[test]
    fn generic_x86_desktop_and_laptop() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i7-1165G7 @ 2.80GHz\n",
        );
        write(root, "proc/meminfo", "MemTotal:       16000000 kB\n");
        // No power supply: a desktop, whatever the host's architecture.
        let (p, ev) = detect(root).unwrap();
        assert_eq!(p.name, "generic");
        assert_eq!(ev.chosen_by, "no profile matched this machine");
        assert_eq!(
            ev.facts.cpu_model.as_deref(),
            Some("Intel(R) Core(TM) i7-1165G7 @ 2.80GHz")
        );
        // The same facts on an x86-64 Linux laptop with a battery.
        let mut facts = Facts::read(root);
        facts.os = "linux".into();
        facts.arch = "x86_64".into();
        facts.has_battery = Some(true);
        let (p, why) = choose(&facts).unwrap();
        assert_eq!(p.name, "x86-laptop");
        assert!(why.contains("has a battery"), "{why}");
        // Too little memory for the laptop profile.
        facts.mem_total_bytes = Some(4 << 30);
        assert_eq!(choose(&facts).unwrap().0.name, "generic");
        // An arm laptop is not an x86 laptop.
        facts.mem_total_bytes = Some(16 << 30);
        facts.arch = "aarch64".into();
        assert_eq!(choose(&facts).unwrap().0.name, "generic");
    }

    #[test]
    fn macbook_air_by_hw_model() {
        let facts = Facts {
            hw_model: Some("Mac14,2".into()),
            mem_total_bytes: Some(8 << 30),
            has_battery: Some(true),
            os: "macos".into(),
            arch: "aarch64".into(),
            logical_cpus: 8,
            ..Facts::default()
        };
        let (p, why) = choose(&facts).unwrap();
        assert_eq!(p.name, "macbook-air-m", "{why}");
        let m1 = Facts {
            hw_model: Some("MacBookAir10,1".into()),
            ..facts.clone()
        };
        assert_eq!(choose(&m1).unwrap().0.name, "macbook-air-m");
        // A Mac mini ("Mac14,3") is not an Air; "Mac14,20" is not "Mac14,2".
        for other in ["Mac14,3", "Mac14,20"] {
            let f = Facts {
                hw_model: Some(other.into()),
                ..facts.clone()
            };
            assert_eq!(choose(&f).unwrap().0.name, "generic", "{other}");
        }
    }

    #[test]
    fn device_name_and_override_file() {
        let dir = board("Raspberry Pi 4 Model B Rev 1.4", PI_CPUINFO, 3_884_376);
        let (p, ev) = resolve(dir.path(), Some("jetson-orin-nano"), None).unwrap();
        assert_eq!(p.name, "jetson-orin-nano");
        assert_eq!(ev.chosen_by, "--device jetson-orin-nano");
        assert!(resolve(dir.path(), Some("toaster"), None).is_err());

        let home = tempfile::tempdir().unwrap();
        let over = override_path(home.path());
        // Missing override file: detection as usual.
        assert_eq!(
            resolve(dir.path(), None, Some(&over)).unwrap().0.name,
            "raspberry-pi-4"
        );
        fs::write(
            &over,
            "threads = 4\ndefault_model = \"qwen2.5-coder-0.5b-instruct\"\n[learn]\nmemory_budget = \"1.5GiB\"\n",
        )
        .unwrap();
        let (p, ev) = resolve(dir.path(), None, Some(&over)).unwrap();
        assert_eq!(p.name, "raspberry-pi-4");
        assert_eq!(p.threads, 4);
        assert_eq!(p.learn.memory_budget_bytes, 3 << 29);
        assert_eq!(p.learn.sequence_length, 256);
        assert!(
            ev.adjustments[0].contains("threads, default_model, learn.memory_budget"),
            "{ev}"
        );
        // base = picks the profile; --device still wins over it.
        fs::write(&over, "base = \"raspberry-pi-5\"\nthreads = 2\n").unwrap();
        let (p, _) = resolve(dir.path(), None, Some(&over)).unwrap();
        assert_eq!((p.name.as_str(), p.threads), ("raspberry-pi-5", 2));
        // The Pi 5 profile expects 8 GiB; this board has 3.7 GiB, so the budget shrinks.
        assert!(p.learn.memory_budget_bytes < 1300 << 20);
        let (p, _) = resolve(dir.path(), Some("generic"), Some(&over)).unwrap();
        assert_eq!((p.name.as_str(), p.threads), ("generic", 2));
        // Typos and bad sizes are errors that name the file.
        fs::write(&over, "thread = 4\n").unwrap();
        let e = resolve(dir.path(), None, Some(&over)).unwrap_err();
        assert!(matches!(e, DeviceError::BadOverride { .. }));
        assert!(e.to_string().contains("device.toml"), "{e}");
        fs::write(&over, "[learn]\nmemory_budget = \"lots\"\n").unwrap();
        assert!(resolve(dir.path(), None, Some(&over)).is_err());
        fs::write(&over, "base = \"toaster\"\n").unwrap();
        assert!(matches!(
            resolve(dir.path(), None, Some(&over)),
            Err(DeviceError::UnknownProfile { .. })
        ));
    }

    #[test]
    fn threads_and_display() {
        let mut p = Profile::by_name("generic").unwrap();
        assert_eq!(p.threads_for(8), 4);
        assert_eq!(p.threads_for(1), 1);
        p.threads = 3;
        assert_eq!(p.threads_for(2), 2);
        assert_eq!(p.threads_for(8), 3);
        let shown = p.to_string();
        assert!(shown.contains("budget 1.0 GiB"), "{shown}");
        let dir = board("Raspberry Pi 5 Model B Rev 1.0", "", 8_245_000);
        let (_, ev) = detect(dir.path()).unwrap();
        let shown = ev.to_string();
        assert!(
            shown.contains("board:          Raspberry Pi 5 Model B Rev 1.0"),
            "{shown}"
        );
        assert!(shown.contains("battery:        no"), "{shown}");
        let json = serde_json::to_string(&ev).unwrap();
        assert!(!json.contains("cpuinfo\""), "{json}");
    }
}
