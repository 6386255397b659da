//! `hone bench`: prompt-processing and decode speed and peak memory, measured the way
//! `llama-bench` does (pp: a batch of prompt tokens from an empty context; tg: tokens decoded
//! one at a time from an empty context), as medians over repetitions.

use super::Ctx;
use crate::Cli;
use anyhow::{Context, Result};
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
    /// Also run llama.cpp's llama-bench (this path) on the same file, alternating with hone
    /// rep by rep, and print the ratios
    #[arg(long, value_name = "PATH")]
    pub vs_llama_bench: Option<std::path::PathBuf>,
    /// Keep one core busy with another process during the runs (a busy neighbour)
    #[arg(long)]
    pub neighbour: bool,
    /// Measure LoRA training instead (r=8 on every projection of every layer, 4x128 tokens)
    #[arg(long)]
    pub train: bool,
    /// With --train: the memory budget the planner must keep (e.g. 600MiB)
    #[arg(long)]
    pub max_memory: Option<String>,
    /// With --train: write the benchmark's token ids to this JSON file (for bench/peft_train.py)
    #[arg(long)]
    pub data_out: Option<std::path::PathBuf>,
    /// With --train: also train with PyTorch + PEFT (this Python, which must have torch,
    /// transformers, peft and gguf installed) on the same data and LoRA config, alternating
    /// with hone round by round, and print the ratios
    #[arg(long, value_name = "PYTHON")]
    pub vs_peft: Option<std::path::PathBuf>,
    /// With --train: measured rounds (the median is reported; default 5 with --vs-peft, else 1)
    #[arg(long)]
    pub rounds: Option<usize>,
}

/// One llama-bench run: (prompt t/s, decode t/s, peak RSS MiB).
fn run_llama_bench(
    exe: &std::path::Path,
    model: &std::path::Path,
    a: &BenchArgs,
    threads: usize,
) -> Result<(Option<f64>, Option<f64>, f64)> {
    let child = std::process::Command::new(exe)
        .arg("-m")
        .arg(model)
        .args(["-p", &a.prompt.to_string(), "-n", &a.gen.to_string()])
        .args(["-t", &threads.to_string(), "-r", "1", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    // The peer's peak RSS: VmHWM of its own address space, polled while it runs (the kernel's
    // child rusage would count the pages of the hone process it was forked from).
    let pid = child.id();
    let hwm = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (hwm, done) = (hwm.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kb) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("VmHWM:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    })
                {
                    hwm.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let out = child.wait_with_output();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    let out = out.with_context(|| format!("running {}", exe.display()))?;
    let peak_mb = hwm.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} did not print JSON", exe.display()))?;
    let mut pp = None;
    let mut tg = None;
    for t in v.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
        let ts = t["avg_ts"].as_f64();
        if t["n_gen"].as_u64() == Some(0) {
            pp = ts;
        } else if t["n_prompt"].as_u64() == Some(0) {
            tg = ts;
        }
    }
    Ok((pp, tg, peak_mb))
}

/// Median, min and max of a non-empty list.
pub(super) fn stats(v: &mut [f64]) -> (f64, f64, f64) {
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
    let mut peer_pp = Vec::new();
    let mut peer_tg = Vec::new();
    let mut peer_peak = 0f64;
    let mut neighbour = if a.neighbour {
        Some(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .context("starting the busy neighbour (sh)")?,
        )
    } else {
        None
    };
    for _ in 0..reps {
        if let Some(exe) = &a.vs_llama_bench {
            let (p, t, rss) = run_llama_bench(exe, &choice.path, a, threads)?;
            peer_pp.extend(p);
            peer_tg.extend(t);
            peer_peak = peer_peak.max(rss);
        }
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
    if let Some(mut n) = neighbour.take() {
        let _ = n.kill();
        let _ = n.wait();
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
    let sz = hone::sys::human_bytes(size);
    let peer = a.vs_llama_bench.is_some();
    let (ppp, _, _) = if peer_pp.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        stats(&mut peer_pp)
    };
    let (ptg, _, _) = if peer_tg.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        stats(&mut peer_tg)
    };
    let load = if a.neighbour { ", busy neighbour" } else { "" };
    if peer {
        println!("| model | size | threads | test | hone t/s (median, min-max) | llama.cpp t/s (median) | ratio |");
        println!("|---|---|---|---|---|---|---|");
    } else {
        println!("| model | size | threads | test | t/s (median) | min | max |");
        println!("|---|---|---|---|---|---|---|");
    }
    let row = |test: String, med: f64, min: f64, max: f64, theirs: f64| {
        if peer {
            println!(
                "| {} | {sz} | {threads}{load} | {test} | {med:.2} ({min:.2}-{max:.2}) | {theirs:.2} | {:.2}x |",
                choice.name,
                if theirs > 0.0 { med / theirs } else { 0.0 }
            );
        } else {
            println!(
                "| {} | {sz} | {threads}{load} | {test} | {med:.2} | {min:.2} | {max:.2} |",
                choice.name
            );
        }
    };
    if a.prompt > 0 {
        row(format!("pp{}", a.prompt), pp_med, pp_min, pp_max, ppp);
    }
    if a.gen > 0 {
        row(format!("tg{}", a.gen), tg_med, tg_min, tg_max, ptg);
    }
    println!(
        "load {:.0} ms, peak RSS {peak:.1} MiB{}, {reps} reps",
        engine.load_time.as_secs_f64() * 1000.0,
        if peer {
            format!(
                " (llama-bench {peer_peak:.1} MiB, ratio {:.2}x)",
                peak / peer_peak.max(1e-9)
            )
        } else {
            String::new()
        }
    );
    if a.json {
        println!(
            "{}",
            json!({"model": choice.name, "threads": threads, "prompt_tokens": a.prompt,
                   "gen_tokens": a.gen, "reps": reps,
                   "prompt_tps": pp_med, "prompt_tps_min": pp_min, "prompt_tps_max": pp_max,
                   "decode_tps": tg_med, "decode_tps_min": tg_min, "decode_tps_max": tg_max,
                   "load_ms": engine.load_time.as_secs_f64() * 1000.0, "peak_rss_mb": peak,
                   "neighbour": a.neighbour,
                   "llama_cpp": if peer { json!({"prompt_tps": ppp, "decode_tps": ptg,
                       "peak_rss_mb": peer_peak, "prompt_ratio": pp_med / ppp.max(1e-9),
                       "decode_ratio": tg_med / ptg.max(1e-9)}) } else { serde_json::Value::Null }})
        );
    }
    Ok(())
}
