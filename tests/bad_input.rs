//! Bad input gets a clear error that names the file and the fix, never a panic, and leaves the
//! database as it was. These run on tiny models the tests write, except where the real model's
//! file is the point (truncating it).

mod common;

use common::*;
use hone::tiny::{write_tiny_model, TinySpec};
use std::path::Path;

fn assert_clean_error(o: &std::process::Output, must_contain: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.starts_with("error: "), "not an error line: {err}");
    for m in must_contain {
        assert!(err.contains(m), "stderr lacks {m:?}:\n{err}");
    }
}

fn note_count(home: &Path) -> u64 {
    let store = hone::store::Store::open(&home.join("hone.db")).unwrap();
    store.count_notes().unwrap()
}

fn exchange_count(home: &Path) -> u64 {
    hone::store::Store::open(&home.join("hone.db"))
        .unwrap()
        .stats()
        .unwrap()
        .exchanges
}

#[test]
fn truncated_real_model_names_the_file() {
    let real = default_model();
    let home = temp_home();
    let bytes = std::fs::read(&real).unwrap();
    for (label, len) in [("header", 4000usize), ("tensors", bytes.len() / 3)] {
        let p = home.path().join(format!("cut-{label}.gguf"));
        std::fs::write(&p, &bytes[..len]).unwrap();
        let o = hone(home.path())
            .arg("--model")
            .arg(&p)
            .args(["ask", "hi"])
            .output()
            .unwrap();
        assert_clean_error(&o, &[p.to_str().unwrap(), "truncated", "download it again"]);
    }
    assert_eq!(exchange_count(home.path()), 0);
}

#[test]
fn wrong_magic_empty_file_and_text_file_are_not_models() {
    let home = temp_home();
    let cases: [(&str, &[u8]); 3] = [
        ("ggml.gguf", b"ggmlrest-of-an-old-file......"),
        ("empty.gguf", b""),
        ("notes.txt", b"just some text, not a model\n"),
    ];
    for (name, content) in cases {
        let p = home.path().join(name);
        std::fs::write(&p, content).unwrap();
        let o = hone(home.path())
            .arg("--model")
            .arg(&p)
            .args(["ask", "hi"])
            .output()
            .unwrap();
        assert_clean_error(&o, &[p.to_str().unwrap(), "not a GGUF model file"]);
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let home = temp_home();
    let p = home.path().join("gemma.gguf");
    write_tiny_model(
        &p,
        &TinySpec {
            arch: "gemma3".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let o = hone(home.path())
        .arg("--model")
        .arg(&p)
        .args(["ask", "hi"])
        .output()
        .unwrap();
    assert_clean_error(&o, &["gemma3", "llama and qwen2"]);
    // Registering it is refused too, and nothing is registered.
    let o = hone(home.path())
        .args(["pull", "--file"])
        .arg(&p)
        .args(["--name", "g"])
        .output()
        .unwrap();
    assert_clean_error(&o, &["gemma3"]);
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    assert!(store.registered_models().unwrap().is_empty());
}

#[test]
fn missing_model_file_says_so() {
    let home = temp_home();
    let o = hone(home.path())
        .args(["--model", "/nonexistent/m.gguf", "ask", "hi"])
        .output()
        .unwrap();
    assert_clean_error(&o, &["/nonexistent/m.gguf"]);
    let o = hone(home.path())
        .args(["--model", "no-such-model", "ask", "hi"])
        .output()
        .unwrap();
    assert_clean_error(&o, &["no-such-model", "smollm2-135m-instruct"]);
}

#[cfg(unix)]
#[test]
fn invalid_utf8_note_argument_is_refused_and_an_invalid_file_left_out() {
    use std::os::unix::ffi::OsStrExt;
    let home = temp_home();
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9 au lait");
    let o = hone(home.path())
        .args(["note", "add"])
        .arg(bad)
        .output()
        .unwrap();
    assert_clean_error(&o, &["UTF-8"]);
    let dir = home.path().join("notes");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("good.md"), "# Good\nA fine note.\n").unwrap();
    std::fs::write(dir.join("latin1.txt"), b"line one\nna\xefve line two\n").unwrap();
    let o = hone(home.path())
        .args(["note", "import"])
        .arg(&dir)
        .output()
        .unwrap();
    // The bad file is reported and left out; the good one is imported.
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("latin1.txt") && out.contains("UTF-8") && out.contains("line 2"),
        "{out}"
    );
    assert_eq!(note_count(home.path()), 1);
}

#[test]
fn fifty_megabyte_note_file_is_refused_without_reading_it() {
    let home = temp_home();
    let p = home.path().join("huge.md");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(50 * 1024 * 1024).unwrap();
    let o = hone(home.path())
        .args(["note", "import"])
        .arg(&p)
        .output()
        .unwrap();
    assert_clean_error(&o, &["huge.md", "50.0 MiB", "limit"]);
    assert_eq!(note_count(home.path()), 0);
}

#[test]
fn a_file_that_is_not_a_database_is_left_alone() {
    let home = temp_home();
    let db = home.path().join("hone.db");
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&db, &junk).unwrap();
    let o = hone(home.path())
        .args(["note", "add", "hello"])
        .output()
        .unwrap();
    assert_clean_error(&o, &[db.to_str().unwrap(), "not a hone database"]);
    assert_eq!(std::fs::read(&db).unwrap(), junk);
}

