//! `hone writer`: train the self-edit writer on reward, see its log, choose its version.
//! Parsing and printing only; the rounds are `hone::teach`, the versions `hone::learn::writer`.

use super::Ctx;
use crate::Cli;
use anyhow::{Context, Result};
use clap::Subcommand;
use hone::learn::writer::{self, WriterChoice};
use hone::teach::{self, reward::Inner, TeachOptions};
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum WriterCommand {
    /// Train the writer on reward (SEAL's outer loop): sample self-edits per note, reward each by
    /// how well the model answers the note's questions after a small update on it, fine-tune the
    /// writer on the winners
    Train {
        /// Notes with questions, one JSON object per line: {"id","note","questions":[{"q","a":[...]}]}
        #[arg(long, required_unless_present = "own_notes")]
        qa: Option<PathBuf>,
        /// Train on your own notes instead: they have no questions, so their rule-made probes
        /// reward the samples
        #[arg(long, conflicts_with = "qa")]
        own_notes: bool,
        /// What rewards a sample: questions (the file's) or probes (rule-made, as for own notes)
        #[arg(long, value_parser = ["questions", "probes"], default_value = "questions")]
        reward: String,
        /// Rounds to run
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
        /// A larger local model that writes (and is trained); the default model is the student
        #[arg(long)]
        teacher: Option<String>,
        /// Optimiser steps of each sample's inner update
        #[arg(long, default_value_t = 24, value_parser = super::args::at_least_one)]
        inner_steps: usize,
        /// Memory budget for the whole process, e.g. 1536MiB
        #[arg(long)]
        max_memory: Option<String>,
        /// Sampling temperature of the writer
        #[arg(long, default_value_t = 0.9)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object at the end, for scripts
        #[arg(long)]
        json: bool,
    },
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
    /// Copy a writer version's file (to ship it, or to pass it to --writer)
    Export {
        version: String,
        out: PathBuf,
        /// Half precision: half the size, the same answers within rounding
        #[arg(long)]
        f16: bool,
    },
}

fn version_number(v: &str) -> Result<i64> {
    v.trim_start_matches('w')
        .parse()
        .with_context(|| format!("{v:?} is not a writer version (e.g. w3)"))
}

