//! `hone writer`: train the self-edit writer on reward, see its log, choose its version.
//! Parsing and printing only; the rounds are `hone::teach`, the versions `hone::learn::writer`.

use super::Ctx;
use crate::Cli;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hone::learn::writer::{self, WriterChoice};
use hone::teach::{self, report, reward::Inner, RewardOn, TeachOptions};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum WriterCommand {
    /// Train the writer on reward (SEAL's outer loop): sample self-edits per note, reward each by
    /// how well the model answers the note's questions after a small update on it, fine-tune the
    /// writer on the winners
    Train(TrainArgs),
    /// Show the rounds and, with --round, every sample with its reward and decision
    Log {
        #[arg(long)]
        round: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// List writer versions (the one in use is marked)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Use writer version V (or "none": the model alone)
    Use { version: String },
    /// Go back to the writer before the one in use
    Rollback,
    /// Copy a writer version's file (to ship it, or to pass it to --writer); --f16 halves it
    Export {
        version: String,
        out: PathBuf,
        #[arg(long)]
        f16: bool,
    },
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Notes with questions, one JSON object per line: {"id","note","questions":[{"q","a":[...]}]}
    #[arg(long, required_unless_present = "own_notes")]
    qa: Option<PathBuf>,
    /// Train on your own notes instead, rewarded by their rule-made probes
    #[arg(long, conflicts_with = "qa")]
    own_notes: bool,
    /// What rewards a sample: questions (the file's) or probes (rule-made, as for own notes)
    #[arg(long, value_parser = ["questions", "probes"], default_value = "questions")]
    reward: String,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Self-edits sampled per note
    #[arg(long, default_value_t = 4, value_parser = super::args::at_least_one)]
    samples: usize,
    /// Training notes per round (later rounds take the next ones); 0 = all
    #[arg(long, default_value_t = 40)]
    notes: usize,
    /// Notes never trained on, to measure the writer before the first round and after each
    #[arg(long, default_value_t = 10)]
    holdout: usize,
    /// A larger local model that writes (and is trained); the default model stays the student
    #[arg(long)]
    teacher: Option<String>,
    /// Optimiser steps of each sample's inner update
    #[arg(long, default_value_t = 24, value_parser = super::args::at_least_one)]
    inner_steps: usize,
    /// Memory budget for the whole process, e.g. 1536MiB
    #[arg(long)]
    max_memory: Option<String>,
    #[arg(long, default_value_t = 0.9)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object at the end, for scripts
    #[arg(long)]
    json: bool,
}

fn version_number(v: &str) -> Result<i64> {
    v.trim_start_matches('w')
        .parse()
        .with_context(|| format!("{v:?} is not a writer version (e.g. w3)"))
}

pub fn run(cli: &Cli, c: &WriterCommand) -> Result<()> {
    let mut ctx = match c {
        WriterCommand::Log { .. } | WriterCommand::List { .. } => Ctx::open_for_reading(cli)?,
        _ => Ctx::open(cli)?,
    };
    let choice = ctx.choose_model()?;
    let model_id = |ctx: &Ctx| hone::adapters::model_id_of(&ctx.store, &choice);
    match c {
        WriterCommand::Train(a) => train(&mut ctx, &choice, a)?,
        WriterCommand::Log { round: None, json } => {
            let rounds = teach::records::all_rounds(&ctx.store)?;
            match json {
                true => println!("{}", serde_json::to_string(&rounds)?),
                false => println!("{}", report::log_text(&rounds)),
            }
        }
        WriterCommand::Log {
            round: Some(r),
            json,
        } => {
            let samples = teach::records::samples(&ctx.store, *r)?;
            match json {
                true => println!("{}", serde_json::to_string(&samples)?),
                false => samples
                    .iter()
                    .for_each(|s| println!("{}", report::sample_text(s))),
            }
        }
        WriterCommand::List { json } => {
            let id = model_id(&ctx)?;
            let all = writer::versions(&ctx.store, &id.sha256)?;
            if *json {
                for r in &all {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                let shipped = writer::shipped(&id.sha256).is_some();
                println!("{}", report::versions_text(&all, &choice.name, shipped));
            }
        }
        WriterCommand::Use { version } if version == "none" => {
            ctx.store.set_active_writer(&model_id(&ctx)?.sha256, None)?;
            println!("no writer version is in use for {}", choice.name);
        }
        WriterCommand::Use { version } => {
            let rec = writer::use_version(&ctx.home, &ctx.store, version_number(version)?)?;
            println!("writer w{} is in use for {}", rec.version, rec.model);
        }
        WriterCommand::Rollback => {
            let (from, to) = writer::rollback(&ctx.store, &model_id(&ctx)?.sha256)?;
            let to = to.map_or("the model alone (no writer adapter)".into(), |v| {
                format!("w{v}")
            });
            println!("rolled back from w{from} to {to}");
        }
        WriterCommand::Export { version, out, f16 } => {
            let v = version_number(version)?;
            writer::export(&ctx.home, &ctx.store, v, out, *f16)?;
            println!("wrote writer w{v} to {}", out.display());
        }
    }
    Ok(())
}

fn train(ctx: &mut Ctx, choice: &hone::registry::ModelChoice, a: &TrainArgs) -> Result<()> {
    let (notes, source) = teach::notes_from(&ctx.store, a.qa.as_deref())?;
    let teacher = hone::registry::resolve_teacher(&ctx.home, &ctx.store, a.teacher.as_deref())?;
    let opts = TeachOptions {
        rounds: a.rounds,
        samples: a.samples,
        notes_per_round: (a.notes > 0).then_some(a.notes),
        holdout: a.holdout,
        temperature: a.temperature,
        inner: Inner {
            steps: a.inner_steps,
            ..Inner::default()
        },
        max_memory: hone::units::parse_budget(a.max_memory.as_deref())?,
        seed: a.seed,
        teacher_name: teacher.as_ref().map(|t| t.name.clone()),
        start: WriterChoice::Active,
        reward_on: match a.own_notes || a.reward == "probes" {
            true => RewardOn::Probes,
            false => RewardOn::Questions,
        },
        ..TeachOptions::default()
    };
    let stop = hone::interrupt::install_stop_handlers()
        .context("installing the Ctrl-C and SIGTERM handlers")?;
    let bar = super::learn::progress_bar(a.json);
    let (home, store) = (&ctx.home, &mut ctx.store);
    let out = teach::train(
        home,
        store,
        choice,
        teacher.as_ref(),
        &notes,
        &source,
        &opts,
        &stop.stop,
        &mut |p| {
            bar.set_prefix(format!("round {} {}", p.round, p.phase));
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            bar.set_message(p.message.clone());
        },
    )?;
    bar.finish_and_clear();
    for (id, why) in &out.skipped {
        eprintln!("skipped note {id}: {why}");
    }
    match a.json {
        true => println!("{}", serde_json::to_string(&out)?),
        false => out
            .rounds
            .iter()
            .for_each(|r| println!("{}", report::round_line(r))),
    }
    if out.interrupted {
        eprintln!("interrupted: `hone writer train` with the same file continues after the last finished note");
        std::process::exit(130);
    }
    Ok(())
}
