//! `hone daemon` as real processes: one daemon per data directory, `daemon status`, a clean stop
//! on SIGTERM, a database that survives SIGKILL, the service file, and (once the learning cycle
//! is in) a user request pausing training within a second.
//!
//! The daemons here run with hidden test flags: `--ignore-idle` (no idle threshold after a
//! request) and `--ignore-condition …` (the test machine's CPU load, power and temperature do not
//! count), so they do not depend on how busy the machine is.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const IGNORE: &str = "cpu_load,power,battery,temperature,memory,window,daily_limit,session_limit";

/// A daemon child that is killed if the test fails before it stops it.
struct Daemon(Child);

impl Daemon {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
        let rc = unsafe { libc::kill(self.0.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.0.id());
    }

    /// Waits for the process to end; None after `timeout`.
    fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.0.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon_cmd(home: &Path, model: &Path) -> Command {
    let mut c = hone(home);
    c.arg("--model")
        .arg(model)
        .args([
            "daemon",
            "run",
            "--ignore-idle",
            "--ignore-condition",
            IGNORE,
        ])
        .args(["--check-every-ms", "200"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn spawn_daemon(home: &Path, model: &Path) -> Daemon {
    Daemon(
        daemon_cmd(home, model)
            .spawn()
            .expect("start hone daemon run"),
    )
}

fn status_file(home: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(home.join("daemon.status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Polls the status file every 5 ms until `f` holds; panics with the last status after
/// `timeout`.
fn wait_status(home: &Path, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < timeout {
        if let Some(s) = status_file(home) {
            if f(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out after {timeout:?} waiting for {what}; last status: {last:#?}");
}

fn phase(s: &Value) -> &str {
    s["phase"].as_str().unwrap_or("")
}

/// Up: the status file carries this daemon's pid and it has left "starting".
fn wait_up(home: &Path, d: &Daemon) -> Value {
    let pid = d.pid();
    wait_status(home, "the daemon to start", Duration::from_secs(30), |s| {
        s["pid"].as_u64() == Some(u64::from(pid)) && phase(s) != "starting"
    })
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn add_notes(home: &Path, notes: &[&str]) {
    for n in notes {
        run(hone(home).args(["note", "add", n]), true);
    }
}

const NOTES: &[&str] = &[
    "The spare key is under the blue flowerpot by the back door.",
    "Ilse's birthday is on the 14th of March; she collects old postcards.",
    "The bakery on Linden Street closes at 2 pm on Saturdays.",
    "My bike lock code is the year the library opened, 1987.",
    "The dentist is Dr. Okafor, Tuesdays only, third floor.",
    "Water the fern every Sunday; the cactus once a month.",
    "The wifi password at the cabin is written inside the fuse box door.",
    "Project Heron's demo moved to the 9th; Ana presents the slides.",
];

#[test]
fn one_daemon_per_home_status_sigterm_and_sigkill() {
    let home = temp_home();
    let h = home.path();
    let model = default_model();
    add_notes(h, &NOTES[..3]);

    let mut d1 = spawn_daemon(h, &model);
    let pid = d1.pid();
    let first = wait_up(h, &d1);
    assert_eq!(first["started_at"].as_str().map(str::len), Some(24));

    // A second daemon for the same data directory refuses, naming the first one's pid.
    let o = run(
        hone(h).arg("--model").arg(&model).args(["daemon", "run"]),
        false,
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!("(pid {pid})")) && err.contains("already running"),
        "{err}"
    );
    assert_eq!(
        err.matches("already running").count(),
        1,
        "said once: {err}"
    );
    assert!(
        d1.0.try_wait().unwrap().is_none(),
        "the first one still runs"
    );

    // Status: running, this pid, what it does, and the schedule's decision.
    let j = last_json(&run(hone(h).args(["daemon", "status", "--json"]), true));
    assert_eq!(j["running"], true, "{j:#}");
    assert_eq!(j["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(j["status"]["pid"].as_u64(), Some(u64::from(pid)));
    assert!(!phase(&j["status"]).is_empty(), "{j:#}");
    assert!(j["decision"]["allowed"].is_boolean(), "{j:#}");
    assert!(j["pending_notes"].as_u64().is_some(), "{j:#}");
    let text = stdout(&run(hone(h).args(["daemon", "status"]), true));
    assert!(text.contains(&format!("running (pid {pid}")), "{text}");
    assert!(text.contains("would learn now:"), "{text}");

    // SIGTERM: exits 0 within 2 s, having written "stopped" and released the lock.
    let t0 = Instant::now();
    d1.signal(libc::SIGTERM);
    let st = d1
        .wait_for_exit(Duration::from_secs(2))
        .unwrap_or_else(|| panic!("still running 2 s after SIGTERM: {:#?}", status_file(h)));
    let took = t0.elapsed();
    eprintln!("SIGTERM → exit: {} ms", took.as_millis());
    assert!(st.success(), "exit status {st:?}");
    assert_eq!(phase(&status_file(h).unwrap()), "stopped");
    let j = last_json(&run(hone(h).args(["daemon", "status", "--json"]), true));
    assert_eq!(j["running"], false, "{j:#}");
    assert_eq!(j["last_status"]["phase"], "stopped", "{j:#}");

    // The files it keeps are private.
    for f in ["daemon.log", "daemon.status.json", "daemon.lock"] {
        assert_eq!(mode(&h.join(f)), 0o600, "{f}");
    }
    let log = std::fs::read_to_string(h.join("daemon.log")).unwrap();
    assert!(log.contains(&format!("started (pid {pid})")), "{log}");
    assert!(log.contains("hone daemon stopped"), "{log}");

    // SIGKILL while it works, with another process writing notes: the database stays whole
    // and the next daemon takes the lock.
    let mut d2 = spawn_daemon(h, &model);
    wait_up(h, &d2);
    add_notes(h, &NOTES[3..5]);
    std::thread::sleep(Duration::from_millis(300));
    d2.signal(libc::SIGKILL);
    let st = d2
        .wait_for_exit(Duration::from_secs(5))
        .expect("SIGKILL ends it");
    assert!(!st.success());
    let store = hone::store::Store::open(&h.join("hone.db")).expect("the database opens");
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert_eq!(store.count_notes().unwrap(), 5);
    drop(store);
    let j = last_json(&run(hone(h).args(["daemon", "status", "--json"]), true));
    assert_eq!(j["running"], false, "a killed daemon is not running: {j:#}");

    let mut d3 = spawn_daemon(h, &model);
    let s = wait_up(h, &d3);
    assert_eq!(s["pid"].as_u64(), Some(u64::from(d3.pid())));
    let j = last_json(&run(hone(h).args(["daemon", "status", "--json"]), true));
    assert_eq!(j["pid"].as_u64(), Some(u64::from(d3.pid())));
    d3.signal(libc::SIGINT);
    let st = d3
        .wait_for_exit(Duration::from_secs(2))
        .expect("SIGINT stops it");
    assert!(st.success(), "{st:?}");
}

#[test]
fn install_writes_a_private_service_file_and_uninstall_removes_it() {
    let home = temp_home();
    let user = temp_home();
    let cfg = user.path().join("cfg");
    let cmd = |args: &[&str]| {
        let mut c = hone(home.path());
        c.env("HOME", user.path())
            .env("XDG_CONFIG_HOME", &cfg)
            .args(args);
        c
    };
    let o = run(&mut cmd(&["daemon", "install"]), true);
    let out = stdout(&o);
    let canonical_home = std::fs::canonicalize(home.path()).unwrap();
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_hone")).unwrap();
    let (file, enable) = if cfg!(target_os = "macos") {
        (
            user.path()
                .join("Library/LaunchAgents/dev.hone.daemon.plist"),
            "launchctl bootstrap",
        )
    } else {
        (
            cfg.join("systemd/user/hone.service"),
            "systemctl --user enable --now hone.service",
        )
    };
    assert!(out.contains(enable), "{out}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&exe.display().to_string()), "{text}");
    assert!(
        text.contains(&canonical_home.display().to_string()),
        "{text}"
    );
    assert_eq!(mode(&file), 0o600);
    if !cfg!(target_os = "macos") {
        assert!(
            text.contains("daemon run\n") && text.contains("Nice=10\n"),
            "{text}"
        );
        // As `systemctl enable` would link it.
        let wants = cfg.join("systemd/user/default.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        std::os::unix::fs::symlink(&file, wants.join("hone.service")).unwrap();
    }

    let o = run(&mut cmd(&["daemon", "uninstall"]), true);
    let out = stdout(&o);
    assert!(!file.exists());
    assert!(
        out.contains(&format!("removed {}", file.display())),
        "{out}"
    );
    if !cfg!(target_os = "macos") {
        let link = cfg.join("systemd/user/default.target.wants/hone.service");
        assert!(link.symlink_metadata().is_err(), "the link is gone");
        assert!(out.contains("systemctl --user stop hone.service"), "{out}");
    }
    let o = run(&mut cmd(&["daemon", "uninstall"]), true);
    assert!(stdout(&o).contains("no service file"), "{}", stdout(&o));
}

/// Wall time of one `hone ask` on the real model.
fn timed_ask(home: &Path, model: &Path) -> Duration {
    let t0 = Instant::now();
    let o = run(
        hone(home).arg("--model").arg(model).args([
            "ask",
            "--json",
            "--temperature",
            "0",
            "-n",
            "32",
            "Where is the spare key?",
        ]),
        true,
    );
    let took = t0.elapsed();
    assert!(!last_json(&o)["answer"].as_str().unwrap_or("").is_empty());
    took
}

#[test]
fn a_request_pauses_training_within_a_second_and_learning_resumes() {
    let home = temp_home();
    let h = home.path();
    let model = default_model();
    add_notes(h, NOTES);

    // An ask on an idle machine, for comparison (the second of two: files cached).
    timed_ask(h, &model);
    let idle = timed_ask(h, &model);

    let mut d = spawn_daemon(h, &model);
    wait_up(h, &d);
    wait_status(
        h,
        "the cycle to reach training",
        Duration::from_secs(900),
        |s| phase(s) == "training",
    );
    // Into training for a moment, so the trainer is busy when the request comes.
    std::thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    let t0_wall = chrono::Utc::now();
    let ask = hone(h)
        .arg("--model")
        .arg(&model)
        .args([
            "ask",
            "--json",
            "--temperature",
            "0",
            "-n",
            "32",
            "Where is the spare key?",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hone ask");
    // When the ask ends before the cycle has checkpointed, the daemon resumes at once and
    // "paused" may last only milliseconds; the interrupted cycle's result, stamped after the
    // request began, shows the pause as well.
    let interrupted_at = |s: &Value| {
        let r = &s["last_result"];
        (r["outcome"] == "interrupted")
            .then(|| chrono::DateTime::parse_from_rfc3339(r["at"].as_str()?).ok())
            .flatten()
            .filter(|at| *at >= t0_wall)
    };
    let paused = wait_status(h, "the daemon to pause", Duration::from_secs(10), |s| {
        phase(s) == "paused" || interrupted_at(s).is_some()
    });
    let pause = match interrupted_at(&paused) {
        Some(at) if phase(&paused) != "paused" => (at.with_timezone(&chrono::Utc) - t0_wall)
            .to_std()
            .unwrap_or_default(),
        _ => t0.elapsed(),
    };
    let o = ask.wait_with_output().expect("hone ask");
    let busy = t0.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!(
        "request → daemon paused: {} ms (cancel → checkpoint {} ms); ask latency {} ms while \
         training vs {} ms idle",
        pause.as_millis(),
        paused["last_pause_ms"],
        busy.as_millis(),
        idle.as_millis()
    );
    assert!(pause < Duration::from_secs(1), "paused after {pause:?}");
    assert!(paused["last_pause_ms"].as_u64().unwrap() < 1000);
    let cycle = paused["cycle"].as_i64().expect("the interrupted cycle");
    assert!(
        busy < idle * 2 + Duration::from_secs(1),
        "ask took {busy:?} during training, {idle:?} idle"
    );

    // The request is over: the same cycle continues (no idle threshold with --ignore-idle).
    let resumed = wait_status(h, "learning to resume", Duration::from_secs(60), |s| {
        s["cycle"].as_i64() == Some(cycle)
            && matches!(
                phase(s),
                "learning" | "self_edits" | "anchors" | "training" | "gate"
            )
    });
    eprintln!("resumed: {}", resumed["detail"]);

    // SIGTERM mid-cycle: the cycle checkpoints and the daemon exits 0 within 2 s.
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let st = d
        .wait_for_exit(Duration::from_secs(2))
        .unwrap_or_else(|| panic!("still running 2 s after SIGTERM: {:#?}", status_file(h)));
    eprintln!(
        "SIGTERM during learning → exit: {} ms",
        t0.elapsed().as_millis()
    );
    assert!(st.success());
    let s = status_file(h).unwrap();
    assert_eq!(s["last_result"]["outcome"], "interrupted", "{s:#}");
}

/// Polls the status file while `child` runs; true if the daemon said a request is running.
fn saw_request(home: &Path, child: &mut Child) -> bool {
    let mut seen = false;
    while child.try_wait().expect("try_wait").is_none() {
        if status_file(home).is_some_and(|s| s["detail"] == "a hone request is running") {
            seen = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    seen
}

#[test]
fn ask_and_chat_announce_themselves_to_the_daemon() {
    let home = temp_home();
    let h = home.path();
    let model = default_model();
    let mut d = spawn_daemon(h, &model);
    wait_up(h, &d);

    let mut ask = hone(h)
        .arg("--model")
        .arg(&model)
        .args(["ask", "-n", "8", "--temperature", "0", "Hello"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hone ask");
    assert!(saw_request(h, &mut ask), "the daemon never saw the ask");
    assert!(ask.wait().unwrap().success());
    let after_ask = std::fs::metadata(h.join("user.lock"))
        .and_then(|m| m.modified())
        .expect("user.lock dates the last request");

    let mut chat = hone(h)
        .arg("--model")
        .arg(&model)
        .args(["chat", "-n", "8", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hone chat");
    {
        use std::io::Write as _;
        let mut stdin = chat.stdin.take().unwrap();
        stdin.write_all(b"Hello\n/quit\n").unwrap();
    }
    assert!(saw_request(h, &mut chat), "the daemon never saw the chat");
    assert!(chat.wait().unwrap().success());
    let after_chat = std::fs::metadata(h.join("user.lock"))
        .and_then(|m| m.modified())
        .unwrap();
    assert!(after_chat >= after_ask);
    assert_eq!(mode(&h.join("user.lock")), 0o600);

    // Once the requests are over the daemon goes back to its business.
    wait_status(h, "the request to be over", Duration::from_secs(10), |s| {
        s["detail"] != "a hone request is running"
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_for_exit(Duration::from_secs(2)).unwrap().success());
    let log = std::fs::read_to_string(h.join("daemon.log")).unwrap();
    assert!(
        log.matches("SIGUSR1: a hone request announced itself")
            .count()
            >= 2,
        "{log}"
    );
    assert!(log.contains("a hone request started"), "{log}");
    assert!(log.contains("the hone request ended"), "{log}");
}
