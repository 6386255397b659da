//! `hone chat`: an interactive conversation that streams tokens, keeps the conversation in the
//! context (dropping the oldest turns when it fills), and records every exchange. Each turn is
//! prepared, answered and finished by `hone::assistant` (notes retrieved and cited, claims
//! checked, candidate notes collected); feedback goes to `hone::feedback`. It only reads lines
//! and prints.

use super::{sampling, Ctx};
use crate::{ChatArgs, Cli};
use anyhow::{Context, Result};
use hone::engine::StopReason;
use hone::presence::UserRequest;
use hone::template::Message;
use rustyline::error::ReadlineError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const HELP: &str = "\
/help           this help
/new            start a new conversation (forget the context)
/good, /bad     say the last answer was good or bad (a bad answer from learned
                knowledge puts its note back in the learning queue)
/fix TEXT       correct the last answer: TEXT becomes a note that replaces the
                note the answer rested on
/remember TEXT  store TEXT as a note (/remember alone keeps the last candidate note)
/quit           leave (Ctrl-D too)
Ctrl-C stops the answer being written; it does not leave.";

pub fn run(cli: &Cli, a: &ChatArgs) -> Result<()> {
    // Background learning yields while the model loads and while each answer is written; not
    // while the chat waits for you to type (the idle threshold counts from the last answer).
    let home = hone::home::Home::from_env()?;
    home.ensure()?;
    let mut request = Some(UserRequest::begin(home.root()));
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let (params, max_tokens) = sampling(&choice, &a.sampling)?;
    let mut asst = ctx.assistant(&choice, a.base)?;
    let session = format!("{:016x}", rand::random::<u64>());
    let system = hone::assistant::system_message(&choice, a.sampling.system.as_deref());
    let base: Vec<Message> = system.into_iter().collect();
    let mut messages = base.clone();
    // The last answer (its exchange and where it came from), for /good, /bad and /fix; the last
    // candidate note from what you said, for /remember alone.
    let mut last: Option<i64> = None;
    let mut last_candidate: Option<i64> = None;
    eprintln!(
        "hone chat: {} ({} tokens of context, loaded in {:.0} ms). /help for commands, Ctrl-C stops an answer, /quit leaves.",
        choice.name,
        asst.engine.model.max_context(),
        asst.engine.load_time.as_secs_f64() * 1000.0
    );
    let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
    // After the editor: on a terminal it installs its own SIGINT handler for as long as it
    // lives (a pipe only read while a line is edited), which would swallow Ctrl-C during an
    // answer. While a line is edited the terminal is raw, so Ctrl-C still reaches the editor
    // as a key.
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    loop {
        drop(request.take());
        let line = match rl.readline("you> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                eprintln!("(type /quit or press Ctrl-D to leave)");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading input"),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line);
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match name {
                "help" | "?" => println!("{HELP}"),
                "new" | "reset" => {
                    messages = base.clone();
                    asst.engine.reset();
                    println!("(new conversation)");
                }
                "quit" | "exit" | "q" => break,
                "remember" => {
                    let text = rest.trim();
                    if text.is_empty() {
                        match last_candidate.take() {
                            Some(c) => match hone::candidates::keep(&ctx.store, c) {
                                Ok(n) => println!("(kept as note {})", n.id()),
                                Err(e) => println!("({e})"),
                            },
                            None => println!(
                                "usage: /remember TEXT (or /remember alone to keep the last candidate note)"
                            ),
                        }
                        continue;
                    }
                    match ctx.store.add_note(text, Some("chat"), None)? {
                        hone::store::NoteAdded::Added(id) => println!("(stored as note {id})"),
                        hone::store::NoteAdded::Duplicate(id) => {
                            println!("(already stored as note {id})")
                        }
                    }
                }
                "good" | "bad" | "fix" => {
                    let Some(exchange) = last else {
                        println!("(no answer to judge yet)");
                        continue;
                    };
                    let r = if name == "fix" {
                        if rest.trim().is_empty() {
                            println!("usage: /fix TEXT (the right answer, kept as a note)");
                            continue;
                        }
                        hone::feedback::correct(&ctx.store, exchange, rest)
                    } else {
                        let rating = if name == "good" {
                            hone::feedback::Rating::Good
                        } else {
                            hone::feedback::Rating::Bad
                        };
                        hone::feedback::rate(&ctx.store, exchange, rating)
                    };
                    match r {
                        Ok(o) => println!("({})", o.summary()),
                        Err(e) => println!("(not stored: {e})"),
                    }
                }
                _ => println!("unknown command /{name}; /help lists them"),
            }
            continue;
        }
        request.get_or_insert_with(|| UserRequest::begin(ctx.home.root()));
        messages.push(Message::user(line));
        let retrieval = !a.no_retrieval;
        let turn = match asst.prepare_turn(&ctx.store, &mut messages, retrieval, max_tokens) {
            Ok(x) => x,
            Err(e) => {
                messages.pop();
                eprintln!("error: {e:#}");
                continue;
            }
        };
        if turn.dropped > 0 {
            eprintln!(
                "(dropped the {} oldest turns to fit the context)",
                turn.dropped
            );
        }
        cancel.store(false, Ordering::SeqCst);
        // As `hone ask`: with retrieval on, a search that found nothing needs no second one.
        let routed = (!retrieval).then_some(line);
        let mut answered = asst.answer_turn(
            &ctx.store,
            turn,
            line,
            routed,
            &params,
            max_tokens,
            &cancel,
            &mut super::print_piece,
        )?;
        let (id, found) = asst.finish(
            &ctx.store,
            "chat",
            Some(&session),
            line,
            &mut answered,
            &params,
            true,
        )?;
        let g = &answered.generation;
        let stop = match g.stop {
            StopReason::Cancelled => " [stopped]",
            StopReason::MaxTokens => " [max tokens reached]",
            StopReason::ContextFull => " [context full]",
            StopReason::Eos => "",
        };
        println!("{}{stop}", answered.citation());
        messages.push(Message::assistant(&g.text));
        for c in &found {
            match c.note {
                Some(n) => println!("(kept as note {n}: {})", c.content),
                None => {
                    println!(
                        "(candidate note {}: \"{}\"; /remember keeps it)",
                        c.id, c.content
                    );
                    last_candidate = Some(c.id);
                }
            }
        }
        last = Some(id);
    }
    Ok(())
}
