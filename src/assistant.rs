//! Answering a user the way `hone ask` does, shared by the command line and `hone serve`: the
//! model loaded with its chat defaults, the active adapter attached with its route, sampling
//! settled from the model's defaults and the request, and the exchange recorded.
//!
//! It must not print, parse arguments or speak HTTP: callers do that. It must not choose the
//! model (`registry` does) or decide how an answer is produced (`engine::Engine::answer` does;
//! `note_about` only says whether the question is about a learned note).

use crate::engine::{Backend, Engine, Generation, LoadOptions};
use crate::home::Home;
use crate::registry::ModelChoice;
use crate::sample::SamplingParams;
use crate::store::{NewExchange, Store};
use crate::template::Message;
use anyhow::{Context as _, Result};
use std::sync::Arc;

/// Loads the chosen model with a context of `ctx` tokens (default: its chat default).
pub fn load_engine(choice: &ModelChoice, ctx: Option<usize>, backend: Backend) -> Result<Engine> {
    let opts = LoadOptions {
        ctx: ctx.unwrap_or(choice.chat_defaults().context),
        backend,
        ..LoadOptions::default()
    };
    Engine::load(&choice.name, &choice.path, &opts)
        .with_context(|| format!("loading model {}", choice.name))
}

/// A question with notes in the prompt (`hone ask --with-notes`, the demo, `hone eval`'s
/// in-context mode): "My notes:", one "- note" line each, then the question.
pub fn notes_prompt<S: AsRef<str>>(notes: &[S], question: &str) -> String {
    let mut s = String::from("My notes:\n");
    for n in notes {
        s.push_str("- ");
        s.push_str(n.as_ref().trim());
        s.push('\n');
    }
    s.push_str(question);
    s
}

/// Answers `tokens` with the base model: the adapter is set aside and put back. Notes in the
/// prompt (retrieval, `--with-notes`) are answered best without an adapter trained on them.
pub fn answer_base(
    engine: &mut Engine,
    tokens: &[u32],
    params: &SamplingParams,
    max_tokens: usize,
    cancel: &std::sync::atomic::AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let Some(adapter) = engine.model.adapter().cloned() else {
        return Ok(engine.generate(tokens, params, max_tokens, cancel, on_text)?);
    };
    engine.model.set_adapter(None);
    engine.reset();
    let g = engine.generate(tokens, params, max_tokens, cancel, on_text);
    engine.model.set_adapter(Some(adapter));
    engine.reset();
    Ok(g?)
}

/// The learned note `question` is about, when `engine` routes between its adapter and the base
/// model (`Engine::answer_routed` then lets the adapter answer from its weights); None without a
/// route or a question (e.g. notes already in the prompt).
pub fn note_about(
    store: &Store,
    engine: &Engine,
    question: Option<&str>,
) -> Result<Option<crate::retrieve::NoteMatch>> {
    match (&engine.route, question) {
        (Some(_), Some(q)) => crate::retrieve::learned_note_about(store, q),
        _ => Ok(None),
    }
}

/// Attaches the chosen model's active adapter to `engine`, with the route its learning cycle
/// trained (see `Engine::answer`); returns its version (None when the base model answers) and,
/// when the active adapter's file was damaged and an earlier version or the base model answers
/// instead, a sentence saying so (for the user, once: the fallback becomes the active version).
pub fn attach_active_adapter(
    home: &Home,
    store: &Store,
    choice: &ModelChoice,
    engine: &mut Engine,
) -> Result<(Option<i64>, Option<String>)> {
    if store.adapters()?.is_empty() {
        return Ok((None, None));
    }
    let id = crate::adapters::model_id(store, choice, &engine.model.cfg.arch_name)?;
    let (found, warning) =
        crate::adapters::load_active_or_fallback(home, store, &id, &engine.model.cfg)?;
    let Some((rec, w)) = found else {
        return Ok((None, warning));
    };
    let route = crate::learn::answer_route(store, rec.version)?;
    engine.attach(Some((Arc::new(w.prepare()?), route)));
    Ok((Some(rec.version), warning))
}

/// A loaded model with the adapter it answers with: what `ask`, `chat`, `demo` and `serve`
/// talk to. The adapter's version travels with the engine, so every recorded exchange names the
/// adapter that wrote it.
pub struct Assistant {
    pub engine: Engine,
    /// The model's name, as recorded.
    pub model: String,
    /// The attached adapter version (None: the base model answers).
    pub adapter: Option<i64>,
}

