//! Ctrl-C and SIGTERM for long-running commands, handled one way everywhere: the first signal
//! sets a flag the work checks (it stops at its next checkpoint), a second one ends the
//! process at once with code 130.
//!
//! It must not do anything but set atomics in the handlers (async-signal-safe).

use std::sync::atomic::{AtomicBool, Ordering};

/// What the handlers set.
#[derive(Debug)]
pub struct StopFlags {
    /// SIGINT, SIGTERM or SIGHUP arrived.
    pub stop: AtomicBool,
}

static FLAGS: StopFlags = StopFlags {
    stop: AtomicBool::new(false),
};

extern "C" fn on_stop(_: libc::c_int) {
    if FLAGS.stop.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Installs the handlers for SIGINT, SIGTERM and SIGHUP.
pub fn install_stop_handlers() -> std::io::Result<&'static StopFlags> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only touches
        // atomics and _exit.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(&FLAGS)
}
