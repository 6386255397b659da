//! The training-data reader (`hone train --data`): JSON Lines of text, prompt/completion or
//! messages, tokenized and rendered with a tiny model's tokenizer and chat template, then
//! packed into sequences.
use std::sync::OnceLock;

static ENGINE: OnceLock<(tempfile::TempDir, std::sync::Mutex<hone::engine::Engine>)> =
    OnceLock::new();

fn run(data: &[u8]) {
    let (_, engine) = ENGINE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("tiny.gguf");
        hone::tiny::write_tiny_model(&p, &hone::tiny::TinySpec::default()).expect("tiny model");
        let opts = hone::engine::LoadOptions {
            ctx: 64,
            ..hone::engine::LoadOptions::default()
        };
        let e = hone::engine::Engine::load("tiny", &p, &opts).expect("load tiny");
        (dir, std::sync::Mutex::new(e))
    });
    let engine = engine.lock().unwrap_or_else(|e| e.into_inner());
    let f = hone_fuzz::temp_file(data);
    if let Ok((examples, sha)) =
        hone::train::data::read_jsonl(&engine.codec(), f.path(), Some("sys"))
    {
        let _ = hone::train::data::pack_dataset(&engine.codec(), f.path(), &examples, sha, 32);
    }
}

fn main() {
    hone_fuzz::drive(run);
}
