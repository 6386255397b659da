//! `hone chat`: an interactive conversation that streams tokens, keeps the conversation in the
//! context (dropping the oldest turns when it fills), and records every exchange.

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
/remember TEXT  store TEXT as a note
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
                        println!("usage: /remember TEXT");
                        continue;
                    }
                    match ctx.store.add_note(text, Some("chat"), None)? {
                        hone::store::NoteAdded::Added(id) => println!("(stored as note {id})"),
                        hone::store::NoteAdded::Duplicate(id) => {
                            println!("(already stored as note {id})")
                        }
                    }
                }
                _ => println!("unknown command /{name}; /help lists them"),
            }
            continue;
        }
        request.get_or_insert_with(|| UserRequest::begin(ctx.home.root()));
        messages.push(Message::user(line));
        let (tokens, dropped) = match asst.fit_context(&mut messages, max_tokens) {
            Ok(x) => x,
            Err(e) => {
                messages.pop();
                eprintln!("error: {e:#}");
                continue;
            }
        };
        if dropped > 0 {
            eprintln!("(dropped the {dropped} oldest turns to fit the context)");
        }
        cancel.store(false, Ordering::SeqCst);
        let g = asst
            .answer(
                &ctx.store,
                &tokens,
                Some(line),
                &params,
                max_tokens,
                &cancel,
                &mut super::print_piece,
            )?
            .generation;
        match g.stop {
            StopReason::Cancelled => println!(" [stopped]"),
            StopReason::MaxTokens => println!(" [max tokens reached]"),
            StopReason::ContextFull => println!(" [context full]"),
            StopReason::Eos => println!(),
        }
        messages.push(Message::assistant(&g.text));
        asst.record(&ctx.store, "chat", Some(&session), line, &g, &params)?;
    }
    Ok(())
}
