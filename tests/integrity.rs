//! Nothing bad gets in: a diverging run keeps the previous adapter, a failed checkpoint write
//! does not end a run, an oversized note on standard input is refused, and values that would
//! silently do something else than asked are refused with a clear message. On tiny models the
//! tests write (fast), through the real `hone` binary.

mod common;

use common::*;
use hone::tiny::{write_tiny_model, TinySpec};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

fn assert_clean_error(o: &std::process::Output, must_contain: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for m in must_contain {
        assert!(err.contains(m), "stderr lacks {m:?}:\n{err}");
    }
}

fn tiny_model(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    write_tiny_model(&p, &TinySpec::default()).unwrap();
    p
}

fn training_data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"The heron waits in the shallow water until a fish comes near.\"}\n\
         {\"text\": \"Otters hold hands while they sleep so that they do not drift apart.\"}\n",
    )
    .unwrap();
    p
}

fn adapter_count(home: &Path) -> usize {
    hone::store::Store::open(&home.join("hone.db"))
        .unwrap()
        .adapters()
        .unwrap()
        .len()
}

/// A model whose final norm is NaN: every loss is NaN, so training diverges at its first step.
#[test]
fn a_diverging_run_stops_and_keeps_the_previous_adapter() {
    let home = temp_home();
    let model = tiny_model(home.path());
    let data = training_data(home.path());
    // A good run first: v1 is active.
    run(
        hone(home.path())
            .arg("--model")
            .arg(&model)
            .args(["train", "--data"])
            .arg(&data)
            .args(["--max-steps", "2", "--seq-len", "32"]),
        true,
    );
    assert_eq!(adapter_count(home.path()), 1);
    // The same model with NaN norm weights (same file size: the sha256 differs, so it is
    // another model; the point is that nothing is saved or activated from the NaN run).
    let mut bytes = std::fs::read(&model).unwrap();
    let layout = hone::gguf::header_layout(&bytes).unwrap();
    let t = layout
        .tensors
        .iter()
        .find(|t| t.name == "output_norm.weight")
        .unwrap();
    let start = (layout.data_start + t.offset) as usize;
    for i in 0..t.dims[0] as usize {
        bytes[start + 4 * i..start + 4 * i + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let nan_model = home.path().join("nan.gguf");
    std::fs::write(&nan_model, &bytes).unwrap();
    let o = hone(home.path())
        .arg("--model")
        .arg(&nan_model)
        .args(["train", "--data"])
        .arg(&data)
        .args(["--max-steps", "3", "--seq-len", "32"])
        .output()
        .unwrap();
    assert_clean_error(&o, &["diverged", "previous adapter stays active"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(adapter_count(home.path()), 1);
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    assert_eq!(store.adapters().unwrap()[0].version, 1);
    assert!(store.adapters().unwrap()[0].active);
}

/// A learning cycle whose active adapter's file was damaged builds on the nearest good version
/// (here none: the base model) instead of failing, says so, and activates its own adapter.
#[test]
fn a_cycle_does_not_build_on_a_damaged_adapter() {
    let home = temp_home();
    let h = home.path();
    let model = tiny_model(h);
    let data = training_data(h);
    let with_model = |c: &mut std::process::Command| {
        c.arg("--model").arg(&model);
    };
    let mut c = hone(h);
    with_model(&mut c);
    run(
        c.args(["train", "--data"])
            .arg(&data)
            .args(["--max-steps", "2", "--seq-len", "32"]),
        true,
    );
    let file = h.join("adapters/v1.safetensors");
    let mut b = std::fs::read(&file).unwrap();
    let n = b.len();
    b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, b).unwrap();
    run(
        hone(h).args(["note", "add", "My locker at the pool is number 311."]),
        true,
    );
    let mut c = hone(h);
    with_model(&mut c);
    let o = run(
        c.args([
            "learn",
            "--no-gate",
            "--fixed-steps",
            "--min-steps",
            "2",
            "--epochs",
            "1",
        ])
        .args(["--anchor-ratio", "0", "--json"]),
        true,
    );
    assert!(
        stderr(&o).contains("adapter v1 cannot be used"),
        "{}",
        stderr(&o)
    );
    let j = last_json(&o);
    assert_eq!(j["activated"], 2, "{j}");
    let store = hone::store::Store::open(&h.join("hone.db")).unwrap();
    assert_eq!(store.adapter(2).unwrap().unwrap().parent, None);
}

/// RLIMIT_FSIZE below the checkpoint's size (and SIGXFSZ ignored, so writes fail with EFBIG as
/// on a full disk): the run warns, keeps training, and saves its (smaller) adapter at the end.
#[cfg(target_os = "linux")]
#[test]
fn a_failed_checkpoint_write_does_not_end_the_run() {
    use std::os::unix::process::CommandExt;
    let home = temp_home();
    let model = tiny_model(home.path());
    let data = training_data(home.path());
    // Create the database first, without a limit.
    run(hone(home.path()).args(["note", "list"]), true);
    // A checkpoint holds the adapter and two AdamW moments: about 3x the adapter's bytes.
    // rank 8 on q,k,v,o,gate,up,down of 2 layers (dim 64, kv 32, ffn 128): 8*(64+64)*2 +
    // 8*(64+32)*2 + 8*(64+128)*3 per layer = 9728 floats, 19456 for two = 78 KB.
    let limit: libc::rlim_t = 160 * 1024;
    let mut c = hone(home.path());
    c.arg("--model")
        .arg(&model)
        .args(["train", "--data"])
        .arg(&data)
        .args(["--max-steps", "4", "--seq-len", "32", "--save-every", "1"]);
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &r);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "the run ended: {err}");
    assert!(
        err.contains("could not save the checkpoint at step 1") && err.contains("training goes on"),
        "{err}"
    );
    // Said once, not at every retry.
    assert_eq!(
        err.matches("could not save the checkpoint").count(),
        1,
        "{err}"
    );
    assert_eq!(adapter_count(home.path()), 1);
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert_eq!(store.adapters().unwrap()[0].steps, 4);
}

#[test]
fn a_note_on_standard_input_over_the_limit_is_refused() {
    let home = temp_home();
    let mut child = hone(home.path())
        .args(["note", "add", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let line = "All work and no play makes a very long note indeed.\n".repeat(1000);
        // 9+ MiB; hone stops reading after 8 MiB + 1 byte, so later writes may fail (EPIPE).
        for _ in 0..200 {
            if stdin.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
    });
    let o = child.wait_with_output().unwrap();
    let _ = writer.join();
    assert_clean_error(&o, &["standard input", "8 MiB limit", "hone note import"]);
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    assert_eq!(store.count_notes().unwrap(), 0);
    // Under the limit it is stored.
    let mut child = hone(home.path())
        .args(["note", "add", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a short note\n")
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert_eq!(store.count_notes().unwrap(), 1);
}

#[test]
fn values_that_would_do_something_else_are_refused() {
    let home = temp_home();
    let model = tiny_model(home.path());
    let data = training_data(home.path());
    let cores = std::thread::available_parallelism().unwrap().get();
    let too_many = (cores * 2 + 1).to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--max-steps", "0"], "--max-steps"),
        (vec!["train", "--seq-len", "0"], "--seq-len"),
        (vec!["train", "--seq-len", "8"], "at least 16"),
        (vec!["train", "--lr", "nan"], "--lr"),
        (vec!["train", "--lr", "0"], "above 0"),
        (vec!["train", "--rank", "0"], "--rank"),
        (vec!["train", "--alpha", "inf"], "--alpha"),
        (vec!["ask", "-n", "0", "hi"], "at least 1"),
        (vec!["-t", &too_many, "ask", "hi"], "cores"),
        (vec!["-t", "0", "ask", "hi"], "at least 1"),
        (vec!["history", "-n", "0"], "at least 1"),
        (vec!["note", "list", "--limit", "0"], "at least 1"),
        (vec!["schedule", "set", "--ac-only", "true"], "yes"),
    ];
    for (args, says) in cases {
        let mut c = hone(home.path());
        c.arg("--model").arg(&model);
        if args[0] == "train" {
            c.args(["train", "--data"]).arg(&data).args(&args[1..]);
        } else {
            c.args(&args);
        }
        let o = c.output().unwrap();
        assert_clean_error(&o, &[says]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    assert!(!home.path().join("hone.db").exists() || adapter_count(home.path()) == 0);
    // More threads than cores (up to twice) runs, but says so.
    let o = run(
        hone(home.path()).args(["-t", &(cores + 1).to_string(), "note", "list"]),
        true,
    );
    assert!(
        stderr(&o).contains("more threads than the"),
        "{}",
        stderr(&o)
    );
    // `schedule set --ac-only` lists yes and no, not true and false.
    let o = hone(home.path())
        .args(["schedule", "set", "--ac-only", "maybe"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(err.contains("[possible values: yes, no]"), "{err}");
}

#[test]
fn help_texts_are_written_for_every_option() {
    let home = temp_home();
    for cmd in [
        vec!["ask", "--help"],
        vec!["train", "--help"],
        vec!["learn", "--help"],
        vec!["history", "--help"],
        vec!["note", "list", "--help"],
        vec!["adapters", "list", "--help"],
        vec!["perplexity", "--help"],
    ] {
        let o = run(hone(home.path()).args(&cmd), true);
        let out = stdout(&o);
        // An option line with no text after it: "  --name <NAME>" alone.
        for line in out.lines() {
            let t = line.trim();
            let option = t.starts_with("--")
                || (t.len() > 2 && t.starts_with('-') && t.as_bytes()[1].is_ascii_alphabetic());
            if option && !t.starts_with("-h") && !t.starts_with("-V") {
                let undocumented = !t.contains("  ")
                    && out
                        .lines()
                        .skip_while(|l| l.trim() != t)
                        .nth(1)
                        .is_none_or(|next| next.trim().starts_with('-') || next.trim().is_empty());
                assert!(!undocumented, "{cmd:?}: {t:?} has no help text:\n{out}");
            }
        }
    }
}

#[test]
fn an_os_error_is_printed_once() {
    let home = temp_home();
    let o = hone(home.path())
        .args(["note", "import", "/nonexistent/notes.md"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.matches("(os error 2)").count() <= 1, "{err}");
    let o = hone(home.path())
        .args(["--model", "/nonexistent/m.gguf", "ask", "hi"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(err.matches("(os error 2)").count() <= 1, "{err}");
    assert!(
        !err.contains("stack backtrace") && !err.contains("   0: "),
        "{err}"
    );
}

#[test]
fn history_text_and_json_agree_on_order() {
    let home = temp_home();
    let model = tiny_model(home.path());
    for q in ["first question", "second question"] {
        run(
            hone(home.path()).arg("--model").arg(&model).args([
                "ask",
                "-n",
                "2",
                "--temperature",
                "0",
                q,
            ]),
            true,
        );
    }
    let text = stdout(&run(hone(home.path()).args(["history"]), true));
    let json = stdout(&run(hone(home.path()).args(["history", "--json"]), true));
    let first_text = text.find("second question").unwrap() < text.find("first question").unwrap();
    let first_json = json.find("second question").unwrap() < json.find("first question").unwrap();
    assert!(first_text && first_json, "text:\n{text}\njson:\n{json}");
    // Piped output carries no colour codes.
    let o = run(
        hone(home.path())
            .arg("--model")
            .arg(&model)
            .args(["-v", "ask", "-n", "2", "hi"]),
        true,
    );
    assert!(!stdout(&o).contains('\u{1b}') && !stderr(&o).contains('\u{1b}'));
}

/// On a terminal the line editor installed its own SIGINT handler, so Ctrl-C (or `kill -INT`)
/// during an answer did nothing. Run `hone chat` on a pseudo-terminal, ask for a long story,
/// send SIGINT while it is written: the answer stops ("[stopped]") and the chat goes on.
#[cfg(target_os = "linux")]
#[test]
fn ctrl_c_stops_a_chat_answer_on_a_terminal() {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let home = home_with_model();
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the given integers.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just opened and are owned here only.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    /// Kills the chat when the test fails (it would wait at its prompt for ever).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = KillOnDrop(
        hone(home.path())
            .args(["chat", "-n", "400", "--temperature", "0"])
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .spawn()
            .unwrap(),
    );
    let child = &mut guard.0;
    let out = Arc::new(Mutex::new(String::new()));
    let mut reader = master.try_clone().unwrap();
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let wait_for = |what: &str, secs: u64| {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if out.lock().unwrap().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    let mut m = master;
    assert!(wait_for("you> ", 60), "no prompt: {}", out.lock().unwrap());
    m.write_all(b"Write a very long story about a dragon and a knight.\r")
        .unwrap();
    // Wait until the answer is being written (some text after the echoed question).
    let started = Instant::now();
    while out.lock().unwrap().len() < 300 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id() as libc::pid_t;
    let t0 = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let stopped = wait_for("[stopped]", 10);
    let took = t0.elapsed();
    let text = out.lock().unwrap().clone();
    assert!(stopped, "SIGINT did not stop the answer:\n{text}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // The chat goes on: /quit leaves with success.
    m.write_all(b"/quit\r").unwrap();
    let t1 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}:\n{text}");
            break;
        }
        if t1.elapsed() > Duration::from_secs(20) {
            panic!("chat did not leave after /quit:\n{}", out.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `note list`, `history` and `status` only read: on a data directory hone cannot write (here
/// a folder and database of another user, read-only to them), they open the database
/// read-only instead of failing; a command that writes still fails, naming the file.
#[cfg(target_os = "linux")]
#[test]
fn read_only_commands_work_on_a_read_only_data_directory() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let outer = temp_home();
    let home = outer.path().join("h");
    run(
        hone(&home).args(["note", "add", "a note to read back"]),
        true,
    );
    run(hone(&home).args(["note", "list"]), true);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let nobody: libc::uid_t = 65534;
    let set_mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    if root {
        // root ignores modes: run hone as nobody, owner of a read-only folder and file.
        set_mode(outer.path(), 0o755);
        for p in [
            home.clone(),
            home.join("hone.db"),
            home.join("models"),
            home.join("adapters"),
        ] {
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: a valid C string path.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), nobody, nobody) }, 0);
        }
    }
    set_mode(&home.join("hone.db"), 0o400);
    set_mode(&home, 0o555);
    let as_reader = |args: &[&str]| {
        let mut c = hone(&home);
        c.args(args);
        if root {
            // SAFETY: setgid/setuid only, between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    if libc::setgid(nobody) != 0 || libc::setuid(nobody) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c.output().unwrap()
    };
    let o = as_reader(&["note", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("a note to read back"), "{}", stdout(&o));
    let o = as_reader(&["history", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_reader(&["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("schema v"), "{}", stdout(&o));
    for args in [
        &["learn", "--log"][..],
        &["adapters", "list"],
        &["models"],
        &["schedule", "show"],
    ] {
        let o = as_reader(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = as_reader(&["note", "add", "cannot be stored"]);
    assert_clean_error(&o, &["hone.db"]);
    // Let the temporary folder be removed.
    set_mode(&home, 0o755);
}
