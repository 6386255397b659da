//! How the command line logs: to stderr for every command ([`init_logging`]), and for
//! `hone daemon run` to `$HONE_HOME/daemon.log` with warnings also on stderr
//! ([`init_file_logging`]).
//!
//! It must not decide what is logged (the library's `tracing` calls do) or write the log file
//! itself (`hone::logfile` does, rotating it); it only installs the process's one subscriber.

use anyhow::{Context, Result};
use hone::home::Home;
use hone::logfile::{self, RotatingFile};
use std::path::PathBuf;

/// Logging to stderr, at warn (`-v` info, `-vv` debug, or `HONE_LOG`).
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HONE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only for a terminal: a pipe or a file gets plain text.
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The daemon's logging: `$HONE_HOME/daemon.log` (rotated by size, 0600) at info (or
/// `HONE_LOG`), warnings also on stderr (the service manager's journal).
pub fn init_file_logging(home: &Home, verbose: u8) -> Result<PathBuf> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let path = home.root().join(logfile::DAEMON_LOG);
    let file = RotatingFile::open(&path, logfile::DEFAULT_MAX_BYTES, logfile::DEFAULT_KEEP)
        .with_context(|| {
            format!(
                "cannot open the log file {}; check that the data directory is writable",
                path.display()
            )
        })?;
    let level = if verbose > 0 { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HONE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let to_file = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .with_filter(filter);
    use std::io::IsTerminal as _;
    let to_stderr = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::filter::LevelFilter::WARN)
        // The error that ends the daemon is printed by main already.
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target() != EXIT_TARGET
        }));
    // Fails only if a logger is already set (never, for `daemon run`).
    let _ = tracing_subscriber::registry()
        .with(to_file)
        .with(to_stderr)
        .try_init();
    Ok(path)
}

/// The log target of the error that ends the daemon (kept off stderr, where main prints it).
pub const EXIT_TARGET: &str = "hone::daemon::exit";
