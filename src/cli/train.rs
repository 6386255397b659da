//! `hone train`, `hone adapters ...`, `hone bench --train`, and attaching the active adapter to
//! a loaded model for `ask` / `chat`.
//!
//! It parses, plans, prints and handles signals; the training itself is `hone::train`, versions
//! and exports are `hone::adapters`.

use super::Ctx;
use crate::Cli;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hone::adapters::{self, ModelId};
use hone::engine::Engine;
use hone::lora::{LoraConfig, Target};
use hone::registry::ModelChoice;
use hone::train::from_file::{self, FileOptions, FileRun};
use hone::train::job::JobEvent;
use hone::train::optim::Decay;
use hone::train::plan::{self, PlanRequest};
use hone::train::{data, AdamWParamsCfg, Outcome, TrainConfig, Trainer};
use hone::units::{mib, parse_bytes};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training data: JSON Lines with {"text"}, {"prompt","completion"} or {"messages"} objects
    #[arg(long)]
    pub data: PathBuf,
    /// Stop after this many optimiser steps, at least 1 (default: the steps of --epochs)
    #[arg(long, value_parser = super::args::at_least_one)]
    pub max_steps: Option<usize>,
    /// Passes over the data, at least 1 (default 3 when --max-steps is not given)
    #[arg(long, value_parser = super::args::at_least_one)]
    pub epochs: Option<usize>,
    /// LoRA rank: the size of the small matrices trained beside each weight; higher learns
    /// more and costs more memory and time (4 to 64 are usual)
    #[arg(long, default_value_t = 8, value_parser = super::args::at_least_one)]
    pub rank: usize,
    /// LoRA alpha: the adapter's update is scaled by alpha / rank (usually twice the rank)
    #[arg(long, default_value_t = 16.0, value_parser = super::args::positive)]
    pub alpha: f32,
    /// Peak learning rate: how big each training step is, above 0 and at most 1; too high
    /// makes training diverge (it then stops and keeps the previous adapter)
    #[arg(long, default_value_t = 1e-3, value_parser = super::args::learning_rate)]
    pub lr: f64,
    /// Warmup steps (linear), then cosine decay to lr/10
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Learning-rate decay after warmup
    #[arg(long, value_parser = ["cosine", "linear", "constant"], default_value = "cosine")]
    pub decay: String,
    /// Adapt only the top K layers (default: as many as the memory budget allows, up to all)
    #[arg(long)]
    pub layers: Option<usize>,
    /// Projections to adapt: any of q,k,v,o,gate,up,down, or "all"
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub targets: String,
    /// Memory budget for the whole process, e.g. 600MiB or 1GiB
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Tokens per packed sequence, at least 16 (default: chosen by the planner, at most 512)
    #[arg(long, value_parser = super::args::seq_len)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch, at least 1 (default: chosen by the planner)
    #[arg(long, value_parser = super::args::at_least_one)]
    pub batch: Option<usize>,
    /// Micro-batches per optimiser step (gradient accumulation), at least 1
    #[arg(long, default_value_t = 1, value_parser = super::args::at_least_one)]
    pub accum: usize,
    /// Recompute activations in the backward pass (less memory, ~1/3 more compute)
    #[arg(long)]
    pub checkpointing: Option<bool>,
    /// Clip the global gradient norm to this (0 = off)
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// AdamW weight decay: pulls the adapter's weights toward zero a little each step (0 = off)
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed for the adapter initialisation and the data order
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a resumable checkpoint every N steps (and on Ctrl-C / SIGTERM), at least 1
    #[arg(long, default_value_t = 20, value_parser = super::args::at_least_one)]
    pub save_every: usize,
    /// Discard an unfinished run's checkpoint instead of resuming it
    #[arg(long)]
    pub fresh: bool,
    /// Stop after this many steps of this invocation, keeping the checkpoint (as an interruption would)
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    /// Print one JSON object at the end (version, losses, tokens/s, peak memory), for scripts
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum AdaptersCommand {
    /// List adapter versions (the active one is marked)
    List {
        /// Print one JSON object per version, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Make VERSION the active adapter of its model ("none" for the base model)
    Use { version: String },
    /// Go back to the adapter that was active before the current one (or to none)
    Rollback,
    /// Export a version (default: the active one) for llama.cpp (gguf) or PEFT (peft)
    Export {
        version: Option<i64>,
        #[arg(long, value_parser = ["gguf", "peft"])]
        format: String,
        /// Output file (gguf) or folder (peft)
        #[arg(long)]
        out: PathBuf,
    },
}

fn identity(ctx: &Ctx, choice: &ModelChoice, engine: &Engine) -> Result<ModelId> {
    Ok(adapters::model_id(
        &ctx.store,
        choice,
        &engine.model.cfg.arch_name,
    )?)
}

/// candle runs its elementwise ops (and quantised kernels) on its own worker pool, synchronised
/// by a barrier after every op. In training those ops are small next to the matrix products
/// (which use rayon with all threads), and waiting at thousands of barriers per step cost about
/// a fifth of the time (measured with perf: 21% in `BarrierGuard::drop`); with one pool thread
/// the ops run inline and the step is ~25% faster. Workers that exist do not spin either.
pub fn quiet_candle_pool() {
    // Edition 2021: set_var is safe; no compute thread has started yet.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}

impl TrainArgs {
    fn options(&self) -> Result<FileOptions> {
        Ok(FileOptions {
            data: self.data.clone(),
            max_steps: self.max_steps,
            epochs: self.epochs,
            rank: self.rank,
            alpha: self.alpha,
            lr: self.lr,
            warmup: self.warmup,
            decay: match self.decay.as_str() {
                "linear" => Decay::Linear,
                "constant" => Decay::Constant,
                _ => Decay::Cosine,
            },
            layers: self.layers,
            targets: Target::parse_list(&self.targets)?,
            budget: self.max_memory.as_deref().map(parse_bytes).transpose()?,
            seq_len: self.seq_len,
            batch: self.batch,
            accum: self.accum,
            checkpointing: self.checkpointing,
            clip: self.clip,
            weight_decay: self.weight_decay,
            seed: self.seed,
            save_every: self.save_every,
            fresh: self.fresh,
        })
    }
}

pub fn train(cli: &Cli, a: &TrainArgs) -> Result<()> {
    quiet_candle_pool();
    let mut ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let o = a.options()?;
    let opts = hone::engine::LoadOptions {
        ctx: from_file::load_ctx(&o),
        backend: ctx.backend,
        ..hone::engine::LoadOptions::default()
    };
    let engine = Engine::load(&choice.name, &choice.path, &opts)
        .with_context(|| format!("loading model {}", choice.name))?;
    let FileRun {
        mut job,
        plan: p,
        model,
    } = from_file::prepare(&ctx.home, &ctx.store, &choice, &engine, &o)?;
    let tr = &job.trainer;
    let cfg = tr.cfg.clone();
    if let Some(step) = job.resumed_at {
        eprintln!(
            "resuming the unfinished run at step {step}/{} ({})",
            cfg.steps,
            job.checkpoint().display()
        );
    }
    eprintln!(
        "training {} on {}: LoRA r={} alpha={} on {} of the top {} layers ({} parameters), {} steps of {}x{} tokens x{} accum, {}checkpointing; plan ~{:.0} MiB{}",
        choice.name,
        tr.data().description,
        cfg.lora.rank,
        cfg.lora.alpha,
        cfg.lora.targets_string(),
        cfg.lora.layers.len(),
        tr.lora().param_count(),
        cfg.steps,
        cfg.micro_batch,
        cfg.seq_len,
        cfg.accum,
        if cfg.checkpointing { "" } else { "no " },
        mib(p.estimate),
        o.budget.map(|b| format!(" (budget {:.0} MiB)", mib(b))).unwrap_or_default()
    );
    let stop = hone::interrupt::install_stop_handlers()?;
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let start_step = job.trainer.step;
    bar.set_position(start_step as u64);
    let t0 = Instant::now();
    let mut tokens_run = 0usize;
    let outcome = job.run(&stop.stop, &mut |ev| match ev {
        JobEvent::Step(r) => {
            tokens_run += r.tokens;
            let tps = tokens_run as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(r.step as u64);
            bar.set_message(format!(
                "loss {:.4} | lr {:.2e} | {:.0} tok/s | peak {:.0} MiB",
                r.loss,
                r.lr,
                tps,
                mib(r.peak_rss)
            ));
            if a.stop_after.is_some_and(|n| r.step - start_step >= n) {
                stop.stop.store(true, Ordering::SeqCst);
            }
        }
        JobEvent::CheckpointFailed { step, error, kept } => bar.suspend(|| {
            eprintln!(
                "warning: could not save the checkpoint at step {step} ({error}); training goes on and retries after every step{}",
                kept.map(|s| format!(", the checkpoint of step {s} is kept"))
                    .unwrap_or_default()
            )
        }),
        JobEvent::CheckpointRecovered { step } => {
            bar.suspend(|| eprintln!("checkpoint saved again at step {step}"))
        }
    })?;
    bar.finish_and_clear();
    if outcome == Outcome::Interrupted {
        let tr = &job.trainer;
        eprintln!(
            "interrupted at step {}/{}: saved {}; run the same command again to resume",
            tr.step,
            tr.cfg.steps,
            job.checkpoint().display()
        );
        if a.json {
            println!(
                "{}",
                json!({"interrupted": true, "step": tr.step, "steps": tr.cfg.steps,
                       "losses": tr.losses, "checkpoint": job.checkpoint()})
            );
        }
        std::process::exit(130);
    }
    let parent = ctx.store.active_adapter(&model.sha256)?.map(|r| r.version);
    let description = job.trainer.data().description.clone();
    let done = job.finish(&ctx.home, &mut ctx.store, &model, parent, description, true)?;
    done.clear_checkpoint();
    let version = done.version;
    let first = done.losses.first().copied().unwrap_or(0.0);
    let last = done.losses.last().copied().unwrap_or(0.0);
    let peak = hone::sys::peak_rss_bytes().unwrap_or(0);
    let tps = done.tokens as f64 / done.seconds.max(1e-9);
    if a.json {
        println!(
            "{}",
            json!({"version": version, "parent": parent, "steps": done.steps, "loss_first": first,
                   "loss_last": last, "losses": done.losses, "train_tps": tps,
                   "peak_rss_mb": mib(peak), "seconds": done.seconds, "seq_len": cfg.seq_len,
                   "micro_batch": cfg.micro_batch, "layers": cfg.lora.layers.len(),
                   "checkpointing": cfg.checkpointing, "estimate_mb": mib(p.estimate)})
        );
    } else {
        println!(
            "adapter v{version} is active: {} steps, loss {first:.4} -> {last:.4}, {tps:.0} tokens/s, peak RSS {:.0} MiB",
            done.steps,
            mib(peak)
        );
    }
    Ok(())
}

pub fn adapters_cmd(cli: &Cli, c: &AdaptersCommand) -> Result<()> {
    let ctx = Ctx::open(cli)?;
    match c {
        AdaptersCommand::List { json } => {
            let all = ctx.store.adapters()?;
            if *json {
                for r in &all {
                    println!("{}", serde_json::to_string(r)?);
                }
                return Ok(());
            }
            if all.is_empty() {
                println!("no adapters yet: train one with `hone train --data FILE.jsonl`");
            }
            for r in &all {
                let losses: Vec<f32> = r
                    .loss_curve
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or_default();
                println!(
                    "{} v{:<3} {} {} parent {} | {} steps, loss {:.3} -> {:.3} | {} params, {} | {}",
                    if r.active { "*" } else { " " },
                    r.version,
                    &r.created_at[..r.created_at.len().min(19)],
                    r.model,
                    r.parent.map(|p| format!("v{p}")).unwrap_or("-".into()),
                    r.steps,
                    losses.first().copied().unwrap_or(f32::NAN),
                    losses.last().copied().unwrap_or(f32::NAN),
                    r.params,
                    hone::sys::human_bytes(r.bytes),
                    r.data.as_deref().unwrap_or("")
                );
            }
        }
        AdaptersCommand::Use { version } => {
            if version == "none" || version == "base" {
                let choice = ctx.choose_model()?;
                let engine = ctx.load(&choice)?;
                let id = identity(&ctx, &choice, &engine)?;
                ctx.store.set_active_adapter(&id.sha256, None)?;
                println!(
                    "no adapter is active for {}: the base model answers",
                    choice.name
                );
            } else {
                let v: i64 = version
                    .trim_start_matches('v')
                    .parse()
                    .with_context(|| format!("{version:?} is not a version number"))?;
                let rec = adapters::use_version(&ctx.home, &ctx.store, v)?;
                println!("adapter v{} is active for {}", rec.version, rec.model);
            }
        }
        AdaptersCommand::Rollback => {
            let choice = ctx.choose_model()?;
            let engine = ctx.load(&choice)?;
            let id = identity(&ctx, &choice, &engine)?;
            let (from, to) = adapters::rollback(&ctx.store, &id.sha256)?;
            println!(
                "rolled back from v{} to {}",
                from.unwrap_or(0),
                to.map(|v| format!("v{v}"))
                    .unwrap_or("the base model (no adapter)".into())
            );
        }
        AdaptersCommand::Export {
            version,
            format,
            out,
        } => {
            let choice = ctx.choose_model()?;
            let engine = ctx.load(&choice)?;
            let id = identity(&ctx, &choice, &engine)?;
            let rec = match version {
                Some(v) => ctx
                    .store
                    .adapter(*v)?
                    .ok_or(adapters::AdapterError::NoVersion(*v))?,
                None => ctx
                    .store
                    .active_adapter(&id.sha256)?
                    .context("no adapter is active for this model; name a VERSION")?,
            };
            let w = adapters::load_version(&ctx.home, &rec, &id, &engine.model.cfg)?;
            match format.as_str() {
                "gguf" => adapters::export_gguf(
                    &w,
                    &id.architecture,
                    &format!("hone adapter v{}", rec.version),
                    out,
                )?,
                _ => adapters::export_peft(&w, &engine.model.cfg, &choice.name, out)?,
            }
            println!(
                "exported adapter v{} as {format}: {}",
                rec.version,
                out.display()
            );
        }
    }
    Ok(())
}

/// `hone bench --train`: LoRA r=8, alpha 16 on q,k,v,o,gate,up,down of every layer, batches of
/// 4 x 128 tokens, AdamW, on fixed synthetic data; train tokens/s and peak RSS.
/// The peer of `hone bench --train --vs-peft`: the same training step in PyTorch + PEFT
/// (bench/peft_train.py, compiled in so an installed binary can run it).
const PEFT_SCRIPT: &str = include_str!("../../bench/peft_train.py");

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

/// One run of the PyTorch + PEFT peer: its JSON report (train_tps, peak_rss_mb, losses).
fn peft_round(
    python: &std::path::Path,
    script: &std::path::Path,
    model: &std::path::Path,
    data: &std::path::Path,
    threads: usize,
    steps: usize,
) -> Result<serde_json::Value> {
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("--gguf")
        .arg(model)
        .arg("--data")
        .arg(data)
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

/// The median of the (non-empty) figures, as `hone bench` reports them.
fn median(v: &[f64]) -> f64 {
    super::bench::stats(&mut v.to_vec()).0
}

pub fn bench(cli: &Cli, a: &super::bench::BenchArgs) -> Result<()> {
    quiet_candle_pool();
    let (steps, json_out, max_memory) = (a.reps, a.json, a.max_memory.as_deref());
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let engine = ctx.load(&choice)?;
    let mcfg = engine.model.cfg.clone();
    let threads = cli
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let (b, s) = (4usize, 128usize);
    let budget = max_memory.map(parse_bytes).transpose()?;
    let model_bytes = std::fs::metadata(&choice.path)
        .map(|m| m.len())
        .unwrap_or(0);
    let req = PlanRequest {
        budget,
        seq_len: Some(s),
        micro_batch: None,
        layers: Some(mcfg.n_layers),
        checkpointing: None,
        rank: 8,
        targets: Target::ALL.to_vec(),
        model_bytes,
        cache_seqs: 0,
        max_micro_batch: None,
    };
    let p = plan::choose(&mcfg, &req)?;
    let steps = steps.max(1);
    let rounds = a
        .rounds
        .unwrap_or(if a.vs_peft.is_some() { 5 } else { 1 })
        .max(1);
    let ds = data::synthetic(&engine.tokenizer, b * (steps + 1), s, 0x5EED);
    let lora = LoraConfig::top_layers(8, 16.0, Target::ALL.to_vec(), mcfg.n_layers, mcfg.n_layers)?;
    let micro = p.micro_batch.min(b);
    let cfg = TrainConfig {
        lora,
        lr: 1e-4,
        min_lr_ratio: 1.0,
        warmup: 0,
        decay: Decay::Constant,
        adamw: AdamWParamsCfg::default(),
        clip: 1.0,
        seq_len: s,
        micro_batch: micro,
        accum: b / micro,
        steps: steps + 1,
        seed: 0,
        checkpointing: p.checkpointing,
    };
    // The token ids in the order the trainer consumes them, so the peer sees the same batches.
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
    drop(tr);
    let ids = json!({"batch": b, "seq_len": s, "sequences": seqs}).to_string();
    if let Some(out) = &a.data_out {
        std::fs::write(out, &ids).with_context(|| format!("writing {}", out.display()))?;
    }
    // The peer's script and data in a private temporary directory.
    let peer = match &a.vs_peft {
        Some(py) => {
            // Fail now, not after the first round, when the peer's Python cannot even start.
            let ok = std::process::Command::new(py)
                .args(["-c", "import torch, transformers, peft"])
                .output()
                .with_context(|| format!("running {} (--vs-peft)", py.display()))?;
            if !ok.status.success() {
                bail!(
                    "{} cannot import torch, transformers and peft: {}\nInstall them with `{} -m pip install torch transformers peft gguf`.",
                    py.display(),
                    String::from_utf8_lossy(&ok.stderr).lines().last().unwrap_or(""),
                    py.display()
                );
            }
            let dir = tempfile::Builder::new().prefix("hone-peft-").tempdir()?;
            let script = dir.path().join("peft_train.py");
            let data = dir.path().join("benchdata.json");
            // The directory is the user's alone (0700), so its files are private.
            std::fs::write(&script, PEFT_SCRIPT)
                .with_context(|| format!("writing {}", script.display()))?;
            std::fs::write(&data, &ids).with_context(|| format!("writing {}", data.display()))?;
            Some((py.clone(), dir, script, data))
        }
        None => None,
    };
    let mut ours: Vec<(f64, f64, Vec<f32>)> = Vec::new();
    let mut theirs: Vec<serde_json::Value> = Vec::new();
    for round in 0..rounds {
        if rounds > 1 {
            eprintln!("round {}/{rounds}: hone", round + 1);
        }
        ours.push(bench_round(&engine, &cfg, &ds, steps, b * s)?);
        if let Some((py, _, script, data)) = &peer {
            eprintln!("round {}/{rounds}: PyTorch + PEFT", round + 1);
            theirs.push(peft_round(py, script, &choice.path, data, threads, steps)?);
        }
    }
    let peak = mib(hone::sys::peak_rss_bytes().unwrap_or(0));
    let tps: Vec<f64> = ours.iter().map(|r| r.0).collect();
    let med = median(&tps);
    let losses = &ours[ours.len() - 1].2;
    let sps = median(&ours.iter().map(|r| r.1).collect::<Vec<_>>());
    println!("| model | threads | test | train tok/s | peak RSS MiB | s/step |\n|---|---|---|---|---|---|");
    println!(
        "| {} | {threads} | lora r8 qkvo+mlp x{} layers, {b}x{s} | {med:.1} | {peak:.0} | {sps:.2} |",
        choice.name, mcfg.n_layers,
    );
    println!(
        "micro-batch {micro} x accum {}, {}checkpointing, training kernels {}, planner estimate {:.0} MiB, loss {:.4} -> {:.4}",
        b / micro,
        if cfg.checkpointing { "" } else { "no " },
        hone::kernels::train_kernels().name(),
        mib(p.estimate),
        losses[0],
        losses[losses.len() - 1]
    );
    let mut peer_json = serde_json::Value::Null;
    if !theirs.is_empty() {
        let f =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
        let ptps: Vec<f64> = theirs.iter().map(|v| f(v, "train_tps")).collect();
        let prss: Vec<f64> = theirs.iter().map(|v| f(v, "peak_rss_mb")).collect();
        let ratios: Vec<f64> = tps.iter().zip(&ptps).map(|(h, p)| h / p).collect();
        println!("\n| round | hone tok/s | PEFT tok/s | hone / PEFT | PEFT peak RSS MiB |\n|---|---|---|---|---|");
        for (i, ((h, p), r)) in tps.iter().zip(&ptps).zip(&ratios).enumerate() {
            println!("| {} | {h:.1} | {p:.1} | {r:.2}x | {:.0} |", i + 1, prss[i]);
        }
        let (pm, pr) = (median(&ptps), median(&prss));
        println!(
            "| median | {med:.1} | {pm:.1} | {:.2}x (ratio of medians {:.2}x) | {pr:.0} |",
            median(&ratios),
            med / pm
        );
        println!(
            "peak RSS: hone {peak:.0} MiB = {:.2}x PEFT's; losses: hone {}, PEFT {}",
            peak / pr,
            json!(losses),
            theirs[theirs.len() - 1]
                .get("losses")
                .cloned()
                .unwrap_or_default()
        );
        peer_json = json!({"peer": "pytorch+peft", "train_tps": pm, "peak_rss_mb": pr,
                           "rounds_tps": ptps, "rounds_rss_mb": prss,
                           "speed_ratio_median": median(&ratios), "ratio_of_medians": med / pm,
                           "rss_ratio": peak / pr,
                           "torch": theirs[0].get("torch").cloned().unwrap_or_default()});
    }
    if json_out {
        println!(
            "{}",
            json!({"model": choice.name, "threads": threads, "train_tps": med, "peak_rss_mb": peak,
                   "steps": steps, "rounds": rounds, "rounds_tps": tps, "batch": b, "seq_len": s,
                   "rank": 8, "alpha": 16.0,
                   "train_kernels": hone::kernels::train_kernels().name(),
                   "micro_batch": micro, "checkpointing": cfg.checkpointing,
                   "estimate_mb": mib(p.estimate), "seconds_per_step": sps,
                   "losses": losses, "vs": peer_json})
        );
    }
    Ok(())
}
