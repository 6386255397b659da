//! The GGUF reader as `hone ask` uses it: header walk, candle's parser, tensor extents, the
//! hyper-parameters and every tensor's shape, the tokenizer and chat template from metadata,
//! and (when all that passes) loading the weights with a small context.
fn run(data: &[u8]) {
    let _ = hone::gguf::header_layout(data);
    let f = hone_fuzz::temp_file(data);
    let Ok(file) = hone::gguf::GgufFile::open(f.path()) else {
        return;
    };
    let Ok(cfg) = hone::hparams::Config::from_gguf(&file) else {
        return;
    };
    let _ = hone::tokenizer::Tokenizer::from_gguf(&file);
    // Loading allocates what the (checked) shapes say; keep it to small models.
    if cfg.dim <= 256 && cfg.n_layers <= 4 && cfg.vocab <= 4096 && cfg.ffn_dim <= 1024 {
        let _ = hone::model::Model::load(&file, &candle_core::Device::Cpu, 64);
    }
}

fn main() {
    hone_fuzz::drive(run);
}
