//! Numerical check against a peer: the perplexity of the default model on a fixed text is
//! within 2% of llama.cpp's `llama-perplexity` on the same file and context length (the peer's
//! figure and command are recorded in tests/fixtures/perplexity.json).

mod common;

use hone::engine::{Engine, LoadOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    model: String,
    text_file: String,
    ctx: usize,
    llama_cpp_ppl: f64,
    llama_cpp_chunks: usize,
    llama_cpp_command: String,
}

#[test]
fn perplexity_matches_llama_cpp_within_two_percent() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let r: Reference =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/perplexity.json")).unwrap())
            .unwrap();
    let text = std::fs::read_to_string(format!("{dir}/{}", r.text_file)).unwrap();
    let path = common::model_path(&r.model);
    let mut engine = Engine::load(
        &r.model,
        &path,
        &LoadOptions {
            ctx: r.ctx,
            ..Default::default()
        },
    )
    .unwrap();
    let p = engine.perplexity(&text, r.ctx, &mut |_, _, _| {}).unwrap();
    let rel = (p.ppl - r.llama_cpp_ppl).abs() / r.llama_cpp_ppl;
    println!(
        "hone: {:.4} over {} chunks; llama.cpp: {:.4} over {} chunks ({}); difference {:.2}%",
        p.ppl,
        p.chunks,
        r.llama_cpp_ppl,
        r.llama_cpp_chunks,
        r.llama_cpp_command,
        rel * 100.0
    );
    assert_eq!(p.chunks, r.llama_cpp_chunks, "different chunking");
    assert!(
        rel < 0.02,
        "perplexity {} vs llama.cpp {}",
        p.ppl,
        r.llama_cpp_ppl
    );
}
