//! Prompt-processing and decode speed and peak memory, measured the way `llama-bench` does
//! (pp: a batch of prompt tokens from an empty context; tg: tokens decoded one at a time from
//! an empty context), over repetitions, optionally alternating rep by rep with llama-bench
//! itself on the same file.
//!
//! It must NOT print: it returns an [`InferReport`].

use super::{median, Spread};
use crate::engine::Engine;
use crate::model::Logits;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// Prompt tokens (pp test; 0 = none).
    pub prompt: usize,
    /// Generated tokens (tg test; 0 = none).
    pub gen: usize,
    /// Repetitions (at least 1).
    pub reps: usize,
    /// Keep one core busy with another process during the runs.
    pub neighbour: bool,
    /// Also run this llama-bench, one run before each rep of ours.
    pub llama_bench: Option<PathBuf>,
    /// The threads llama-bench gets.
    pub threads: usize,
}

/// llama-bench's figures on the same file: medians of its runs and its largest peak RSS.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlamaBench {
    pub prompt_tps: f64,
    pub decode_tps: f64,
    pub peak_rss_mb: f64,
}

/// What [`run`] measured.
#[derive(Debug, Clone)]
pub struct InferReport {
    pub reps: usize,
    /// Prompt tokens per second over the reps (zeros without a pp test).
    pub prompt_tps: Spread,
    /// Decoded tokens per second over the reps (zeros without a tg test).
    pub decode_tps: Spread,
    /// This process's peak RSS, MiB.
    pub peak_rss_mb: f64,
    /// The model file's size in bytes.
    pub model_bytes: u64,
    pub llama_bench: Option<LlamaBench>,
}

/// A deterministic prompt of ordinary (non-special) tokens.
fn prompt_tokens(engine: &Engine, n: usize) -> Vec<u32> {
    let vocab = engine.tokenizer.vocab_size() as u32;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut prompt = Vec::with_capacity(n);
    while prompt.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = (x % vocab as u64) as u32;
        if !engine.tokenizer.is_special(id) {
            prompt.push(id);
        }
    }
    prompt
}

/// Measures `engine` (loaded from `model`) as `req` says.
pub fn run(engine: &mut Engine, model: &Path, req: &InferRequest) -> Result<InferReport> {
    let prompt = prompt_tokens(engine, req.prompt);
    let reps = req.reps.max(1);
    // One untimed warm-up of each test.
    engine.reset();
    engine.model.forward(&prompt, Logits::Last)?;
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let mut peer_pp = Vec::new();
    let mut peer_tg = Vec::new();
    let mut peer_peak = 0f64;
    let mut neighbour = if req.neighbour {
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
        if let Some(exe) = &req.llama_bench {
            let (p, t, rss) = run_llama_bench(exe, model, req)?;
            peer_pp.extend(p);
            peer_tg.extend(t);
            peer_peak = peer_peak.max(rss);
        }
        if req.prompt > 0 {
            engine.reset();
            let t = Instant::now();
            engine.model.forward(&prompt, Logits::Last)?;
            pp.push(req.prompt as f64 / t.elapsed().as_secs_f64());
        }
        if req.gen > 0 {
            engine.reset();
            let mut tok = prompt.first().copied().unwrap_or(0);
            let t = Instant::now();
            for _ in 0..req.gen {
                let l = engine.model.forward(&[tok], Logits::Last)?;
                tok = l.argmax(0)?.to_scalar::<u32>()?;
            }
            tg.push(req.gen as f64 / t.elapsed().as_secs_f64());
        }
    }
    if let Some(mut n) = neighbour.take() {
        let _ = n.kill();
        let _ = n.wait();
    }
    Ok(InferReport {
        reps,
        prompt_tps: Spread::of(&pp),
        decode_tps: Spread::of(&tg),
        peak_rss_mb: crate::sys::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0,
        model_bytes: std::fs::metadata(model).map(|m| m.len()).unwrap_or(0),
        llama_bench: req.llama_bench.as_ref().map(|_| LlamaBench {
            prompt_tps: median(&peer_pp),
            decode_tps: median(&peer_tg),
            peak_rss_mb: peer_peak,
        }),
    })
}

/// One llama-bench run: (prompt t/s, decode t/s, peak RSS MiB).
fn run_llama_bench(
    exe: &Path,
    model: &Path,
    req: &InferRequest,
) -> Result<(Option<f64>, Option<f64>, f64)> {
    let child = std::process::Command::new(exe)
        .arg("-m")
        .arg(model)
        .args(["-p", &req.prompt.to_string(), "-n", &req.gen.to_string()])
        .args(["-t", &req.threads.to_string(), "-r", "1", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    // The peer's peak RSS: VmHWM of its own address space, polled while it runs (the kernel's
    // child rusage would count the pages of the hone process it was forked from).
    let pid = child.id();
    let hwm = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (hwm, done) = (hwm.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("VmHWM:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    })
                {
                    hwm.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let out = child.wait_with_output();
    done.store(true, Ordering::Relaxed);
    let _ = poller.join();
    let out = out.with_context(|| format!("running {}", exe.display()))?;
    let peak_mb = hwm.load(Ordering::Relaxed) as f64 / 1024.0;
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
    // The external tool's JSON, read as leniently as it has always been: an array of tests.
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