pub fn run(cli: &Cli, c: &WriterCommand) -> Result<()> {
    let ctx = match c {
        WriterCommand::Log { .. } | WriterCommand::List { .. } => Ctx::open_for_reading(cli)?,
        _ => Ctx::open(cli)?,
    };
    let choice = ctx.choose_model()?;
    match c {
        WriterCommand::Train {
            qa,
            own_notes,
            reward,
            rounds,
            samples,
            notes,
            holdout,
            teacher,
            inner_steps,
            max_memory,
            temperature,
            seed,
            json,
        } => {
            let (notes_file, source) = match qa {
                Some(qa) => (
                    hone::eval::read_qa(qa)?,
                    format!(
                        "{} (sha256 {})",
                        qa.display(),
                        &hone::digest::sha256_file(qa)?[..12]
                    ),
                ),
                None => (teach::own_notes(&ctx.store)?, "your notes".to_string()),
            };
            let reward_on = match (*own_notes, reward.as_str()) {
                (true, _) | (_, "probes") => teach::RewardOn::Probes,
                _ => teach::RewardOn::Questions,
            };
            let teacher = match teacher {
                Some(t) => Some(
                    hone::registry::resolve(&ctx.home, &ctx.store, Some(t))
                        .with_context(|| format!("the teacher model {t:?}"))?,
                ),
                None => None,
            };
            let opts = TeachOptions {
                rounds: *rounds,
                samples: *samples,
                notes_per_round: (*notes > 0).then_some(*notes),
                holdout: *holdout,
                temperature: *temperature,
                inner: Inner {
                    steps: *inner_steps,
                    ..Inner::default()
                },
                max_memory: max_memory
                    .as_deref()
                    .map(hone::units::parse_bytes)
                    .transpose()?,
                seed: *seed,
                teacher_name: teacher.as_ref().map(|t| t.name.clone()),
                start: WriterChoice::Active,
                reward_on,
                ..TeachOptions::default()
            };
            let stop = hone::interrupt::install_stop_handlers()
                .context("installing the Ctrl-C and SIGTERM handlers")?;
            let bar = super::learn::progress_bar(*json);
            let mut ctx = ctx;
            let out = teach::train(
                &ctx.home,
                &mut ctx.store,
                &choice,
                teacher.as_ref(),
                &notes_file,
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
            for r in &out.rounds {
                if !*json {
                    println!(
                        "round {}: {} notes, {} self-edits kept, mean reward {}, held-out reward {}, probe/question rank agreement {}, {:.0} s, writer {}",
                        r.round,
                        r.notes,
                        r.kept,
                        r.mean_reward.map_or("-".into(), |x| format!("{x:+.3}")),
                        r.holdout_reward.map_or("-".into(), |x| format!("{x:+.3}")),
                        r.probe_agreement.map_or("-".into(), |x| format!("{x:+.2}")),
                        r.wall_s,
                        r.writer.map_or("none".into(), |v| format!("w{v}"))
                    );
                }
            }
            if out.interrupted {
                eprintln!("interrupted: `hone writer train` with the same file continues after the last finished note");
            }
            if *json {
                println!(
                    "{}",
                    json!({"rounds": out.rounds, "writer": out.writer, "interrupted": out.interrupted})
                );
            }
            if out.interrupted {
                std::process::exit(130);
            }
        }
        WriterCommand::Log { round, json } => match round {
            None => {
                let rounds = teach::records::all_rounds(&ctx.store)?;
                if *json {
                    println!("{}", serde_json::to_string(&rounds)?);
                } else if rounds.is_empty() {
                    println!("no writer rounds yet: `hone writer train --qa FILE`");
                }
                for r in rounds.iter().filter(|_| !*json) {
                    println!(
                            "#{:<3} {} {} {:<9} {} notes, {} kept, mean reward {}, held-out {}, agreement {}, {:.0} s, writer {} -> {}",
                            r.id,
                            &r.started_at[..r.started_at.len().min(19)],
                            r.model,
                            r.status,
                            r.notes,
                            r.kept,
                            r.mean_reward.map_or("-".into(), |x| format!("{x:+.3}")),
                            r.holdout_reward.map_or("-".into(), |x| format!("{x:+.3}")),
                            r.probe_agreement.map_or("-".into(), |x| format!("{x:+.2}")),
                            r.wall_s.unwrap_or(0.0),
                            r.parent_writer.map_or("none".into(), |v| format!("w{v}")),
                            r.writer.map_or("none".into(), |v| format!("w{v}")),
                        );
                }
            }
            Some(r) => {
                let samples = teach::records::samples(&ctx.store, *r)?;
                if *json {
                    println!("{}", serde_json::to_string(&samples)?);
                    return Ok(());
                }
                for s in &samples {
                    println!(
                            "{} {:<16} {:<16} k={:<2} acc {:.2} ll {:+.2} reward {} probe reward {} items {} {}",
                            if s.chosen { "*" } else { " " },
                            s.note_key,
                            s.role,
                            s.k,
                            s.accuracy,
                            s.loglik,
                            s.reward.map_or("-".into(), |x| format!("{x:+.3}")),
                            s.probe_reward.map_or("-".into(), |x| format!("{x:+.3}")),
                            s.items,
                            s.reason.as_deref().unwrap_or("")
                        );
                    if s.k >= 0 {
                        for l in s.text.lines().take(8) {
                            println!("      | {l}");
                        }
                    }
                }
            }
        },
        WriterCommand::List { json } => {
            let engine = ctx.load(&choice)?;
            let id = hone::adapters::model_id(&ctx.store, &choice, &engine.model.cfg.arch_name)?;
            let all = writer::versions(&ctx.store, &id.sha256)?;
            if *json {
                for r in &all {
                    println!("{}", serde_json::to_string(r)?);
                }
                return Ok(());
            }
            if all.is_empty() {
                let shipped = writer::shipped(&id.sha256).is_some();
                println!(
                    "no writer versions for {}: the {} writes (`hone writer train --qa FILE` trains one)",
                    choice.name,
                    if shipped { "writer shipped with hone" } else { "model alone" }
                );
            }
            for r in &all {
                println!(
                    "{} w{:<3} {} parent {} | {} steps | {} | {}",
                    if r.active { "*" } else { " " },
                    r.version,
                    &r.created_at[..r.created_at.len().min(19)],
                    r.parent.map_or("-".into(), |p| format!("w{p}")),
                    r.steps,
                    hone::sys::human_bytes(r.bytes),
                    r.data.as_deref().unwrap_or("")
                );
            }
        }
        WriterCommand::Use { version } => {
            if version == "none" {
                let engine = ctx.load(&choice)?;
                let id =
                    hone::adapters::model_id(&ctx.store, &choice, &engine.model.cfg.arch_name)?;
                ctx.store.set_active_writer(&id.sha256, None)?;
                println!("no writer version is in use for {}", choice.name);
            } else {
                let rec = writer::use_version(&ctx.home, &ctx.store, version_number(version)?)?;
                println!("writer w{} is in use for {}", rec.version, rec.model);
            }
        }
        WriterCommand::Rollback => {
            let engine = ctx.load(&choice)?;
            let id = hone::adapters::model_id(&ctx.store, &choice, &engine.model.cfg.arch_name)?;
            let (from, to) = writer::rollback(&ctx.store, &id.sha256)?;
            println!(
                "rolled back from w{from} to {}",
                to.map_or("the model alone (no writer adapter)".into(), |v| format!(
                    "w{v}"
                ))
            );
        }
        WriterCommand::Export { version, out, f16 } => {
            let v = version_number(version)?;
            let rec = ctx
                .store
                .writer(v)?
                .with_context(|| format!("there is no writer version w{v} (`hone writer list`)"))?;
            let (w, meta) = hone::adapters::read_checked(&ctx.home, &rec)?;
            let bytes = hone::adapters::file_bytes(&w, &meta, *f16)?;
            hone::lora::write_atomic(out, &bytes)
                .with_context(|| format!("writing writer w{v} to {}", out.display()))?;
            println!("wrote writer w{v} to {}", out.display());
        }
    }
    Ok(())
}
