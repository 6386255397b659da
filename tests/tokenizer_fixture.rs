//! hone's tokenizer gives exactly the token ids llama.cpp's `llama-tokenize` gives, for every
//! string of the committed fixtures (one per model; how they were made is recorded inside each
//! fixture and in tests/README.md).

mod common;

use common::model_path;
use hone::gguf::GgufFile;
use hone::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    model_sha256: String,
    generator: String,
    add_bos: bool,
    parse_special: bool,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn check(model: &str) {
    let fixture_path = format!(
        "{}/tests/fixtures/tokenizer/{model}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let fx: Fixture = serde_json::from_str(&std::fs::read_to_string(&fixture_path).unwrap())
        .unwrap_or_else(|e| panic!("{fixture_path}: {e}"));
    let m = hone::manifest::find(model).unwrap().unwrap();
    assert_eq!(fx.model_sha256, m.sha256, "fixture made from another file");
    assert!(!fx.add_bos, "the fixture is expected without BOS");
    assert!(fx.cases.len() >= 300, "only {} cases", fx.cases.len());
    let file = GgufFile::open(&model_path(model)).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let mut bad = Vec::new();
    for c in &fx.cases {
        let ids = tok.encode(&c.text, fx.parse_special).unwrap();
        if ids != c.ids {
            bad.push(format!(
                "{:?}\n   llama.cpp: {:?}\n   hone:      {:?}",
                c.text, c.ids, ids
            ));
        }
        // Decoding gives the text back (special tokens included).
        if !c.ids.is_empty() {
            assert_eq!(
                tok.decode(&c.ids, false).unwrap(),
                c.text,
                "decode of {:?}",
                c.text
            );
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} strings tokenize differently from {}:\n{}",
        bad.len(),
        fx.cases.len(),
        fx.generator,
        bad.iter().take(15).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check("smollm2-135m-instruct");
}

#[test]
fn qwen2_5_matches_llama_cpp() {
    check("qwen2.5-coder-0.5b-instruct");
}
