//! How the command line logs: to stderr for every command but `hone daemon run`, which logs to
//! its file (`hone::daemon::init_file_logging`).
//!
//! It must not decide what is logged (the library's `tracing` calls do); it only installs the
//! process's one subscriber.

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
