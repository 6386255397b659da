//! The training bench: LoRA r=8, alpha 16 on q,k,v,o,gate,up,down of every layer, batches of
//! 4 x 128 tokens, AdamW, on fixed synthetic data; train tokens/s, seconds per step, the
//! losses and peak RSS, over rounds that each start from a fresh trainer. Optionally the same
//! training step in PyTorch + PEFT (`bench/peft_train.py`, compiled in so an installed binary
//! can run it) on the same batches, alternating with ours round by round.
//!
//! It must NOT print: it reports each round as it starts through a callback and returns a
//! [`TrainReport`].

use super::median;
use crate::engine::Engine;
use crate::lora::{LoraConfig, Target};
use crate::train::optim::Decay;
use crate::train::plan::{self, Plan, PlanRequest};
use crate::train::{data, AdamWParamsCfg, TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// The peer's script.
const PEFT_SCRIPT: &str = include_str!("../../bench/peft_train.py");

/// Sequences per optimiser step and tokens per sequence.
const BATCH: usize = 4;
const SEQ_LEN: usize = 128;

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// The memory budget the planner must keep, bytes.
    pub budget: Option<u64>,
    /// Timed optimiser steps per round (at least 1), after one untimed warm-up step.
    pub steps: usize,
    /// Measured rounds (default 5 with a peer, else 1).
    pub rounds: Option<usize>,
    /// Also train with PyTorch + PEFT in this Python.
    pub vs_peft: Option<PathBuf>,
    /// Write the bench's token ids (the peer's input) to this JSON file.
    pub data_out: Option<PathBuf>,
    /// The threads the peer gets.
    pub threads: usize,
}

/// A round starting, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Ours: round (from 1) of rounds.
    Hone(usize, usize),
    /// The PyTorch + PEFT peer's.
    Peft(usize, usize),
}

/// The PyTorch + PEFT peer's figures.
#[derive(Debug, Clone)]
pub struct PeftReport {
    pub rounds_tps: Vec<f64>,
    pub rounds_rss_mb: Vec<f64>,
    /// Ours / theirs, round by round.
    pub ratios: Vec<f64>,
    /// Medians of its rounds.
    pub train_tps: f64,
    pub peak_rss_mb: f64,
    pub speed_ratio_median: f64,
    pub ratio_of_medians: f64,
    /// Our peak RSS / its median peak RSS.
    pub rss_ratio: f64,
    /// Its last round's losses, as it printed them.
    pub losses: Value,
    /// Its torch version, as it printed it (first round).
    pub torch: Value,
}

/// What [`run`] measured.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub n_layers: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub accum: usize,
    pub checkpointing: bool,
    /// The planner's memory estimate, bytes.
    pub estimate: u64,
    pub train_kernels: &'static str,
    pub steps: usize,
    pub rounds: usize,
    /// Train tokens/s of each round, and their median.
    pub rounds_tps: Vec<f64>,
    pub train_tps: f64,
    /// Median seconds per step.
    pub seconds_per_step: f64,
    /// The last round's losses: the warm-up step's, then each timed step's.
    pub losses: Vec<f32>,
    /// This process's peak RSS, MiB.
    pub peak_rss_mb: f64,
    pub peft: Option<PeftReport>,
}

/// The trainer's settings for the bench on `engine`'s model (file `model`), and its plan.
fn config(
    engine: &Engine,
    model: &Path,
    budget: Option<u64>,
    steps: usize,
) -> Result<(TrainConfig, Plan)> {
    let mcfg = &engine.model.cfg;
    let model_bytes = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let req = PlanRequest {
        budget,
        seq_len: Some(SEQ_LEN),
        micro_batch: None,
        layers: Some(mcfg.n_layers),
        checkpointing: None,
        rank: 8,
        targets: Target::ALL.to_vec(),
        model_bytes,
        cache_seqs: 0,
        max_micro_batch: None,
    };
    let p = plan::choose(mcfg, &req)?;
    let lora = LoraConfig::top_layers(8, 16.0, Target::ALL.to_vec(), mcfg.n_layers, mcfg.n_layers)?;
    let micro = p.micro_batch.min(BATCH);
    let cfg = TrainConfig {
        lora,
        lr: 1e-4,
        min_lr_ratio: 1.0,
        warmup: 0,
        decay: Decay::Constant,
        adamw: AdamWParamsCfg::default(),
        clip: 1.0,
        seq_len: SEQ_LEN,
        micro_batch: micro,
        accum: BATCH / micro,
        steps: steps + 1,
        seed: 0,
        checkpointing: p.checkpointing,
        skip_learned: 0.0,
    };
    Ok((cfg, p))
}

