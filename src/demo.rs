//! `hone demo`: pull the model if needed, store two sample notes, answer two questions with the
//! base model (one with the notes in the prompt), learn the notes in one cycle, and answer again
//! from the adapter with no note in the prompt, recording every exchange.
//!
//! It must not print or draw progress itself: what the user sees goes through [`Show`] (text
//! for standard output, answer pieces, warnings, the download and the learning progress), which
//! the command line implements.

use crate::assistant::{self, Assistant};
use crate::engine::Backend;
use crate::home::Home;
use crate::learn::{self, CycleOutcome, LearnOptions, Progress};
use crate::manifest::{self, Manifest};
use crate::pull::{self, PullReport};
use crate::registry::{self, ModelChoice};
use crate::sample::SamplingParams;
use crate::store::Store;
use crate::sys::human_bytes;
use crate::template::Message;
use anyhow::Result;
use std::sync::atomic::AtomicBool;

/// The sample notes the demo stores and learns.
pub const NOTES: &[&str] = &[
    "The bakery on Linden Street closes at 2 pm on Saturdays and is closed on Sundays.",
    "My sister Ilse's birthday is on the 14th of March; she collects old postcards.",
];

/// The question asked before and after learning.
const BAKERY: &str = "When does the bakery on Linden Street close on Saturdays?";

/// What the demo shows, and how (the command line's terminal).
pub trait Show {
    /// Text for standard output, as given (lines end in a newline).
    fn say(&mut self, text: &str);
    /// A piece of a streamed answer, shown at once.
    fn piece(&mut self, piece: &str);
    /// A warning for standard error (an adapter that fell back to an earlier version).
    fn warn(&mut self, text: &str);
    /// Fetches `m` into `home` (nothing to do when it is in place), showing the download.
    fn pull(&mut self, home: &Home, m: &Manifest) -> Result<PullReport>;
    /// The learning cycle's progress.
    fn progress(&mut self, p: &Progress);
    /// The learning cycle ended: clear its progress.
    fn progress_done(&mut self);
}

/// The model and how to run it (the command line's global flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The model asked for (else the default model).
    pub model: Option<String>,
    /// Context length (else the model's chat default).
    pub ctx: Option<usize>,
    pub backend: Backend,
}

/// Runs the demo in `home` (see the module doc).
pub fn run(home: &Home, o: &DemoOptions, show: &mut dyn Show) -> Result<()> {
    home.ensure()?;
    show.say("hone demo: answers two questions, then learns two sample notes (LoRA training: a few minutes on a laptop, longer on a small board; Ctrl-C stops it) and answers again\n");
    let m = match &o.model {
        Some(name) => manifest::find(name)?,
        None => Some(manifest::default_model()?),
    };
    if let Some(m) = m {
        if !pull::is_pulled(home, &m) {
            show.say(&format!(
                "pulling {} ({}) ...\n",
                m.name,
                human_bytes(m.bytes)
            ));
        }
        show.pull(home, &m)?;
    }
    let mut store = Store::open(&home.db_path())?;
    for n in NOTES {
        store.add_note(n, Some("demo"), None)?;
    }
    show.say(&format!(
        "stored {} sample notes (see `hone note list`)\n",
        NOTES.len()
    ));
    let choice = registry::resolve(home, &store, o.model.as_deref())?;
    // The base model first: the notes are in the prompt.
    let mut asst = attach(home, &store, &choice, o, true, show)?;
    show.say(&format!(
        "loaded {} in {:.0} ms\n",
        choice.name,
        asst.engine.load_time.as_secs_f64() * 1000.0
    ));
    let questions: [(&str, bool); 2] = [
        (
            "What is the capital of France? Answer in one sentence.",
            false,
        ),
        (BAKERY, true),
    ];
    for (q, with_notes) in questions {
        let content = if with_notes {
            assistant::notes_prompt(NOTES, q)
        } else {
            q.to_string()
        };
        let mark = if with_notes {
            "   (notes in the prompt)"
        } else {
            ""
        };
        show.say(&format!("\n> {q}{mark}\n"));
        answer(&store, &mut asst, q, &content, show)?;
    }
    drop(asst);
    // The main job: learn the notes into the adapter, then answer with no note in the prompt.
    show.say(
        "\nlearning the notes: self-edits, LoRA training, gate (a few minutes on 2 cores) ...\n",
    );
    crate::sys::quiet_candle_pool();
    let cancel = AtomicBool::new(false);
    let opts = LearnOptions::default();
    let out = learn::run_cycle(home, &mut store, &choice, &opts, &cancel, &mut |p| {
        show.progress(p)
    })?;
    show.progress_done();
    if let CycleOutcome::Done {
        reason, seconds, ..
    } = &out
    {
        show.say(&format!("cycle done in {seconds:.0} s: {reason}\n"));
    }
    let mut asst = attach(home, &store, &choice, o, false, show)?;
    let adapter = asst
        .adapter
        .map(|v| format!("v{v}"))
        .unwrap_or("none".into());
    show.say(&format!(
        "\n> {BAKERY}   (no notes in the prompt; adapter {adapter})\n"
    ));
    answer(&store, &mut asst, BAKERY, BAKERY, show)?;
    show.say(&format!(
        "\nEverything above is stored in {} (try `hone history`, `hone learn --log`, `hone chat`).\n",
        home.db_path().display()
    ));
    Ok(())
}

/// Loads the model and attaches its active adapter (none with `base`), warning of a fallback.
fn attach(
    home: &Home,
    store: &Store,
    choice: &ModelChoice,
    o: &DemoOptions,
    base: bool,
    show: &mut dyn Show,
) -> Result<Assistant> {
    let engine = assistant::load_engine(choice, o.ctx, o.backend)?;
    let (asst, warning) = Assistant::new(home, store, choice, engine, base)?;
    if let Some(w) = warning {
        show.warn(&w);
    }
    Ok(asst)
}

/// Streams the greedy answer to `content` (shown as `q`), shows its speed and records it.
fn answer(
    store: &Store,
    asst: &mut Assistant,
    q: &str,
    content: &str,
    show: &mut dyn Show,
) -> Result<()> {
    let params = SamplingParams::greedy();
    let cancel = AtomicBool::new(false);
    let tokens = asst.engine.chat_tokens(&[Message::user(content)])?;
    let g = asst
        .answer(store, &tokens, Some(q), &params, 80, &cancel, &mut |p| {
            show.piece(p)
        })?
        .generation;
    show.say(&format!(
        "\n  [{} prompt tokens at {:.0} tok/s, {} generated at {:.1} tok/s]\n",
        g.prompt_tokens,
        g.prompt_tps(),
        g.completion_tokens,
        g.decode_tps()
    ));
    asst.record(store, "ask", None, q, &g, &params)?;
    Ok(())
}
