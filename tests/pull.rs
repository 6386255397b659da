//! `hone pull` end to end against a local package index (a folder of wheels the test builds),
//! so checksum, idempotence and error paths are checked without the network.

mod common;

use common::*;
use hone::manifest::{ChatDefaults, Manifest, Part, Source};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Builds a minimal wheel `name-ver-py3-none-any.whl` in `dir` holding `member` = `data`.
fn make_wheel(dir: &Path, name: &str, ver: &str, member: &str, data: &[u8]) {
    let norm = name.replace('-', "_");
    let path = dir.join(format!("{norm}-{ver}-py3-none-any.whl"));
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts: zip::write::SimpleFileOptions = Default::default();
    z.start_file(member, opts).unwrap();
    z.write_all(data).unwrap();
    let di = format!("{norm}-{ver}.dist-info");
    z.start_file(format!("{di}/METADATA"), opts).unwrap();
    write!(z, "Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n").unwrap();
    z.start_file(format!("{di}/WHEEL"), opts).unwrap();
    write!(
        z,
        "Wheel-Version: 1.0\nGenerator: hone-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    .unwrap();
    z.start_file(format!("{di}/RECORD"), opts).unwrap();
    z.finish().unwrap();
}

fn manifest(parts: Vec<Part>, bytes: u64, sha: &str) -> Manifest {
    Manifest {
        name: "fake-model".into(),
        description: "test".into(),
        architecture: "llama".into(),
        file: "fake.gguf".into(),
        bytes,
        sha256: sha.into(),
        license: "test".into(),
        default: false,
        source: Source {
            kind: "pypi-wheel".into(),
            parts,
        },
        chat: ChatDefaults::default(),
    }
}

/// Serialises the tests that set process-wide environment variables.
static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn pull_concatenates_parts_verifies_and_is_idempotent_then_catches_a_bad_checksum() {
    let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let index = tempfile::tempdir().unwrap();
    let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..123_457u32).map(|i| (i % 13) as u8).collect();
    make_wheel(
        index.path(),
        "hone-fake-part1",
        "1.0.0",
        "hone_fake_part1/data/part01.bin",
        &a,
    );
    make_wheel(
        index.path(),
        "hone-fake-part2",
        "1.0.0",
        "hone_fake_part2/data/part02.bin",
        &b,
    );
    let whole = [a.clone(), b.clone()].concat();
    let sha = hex::encode(Sha256::digest(&whole));
    let parts = vec![
        Part {
            package: "hone-fake-part1".into(),
            version: "1.0.0".into(),
            member: "*/data/part01.bin".into(),
        },
        Part {
            package: "hone-fake-part2".into(),
            version: "1.0.0".into(),
            member: "*/data/part02.bin".into(),
        },
    ];
    std::env::set_var(
        "HONE_PIP_ARGS",
        format!("--no-index --find-links {}", index.path().display()),
    );
    let home_dir = temp_home();
    let home = hone::home::Home::at(home_dir.path().to_path_buf());
    let m = manifest(parts.clone(), whole.len() as u64, &sha);
    let mut events = 0;
    let r = hone::pull::pull(&home, &m, false, &mut |_| events += 1).unwrap();
    assert!(!r.already);
    assert_eq!(std::fs::read(&r.path).unwrap(), whole);
    assert!(events >= 3);
    // A second pull does nothing.
    let r2 = hone::pull::pull(&home, &m, false, &mut |_| {}).unwrap();
    assert!(r2.already);
    // No temporary folders are left behind.
    let left: Vec<_> = std::fs::read_dir(home.models_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pull-"))
        .collect();
    assert!(left.is_empty());

    // A wrong checksum installs nothing and says what happened.
    let bad = manifest(parts, whole.len() as u64, &"0".repeat(64));
    let home2_dir = temp_home();
    let home2 = hone::home::Home::at(home2_dir.path().to_path_buf());
    let e = hone::pull::pull(&home2, &bad, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("checksum mismatch") && e.contains("nothing was installed"),
        "{e}"
    );
    assert!(!hone::pull::model_path(&home2, &bad).exists());
    std::env::remove_var("HONE_PIP_ARGS");
}

#[test]
fn missing_python_and_unreachable_index_give_one_line_errors() {
    let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let home = temp_home();
    let o = hone(home.path())
        .env("HONE_PYTHON", "/nonexistent/python3")
        .args(["pull", "smollm2-135m-instruct"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("needs python3 with pip"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let o = hone(home.path())
        .env(
            "HONE_PIP_ARGS",
            "--index-url http://127.0.0.1:9/simple --retries 0 --timeout 2",
        )
        .args(["pull", "smollm2-135m-instruct", "--force"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("could not reach the package index") || err.contains("has no"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert!(!home
        .path()
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .exists());
}

#[test]
fn unknown_model_name_lists_the_known_ones() {
    let home = temp_home();
    let o = hone(home.path())
        .args(["pull", "llama-70b"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("llama-70b") && err.contains("smollm2-135m-instruct"),
        "{err}"
    );
}

#[test]
fn register_a_gguf_by_path() {
    let home = temp_home();
    let p = home.path().join("tiny.gguf");
    hone::tiny::write_tiny_model(&p, &Default::default()).unwrap();
    let o = run(
        hone(home.path())
            .args(["pull", "--file"])
            .arg(&p)
            .args(["--name", "tiny", "--default"]),
        true,
    );
    assert!(stdout(&o).contains("registered tiny"));
    let o = run(hone(home.path()).args(["models"]), true);
    assert!(stdout(&o).contains("tiny"), "{}", stdout(&o));
    // It is now the default model and answers (random weights: any text will do).
    let o = run(
        hone(home.path()).args(["ask", "--json", "-n", "4", "hi"]),
        true,
    );
    assert_eq!(last_json(&o)["model"], "tiny");
}