/// The token ids in the order the trainer consumes them, so the peer sees the same batches.
fn token_ids(engine: &Engine, cfg: &TrainConfig, ds: &data::Dataset) -> Result<String> {
    let mut tr = Trainer::new(&engine.model, cfg.clone(), ds.clone(), "bench")?;
    let n = tr.data().seqs.len();
    let order: Vec<usize> = (0..n).map(|k| tr.stream_seq(k)).collect();
    let seqs: Vec<_> = order
        .iter()
        .map(|&i| {
            let q = &tr.data().seqs[i];
            json!({"tokens": q.tokens, "targets": q.targets})
        })
        .collect();
    Ok(json!({"batch": BATCH, "seq_len": SEQ_LEN, "sequences": seqs}).to_string())
}

/// Measures LoRA training on `engine`'s model (file `model`) as `req` says.
pub fn run(
    engine: &Engine,
    model: &Path,
    req: &TrainRequest,
    on_round: &mut dyn FnMut(Round),
) -> Result<TrainReport> {
    let steps = req.steps.max(1);
    let (cfg, p) = config(engine, model, req.budget, steps)?;
    let rounds = req
        .rounds
        .unwrap_or(if req.vs_peft.is_some() { 5 } else { 1 })
        .max(1);
    let ds = data::synthetic(&engine.tokenizer, BATCH * (steps + 1), SEQ_LEN, 0x5EED);
    let ids = token_ids(engine, &cfg, &ds)?;
    if let Some(out) = &req.data_out {
        std::fs::write(out, &ids).with_context(|| format!("writing {}", out.display()))?;
    }
    let peer = match &req.vs_peft {
        Some(py) => Some(Peer::prepare(py, &ids)?),
        None => None,
    };
    let mut ours: Vec<(f64, f64, Vec<f32>)> = Vec::new();
    let mut theirs: Vec<PeftRound> = Vec::new();
    for round in 1..=rounds {
        on_round(Round::Hone(round, rounds));
        ours.push(bench_round(engine, &cfg, &ds, steps, BATCH * SEQ_LEN)?);
        if let Some(peer) = &peer {
            on_round(Round::Peft(round, rounds));
            theirs.push(peer.round(model, req.threads, steps)?);
        }
    }
    let peak_rss_mb = crate::units::mib(crate::sys::peak_rss_bytes().unwrap_or(0));
    let rounds_tps: Vec<f64> = ours.iter().map(|r| r.0).collect();
    let train_tps = median(&rounds_tps);
    let seconds_per_step = median(&ours.iter().map(|r| r.1).collect::<Vec<_>>());
    let losses = ours.pop().map(|r| r.2).unwrap_or_default();
    let peft = (!theirs.is_empty()).then(|| peft_report(&theirs, &rounds_tps, peak_rss_mb));
    Ok(TrainReport {
        n_layers: engine.model.cfg.n_layers,
        batch: BATCH,
        seq_len: SEQ_LEN,
        micro_batch: cfg.micro_batch,
        accum: cfg.accum,
        checkpointing: cfg.checkpointing,
        estimate: p.estimate,
        train_kernels: crate::kernels::train_kernels().name(),
        steps,
        rounds,
        rounds_tps,
        train_tps,
        seconds_per_step,
        losses,
        peak_rss_mb,
        peft,
    })
}