/// One answer and what routed it.
pub struct Answered {
    pub generation: Generation,
    /// The learned note the question is about, when one routed the answer to the adapter.
    pub about: Option<crate::retrieve::NoteMatch>,
    /// The notes retrieval put in the prompt: what the answer cites.
    pub cited: Vec<crate::retrieve::NoteMatch>,
    /// The removed note the question is about, when the adapter still holds it: the base model
    /// answered instead (see `retrieve::forgotten_about`).
    pub held_back: Option<i64>,
}

/// Which notes `hone ask` puts in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotesInPrompt {
    /// The notes the question is about (full-text search), when some are; else none and the
    /// adapter answers from its weights.
    Found,
    /// The 50 most recent notes (`--with-notes`).
    Recent,
    /// None (`--no-retrieval`): the weights alone.
    Off,
}

impl Assistant {
    /// Wraps a loaded engine and attaches the active adapter (none with `base`). Returns the
    /// fallback warning of [`attach_active_adapter`], if any.
    pub fn new(
        home: &Home,
        store: &Store,
        choice: &ModelChoice,
        mut engine: Engine,
        base: bool,
    ) -> Result<(Self, Option<String>)> {
        let (adapter, warning) = if base {
            (None, None)
        } else {
            attach_active_adapter(home, store, choice, &mut engine)?
        };
        let me = Self {
            engine,
            model: choice.name.clone(),
            adapter,
        };
        Ok((me, warning))
    }

