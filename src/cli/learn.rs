//! `hone learn` (one learning cycle now, or its log) and `hone eval` (knowledge-incorporation
//! evaluation, each mode in its own process and fresh data directory).
//!
//! Parsing, progress bars and printing only; the cycle and its text are `hone::learn` (`report`),
//! the scoring and its table `hone::eval` (`report`), the child processes `hone::eval::harness`.

use super::Ctx;
use crate::Cli;
use anyhow::{Context, Result};
use clap::Args;
use hone::eval::harness::{self, Event, Job, Setup};
use hone::eval::report;
use hone::learn::{self, records, selfedit::Strategy, CycleOutcome, LearnOptions, Progress};
use hone::registry::ModelChoice;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// Training and self-edit settings shared by `learn` and `eval`.
#[derive(Args, Debug, Clone)]
pub struct LearnFlags {
    /// Self-edit strategies: any of passage,cloze,recall,questions,qa,implications,rewrites,writer, or "all"
    #[arg(long, default_value = "passage,cloze,recall,questions")]
    pub strategies: String,
    /// A larger local model that writes the generated self-edits (e.g. qwen2.5-coder-0.5b-instruct)
    #[arg(long)]
    pub teacher: Option<String>,
    /// The writer of the `writer` strategy: active (the trained writer, or the one shipped for
    /// the default model), none (the model alone), or a writer file (`hone writer export`)
    #[arg(long, default_value = "active")]
    pub writer: String,
    /// Samples per note and generated strategy
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Passes over the cycle's training data
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Train at least this many steps of one packed sequence, however few the notes
    #[arg(long, default_value_t = 100)]
    pub min_steps: usize,
    /// Always train the planned steps (--epochs, --min-steps), instead of stopping once the new
    /// notes' held-out probes pass and the training loss has flattened
    #[arg(long)]
    pub fixed_steps: bool,
    /// Spend less on what is learned: a packed sequence whose training loss was below this
    /// (nats per answer token), or an anchoring one whose loss is within this of where it
    /// started, is skipped up to twice in a row, then trained again; 0 trains everything every
    /// pass
    #[arg(long, default_value_t = 0.05, value_name = "NATS")]
    pub skip_learned: f32,
    /// LoRA rank: the size of the small matrices trained beside each weight; higher learns
    /// more and costs more memory and time
    #[arg(long, default_value_t = 16, value_parser = super::args::at_least_one)]
    pub rank: usize,
    /// LoRA alpha: the adapter's update is scaled by alpha / rank (usually twice the rank)
    #[arg(long, default_value_t = 32.0, value_parser = super::args::positive)]
    pub alpha: f32,
    /// Peak learning rate: how big each training step is, above 0 and at most 1
    #[arg(long, default_value_t = 1e-3, value_parser = super::args::learning_rate)]
    pub lr: f64,
    /// Adapt only the top K layers (faster: the frozen layers below run once; 0 = all)
    #[arg(long, default_value_t = 0)]
    pub layers: usize,
    /// General anchoring examples per note-derived example (at most the anchoring prompts there are)
    #[arg(long, default_value_t = 0.75)]
    pub anchor_ratio: f64,
    /// Train anchors toward the base model's K most likely next tokens (distillation; 0 = its
    /// answer's tokens only)
    #[arg(long, default_value_t = 4)]
    pub anchor_topk: usize,
    /// The first N answer tokens of each anchor weigh --anchor-lead-weight in the loss
    #[arg(long, default_value_t = 0)]
    pub anchor_lead: usize,
    /// Loss weight of an anchor answer's first --anchor-lead tokens (1 = no emphasis)
    #[arg(long, default_value_t = 3.0)]
    pub anchor_lead_weight: f32,
    /// Items replayed per earlier learned note
    #[arg(long, default_value_t = 4)]
    pub replay: usize,
    /// Replay at least this many earlier items per new item, spread evenly over earlier notes
    #[arg(long, default_value_t = 2.0)]
    pub replay_ratio: f64,
    /// Answer the rule-based questions plainly instead of with "Your notes say:" first (then
    /// `ask` uses the adapter for every question instead of handing general ones to the base model)
    #[arg(long)]
    pub no_attribute: bool,
    /// When the gate rejects a cycle for forgetting earlier notes, retry its notes this many
    /// times, each with twice the replay
    #[arg(long, default_value_t = 1)]
    pub retries: usize,
    /// Memory budget for the whole process, e.g. 1GiB
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Seed for the self-edits' sampling, the adapter's initialisation and the data order
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct LearnArgs {
    /// At most this many notes in the cycle (oldest unlearned first)
    #[arg(long, default_value_t = 20)]
    pub max_notes: usize,
    /// Print the self-edits and filter verdicts; do not train
    #[arg(long)]
    pub dry_run: bool,
    /// Forget removed notes now: rebuild the adapter without them (the next cycle would), and
    /// learn no new note
    #[arg(long, conflicts_with = "dry_run")]
    pub forget_now: bool,
    /// Show the recorded cycles and gate decisions instead of learning
    #[arg(long)]
    pub log: bool,
    /// Say how long the next cycle would take on this machine (times a few training steps and
    /// probe answers now); learn nothing
    #[arg(long)]
    pub estimate: bool,
    /// Put notes the gate rejected twice back in the queue
    #[arg(long)]
    pub retry: bool,
    /// Activate the candidate without the gate
    #[arg(long)]
    pub no_gate: bool,
    /// Print one JSON object (the cycle's outcome, or with --log the cycles), for scripts
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub flags: LearnFlags,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Notes with questions, one JSON object per line: {"id","note","questions":[{"q","a":[...]}]}
    #[arg(long)]
    pub qa: PathBuf,
    /// General questions ({"q","a":[...]} per line) asked before and after learning
    #[arg(long)]
    pub retention: Option<PathBuf>,
    /// base, in-context, passage, learn, retrieval (notes stored, found per question), newest
    /// (notes stored, the newest that fit in the prompt, as `ask --with-notes`), hybrid (learned,
    /// and retrieval), all (the first four) or ablation (each strategy alone and combined)
    #[arg(long, default_value = "all")]
    pub mode: String,
    /// Learn the notes in K batches, one cycle after another, and report what each batch keeps
    #[arg(long)]
    pub sequential: Option<usize>,
    /// Keep each mode's data directory (printed), with every answer in its result.json
    #[arg(long)]
    pub keep: bool,
    /// Answer the questions with the notes and adapter of DIR, a data directory `--keep` kept
    /// from a learn or hybrid mode, or a HONE_HOME whose notes `hone learn` learned (copied;
    /// nothing is learned again): to score a change in how hone answers against the same
    /// learning cycle. Only with --mode learn or hybrid
    #[arg(long, value_name = "DIR")]
    pub answer_in: Option<std::path::PathBuf>,
    /// Print the results as one JSON object, for scripts
    #[arg(long)]
    pub json: bool,
    /// Internal: run one mode (this JSON job from the parent `hone eval`) in this process, in
    /// $HONE_HOME, and print its JSON
    #[arg(long, hide = true)]
    pub run_one: Option<String>,
    #[command(flatten)]
    pub flags: LearnFlags,
}

fn options(ctx: &Ctx, f: &LearnFlags) -> Result<LearnOptions> {
    let strategies = Strategy::parse_list(&f.strategies).map_err(anyhow::Error::msg)?;
    let teacher = hone::registry::resolve_teacher(&ctx.home, &ctx.store, f.teacher.as_deref())?;
    Ok(LearnOptions {
        strategies,
        teacher_name: teacher.as_ref().map(|t| t.name.clone()),
        teacher,
        writer: match hone::learn::writer::WriterChoice::parse(&f.writer) {
            // A path is made absolute: `hone eval` hands it to processes in other directories.
            hone::learn::writer::WriterChoice::File(p) => hone::learn::writer::WriterChoice::File(
                std::fs::canonicalize(&p)
                    .with_context(|| format!("the writer file {}", p.display()))?,
            ),
            other => other,
        },
        samples: f.samples.max(1),
        rank: f.rank,
        alpha: f.alpha,
        lr: f.lr,
        epochs: f.epochs.max(1),
        layers: (f.layers > 0).then_some(f.layers),
        anchor_ratio: f.anchor_ratio.max(0.0),
        anchor_topk: f.anchor_topk,
        anchor_lead: f.anchor_lead,
        anchor_lead_weight: f.anchor_lead_weight.max(0.0),
        replay_per_note: f.replay,
        replay_ratio: f.replay_ratio.max(0.0),
        retries: f.retries,
        attribute_answers: !f.no_attribute,
        min_steps: f.min_steps,
        adaptive: !f.fixed_steps,
        skip_learned: f.skip_learned.max(0.0),
        max_memory: hone::units::parse_budget(f.max_memory.as_deref())?,
        seed: f.seed,
        ..LearnOptions::default()
    })
}

pub fn progress_bar(hidden: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} {bar:25} {pos}/{len} | {msg} | ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if hidden {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// Draws a learning cycle's progress on `bar` (a clone: they share one bar).
pub fn on_progress(bar: indicatif::ProgressBar) -> impl FnMut(&Progress) {
    let mut phase = None;
    // Without a terminal (logs, eval's child processes) a line every half minute instead.
    let plain = bar.is_hidden();
    let mut last_line = std::time::Instant::now();
    move |p: &Progress| {
        if phase != Some(p.phase) {
            phase = Some(p.phase);
            bar.reset();
            bar.set_prefix(p.phase.name());
        }
        if plain && (last_line.elapsed().as_secs() >= 30 || p.done == 0) {
            last_line = std::time::Instant::now();
            eprintln!("{}", learn::report::progress_line(p));
        }
        bar.set_length(p.total.max(1) as u64);
        bar.set_position(p.done as u64);
        bar.set_message(learn::report::progress_message(p));
    }
}

pub fn learn(cli: &Cli, a: &LearnArgs) -> Result<()> {
    hone::sys::quiet_candle_pool();
    if a.log {
        // Reading the log only reads: it works on a read-only data directory too.
        let ctx = Ctx::open_for_reading(cli)?;
        print!("{}", learn::report::log(&ctx.store, a.json)?);
        return Ok(());
    }
    let mut ctx = Ctx::open(cli)?;
    if a.retry {
        let n = records::retry_rejected(&ctx.store)?;
        println!("{n} note(s) are back in the learning queue");
        return Ok(());
    }
    let choice = ctx.choose_model()?;
    let mut opts = options(&ctx, &a.flags)?;
    opts.max_notes = a.max_notes.max(1);
    opts.dry_run = a.dry_run;
    opts.forget_only = a.forget_now;
    opts.no_gate = a.no_gate;
    let stop = hone::interrupt::install_stop_handlers()?;
    if a.estimate {
        return print_estimate(&ctx, &choice, &opts, &stop.stop, a.json);
    }
    let bar = progress_bar(a.json);
    let mut cb = on_progress(bar.clone());
    let out = learn::run_cycle(
        &ctx.home,
        &mut ctx.store,
        &choice,
        &opts,
        &stop.stop,
        &mut cb,
    )?;
    bar.finish_and_clear();
    let text = learn::report::outcome_text(&out);
    if let CycleOutcome::Interrupted { .. } = out {
        if a.json {
            println!("{}", learn::report::outcome_json(&out));
        }
        eprint!("{text}");
        std::process::exit(130);
    }
    if a.json {
        println!("{}", learn::report::outcome_json(&out));
    } else if a.forget_now && matches!(out, CycleOutcome::NothingToLearn) {
        println!("nothing to forget: no removed note is in the adapter");
    } else {
        print!("{text}");
    }
    Ok(())
}

fn print_estimate(
    ctx: &Ctx,
    choice: &ModelChoice,
    opts: &LearnOptions,
    cancel: &AtomicBool,
    json_out: bool,
) -> Result<()> {
    match learn::estimate::estimate(&ctx.store, choice, opts, cancel)? {
        Some(e) if json_out => println!("{}", serde_json::to_string(&e)?),
        Some(e) => print!("{}", learn::report::estimate_text(&e)),
        None if json_out => println!("{}", json!({"outcome": "nothing"})),
        None => println!("nothing to learn: every note is learned"),
    }
    Ok(())
}

pub fn eval(cli: &Cli, a: &EvalArgs) -> Result<()> {
    hone::sys::quiet_candle_pool();
    if let Some(job) = &a.run_one {
        return eval_child(cli, job);
    }
    let (qa, retention) = Setup::inputs(&a.qa, a.retention.as_deref())?;
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let teacher = match &a.flags.teacher {
        Some(t) => Some(hone::registry::resolve(&ctx.home, &ctx.store, Some(t))?),
        None => None,
    };
    let modes = harness::mode_list(&a.mode, a.sequential, a.retention.is_some())?;
    if let Some(dir) = &a.answer_in {
        harness::check_answer_in(dir, &modes)?;
    }
    let setup = Setup {
        options: options(&ctx, &a.flags)?,
        model: choice,
        teacher,
        qa,
        retention,
        keep: a.keep,
        answer_in: a.answer_in.clone(),
    };
    // A child is this program's hidden `eval --run-one JOB` (`--qa` only because it is required).
    let child = |job: &str| -> Result<std::process::Command> {
        let exe = std::env::current_exe().context("finding the hone executable")?;
        let mut cmd = std::process::Command::new(exe);
        if let Some(t) = cli.threads {
            cmd.arg("-t").arg(t.to_string());
        }
        cmd.arg("eval")
            .arg("--qa")
            .arg(&setup.qa)
            .arg("--run-one")
            .arg(job);
        Ok(cmd)
    };
    let results = harness::run_modes(&setup, &modes, &child, &mut |e| match e {
        Event::SkippedNoTeacher(m) => eprintln!("skipping {m}: no --teacher given"),
        Event::Started(m) => eprintln!("== eval mode {m}"),
        Event::Kept(_, dir) => eprintln!("   kept {} (answers in result.json)", dir.display()),
        Event::Finished(m, r) => eprintln!(
            "   {m}: {}/{} correct ({:.0}%), {:.0} s",
            r.correct,
            r.total,
            r.accuracy * 100.0,
            r.wall_s
        ),
    })?;
    print!("{}", report::table(&setup.model.name, &results, a.json));
    Ok(())
}

/// A child of `hone eval`: runs one mode in this process, in the fresh $HONE_HOME its parent
/// made, and prints its result as the last line.
fn eval_child(cli: &Cli, job: &str) -> Result<()> {
    let job = Job::from_json(job)?;
    let ctx = Ctx::open(cli)?;
    let stop = hone::interrupt::install_stop_handlers()?;
    let bar = progress_bar(false);
    bar.set_prefix(job.mode.clone());
    let mut cb = on_progress(bar.clone());
    let r = harness::run_job(&ctx.home, &ctx.store, &job, &stop.stop, &mut cb)?;
    bar.finish_and_clear();
    println!("{}", harness::report_line(&r)?);
    Ok(())
}