/// One timed run of the bench: `steps` optimiser steps after an untimed warm-up step, from a
/// fresh trainer (so every round does the same work). Returns (tokens/s, s/step, losses).
fn bench_round(
    engine: &Engine,
    cfg: &TrainConfig,
    ds: &data::Dataset,
    steps: usize,
    tokens_per_step: usize,
) -> Result<(f64, f64, Vec<f32>)> {
    let mut tr = Trainer::new(&engine.model, cfg.clone(), ds.clone(), "bench")?;
    let never = AtomicBool::new(false);
    let (l0, _, _, _) = tr.train_step(&never)?.context("cancelled")?;
    let t = Instant::now();
    let mut losses = vec![l0];
    for _ in 0..steps {
        let (l, _, _, _) = tr.train_step(&never)?.context("cancelled")?;
        losses.push(l);
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((
        (steps * tokens_per_step) as f64 / secs,
        secs / steps as f64,
        losses,
    ))
}

/// The PyTorch + PEFT peer: its Python, and its script and data in a private temporary
/// directory (0700, so its files are the user's alone).
struct Peer {
    python: PathBuf,
    _dir: tempfile::TempDir,
    script: PathBuf,
    data: PathBuf,
}

/// One round's report from the peer (the fields read here).
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct PeftRound {
    train_tps: Option<f64>,
    peak_rss_mb: Option<f64>,
    losses: Value,
    torch: Value,
}

impl Peer {
    /// Checks that `python` can import the peer's libraries (failing now, not after the first
    /// round) and writes the script and the token ids `ids` for it.
    fn prepare(python: &Path, ids: &str) -> Result<Peer> {
        let ok = std::process::Command::new(python)
            .args(["-c", "import torch, transformers, peft"])
            .output()
            .with_context(|| format!("running {} (--vs-peft)", python.display()))?;
        if !ok.status.success() {
            bail!(
                "{} cannot import torch, transformers and peft: {}\nInstall them with `{} -m pip install torch transformers peft gguf`.",
                python.display(),
                String::from_utf8_lossy(&ok.stderr).lines().last().unwrap_or(""),
                python.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("hone-peft-").tempdir()?;
        let script = dir.path().join("peft_train.py");
        let data = dir.path().join("benchdata.json");
        std::fs::write(&script, PEFT_SCRIPT)
            .with_context(|| format!("writing {}", script.display()))?;
        std::fs::write(&data, ids).with_context(|| format!("writing {}", data.display()))?;
        Ok(Peer {
            python: python.to_path_buf(),
            _dir: dir,
            script,
            data,
        })
    }

    /// One run of the peer on `model`: its report (the last JSON line it prints).
    fn round(&self, model: &Path, threads: usize, steps: usize) -> Result<PeftRound> {
        let python = &self.python;
        let out = std::process::Command::new(python)
            .arg(&self.script)
            .arg("--gguf")
            .arg(model)
            .arg("--data")
            .arg(&self.data)
            .args(["--threads", &threads.to_string()])
            .args(["--steps", &steps.to_string()])
            .output()
            .with_context(|| format!("running the PEFT peer with {}", python.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'));
        match (out.status.success(), last) {
            (true, Some(l)) => serde_json::from_str(l).context("reading the PEFT peer's report"),
            _ => {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(6).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "the PEFT peer failed ({}):\n{}\nIt needs torch, transformers, peft and gguf in that Python \
                     (`{} -m pip install torch transformers peft gguf`).",
                    out.status,
                    tail.join("\n"),
                    python.display()
                )
            }
        }
    }
}

/// The peer's figures next to ours (`tps`: ours round by round; `peak`: our peak RSS, MiB).
fn peft_report(theirs: &[PeftRound], tps: &[f64], peak: f64) -> PeftReport {
    let rounds_tps: Vec<f64> = theirs
        .iter()
        .map(|r| r.train_tps.unwrap_or(f64::NAN))
        .collect();
    let rounds_rss_mb: Vec<f64> = theirs
        .iter()
        .map(|r| r.peak_rss_mb.unwrap_or(f64::NAN))
        .collect();
    let ratios: Vec<f64> = tps.iter().zip(&rounds_tps).map(|(h, p)| h / p).collect();
    let (train_tps, peak_rss_mb) = (median(&rounds_tps), median(&rounds_rss_mb));
    PeftReport {
        speed_ratio_median: median(&ratios),
        ratio_of_medians: median(tps) / train_tps,
        rss_ratio: peak / peak_rss_mb,
        losses: theirs[theirs.len() - 1].losses.clone(),
        torch: theirs[0].torch.clone(),
        rounds_tps,
        rounds_rss_mb,
        ratios,
        train_tps,
        peak_rss_mb,
    }
}