    /// Answers the rendered `tokens`; when `question` is about a learned note, the adapter
    /// answers from its weights (see [`note_about`]).
    #[allow(clippy::too_many_arguments)]
    pub fn answer(
        &mut self,
        store: &Store,
        tokens: &[u32],
        question: Option<&str>,
        params: &SamplingParams,
        max_tokens: usize,
        cancel: &std::sync::atomic::AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answered> {
        if let Some(gone) = self.held_back(store, question)? {
            let g = answer_base(
                &mut self.engine,
                tokens,
                params,
                max_tokens,
                cancel,
                on_text,
            )?;
            return Ok(Answered {
                generation: g,
                about: None,
                cited: Vec::new(),
                held_back: Some(gone),
            });
        }
        let about = note_about(store, &self.engine, question)?;
        let generation = self.engine.answer_routed(
            tokens,
            params,
            max_tokens,
            cancel,
            on_text,
            about.is_some(),
        )?;
        Ok(Answered {
            generation,
            about,
            cited: Vec::new(),
            held_back: None,
        })
    }

    /// The removed note `question` is about while the attached adapter may still hold it (the
    /// base model must answer), if any.
    fn held_back(&self, store: &Store, question: Option<&str>) -> Result<Option<i64>> {
        match (self.engine.model.adapter(), question) {
            (Some(_), Some(q)) => Ok(crate::retrieve::forgotten_about(store, q)?.map(|m| m.id)),
            _ => Ok(None),
        }
    }

    /// `hone ask`: answers `question` once after the `system` message, streaming the text to
    /// `on_text`, and records it as an "ask" exchange. `notes` says which notes go in the
    /// prompt: the ones the question is about (answered by the base model, citing them), the
    /// recent ones, or none; with none in the prompt, a question about a learned note is
    /// answered by the adapter from its weights. Returns the answer and the exchange's id.
    #[allow(clippy::too_many_arguments)]
    pub fn ask(
        &mut self,
        store: &Store,
        system: Option<Message>,
        question: &str,
        notes: NotesInPrompt,
        params: &SamplingParams,
        max_tokens: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(Answered, i64)> {
        let mut messages: Vec<Message> = system.into_iter().collect();
        let found = match notes {
            NotesInPrompt::Found => crate::retrieve::relevant(store, question, 3)?,
            _ => Vec::new(),
        };
        let content = match notes {
            NotesInPrompt::Recent => with_recent_notes(store, question)?,
            _ if !found.is_empty() => {
                let texts: Vec<&str> = found.iter().map(|m| m.content.as_str()).collect();
                notes_prompt(&texts, question)
            }
            _ => question.to_string(),
        };
        messages.push(Message::user(&content));
        let tokens = self.engine.chat_tokens(&messages)?;
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let answered = if found.is_empty() {
            // With retrieval on and nothing found, no note is about the question (the learned
            // one that routes would have been found too): no second search, but a removed
            // note the adapter still holds is looked for.
            let asked = (notes == NotesInPrompt::Off).then_some(question);
            match self.held_back(store, Some(question))? {
                Some(gone) if asked.is_none() => {
                    let g = answer_base(
                        &mut self.engine,
                        &tokens,
                        params,
                        max_tokens,
                        &cancel,
                        on_text,
                    )?;
                    Answered {
                        generation: g,
                        about: None,
                        cited: Vec::new(),
                        held_back: Some(gone),
                    }
                }
                _ => self.answer(store, &tokens, asked, params, max_tokens, &cancel, on_text)?,
            }
        } else {
            let g = answer_base(
                &mut self.engine,
                &tokens,
                params,
                max_tokens,
                &cancel,
                on_text,
            )?;
            Answered {
                generation: g,
                about: None,
                cited: found,
                held_back: None,
            }
        };
        let id = self.record(store, "ask", None, question, &answered.generation, params)?;
        Ok((answered, id))
    }

    /// Renders `messages` into tokens that leave room for `reserve` new tokens, dropping the
    /// oldest turns (never the system message or the newest user message). Returns the tokens
    /// and how many turns were dropped.
    pub fn fit_context(
        &self,
        messages: &mut Vec<Message>,
        reserve: usize,
    ) -> Result<(Vec<u32>, usize)> {
        let max = self.engine.model.max_context();
        let mut dropped = 0;
        loop {
            let tokens = self.engine.chat_tokens(messages)?;
            if tokens.len() + reserve <= max {
                return Ok((tokens, dropped));
            }
            let first = messages
                .iter()
                .position(|m| m.role != "system")
                .unwrap_or(messages.len());
            if messages.len() - first <= 1 {
                anyhow::bail!(
                    "the message is {} tokens, too long for the {max}-token context with {reserve} tokens left for the answer; shorten it or raise --ctx",
                    tokens.len()
                );
            }
            messages.remove(first);
            if messages.get(first).map(|m| m.role == "assistant") == Some(true)
                && messages.len() - first > 1
            {
                messages.remove(first);
            }
            dropped += 1;
        }
    }

    /// Records an answered turn of `kind` ("ask", "chat", ...) with this assistant's model and
    /// adapter; returns the exchange's id.
    pub fn record(
        &self,
        store: &Store,
        kind: &str,
        session: Option<&str>,
        prompt: &str,
        g: &Generation,
        params: &SamplingParams,
    ) -> Result<i64> {
        let turn = Recorded {
            kind,
            session,
            prompt,
            model: &self.model,
            adapter: self.adapter.map(|v| v.to_string()),
        };
        record(store, &turn, g, &self.engine, params)
    }
}

/// The UTF-8 text of `file` (`hone perplexity`), refusing another encoding with the byte where
/// it stops being UTF-8.
pub fn read_text_file(file: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (byte {}); convert it to UTF-8 first",
            file.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// `hone tokenize`: the token ids of `text` with the model's tokenizer (special-token text
/// parsed when `parse_special`), rendered first as a user message with the chat template when
/// `chat` (which loads the model with `ctx` and `backend`); and the tokenizer, to show pieces.
pub fn tokenize(
    choice: &ModelChoice,
    ctx: Option<usize>,
    backend: Backend,
    text: &str,
    chat: bool,
    parse_special: bool,
) -> Result<(Vec<u32>, crate::tokenizer::Tokenizer)> {
    let file = crate::gguf::GgufFile::open(&choice.path)?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&file)?;
    let ids = if chat {
        let engine = load_engine(choice, ctx, backend)?;
        let text = engine.template.render(&[Message::user(text)], true)?;
        tok.encode(&text, parse_special)?
    } else {
        tok.encode(text, parse_special)?
    };
    Ok((ids, tok))
}

/// The system message: `flag` (`--system`), else the model's manifest default, else none (the
/// chat template's own).
pub fn system_message(choice: &ModelChoice, flag: Option<&str>) -> Option<Message> {
    flag.map(str::to_string)
        .or_else(|| choice.chat_defaults().system)
        .map(|s| Message::system(&s))
}

/// `question` with the 50 most recent notes before it, oldest first (`hone ask --with-notes`:
/// an answer from context, not from memory).
pub fn with_recent_notes(store: &Store, question: &str) -> Result<String> {
    let notes = store.list_notes(Some(50))?;
    let texts: Vec<&str> = notes.iter().rev().map(|n| n.content.as_str()).collect();
    Ok(notes_prompt(&texts, question))
}

impl Answered {
    /// The citation shown after a text answer, e.g. " [note 12, note 7]" (empty without one).
    pub fn citation(&self) -> String {
        if self.cited.is_empty() {
            return String::new();
        }
        let ids: Vec<String> = self
            .cited
            .iter()
            .map(|m| format!("note {}", m.id))
            .collect();
        format!(" [{}]", ids.join(", "))
    }

    /// `hone ask --json`: the answer written by `asst`, its route, tokens and timings, and the
    /// recorded exchange's id.
    pub fn to_json(&self, asst: &Assistant, exchange_id: i64) -> serde_json::Value {
        let g = &self.generation;
        serde_json::json!({
            "answer": g.text,
            "model": asst.model,
            "adapter": asst.adapter.map(|v| v.to_string()),
            // Whether the base model answered instead (the adapter did not claim the notes).
            "answered_by_base": g.by_base,
            // With a routed adapter: the probability it gave the opening that claims the notes.
            "route_p": g.route_p,
            // The learned note the question is about (full-text match), if any.
            "about_note": self.about.as_ref().map(|m| m.id),
            // A removed note the question is about, which the adapter may still hold until it is
            // rebuilt: the base model answered instead.
            "held_back_note": self.held_back,
            // The notes retrieval put in the prompt, which the answer rests on.
            "citations": self.cited.iter().map(|m| serde_json::json!({"id": m.id, "passage": m.content})).collect::<Vec<_>>(),
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "stop": g.stop,
            "load_ms": asst.engine.load_time.as_secs_f64() * 1000.0,
            "prompt_ms": g.prompt_ms,
            "generate_ms": g.generate_ms,
            "prompt_tps": g.prompt_tps(),
            "decode_tps": g.decode_tps(),
            "peak_rss_mb": crate::sys::peak_rss_bytes().map(|b| b as f64 / 1048576.0),
            "exchange_id": exchange_id,
        })
    }
}

/// The sampling settings of the model's chat defaults, with the given overrides, checked.
#[derive(Debug, Clone, Default)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// None: a fresh random seed.
    pub seed: Option<u64>,
}

/// Sampling settings from the model's defaults, overridden; the error names the bad value.
pub fn sampling(choice: &ModelChoice, o: &SamplingOverrides) -> Result<SamplingParams, String> {
    let mut p = choice
        .chat_defaults()
        .sampling(o.seed.unwrap_or_else(rand::random));
    if let Some(v) = o.temperature {
        p.temperature = v;
    }
    if let Some(v) = o.top_k {
        p.top_k = v;
    }
    if let Some(v) = o.top_p {
        p.top_p = v;
    }
    if let Some(v) = o.min_p {
        p.min_p = v;
    }
    if let Some(v) = o.repeat_penalty {
        p.repeat_penalty = v;
    }
    p.validate()?;
    Ok(p)
}

/// One answered turn to record.
pub struct Recorded<'a> {
    /// "ask", "chat", "serve", ...
    pub kind: &'a str,
    pub session: Option<&'a str>,
    /// The user's words as they asked them.
    pub prompt: &'a str,
    pub model: &'a str,
    pub adapter: Option<String>,
}

/// Records an exchange as `hone ask` does (prompt, answer, model, adapter, tokens, timings,
/// sampling); returns its id.
pub fn record(
    store: &Store,
    turn: &Recorded<'_>,
    g: &Generation,
    engine: &Engine,
    params: &SamplingParams,
) -> Result<i64> {
    let ex = NewExchange {
        session_id: turn.session.map(str::to_string),
        kind: turn.kind.to_string(),
        prompt: turn.prompt.to_string(),
        answer: g.text.clone(),
        model: turn.model.to_string(),
        adapter: turn.adapter.clone(),
        prompt_tokens: g.prompt_tokens as u64,
        completion_tokens: g.completion_tokens as u64,
        load_ms: Some(engine.load_time.as_secs_f64() * 1000.0),
        prompt_ms: Some(g.prompt_ms),
        generate_ms: Some(g.generate_ms),
        stop_reason: Some(g.stop.as_str().to_string()),
        sampling: serde_json::to_string(params).ok(),
    };
    store.record_exchange(&ex).context("recording the exchange")
}