#[test]
fn a_locked_database_gives_a_clear_error_and_loses_nothing() {
    let home = temp_home();
    run(hone(home.path()).args(["note", "add", "first note"]), true);
    let conn = rusqlite::Connection::open(home.path().join("hone.db")).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let o = hone(home.path())
        .args(["note", "add", "second note"])
        .output()
        .unwrap();
    assert_clean_error(&o, &["hone.db", "locked"]);
    conn.execute_batch("ROLLBACK").unwrap();
    drop(conn);
    assert_eq!(note_count(home.path()), 1);
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

#[test]
fn bad_sampling_options_name_the_option() {
    let home = temp_home();
    let p = home.path().join("tiny.gguf");
    write_tiny_model(&p, &TinySpec::default()).unwrap();
    let o = hone(home.path())
        .arg("--model")
        .arg(&p)
        .args(["ask", "--top-p", "0", "hi"])
        .output()
        .unwrap();
    assert_clean_error(&o, &["--top-p"]);
}

#[test]
fn dev_write_tiny_model_refuses_to_overwrite_and_names_a_missing_folder() {
    let home = temp_home();
    let p = home.path().join("exists.gguf");
    std::fs::write(&p, b"keep me").unwrap();
    let o = hone(home.path())
        .args(["dev", "write-tiny-model"])
        .arg(&p)
        .output()
        .unwrap();
    assert_clean_error(&o, &[p.to_str().unwrap(), "--force"]);
    assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
    let missing = home.path().join("no-such-dir");
    let o = hone(home.path())
        .args(["dev", "write-tiny-model"])
        .arg(missing.join("t.gguf"))
        .output()
        .unwrap();
    assert_clean_error(&o, &[missing.to_str().unwrap(), "mkdir -p"]);
}

#[test]
fn a_peer_python_without_peft_is_refused_before_any_round() {
    let home = temp_home();
    let p = home.path().join("tiny.gguf");
    write_tiny_model(&p, &TinySpec::default()).unwrap();
    let missing = home.path().join("no-such-python");
    let o = hone(home.path())
        .arg("--model")
        .arg(&p)
        .args(["bench", "--train", "--vs-peft"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_clean_error(&o, &[missing.to_str().unwrap(), "--vs-peft"]);
    // A Python that runs but has no torch: the error says what to install.
    let fake = home.path().join("fake-python");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o700)).unwrap();
    let o = hone(home.path())
        .arg("--model")
        .arg(&p)
        .args(["bench", "--train", "--vs-peft"])
        .arg(&fake)
        .output()
        .unwrap();
    assert_clean_error(
        &o,
        &[
            "cannot import torch",
            "pip install torch transformers peft gguf",
        ],
    );
    assert!(
        !stdout(&o).contains("round"),
        "no round ran: {}",
        stdout(&o)
    );
}

/// Header mutants of the real default model (the ones a fault campaign found: a dimension of
/// 2^63 that wrapped a size to 0 and panicked, an offset, a type or a rank changed and answered
/// with exit 0) are refused at load with exit code 1, naming the file and the tensor.
#[test]
fn header_mutants_of_the_real_model_are_refused_cleanly() {
    let real = default_model();
    let home = temp_home();
    let bytes = std::fs::read(&real).unwrap();
    let layout = hone::gguf::header_layout(&bytes).unwrap();
    let t = layout
        .tensors
        .iter()
        .find(|t| t.name == "blk.15.attn_v.weight")
        .unwrap();
    let p = home.path().join("mutant.gguf");
    let u64_at = |at: usize, v: u64| {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b
    };
    let u32_at = |at: usize, v: u32| {
        let mut b = bytes.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dim 1 = 2^63",
            u64_at(t.n_dims_at + 12, 1 << 63),
            "blk.15.attn_v.weight",
        ),
        (
            "dim 0 = 2^63",
            u64_at(t.n_dims_at + 4, 1 << 63),
            "blk.15.attn_v.weight",
        ),
        (
            "dim 1 + 1",
            u64_at(t.n_dims_at + 12, t.dims[1] + 1),
            "blk.15",
        ),
        ("offset + 32", u64_at(t.offset_at, t.offset + 32), "blk.15"),
        ("offset 0", u64_at(t.offset_at, 0), "overlap"),
        ("type Q4_0", u32_at(t.dtype_at, 2), "tensor"),
        ("type Q8_0", u32_at(t.dtype_at, 8), "tensor"),
        ("rank 3", u32_at(t.n_dims_at, 3), "damaged"),
    ];
    for (label, b, names) in cases {
        std::fs::write(&p, &b).unwrap();
        let o = hone(home.path())
            .arg("--model")
            .arg(&p)
            .args(["ask", "-n", "4", "hi"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{label}: {}", stderr(&o));
        assert_clean_error(&o, &[p.to_str().unwrap(), names]);
    }
    assert_eq!(exchange_count(home.path()), 0);
}
