//! Shared helpers for the integration tests: the real models (pulled once into
//! `target/test-home` through hone's own `pull`), and a `hone` command with its own data folder.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

static PULL_LOCK: Mutex<()> = Mutex::new(());

/// The data folder the tests pull real models into (shared by every test run).
pub fn test_home() -> PathBuf {
    if let Ok(h) = std::env::var("HONE_TEST_HOME") {
        return PathBuf::from(h);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("test-home")
}

/// Path to a real model, pulled with `hone::pull` if it is not there yet. Fails the test (never
/// skips it) when the model can't be had: the behaviour that matters is tested on real models.
pub fn model_path(name: &str) -> PathBuf {
    let _guard = PULL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let home = hone::home::Home::at(test_home());
    let m = hone::manifest::find(name)
        .expect("manifests parse")
        .unwrap_or_else(|| panic!("no manifest {name}"));
    let report = hone::pull::pull(&home, &m, false, &mut |_| {})
        .unwrap_or_else(|e| panic!("could not pull {name} for the tests: {e}"));
    report.path
}

pub fn default_model() -> PathBuf {
    model_path("smollm2-135m-instruct")
}

/// A fresh data folder with the default model linked in (pulled once into the test home).
pub fn home_with_model() -> tempfile::TempDir {
    let src = default_model();
    let home = temp_home();
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let name = src.file_name().unwrap();
    std::os::unix::fs::symlink(&src, models.join(name)).unwrap();
    let mut marker = src.as_os_str().to_owned();
    marker.push(".verified");
    let mut dst = models.join(name).into_os_string();
    dst.push(".verified");
    std::fs::copy(PathBuf::from(marker), PathBuf::from(dst)).unwrap();
    home
}

/// A fresh, empty data folder.
pub fn temp_home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hone-test-")
        .tempdir()
        .expect("temp dir")
}

/// `hone` with `HONE_HOME` set to `home` and nothing inherited that changes its behaviour.
pub fn hone(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hone"));
    c.env("HONE_HOME", home)
        .env_remove("HONE_MODEL")
        .env_remove("HONE_LOG")
        .env("RAYON_NUM_THREADS", "2");
    c
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Runs and returns the output, failing with both streams shown when the exit code is not as
/// expected.
pub fn run(c: &mut Command, expect_success: bool) -> Output {
    let o = c.output().expect("run hone");
    if o.status.success() != expect_success {
        panic!(
            "hone exited with {:?} (expected success = {expect_success})\nstdout:\n{}\nstderr:\n{}",
            o.status.code(),
            stdout(&o),
            stderr(&o)
        );
    }
    o
}

/// The last line of stdout parsed as JSON.
pub fn last_json(o: &Output) -> serde_json::Value {
    let s = stdout(o);
    let line = s.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}
