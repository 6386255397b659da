//! `hone bench`: prompt-processing and decode speed and peak memory, measured the way
//! `llama-bench` does (pp: a batch of prompt tokens from an empty context; tg: tokens decoded
//! one at a time from an empty context), as medians over repetitions.

use super::Ctx;
use crate::Cli;
use anyhow::Result;
use clap::Args;
use hone::model::Logits;
use serde_json::json;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Prompt tokens (pp test)
    #[arg(short = 'p', long, default_value_t = 128)]
    pub prompt: usize,
    /// Generated tokens (tg test)
    #[arg(short = 'n', long = "gen", default_value_t = 64)]
    pub gen: usize,
    /// Repetitions (the median is reported)
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object as the last line
    #[arg(long)]
    pub json: bool,
    /// Measure LoRA training instead (r=8 on every projection of every layer, 4x128 tokens)
    #[arg(long)]
    pub train: bool,
    /// With --train: the memory budget the planner must keep (e.g. 600MiB)
    #[arg(long)]
    pub max_memory: Option<String>,
    /// With --train: write the benchmark's token ids to this JSON file (for bench/peft_train.py)
    #[arg(long)]
    pub data_out: Option<std::path::PathBuf>,
}

/// Median, min and max.
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

pub fn run(cli: &Cli, a: &BenchArgs) -> Result<()> {
    if a.train {
        return super::train::bench(cli, a);
    }
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let mut engine = ctx.load(&choice)?;
    let vocab = engine.tokenizer.vocab_size() as u32;
    let threads = cli
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    // A deterministic prompt of ordinary (non-special) tokens.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut prompt = Vec::with_capacity(a.prompt);
    while prompt.len() < a.prompt {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = (x % vocab as u64) as u32;
        if !engine.tokenizer.is_special(id) {
            prompt.push(id);
        }
    }
    let reps = a.reps.max(1);
    // One untimed warm-up of each test.
    engine.reset();
    engine.model.forward(&prompt, Logits::Last)?;
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..reps {
        if a.prompt > 0 {
            engine.reset();
            let t = Instant::now();
            engine.model.forward(&prompt, Logits::Last)?;
            pp.push(a.prompt as f64 / t.elapsed().as_secs_f64());
        }
        if a.gen > 0 {
            engine.reset();
            let mut tok = prompt.first().copied().unwrap_or(0);
            let t = Instant::now();
            for _ in 0..a.gen {
                let l = engine.model.forward(&[tok], Logits::Last)?;
                tok = l.argmax(0)?.to_scalar::<u32>()?;
            }
            tg.push(a.gen as f64 / t.elapsed().as_secs_f64());
        }
    }
    let peak = hone::sys::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0;
    let size = std::fs::metadata(&choice.path)
        .map(|m| m.len())
        .unwrap_or(0);
    let (pp_med, pp_min, pp_max) = if pp.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        stats(&mut pp)
    };
    let (tg_med, tg_min, tg_max) = if tg.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        stats(&mut tg)
    };
    println!(
        "| model | size | threads | test | t/s (median) | min | max |\n|---|---|---|---|---|---|---|"
    );
    let sz = hone::sys::human_bytes(size);
    if a.prompt > 0 {
        println!(
            "| {} | {sz} | {threads} | pp{} | {pp_med:.2} | {pp_min:.2} | {pp_max:.2} |",
            choice.name, a.prompt
        );
    }
    if a.gen > 0 {
        println!(
            "| {} | {sz} | {threads} | tg{} | {tg_med:.2} | {tg_min:.2} | {tg_max:.2} |",
            choice.name, a.gen
        );
    }
    println!(
        "load {:.0} ms, peak RSS {peak:.1} MiB, {reps} reps",
        engine.load_time.as_secs_f64() * 1000.0
    );
    if a.json {
        println!(
            "{}",
            json!({"model": choice.name, "threads": threads, "prompt_tokens": a.prompt,
                   "gen_tokens": a.gen, "reps": reps,
                   "prompt_tps": pp_med, "prompt_tps_min": pp_min, "prompt_tps_max": pp_max,
                   "decode_tps": tg_med, "decode_tps_min": tg_min, "decode_tps_max": tg_max,
                   "load_ms": engine.load_time.as_secs_f64() * 1000.0, "peak_rss_mb": peak})
        );
    }
    Ok(())
}
