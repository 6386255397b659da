//! `hone daemon run|status|install|uninstall`: the command-line side of background learning.
//! It parses, calls `hone::daemon` (its log file, the loop, the status report, and
//! `hone::daemon::service` for the service file), and prints what they say.
//!
//! It must not decide when to learn, run the loop, gather the status, write service files or
//! run the service manager's commands itself (the library does, the last only for `--now`).

use crate::Cli;
use anyhow::Result;
use clap::{Args, Subcommand};
use hone::daemon::service;
use hone::daemon::{self, LoopConfig, RunOptions};
use hone::home::Home;
use hone::schedule::{self, Condition};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum DaemonCommand {
    /// Run in the foreground: learn from new notes whenever the schedule allows, and yield at
    /// once to your requests (this is what the installed service runs). Logs go to
    /// $HONE_HOME/daemon.log.
    Run(RunArgs),
    /// Whether a daemon runs, what it is doing, and whether learning would run now
    Status {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Write the service file that starts the daemon at login (systemd user unit on Linux,
    /// launchd agent on macOS) and print the commands that turn it on
    Install {
        /// Also run those commands now
        #[arg(long)]
        now: bool,
    },
    /// Remove the service file (and say how to stop a running daemon)
    Uninstall {
        /// Also stop and disable the service now (before removing its file)
        #[arg(long)]
        now: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// For tests: do not wait for the idle threshold after a request (requests still pause
    /// learning while they run)
    #[arg(long, hide = true)]
    pub ignore_idle: bool,
    /// For tests: schedule conditions that do not count, e.g. cpu_load,power
    #[arg(long = "ignore-condition", hide = true, value_delimiter = ',', value_parser = schedule::parse_condition)]
    pub ignore: Vec<Condition>,
    /// For tests: how often the conditions are read while waiting, in milliseconds
    #[arg(long, hide = true, default_value_t = 5000)]
    pub check_every_ms: u64,
}

pub fn run(cli: &Cli, cmd: &DaemonCommand) -> Result<()> {
    match cmd {
        DaemonCommand::Run(a) => {
            hone::sys::quiet_candle_pool();
            run_daemon(cli, a)
        }
        DaemonCommand::Status { json } => status(cli, *json),
        DaemonCommand::Install { now } => install(*now),
        DaemonCommand::Uninstall { now } => uninstall(*now),
    }
}

fn run_daemon(cli: &Cli, a: &RunArgs) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    let log = daemon::init_file_logging(&home, cli.verbose)?;
    let mut ignore = a.ignore.clone();
    if a.ignore_idle {
        ignore.extend([Condition::RecentRequest, Condition::UserActive]);
    }
    let opts = RunOptions {
        model: cli.model.clone(),
        threads: cli.threads,
        device: cli.device.clone(),
        ignore,
        config: LoopConfig {
            check_every: Duration::from_millis(a.check_every_ms.max(10)),
            ..LoopConfig::default()
        },
    };
    eprintln!(
        "hone daemon (pid {}) for {}; log: {}; stop with Ctrl-C",
        std::process::id(),
        home.root().display(),
        log.display()
    );
    let r = daemon::run(&home, &opts);
    if let Err(e) = &r {
        tracing::error!(target: daemon::EXIT_TARGET, "{e:#}");
    }
    r.map(|_| ())
}

fn status(cli: &Cli, json_out: bool) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    let report = daemon::report(&home, cli.device.as_deref())?;
    if json_out {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(())
}

fn install(now: bool) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    service::install_and_tell(&home, now, &mut |line| println!("{line}"))
}

fn uninstall(now: bool) -> Result<()> {
    service::uninstall_and_tell(now, &mut |l| println!("{l}"), &mut |w| eprintln!("{w}"))
}
