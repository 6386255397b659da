//! `hone train` and `hone adapters ...` (`hone bench --train` is `cli::bench` over
//! `hone::bench::train`).
//!
//! It parses, draws the progress bar, prints and handles signals; the run and what it says are
//! `hone::train::from_file`, versions, their list and exports are `hone::adapters`.

use super::Ctx;
use crate::Cli;
use anyhow::Result;
use clap::{Args, Subcommand};
use hone::adapters::{self, ModelId};
use hone::engine::Engine;
use hone::lora::Target;
use hone::registry::ModelChoice;
use hone::train::from_file::{self, FileOptions};
use hone::train::job::JobEvent;
use hone::train::optim::Decay;
use hone::train::Outcome;
use hone::units::{mib, parse_bytes};
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
    let engine = from_file::load_engine(&choice, &o, ctx.backend)?;
    let mut run = from_file::prepare(&ctx.home, &ctx.store, &choice, &engine, &o)?;
    eprint!("{}", run.describe(&choice.name, o.budget));
    let job = &mut run.job;
    let stop = hone::interrupt::install_stop_handlers()?;
    let bar = indicatif::ProgressBar::new(job.trainer.cfg.steps as u64);
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
        eprint!("{}", run.interrupted_text());
        if a.json {
            println!("{}", run.interrupted_json());
        }
        std::process::exit(130);
    }
    let done = run.finish(&ctx.home, &mut ctx.store)?;
    if a.json {
        println!("{}", done.to_json());
    } else {
        println!("{done}");
    }
    Ok(())
}

pub fn adapters_cmd(cli: &Cli, c: &AdaptersCommand) -> Result<()> {
    let ctx = match c {
        // Listing only reads: it works on a read-only data directory too.
        AdaptersCommand::List { .. } => Ctx::open_for_reading(cli)?,
        _ => Ctx::open(cli)?,
    };
    // The chosen model, loaded, and its identity (its adapters belong to it).
    let model = || -> Result<(ModelChoice, Engine, ModelId)> {
        let choice = ctx.choose_model()?;
        let engine = ctx.load(&choice)?;
        let id = adapters::model_id(&ctx.store, &choice, &engine.model.cfg.arch_name)?;
        Ok((choice, engine, id))
    };
    match c {
        AdaptersCommand::List { json } => {
            print!("{}", adapters::list_text(&ctx.store.adapters()?, *json)?);
        }
        AdaptersCommand::Use { version } => {
            if version == "none" || version == "base" {
                let (choice, _, id) = model()?;
                ctx.store.set_active_adapter(&id.sha256, None)?;
                println!(
                    "no adapter is active for {}: the base model answers",
                    choice.name
                );
            } else {
                let v = adapters::parse_version(version)?;
                let rec = adapters::use_version(&ctx.home, &ctx.store, v)?;
                println!("adapter v{} is active for {}", rec.version, rec.model);
            }
        }
        AdaptersCommand::Rollback => {
            let (_, _, id) = model()?;
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
            let (_, engine, id) = model()?;
            let v = adapters::export(
                &ctx.home,
                &ctx.store,
                &id,
                &engine.model.cfg,
                *version,
                format,
                out,
            )?;
            println!("exported adapter v{v} as {format}: {}", out.display());
        }
    }
    Ok(())
}
