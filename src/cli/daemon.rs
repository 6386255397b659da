//! `hone daemon run|status|install|uninstall`: the command-line side of background learning.
//! It parses, sets up the log file, calls `hone::daemon` and `hone::daemon_lock`, and prints.
//!
//! It must not decide when to learn or run the loop itself (the library does); it runs
//! `systemctl`/`launchctl` only when `--now` is given.

use super::logging;
use crate::Cli;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hone::daemon::{self, DaemonPhase, LoopConfig, RunOptions, Status};
use hone::daemon_lock::{self, ServiceManager};
use hone::device;
use hone::home::Home;
use hone::logfile;
use hone::schedule::{self, Condition, Schedule};
use hone::signals;
use hone::store::Store;
use serde_json::json;
use std::path::{Path, PathBuf};
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
            super::train::quiet_candle_pool();
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
    let log = logging::init_file_logging(&home, cli.verbose)?;
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
        tracing::error!(target: logging::EXIT_TARGET, "{e:#}");
    }
    r.map(|_| ())
}

fn status(cli: &Cli, json_out: bool) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    let store = Store::open(&home.db_path())?;
    let pid = daemon_lock::holder(home.root())?;
    let st = daemon::read_status(&daemon::status_path(home.root()))?;
    // The file is only about the running daemon if it carries its pid.
    let current = st.as_ref().filter(|s| Some(s.pid) == pid);
    let (profile, _) = device::resolve(
        Path::new("/"),
        cli.device.as_deref(),
        Some(&device::override_path(home.root())),
    )?;
    let probe = signals::system_probe();
    // Two readings 300 ms apart: CPU load from /proc/stat deltas, not the 1-minute average.
    probe.cpu_load();
    std::thread::sleep(Duration::from_millis(300));
    let (schedule, decision) = daemon::decision_now(home.root(), &store, &profile, probe.as_ref())?;
    let today = chrono::Local::now().date_naive();
    let learned = daemon::learned_minutes(&store, today)?;
    let pending = hone::learn::pending_notes(&store)?;
    let log = home.root().join(logfile::DAEMON_LOG);
    if json_out {
        println!(
            "{}",
            json!({
                "running": pid.is_some(),
                "pid": pid,
                "status": current,
                "last_status": if current.is_none() { st.as_ref() } else { None },
                "pending_notes": pending,
                "learned_today_minutes": learned,
                "max_minutes_per_day": schedule.max_minutes_per_day,
                "decision": decision,
                "log": log,
            })
        );
        return Ok(());
    }
    match (pid, current) {
        (Some(pid), Some(s)) => {
            println!(
                "daemon          running (pid {pid}, since {})",
                local_time(&s.started_at)
            );
            print_doing(s);
        }
        (Some(pid), None) => println!("daemon          running (pid {pid}), starting up"),
        (None, _) => {
            println!("daemon          not running (start it with `hone daemon run`, or `hone daemon install` to start it at login)");
        }
    }
    if let Some(r) = st.as_ref().and_then(|s| s.last_result.as_ref()) {
        let what = match r.outcome.as_str() {
            "done" => format!(
                "cycle {} done: {}{}",
                r.cycle.unwrap_or_default(),
                match r.activated {
                    Some(v) => format!("adapter v{v} activated; "),
                    None => "no new adapter; ".into(),
                },
                r.message
            ),
            "interrupted" => format!(
                "cycle {} interrupted; it continues when learning may run again",
                r.cycle.unwrap_or_default()
            ),
            "nothing_to_learn" => "nothing to learn".into(),
            _ => format!("failed: {}", r.message),
        };
        println!("last cycle      {what} ({})", local_time(&r.at));
    }
    if let Some(ms) = st.as_ref().and_then(|s| s.last_pause_ms) {
        println!("last pause      the cycle stopped {ms} ms after it was asked to");
    }
    if schedule.max_minutes_per_day > 0 {
        println!(
            "learned today   {learned:.0} of {} min",
            schedule.max_minutes_per_day
        );
    } else {
        println!("learned today   {learned:.0} min (no daily limit)");
    }
    println!("notes waiting   {pending}");
    if let Some(e) = st.as_ref().and_then(|s| s.estimate_s) {
        println!(
            "cycle estimate  about {:.1} min, measured on this machine when the last cycle started (`hone learn --estimate` measures now)",
            e / 60.0
        );
    }
    println!("log             {}", log.display());
    println!();
    println!("{decision:#}");
    Ok(())
}

fn print_doing(s: &Status) {
    let mut line = format!("doing           {}", s.phase.as_str());
    if let Some(p) = s.progress.as_ref().filter(|_| s.phase.is_learning()) {
        if p.total > 0 {
            line.push_str(&format!(" ({}/{})", p.done, p.total));
        }
    }
    if !s.detail.is_empty() {
        line.push_str(&format!(" — {}", s.detail));
    }
    line.push_str(&format!(" (since {})", local_time(&s.since)));
    println!("{line}");
    if s.phase == DaemonPhase::Paused {
        if let Some(c) = s.cycle {
            println!("                cycle {c} continues from its checkpoint when learning may run again");
        }
    }
}

