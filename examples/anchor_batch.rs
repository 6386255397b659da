//! Times the base model's anchoring answers (what a first learning cycle generates before it
//! trains) decoded one at a time against decoded together in groups, on the real model.
//!
//! Job: for the first N anchoring prompts, greedy answers of at most 48 tokens with the top-4
//! kept at every position (`Engine::generate_top_k` alone, `Engine::generate_top_k_many` in
//! 2 to 12 at a time, a freed slot taking the next prompt), and print seconds, tokens/s and how many answers differ from the
//! answers decoded alone. Must not: be taken as a correctness test (`engine` tests are).
//!
//! Run: `cargo run --release --example anchor_batch -- MODEL.gguf [N] [THREADS]`

use hone::engine::{Engine, LoadOptions};
use hone::template::Message;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: anchor_batch MODEL.gguf [N] [THREADS]"))?;
    let n: usize = args.get(2).map_or(Ok(40), |s| s.parse())?;
    let threads: usize = args.get(3).map_or(Ok(2), |s| s.parse())?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let mut e = Engine::load(
        "model",
        std::path::Path::new(model),
        &LoadOptions::default(),
    )?;
    let prompts: Vec<Vec<u32>> = hone::learn::anchor_prompts()
        .into_iter()
        .take(n)
        .map(|(p, _)| e.chat_tokens(&[Message::user(p.as_str())]))
        .collect::<Result<_, _>>()?;
    let cancel = AtomicBool::new(false);
    let t0 = Instant::now();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(e.generate_top_k(p, 48, 4, &cancel)?.0.tokens);
    }
    let s1 = t0.elapsed().as_secs_f64();
    let toks: usize = alone.iter().map(|t| t.len()).sum();
    println!(
        "alone:      {s1:6.1} s  {:6.1} tokens/s  ({} answers, {toks} tokens)",
        toks as f64 / s1,
        prompts.len()
    );
    for group in [8, 12, 16, 24] {
        let t0 = Instant::now();
        let mut differ = 0;
        let mut gen = 0;
        let mut batch = e.decode_top_k(prompts.clone(), group, 48, 4);
        while let Some((i, a)) = e.next_answer(&mut batch, &cancel)? {
            gen += a.generation.tokens.len();
            differ += usize::from(a.generation.tokens != alone[i]);
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "{group:2} at once: {s:6.1} s  {:6.1} tokens/s  {:.2}x  ({differ} answers differ)",
            gen as f64 / s,
            s1 / s
        );
    }
    Ok(())
}
