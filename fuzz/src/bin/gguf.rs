//! The GGUF reader as `hone ask` uses it: header walk, candle's parser, tensor extents, the
//! hyper-parameters and every tensor's shape, the tokenizer and chat template from metadata,
//! and (when all that passes) loading the weights with a small context.
//!
//! Speed: building the tokenizer compiles its pre-tokenizer regexes, most of the time of an
//! input. The tokenizer depends only on the `tokenizer.*` metadata, so it is built once per
//! distinct `tokenizer.*` metadata (most mutants change other bytes and share the seed's);
//! every new one is still built and checked. Seeds: `seeds/gguf/`, the smallest models
//! (`hone dev write-tiny-model --smallest`, 21 KB: one layer, width 32), so loading is cheap too.
use std::collections::HashSet;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Mutex;

static TOKENIZERS_SEEN: Mutex<Option<HashSet<u64>>> = Mutex::new(None);

/// Whether these `tokenizer.*` metadata were not seen before (and remembers them).
fn new_tokenizer_metadata(file: &hone::gguf::GgufFile) -> bool {
    let mut keys: Vec<(&String, String)> = file
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k, format!("{v:?}")))
        .collect();
    keys.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    keys.hash(&mut h);
    let mut seen = TOKENIZERS_SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() > 100_000 {
        seen.clear();
    }
    seen.insert(h.finish())
}

fn run(data: &[u8]) {
    let _ = hone::gguf::header_layout(data);
    let f = hone_fuzz::temp_file(data);
    let Ok(file) = hone::gguf::GgufFile::open(f.path()) else {
        return;
    };
    let Ok(cfg) = hone::hparams::Config::from_gguf(&file) else {
        return;
    };
    if new_tokenizer_metadata(&file) {
        let _ = hone::tokenizer::Tokenizer::from_gguf(&file);
    }
    // Loading allocates what the (checked) shapes say; keep it to small models.
    if cfg.dim <= 256 && cfg.n_layers <= 4 && cfg.vocab <= 4096 && cfg.ffn_dim <= 1024 {
        let _ = hone::model::Model::load(&file, &candle_core::Device::Cpu, 64);
    }
}

fn main() {
    hone_fuzz::drive(run);
}
