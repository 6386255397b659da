//! Being asked to stop: one place that installs hone's signal handlers, for any command that
//! runs long and must reach a checkpoint before it exits (`hone train`, the daemon), handled
//! one way everywhere.
//!
//! [`install_stop_handlers`] turns SIGINT, SIGTERM and SIGHUP into [`StopFlags::stop`]: the
//! first one sets the flag (the work looks at it, stops at its next checkpoint and returns);
//! a second one ends the process at once with code 130, for when the checkpoint takes too
//! long. [`install_daemon_handlers`] does the same and also turns SIGUSR1 into
//! [`StopFlags::user`]: a hone request announcing itself to the daemon (`presence`).
//!
//! It must NOT do anything in a handler but touch atomics and call `_exit` (both
//! async-signal-safe): no allocation, no locks, no logging, no I/O. It does not decide what a
//! stop means (the caller looks at the flags), and it does not read the system conditions the
//! schedule uses (that is `signals`).

use std::sync::atomic::{AtomicBool, Ordering};

/// The exit code of a process ended by a second stop signal (as shells report an interrupt).
pub const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// What the signal handlers set. There is one per process ([`install_stop_handlers`] and
/// [`install_daemon_handlers`] hand out the same one).
#[derive(Debug)]
pub struct StopFlags {
    /// SIGTERM, SIGINT or SIGHUP arrived (a second one ends the process at once, code 130).
    /// It is never cleared: it can be handed to work as its cancel flag.
    pub stop: AtomicBool,
    /// SIGUSR1 arrived: a user request announced itself (only with
    /// [`install_daemon_handlers`]; the reader clears it).
    pub user: AtomicBool,
}

impl StopFlags {
    /// Whether a stop signal arrived.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether SIGUSR1 arrived since the last call (clears it).
    pub fn take_user_request(&self) -> bool {
        self.user.swap(false, Ordering::SeqCst)
    }
}

static FLAGS: StopFlags = StopFlags {
    stop: AtomicBool::new(false),
    user: AtomicBool::new(false),
};

extern "C" fn on_stop(_: libc::c_int) {
    if FLAGS.stop.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe; the kernel drops the locks, SQLite's journal
        // keeps the database consistent.
        unsafe { libc::_exit(EXIT_ON_SECOND_SIGNAL) };
    }
}

extern "C" fn on_user(_: libc::c_int) {
    FLAGS.user.store(true, Ordering::SeqCst);
}

/// Installs `handler` for `sig` (restarting interrupted system calls).
fn set_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handlers only touch atomics
    // (and _exit), which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Installs the stop handlers: SIGTERM, SIGINT and SIGHUP set [`StopFlags::stop`]; a second
/// one exits with code 130.
pub fn install_stop_handlers() -> std::io::Result<&'static StopFlags> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        set_handler(sig, on_stop)?;
    }
    Ok(&FLAGS)
}

/// Installs the daemon's handlers: the stop handlers, and SIGUSR1 → [`StopFlags::user`] (a
/// user request). Must run before the daemon lock is taken: SIGUSR1's default action ends a
/// process, and requests signal whoever holds the lock.
pub fn install_daemon_handlers() -> std::io::Result<&'static StopFlags> {
    let flags = install_stop_handlers()?;
    set_handler(libc::SIGUSR1, on_user)?;
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `child` in a forked copy of this process (so the handlers and signals touch no
    /// other test) and returns its wait status. The child may only make async-signal-safe
    /// calls (the test process has other threads) and must end with `_exit`.
    fn in_child(child: fn() -> !) -> libc::c_int {
        // SAFETY: the child only calls async-signal-safe functions (sigaction, raise, atomics,
        // _exit) before it exits; the parent only waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
            if pid == 0 {
                child();
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        }
    }

    fn exit_code(status: libc::c_int) -> Option<i32> {
        libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
    }

    fn killed_by(status: libc::c_int) -> Option<i32> {
        libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
    }

    #[test]
    fn the_first_stop_signal_sets_the_flag_and_the_second_exits_130() {
        fn child() -> ! {
            // SAFETY: raise and _exit are async-signal-safe.
            unsafe {
                let Ok(flags) = install_stop_handlers() else {
                    libc::_exit(2)
                };
                if flags.stop_requested() {
                    libc::_exit(3);
                }
                libc::raise(libc::SIGTERM);
                if !flags.stop_requested() {
                    libc::_exit(4);
                }
                libc::raise(libc::SIGINT);
                // Still here: the second signal did not end the process.
                libc::_exit(5)
            }
        }
        assert_eq!(exit_code(in_child(child)), Some(EXIT_ON_SECOND_SIGNAL));
    }

    #[test]
    fn sighup_stops_too() {
        fn child() -> ! {
            // SAFETY: raise and _exit are async-signal-safe.
            unsafe {
                let Ok(flags) = install_stop_handlers() else {
                    libc::_exit(2)
                };
                libc::raise(libc::SIGHUP);
                libc::_exit(if flags.stop_requested() { 0 } else { 4 })
            }
        }
        assert_eq!(exit_code(in_child(child)), Some(0));
    }

    #[test]
    fn the_daemon_handlers_turn_sigusr1_into_a_user_request_and_the_stop_handlers_do_not() {
        fn daemon() -> ! {
            // SAFETY: raise and _exit are async-signal-safe.
            unsafe {
                let Ok(flags) = install_daemon_handlers() else {
                    libc::_exit(2)
                };
                libc::raise(libc::SIGUSR1);
                if !flags.take_user_request() || flags.take_user_request() {
                    libc::_exit(4);
                }
                libc::_exit(if flags.stop_requested() { 5 } else { 0 })
            }
        }
        assert_eq!(exit_code(in_child(daemon)), Some(0));

        fn stop_only() -> ! {
            // SAFETY: raise and _exit are async-signal-safe.
            unsafe {
                if install_stop_handlers().is_err() {
                    libc::_exit(2);
                }
                // Restore the default action in case the test process ignores it.
                libc::signal(libc::SIGUSR1, libc::SIG_DFL);
                libc::raise(libc::SIGUSR1);
                libc::_exit(0)
            }
        }
        assert_eq!(killed_by(in_child(stop_only)), Some(libc::SIGUSR1));
    }
}