fn local_time(rfc3339: &str) -> String {
    hone::schedule::parse_stored_time(rfc3339)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| rfc3339.to_string())
}

/// The user's uid (for launchd's `gui/UID` domain).
fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn service_file() -> Result<(ServiceManager, PathBuf, daemon_lock::InstallPaths)> {
    let user_home = dirs::home_dir()
        .context("cannot tell your home folder; set HOME so hone knows where service files go")?;
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let paths = daemon_lock::install_paths(&user_home, xdg.as_deref());
    let m = ServiceManager::for_this_os();
    let path = match m {
        ServiceManager::Systemd => paths.systemd_unit.clone(),
        ServiceManager::Launchd => paths.launchd_plist.clone(),
    };
    Ok((m, path, paths))
}

/// Runs one service-manager command, echoing it; the error says what to do instead.
fn run_command(args: &[&str]) -> Result<()> {
    println!("$ {}", args.join(" "));
    let status = std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .with_context(|| {
            format!(
                "cannot run {}; is it installed? Run the commands yourself instead (without --now)",
                args[0]
            )
        })?;
    if !status.success() {
        anyhow::bail!(
            "`{}` failed ({status}); fix what it said, or run the commands yourself",
            args.join(" ")
        );
    }
    Ok(())
}

fn install(now: bool) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    let root = std::fs::canonicalize(home.root()).with_context(|| {
        format!(
            "cannot resolve the data directory {}",
            home.root().display()
        )
    })?;
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("cannot find the path of the running hone executable")?;
    let store = Store::open(&home.db_path())?;
    let schedule = Schedule::load(&store)?;
    let units = daemon_lock::unit_files(&exe, &root, schedule.nice)?;
    let (m, path, paths) = service_file()?;
    let text = match m {
        ServiceManager::Systemd => &units.systemd_unit,
        ServiceManager::Launchd => &units.launchd_plist,
    };
    daemon_lock::write_unit(&path, text)?;
    set_private(&path)?;
    println!(
        "wrote {} (runs {} daemon run with HONE_HOME={})",
        path.display(),
        exe.display(),
        root.display()
    );
    let uid_s = format!("gui/{}", uid());
    if now {
        match m {
            ServiceManager::Systemd => {
                run_command(&["systemctl", "--user", "daemon-reload"])?;
                run_command(&[
                    "systemctl",
                    "--user",
                    "enable",
                    "--now",
                    daemon_lock::SYSTEMD_UNIT,
                ])?;
            }
            ServiceManager::Launchd => {
                let plist = path.to_string_lossy();
                run_command(&["launchctl", "bootstrap", &uid_s, &plist])?;
            }
        }
        println!("the daemon is on; `hone daemon status` shows what it does");
    } else {
        println!("to start it now and at every login, run:");
        for c in daemon_lock::enable_commands(m, &paths, uid()) {
            println!("  {c}");
        }
        println!("(or `hone daemon install --now` runs them)");
    }
    Ok(())
}

fn uninstall(now: bool) -> Result<()> {
    let (m, path, _) = service_file()?;
    if now {
        let r = match m {
            ServiceManager::Systemd => run_command(&[
                "systemctl",
                "--user",
                "disable",
                "--now",
                daemon_lock::SYSTEMD_UNIT,
            ]),
            ServiceManager::Launchd => {
                let target = format!("gui/{}/{}", uid(), daemon_lock::LAUNCHD_LABEL);
                run_command(&["launchctl", "bootout", &target])
            }
        };
        if let Err(e) = r {
            eprintln!("warning: {e:#}; removing the service file anyway");
        }
    }
    let removed = daemon_lock::remove_unit(&path)?;
    // What `systemctl disable` removes: the link that starts it at login. Left behind, it
    // would point at nothing.
    let mut unlinked = None;
    if m == ServiceManager::Systemd {
        if let Some(dir) = path.parent() {
            let link = dir
                .join("default.target.wants")
                .join(daemon_lock::SYSTEMD_UNIT);
            if link.symlink_metadata().is_ok() {
                std::fs::remove_file(&link)
                    .with_context(|| format!("cannot remove {}", link.display()))?;
                unlinked = Some(link);
            }
        }
    }
    if removed {
        println!("removed {}", path.display());
    } else {
        println!("no service file at {}", path.display());
    }
    if let Some(l) = unlinked {
        println!("removed {}", l.display());
    }
    if m == ServiceManager::Systemd {
        if now {
            run_command(&["systemctl", "--user", "daemon-reload"])?;
        } else {
            println!("if the daemon is running as a service, stop it with:");
            println!("  systemctl --user stop {}", daemon_lock::SYSTEMD_UNIT);
            println!("  systemctl --user daemon-reload");
        }
    } else if !now {
        println!("if the daemon is running as a service, stop it with:");
        for c in daemon_lock::disable_commands(m, uid()) {
            println!("  {c}");
        }
    }
    Ok(())
}

fn set_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private (0600)", path.display()))
}
