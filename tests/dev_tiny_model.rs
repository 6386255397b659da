//! `hone dev write-tiny-model` (hidden; used by .ci/cross-check) writes exactly the model that
//! `hone::tiny::write_tiny_model` writes for the same spec, and hone can use it.

mod common;

use candle_core::quantized::GgmlDType;
use common::*;
use hone::tiny::{write_tiny_model, TinySpec};

#[test]
fn cli_writes_the_library_tiny_model_and_hone_loads_it() {
    let home = temp_home();
    let p = home.path().join("tiny.gguf");
    let o = run(
        hone(home.path())
            .args(["dev", "write-tiny-model", "--seed", "5", "--dtype", "q4_1"])
            .arg(&p),
        true,
    );
    assert!(stdout(&o).contains(p.to_str().unwrap()), "{}", stdout(&o));
    let want = home.path().join("lib.gguf");
    write_tiny_model(
        &want,
        &TinySpec {
            seed: 5,
            dtype: GgmlDType::Q4_1,
            ..TinySpec::default()
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&want).unwrap());
    // Another seed gives other weights.
    run(
        hone(home.path())
            .args([
                "dev",
                "write-tiny-model",
                "--force",
                "--seed",
                "6",
                "--dtype",
                "q4_1",
            ])
            .arg(&p),
        true,
    );
    assert_ne!(std::fs::read(&p).unwrap(), std::fs::read(&want).unwrap());
    // It is a model hone loads: "the" is one merged token of the tiny vocabulary after a space.
    let o = run(
        hone(home.path())
            .arg("--model")
            .arg(&p)
            .args(["tokenize", "--pieces", "in the"]),
        true,
    );
    let out = stdout(&o);
    assert!(out.contains("\" the\""), "{out}");
    // `hone dev` is hidden from the help.
    let o = run(hone(home.path()).arg("--help"), true);
    let help = stdout(&o);
    assert!(help.contains("tokenize"), "{help}");
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("dev ")),
        "{help}"
    );
}
