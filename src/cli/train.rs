//! `hone train` and `hone adapters ...` (`hone bench --train` is `cli::bench` over
//! `hone::bench::train`).
//!
//! It parses, plans, prints and handles signals; the training itself is `hone::train`, versions
//! and exports are `hone::adapters`.

use super::Ctx;
use crate::Cli;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hone::adapters::{self, ModelId};
use hone::engine::Engine;
use hone::lora::Target;
use hone::registry::ModelChoice;
use hone::train::from_file::{self, FileOptions, FileRun};
use hone::train::job::JobEvent;
use hone::train::optim::Decay;
use hone::train::Outcome;
use hone::units::{mib, parse_bytes};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
    hone::sys::quiet_candle_pool();
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
    let ctx = match c {
        // Listing only reads: it works on a read-only data directory too.
        AdaptersCommand::List { .. } => Ctx::open_for_reading(cli)?,
        _ => Ctx::open(cli)?,
    };
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
