//! `hone schedule show|set` and `hone device`: the command-line side of when background learning
//! may run and which device profile applies. It parses, calls `hone::schedule`, `hone::device`
//! and `hone::signals`, and prints.
//!
//! It must not decide anything itself (the library does). The daemon that acts on the decision
//! is `hone daemon` (`src/cli/daemon.rs`).

use crate::Cli;
use anyhow::Result;
use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand};
use hone::daemon_lock;
use hone::device::{self, Profile};
use hone::home::Home;
use hone::schedule::{self, OrUnset, Schedule, ScheduleUpdate, Window};
use hone::store::Store;
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Show the schedule, what the system reports, and whether learning would run now
    Show {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Change when learning may run (only the options given change)
    Set(ScheduleSetArgs),
}

#[derive(Args, Debug)]
pub struct ScheduleSetArgs {
    /// Start from the defaults instead of the current schedule
    #[arg(long)]
    pub reset: bool,
    /// Minutes without a hone request before learning may start (0 = no wait)
    #[arg(long, value_name = "MIN")]
    pub idle_minutes: Option<u32>,
    /// Highest CPU load of other processes, e.g. 50% or 0.5
    #[arg(long, value_name = "LOAD", value_parser = schedule::parse_fraction)]
    pub max_cpu_load: Option<f32>,
    /// An allowed time window, e.g. 22:00-07:00; repeat for several (replaces the current ones)
    #[arg(long = "window", value_name = "HH:MM-HH:MM", value_parser = schedule::parse_window)]
    pub windows: Vec<Window>,
    /// Allow learning at any time of day (removes all windows)
    #[arg(long, conflicts_with = "windows")]
    pub any_time: bool,
    /// Longest learning session in minutes (0 = no limit)
    #[arg(long, value_name = "MIN")]
    pub max_session_minutes: Option<u32>,
    /// Most learning minutes per day (0 = no limit)
    #[arg(long, value_name = "MIN")]
    pub max_day_minutes: Option<u32>,
    /// Learn only on AC power: yes or no
    #[arg(long, value_name = "yes|no", value_parser = clap::builder::PossibleValuesParser::new(["yes", "no"]).map(|s| s == "yes"))]
    pub ac_only: Option<bool>,
    /// With --ac-only no: the lowest battery charge to learn on, in percent
    #[arg(long, value_name = "PERCENT")]
    pub min_battery: Option<f32>,
    /// Hottest sensor allowed in °C, or off
    #[arg(long, value_name = "C|off", value_parser = schedule::parse_temperature)]
    pub max_temperature: Option<OrUnset<f32>>,
    /// Minutes the user must be away from keyboard and mouse (0 = not required)
    #[arg(long, value_name = "MIN")]
    pub user_idle_minutes: Option<u32>,
    /// Memory learning may use, e.g. 600MiB or 1.5GiB, or auto (the device profile's)
    #[arg(long, value_name = "SIZE|auto", value_parser = schedule::parse_budget)]
    pub memory_budget: Option<OrUnset<u64>>,
    /// Compute threads for learning, or auto (the device profile's)
    #[arg(long, value_name = "N|auto", value_parser = schedule::parse_threads)]
    pub learn_threads: Option<OrUnset<usize>>,
    /// CPU priority of learning, 0 (normal) to 19 (lowest)
    #[arg(long, value_name = "0-19", value_parser = clap::value_parser!(i32).range(0..=19))]
    pub nice: Option<i32>,
}

impl ScheduleSetArgs {
    fn update(&self) -> ScheduleUpdate {
        ScheduleUpdate {
            idle_minutes: self.idle_minutes,
            max_cpu_load: self.max_cpu_load,
            windows: if self.any_time {
                Some(Vec::new())
            } else if self.windows.is_empty() {
                None
            } else {
                Some(self.windows.clone())
            },
            max_minutes_per_session: self.max_session_minutes,
            max_minutes_per_day: self.max_day_minutes,
            ac_only: self.ac_only,
            min_battery_percent: self.min_battery,
            max_temperature_c: self.max_temperature.map(|v| v.0),
            user_idle_minutes: self.user_idle_minutes,
            memory_budget_bytes: self.memory_budget.map(|v| v.0),
            threads: self.learn_threads.map(|v| v.0),
            nice: self.nice,
        }
    }
}

#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// List the built-in profiles
    #[arg(long)]
    pub list: bool,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

/// The data directory, the store, and the profile in use with what it rests on. `reading`: a
/// command that only reads, which works on a read-only data directory too.
fn open(cli: &Cli, reading: bool) -> Result<(Home, Store, Profile, device::Evidence)> {
    let (home, store) = super::open_store(reading)?;
    let (profile, evidence) = device::for_home(home.root(), cli.device.as_deref())?;
    Ok((home, store, profile, evidence))
}

pub fn schedule_cmd(cli: &Cli, cmd: &ScheduleCommand) -> Result<()> {
    match cmd {
        ScheduleCommand::Show { json } => {
            let (home, store, profile, _) = open(cli, true)?;
            let (s, d) = hone::daemon::decision_measured(home.root(), &store, &profile)?;
            let daemon = daemon_lock::holder(home.root())?;
            if *json {
                println!(
                    "{}",
                    json!({ "schedule": s, "decision": d, "profile": profile.name, "daemon_pid": daemon })
                );
                return Ok(());
            }
            println!("{s}\n\n{d:#}");
            match daemon {
                Some(pid) => println!("daemon: running (pid {pid})"),
                None => println!("daemon: not running"),
            }
            Ok(())
        }
        ScheduleCommand::Set(a) => {
            let (_, store, _, _) = open(cli, false)?;
            println!("{}", Schedule::save_update(&store, &a.update(), a.reset)?);
            Ok(())
        }
    }
}

pub fn device_cmd(cli: &Cli, a: &DeviceArgs) -> Result<()> {
    if a.list {
        for p in Profile::embedded()? {
            println!("{:<18} {}", p.name, p.description);
        }
        return Ok(());
    }
    let (home, _, profile, evidence) = open(cli, true)?;
    let override_file = device::override_path(home.root());
    if a.json {
        println!(
            "{}",
            json!({ "profile": profile, "evidence": evidence, "override_file": override_file })
        );
        return Ok(());
    }
    println!("{profile}\n{evidence}");
    println!(
        "override file:  {} (fields there replace the profile's; `base = \"NAME\"` picks a profile)",
        override_file.display()
    );
    Ok(())
}
