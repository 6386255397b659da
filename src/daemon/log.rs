//! The daemon's logging: `$HONE_HOME/daemon.log` (rotated by size by `crate::logfile`, 0600) at
//! info, warnings also on stderr (the service manager's journal), installed once for the
//! process by `hone daemon run` ([`init_file_logging`]).
//!
//! It must not decide what is logged (the `tracing` calls do) or rotate the file itself.

use crate::home::Home;
use crate::logfile::{self, RotatingFile};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Installs the daemon's logging: `$HONE_HOME/daemon.log` (rotated by size, 0600) at info (or
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
        // The error that ends the daemon is printed by the command line already.
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
