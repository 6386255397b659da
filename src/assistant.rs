//! Answering a user the way `hone ask` does, shared by the command line and `hone serve`: the
//! model loaded with its chat defaults, the active adapter attached with its route, sampling
//! settled from the model's defaults and the request, and the exchange recorded.
//!
//! Around each answer it puts the notes the question is about in the prompt (`retrieve`, for
//! `ask`, `chat` and `serve` alike), and after it checks an answer that claims the user's notes
//! against the notes that exist, records where the answer came from, and collects candidate
//! notes from what the user said (`candidates`).
//!
//! It must not print, parse arguments or speak HTTP: callers do that. It must not choose the
//! model (`registry` does) or decide how an answer is produced (`engine::Engine::answer` does;
//! `note_about` only says whether the question is about a learned note).

use crate::engine::{About, Backend, Engine, Generation, LoadOptions};
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

/// Whether the attached adapter, rather than the base model, answers a prompt that holds the
/// notes `found`: when every one of them is learned. An adapter trained on a note reads it better
/// than the base model does (the held-out notes: 64 of 107 against 60; dev 40 of 42 against 39,
/// BENCHMARKS.md); a note it never learned is answered by the base model, which reads notes as
/// it always has.
pub fn adapter_reads(found: &[crate::retrieve::NoteMatch]) -> bool {
    !found.is_empty() && found.iter().all(|m| m.learned)
}

/// Whether every number in `answer` (each run of digits) is one the notes in the prompt or the
/// question hold. An answer read from notes that names a number they do not hold misread them:
/// on the held-out notes the adapter, reading notes it learned, wrote a ceremony's time, a test's
/// date and a folder's label that its note does not say (BENCHMARKS.md).
pub fn numbers_supported(answer: &str, sources: &[&str]) -> bool {
    let numbers = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .map(|w| w.trim_start_matches('0').to_string())
            .collect()
    };
    let known: std::collections::HashSet<String> =
        sources.iter().flat_map(|s| numbers(s)).collect();
    numbers(answer).iter().all(|n| known.contains(n))
}

/// The share of an answer's words a note must hold for the answer to quote it.
const QUOTES: f64 = 0.9;

/// Lowercase words (runs of letters and digits) of `text`.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// How closely `text` quotes `note`: the share of its words the note holds; 0 under three
/// words (too short to call a quotation: "44", "£4").
pub fn quote_share(text: &str, note: &str) -> f64 {
    let w = words(text);
    if w.len() < 3 {
        return 0.0;
    }
    let held: std::collections::HashSet<String> = words(note).into_iter().collect();
    w.iter().filter(|x| held.contains(*x)).count() as f64 / w.len() as f64
}

/// How many of `question`'s content words ([`crate::retrieve::terms`]) `text` holds, a
/// plural's or a tense's ending set aside ("goes" holds "go", "watered" "waters").
pub fn question_words_held(question: &str, text: &str) -> usize {
    let stem = |w: &str| -> String {
        ["ing", "es", "ed", "s"]
            .iter()
            .find(|s| w.chars().count() > 4 && w.ends_with(*s))
            .map_or(w, |s| &w[..w.len() - s.len()])
            .to_string()
    };
    let have: std::collections::HashSet<String> = words(text).iter().map(|w| stem(w)).collect();
    crate::retrieve::terms(question)
        .iter()
        .filter(|t| have.contains(&stem(t)))
        .count()
}

/// Whether the adapter's answer from its weights alone (`weights`, no note in the prompt) is
/// a better answer than its reading of the notes `found` (`reading`), both about notes it
/// learned: the weights' answer claims the notes and quotes one of those found (nine in ten of
/// its words in it, see [`quote_share`]), and the reading quotes none of them, or quotes one
/// too but holds fewer of the question's words ([`question_words_held`]): it quoted the wrong
/// sentence. A reading that picks a short answer out of a note ("44" asked how far, "Ticket"
/// asked which tram) loses to a weights' answer that quotes the note's sentence; a weights'
/// answer that makes words up never wins (BENCHMARKS.md: on 40 of `bench/notes-train.jsonl`,
/// with the numbers check of [`answer_with_notes`], 64 -> 71 of 135).
pub fn weights_answer_better(
    question: &str,
    reading: &str,
    weights: &str,
    found: &[crate::retrieve::NoteMatch],
    route: Option<&str>,
) -> bool {
    let Some(said) = after_opening(weights, route) else {
        return false;
    };
    let read = after_opening(reading, route).unwrap_or(reading);
    let best = |t: &str| {
        found
            .iter()
            .map(|m| quote_share(t, &m.content))
            .fold(0.0, f64::max)
    };
    if best(said) < QUOTES {
        return false;
    }
    best(read) < QUOTES || question_words_held(question, said) > question_words_held(question, read)
}

/// Answers `tokens`, a prompt holding the notes `found` and `question`. Notes the attached
/// adapter has not all learned are read by the base model ([`answer_base`]). Notes it learned
/// ([`adapter_reads`]) are read by the adapter, its answer held back until whole and kept only
/// when every number in it is in the notes or the question ([`numbers_supported`]); if not, the
/// base model reads them (`by_base` is set), checked the same way; if its answer fails too, None
/// and nothing was shown: the notes do not hold what was asked, and the caller answers the
/// question without them (the adapter's weights hold the learned notes). With `plain` (the
/// question's tokens without the notes), a kept reading of learned notes is weighed against
/// the adapter's answer from its weights alone ([`weights_answer_better`], and every number in
/// it in the notes or the question), and the better one is shown.
#[allow(clippy::too_many_arguments)]
pub fn answer_with_notes(
    engine: &mut Engine,
    found: &[crate::retrieve::NoteMatch],
    question: &str,
    tokens: &[u32],
    plain: Option<&[u32]>,
    params: &SamplingParams,
    max_tokens: usize,
    cancel: &std::sync::atomic::AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Option<Generation>> {
    let adapter = match engine.model.adapter() {
        Some(a) if adapter_reads(found) => a.clone(),
        _ => return answer_base(engine, tokens, params, max_tokens, cancel, on_text).map(Some),
    };
    // Notes found by common words alone are about the question only if the adapter, trained on
    // them, would open its answer to it with the route (a general question shares common words
    // with a note by chance).
    if let Some(plain) = plain.filter(|_| about(found.first()) == About::Common) {
        if engine
            .route_probability(plain)?
            .is_some_and(|p| p < engine.about_min_p)
        {
            return Ok(None);
        }
    }
    let mut sources: Vec<&str> = found.iter().map(|m| m.content.as_str()).collect();
    sources.push(question);
    let sources = &sources;
    let keep = || Box::new(move |t: &str| numbers_supported(t, sources));
    // Every reading is held back whole, and shown once chosen.
    let mut read =
        engine.generate_checked(tokens, params, max_tokens, cancel, &mut |_| {}, keep())?;
    if read.is_none() {
        engine.model.set_adapter(None);
        engine.reset();
        let g = engine.generate_checked(tokens, params, max_tokens, cancel, &mut |_| {}, keep());
        engine.model.set_adapter(Some(adapter));
        engine.reset();
        read = g?.map(|g| Generation { by_base: true, ..g });
    }
    let Some(read) = read else {
        return Ok(None);
    };
    let chosen = match plain {
        Some(plain) if !cancel.load(std::sync::atomic::Ordering::SeqCst) => {
            let weights = engine.answer_routed(
                plain,
                params,
                max_tokens,
                cancel,
                &mut |_| {},
                About::Rare,
            )?;
            let route = engine.route.clone();
            // Cited as the notes' words, it is held to their numbers as a reading is.
            let better =
                weights_answer_better(question, &read.text, &weights.text, found, route.as_deref())
                    && numbers_supported(&weights.text, sources);
            match better {
                true => weights,
                false => read,
            }
        }
        _ => read,
    };
    on_text(&chosen.text);
    Ok(Some(chosen))
}

/// Answers `tokens` with the base model: the adapter is set aside and put back (notes the
/// adapter did not learn, `--with-notes`, answers held back from a removed note).
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

/// How the note a question was found to be about ties it to that note: by a rare word in common,
/// by common words alone, or not at all (see `retrieve::NoteMatch::is_about`). Retrieval keeps
/// only the notes as close as the best one, so the first found speaks for all of them.
pub fn about(note: Option<&crate::retrieve::NoteMatch>) -> About {
    match note {
        None => About::No,
        Some(m) if m.rare > 0 => About::Rare,
        Some(_) => About::Common,
    }
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
        (Some(_), Some(q)) => crate::retrieve::learned_note_about(store, q, &engine.tokenizer),
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
    /// Set by [`check_claim`]: whether an answer that says it comes from the user's notes (with
    /// none in the prompt) is supported by a note that exists.
    pub claim: Option<Claim>,
}

/// What the claims check found for an answer that opens by claiming the user's notes.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// A current note supports it (the one it most likely rests on).
    Supported(crate::retrieve::NoteMatch),
    /// No current note supports it: the note was removed, or the words were made up.
    Unsupported,
}

/// Openings with which an answer says it comes from the user's notes: the one the learning
/// cycle trains (`learn::NOTES_PREFIX`) and its usual variants.
pub const NOTE_OPENINGS: &[&str] = &[
    crate::learn::NOTES_PREFIX,
    "Your note says:",
    "According to your notes,",
    "According to your note,",
    "Your notes mention",
    "In your notes,",
];

/// What an answer says after an opening that claims the user's notes ([`NOTE_OPENINGS`], or
/// `route`, the adapter's trained opening); None when it opens otherwise.
pub fn after_opening<'a>(text: &'a str, route: Option<&str>) -> Option<&'a str> {
    let t = text.trim_start();
    let rest = route
        .map(str::trim)
        .into_iter()
        .chain(NOTE_OPENINGS.iter().copied())
        .filter(|o| !o.is_empty())
        .find_map(|o| {
            t.get(..o.len())
                .filter(|head| head.eq_ignore_ascii_case(o))
                .map(|_| &t[o.len()..])
        })?;
    Some(rest.trim_start())
}

/// The words an answer claims the notes say (its first sentence after the opening), when it
/// opens with one of [`NOTE_OPENINGS`] or with `route` (the adapter's trained opening).
pub fn claimed(text: &str, route: Option<&str>) -> Option<String> {
    let rest = after_opening(text, route)?;
    let end = rest
        .char_indices()
        .find(|&(i, c)| {
            matches!(c, '.' | '!' | '\n')
                && rest[i + c.len_utf8()..]
                    .chars()
                    .next()
                    .is_none_or(char::is_whitespace)
        })
        .map_or(rest.len(), |(i, c)| i + c.len_utf8());
    Some(rest[..end].trim().to_string())
}

/// The claims check: an answer with no note in the prompt that opens by claiming the user's
/// notes is checked against the notes that exist (`retrieve::supporting_note` over its words).
/// None when it makes no such claim (or cites notes that were in its prompt).
pub fn check_claim(
    store: &Store,
    answered: &Answered,
    route: Option<&str>,
) -> Result<Option<Claim>> {
    if !answered.cited.is_empty() {
        return Ok(None);
    }
    let Some(words) = claimed(&answered.generation.text, route) else {
        return Ok(None);
    };
    Ok(Some(
        // A claim is held to the two-word rule alone: an answer may repeat a note's name and get
        // the rest wrong, so a shared name is not support.
        match crate::retrieve::supporting_note(store, &words, &crate::retrieve::Common)? {
            Some(m) => Claim::Supported(m),
            None => Claim::Unsupported,
        },
    ))
}

/// `messages` with the notes the newest user message is about put into it ("My notes:", as
/// `hone ask` does, see [`notes_prompt`]), and those notes (at most three, best first). When the
/// newest message is not the user's or no note matches, the messages are returned unchanged with
/// no notes. What `hone chat` and `hone serve` call before rendering a turn.
pub fn with_retrieved_notes(
    store: &Store,
    messages: &[Message],
    lex: &dyn crate::retrieve::Lexicon,
) -> Result<(Vec<Message>, Vec<crate::retrieve::NoteMatch>)> {
    let mut out = messages.to_vec();
    let Some(last) = out.last_mut().filter(|m| m.role == "user") else {
        return Ok((out, Vec::new()));
    };
    let found = crate::retrieve::relevant(store, &last.content, 3, lex)?;
    if !found.is_empty() {
        let texts: Vec<&str> = found.iter().map(|m| m.content.as_str()).collect();
        *last = Message::user(&notes_prompt(&texts, &last.content));
    }
    Ok((out, found))
}

/// The tokens of `messages` with the notes the newest user message is about put into it (see
/// [`with_retrieved_notes`]) when `retrieval` and they leave `reserve` tokens of the context for
/// the answer, else without them (a question is never refused for its notes); and the notes
/// used. What `hone serve` renders a chat request with.
pub fn chat_tokens_with_notes(
    engine: &Engine,
    store: &Store,
    messages: &[Message],
    retrieval: bool,
    reserve: usize,
) -> Result<(Vec<u32>, Vec<crate::retrieve::NoteMatch>)> {
    if retrieval {
        let (with, found) = with_retrieved_notes(store, messages, &engine.tokenizer)?;
        if !found.is_empty() {
            let tokens = engine.chat_tokens(&with)?;
            if tokens.len() + reserve <= engine.model.max_context() {
                return Ok((tokens, found));
            }
        }
    }
    Ok((engine.chat_tokens(messages)?, Vec::new()))
}

/// Where an answer came from, as recorded with its exchange: "notes" (notes in the prompt, the
/// base model answering), "adapter" (the attached adapter's weights), or "base".
pub fn answered_from(answered: &Answered, adapter_attached: bool) -> &'static str {
    if !answered.cited.is_empty() {
        "notes"
    } else if adapter_attached && !answered.generation.by_base && answered.held_back.is_none() {
        "adapter"
    } else {
        "base"
    }
}

/// What hone does once an answer is written and recorded as exchange `exchange_id`: the claims
/// check (into `answered.claim`), where the answer came from recorded with the exchange (so that
/// feedback can reach the note it rests on), and, when `said` is given (chat, serve: the user's
/// words, where they were said, the session), candidate notes from the user's statements.
pub fn after_answer(
    store: &Store,
    answered: &mut Answered,
    exchange_id: i64,
    adapter_attached: bool,
    route: Option<&str>,
    said: Option<(&str, &str, Option<&str>)>,
) -> Result<Vec<crate::candidates::Collected>> {
    answered.claim = check_claim(store, answered, route)?;
    let from = answered_from(answered, adapter_attached);
    let cited: Vec<i64> = answered.cited.iter().map(|m| m.id).collect();
    let about = answered
        .about
        .as_ref()
        .map(|m| m.id)
        .or(match &answered.claim {
            Some(Claim::Supported(m)) if from == "adapter" => Some(m.id),
            _ => None,
        });
    store.set_exchange_sources(exchange_id, from, &cited, about)?;
    match said {
        Some((text, source, session)) => {
            crate::candidates::collect(store, text, source, session, Some(exchange_id))
        }
        None => Ok(Vec::new()),
    }
}

/// hone's part of a server response (`"hone": {...}`): the exchange, the notes the answer cites
/// with their passages, where it came from, the claims check and candidate notes.
pub fn turn_json(
    answered: &Answered,
    exchange_id: Option<i64>,
    adapter_attached: bool,
    candidates: &[crate::candidates::Collected],
) -> serde_json::Value {
    serde_json::json!({
        "exchange_id": exchange_id,
        "answered_from": answered_from(answered, adapter_attached),
        "citations": answered.citations_json(),
        "about_note": answered.about.as_ref().map(|m| m.id),
        "held_back_note": answered.held_back,
        "claims_notes": answered.claim.is_some(),
        "supported_by": match &answered.claim { Some(Claim::Supported(m)) => Some(m.id), _ => None },
        "unsupported_claim": answered.claim == Some(Claim::Unsupported),
        "candidate_notes": candidates,
    })
}

/// A chat turn ready to answer: its tokens and the notes retrieval put in it.
pub struct PreparedTurn {
    pub tokens: Vec<u32>,
    /// The same conversation without the notes (empty when there are none), rendered only if
    /// the notes turn out not to hold the answer.
    pub plain: Vec<Message>,
    pub cited: Vec<crate::retrieve::NoteMatch>,
    /// How many of the oldest turns were dropped from the conversation to fit the context.
    pub dropped: usize,
}

/// Which notes `hone ask` puts in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotesInPrompt {
    /// The notes the question is about (full-text search), when some are; else none and the
    /// adapter answers from its weights.
    Found,
    /// The most recent notes that fit in the context beside the answer (`--with-notes`).
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

    /// The newest turn of `messages` (a conversation ending with the user's message) rendered
    /// with the notes it is about in it when `retrieval` (see [`with_retrieved_notes`]), leaving
    /// room for `reserve` new tokens: the oldest turns are dropped from `messages` when the
    /// context is full. The conversation keeps the user's words without the notes, so each turn
    /// retrieves afresh (a note stored during the chat is found from then on).
    pub fn prepare_turn(
        &self,
        store: &Store,
        messages: &mut Vec<Message>,
        retrieval: bool,
        reserve: usize,
    ) -> Result<PreparedTurn> {
        let (mut shown, mut cited) = if retrieval {
            with_retrieved_notes(store, messages, &self.engine.tokenizer)?
        } else {
            (messages.clone(), Vec::new())
        };
        let (tokens, dropped) = match self.fit_context(&mut shown, reserve) {
            Ok(x) => x,
            // The notes do not fit with the message: it is answered without them.
            Err(_) if !cited.is_empty() => {
                cited.clear();
                shown = messages.clone();
                self.fit_context(&mut shown, reserve)?
            }
            Err(e) => return Err(e),
        };
        // The same oldest turns leave the conversation (`shown` differs only in its last message).
        let gone = messages.len() - shown.len();
        if gone > 0 {
            let first = messages
                .iter()
                .position(|m| m.role != "system")
                .unwrap_or(messages.len());
            messages.drain(first..first + gone);
        }
        // The same turn without its notes, for a question the notes turn out not to hold.
        let plain = match cited.is_empty() {
            true => Vec::new(),
            false => messages.clone(),
        };
        Ok(PreparedTurn {
            tokens,
            plain,
            cited,
            dropped,
        })
    }

    /// Answers a prepared turn of `question`. With notes in it, [`answer_with_notes`] reads them
    /// and the answer cites them; when neither reader's answer is supported by the notes, the
    /// question is answered from `turn.plain`, without notes and without routing it as a
    /// question about them. Otherwise as [`Assistant::answer`] (`routed`: the question, so that
    /// a question about a learned note routes to the adapter; None when retrieval already
    /// searched and found nothing, when only a removed note the adapter still holds is looked
    /// for, to hold the adapter's answer back).
    #[allow(clippy::too_many_arguments)]
    pub fn answer_turn(
        &mut self,
        store: &Store,
        turn: PreparedTurn,
        question: &str,
        routed: Option<&str>,
        params: &SamplingParams,
        max_tokens: usize,
        cancel: &std::sync::atomic::AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answered> {
        let (tokens, routed) = match turn.cited.is_empty() {
            true => (turn.tokens, routed),
            false => {
                // The question without its notes: for the weights' own answer to be weighed,
                // and for answering without them.
                let plain = self.engine.chat_tokens(&turn.plain)?;
                let read = answer_with_notes(
                    &mut self.engine,
                    &turn.cited,
                    question,
                    &turn.tokens,
                    Some(&plain),
                    params,
                    max_tokens,
                    cancel,
                    on_text,
                )?;
                if let Some(generation) = read {
                    return Ok(Answered {
                        generation,
                        about: None,
                        cited: turn.cited,
                        held_back: None,
                        claim: None,
                    });
                }
                // The notes found do not hold what was asked, so the question is not about
                // them: answered without notes, and not routed to the adapter as a question
                // about a learned note (the route's opening decides, as for any question).
                (plain, None)
            }
        };
        let held_back = match routed {
            None => self.held_back(store, Some(question))?,
            Some(_) => None,
        };
        if held_back.is_none() {
            return self.answer(store, &tokens, routed, params, max_tokens, cancel, on_text);
        }
        let g = answer_base(
            &mut self.engine,
            &tokens,
            params,
            max_tokens,
            cancel,
            on_text,
        )?;
        Ok(Answered {
            generation: g,
            about: None,
            cited: Vec::new(),
            held_back,
            claim: None,
        })
    }

    /// Records an answered turn and does what follows an answer ([`after_answer`]: claims
    /// check, where it came from, candidate notes from `said` when given). Returns the
    /// exchange's id and the candidates.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        store: &Store,
        kind: &str,
        session: Option<&str>,
        prompt: &str,
        answered: &mut Answered,
        params: &SamplingParams,
        candidates: bool,
    ) -> Result<(i64, Vec<crate::candidates::Collected>)> {
        let id = self.record(store, kind, session, prompt, &answered.generation, params)?;
        let said = candidates.then_some((prompt, kind, session));
        let found = after_answer(
            store,
            answered,
            id,
            self.adapter.is_some(),
            self.engine.route.as_deref(),
            said,
        )?;
        Ok((id, found))
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
                claim: None,
            });
        }
        let about = note_about(store, &self.engine, question)?;
        let generation = self.engine.answer_routed(
            tokens,
            params,
            max_tokens,
            cancel,
            on_text,
            self::about(about.as_ref()),
        )?;
        Ok(Answered {
            generation,
            about,
            cited: Vec::new(),
            held_back: None,
            claim: None,
        })
    }

    /// The removed note `question` is about while the attached adapter may still hold it (the
    /// base model must answer), if any.
    fn held_back(&self, store: &Store, question: Option<&str>) -> Result<Option<i64>> {
        match (self.engine.model.adapter(), question) {
            (Some(_), Some(q)) => {
                Ok(
                    crate::retrieve::forgotten_about(store, q, &self.engine.tokenizer)?
                        .map(|m| m.id),
                )
            }
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
            NotesInPrompt::Found => {
                crate::retrieve::relevant(store, question, 3, &self.engine.tokenizer)?
            }
            _ => Vec::new(),
        };
        let content = match notes {
            NotesInPrompt::Recent => {
                with_recent_notes(&self.engine, store, messages.first(), question, max_tokens)?
            }
            _ if !found.is_empty() => {
                let texts: Vec<&str> = found.iter().map(|m| m.content.as_str()).collect();
                notes_prompt(&texts, question)
            }
            _ => question.to_string(),
        };
        let plain = match found.is_empty() {
            true => Vec::new(),
            false => {
                let mut m = messages.clone();
                m.push(Message::user(question));
                m
            }
        };
        messages.push(Message::user(&content));
        let tokens = self.engine.chat_tokens(&messages)?;
        let cancel = std::sync::atomic::AtomicBool::new(false);
        // With retrieval on and nothing found, no note is about the question (the learned one
        // that routes would have been found too): no second search, but a removed note the
        // adapter still holds is looked for.
        let asked = (notes == NotesInPrompt::Off).then_some(question);
        let turn = PreparedTurn {
            tokens,
            plain,
            cited: found,
            dropped: 0,
        };
        let mut answered = self.answer_turn(
            store, turn, question, asked, params, max_tokens, &cancel, on_text,
        )?;
        let (id, _) = self.finish(store, "ask", None, question, &mut answered, params, false)?;
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

/// `question` with the most recent notes before it, oldest first, as many as fit in the model's
/// context beside the system message and `reserve` tokens of answer (`hone ask --with-notes`:
/// an answer from context, not from memory; with thousands of notes, the newest that fit).
pub fn with_recent_notes(
    engine: &Engine,
    store: &Store,
    system: Option<&Message>,
    question: &str,
    reserve: usize,
) -> Result<String> {
    // Rendered with no notes, the prompt's own tokens; each note then costs its tokens and
    // the "- " and newline around it (counted generously).
    let bare = {
        let mut m: Vec<Message> = system.cloned().into_iter().collect();
        m.push(Message::user(&notes_prompt::<&str>(&[], question)));
        engine.chat_tokens(&m)?.len()
    };
    let room = engine
        .model
        .max_context()
        .saturating_sub(reserve)
        .saturating_sub(bare);
    let mut used = 0;
    let mut texts: Vec<String> = Vec::new();
    // Pages of the newest notes, newest first, until one does not fit.
    'pages: for page in 0.. {
        let notes = store.list_notes_page(RECENT_PAGE, page * RECENT_PAGE)?;
        if notes.is_empty() {
            break;
        }
        for n in notes {
            let cost = engine.tokenizer.encode(n.content.trim(), false)?.len() + 3;
            if used + cost > room {
                break 'pages;
            }
            used += cost;
            texts.push(n.content);
        }
    }
    texts.reverse();
    Ok(notes_prompt(&texts, question))
}

/// Notes read at a time by [`with_recent_notes`].
const RECENT_PAGE: usize = 64;

/// What is shown after an answer whose claim of the user's notes no current note supports.
pub const UNSUPPORTED: &str = "(no current note supports this)";

impl Answered {
    /// The citation shown after a text answer, e.g. " [note 12, note 7]"; for an answer from
    /// the weights that claims the notes, " [learned from note 12]" or
    /// " (no current note supports this)"; empty otherwise.
    pub fn citation(&self) -> String {
        match &self.claim {
            Some(Claim::Supported(m)) => return format!(" [learned from note {}]", m.id),
            Some(Claim::Unsupported) => return format!(" {UNSUPPORTED}"),
            None => {}
        }
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

    /// The cited notes with their passages, as JSON.
    pub fn citations_json(&self) -> Vec<serde_json::Value> {
        self.cited
            .iter()
            .map(|m| serde_json::json!({"id": m.id, "passage": m.content}))
            .collect()
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
            "citations": self.citations_json(),
            // The claims check of an answer that says it comes from the notes.
            "claims_notes": self.claim.is_some(),
            "supported_by": match &self.claim { Some(Claim::Supported(m)) => Some(m.id), _ => None },
            "unsupported_claim": self.claim == Some(Claim::Unsupported),
            "answered_from": answered_from(self, asst.adapter.is_some()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str, by_base: bool) -> Answered {
        Answered {
            generation: Generation {
                text: text.to_string(),
                tokens: Vec::new(),
                by_base,
                route_p: None,
                prompt_tokens: 0,
                reused_tokens: 0,
                completion_tokens: 0,
                prompt_ms: 0.0,
                generate_ms: 0.0,
                stop: crate::engine::StopReason::Eos,
            },
            about: None,
            cited: Vec::new(),
            held_back: None,
            claim: None,
        }
    }

    #[test]
    fn the_claimed_words_are_the_first_sentence_after_an_opening() {
        assert_eq!(
            claimed(
                "Your notes say: The bakery closes at 2 pm on Saturdays. Enjoy!",
                None
            )
            .as_deref(),
            Some("The bakery closes at 2 pm on Saturdays.")
        );
        assert_eq!(
            claimed("  according to your notes, Ilse collects postcards", None).as_deref(),
            Some("Ilse collects postcards")
        );
        assert_eq!(
            claimed("From memory: the gym opens at 6.", Some("From memory:")).as_deref(),
            Some("the gym opens at 6.")
        );
        assert_eq!(claimed("Paris is the capital of France.", None), None);
    }

    /// An answer from the weights that claims the notes is checked against the notes that
    /// exist: supported while its note is there, unsupported once it is removed; where it came
    /// from is recorded for feedback.
    #[test]
    fn an_answer_claiming_the_notes_is_checked_against_the_notes_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        let id = store
            .add_note(
                "The bakery on Linden Street closes at 2 pm on Saturdays.",
                None,
                None,
            )
            .unwrap()
            .id();
        let text = "Your notes say: The bakery on Linden Street closes at 2 pm on Saturdays.";
        let mut a = answer(text, false);
        let ex = store
            .record_exchange(&crate::store::NewExchange {
                kind: "ask".into(),
                ..Default::default()
            })
            .unwrap();
        after_answer(&store, &mut a, ex, true, Some("Your notes say:"), None).unwrap();
        assert!(matches!(&a.claim, Some(Claim::Supported(m)) if m.id == id));
        assert_eq!(a.citation(), format!(" [learned from note {id}]"));
        let src = store.exchange_sources(ex).unwrap().unwrap();
        assert_eq!(
            (src.answered_from.as_deref(), src.about),
            (Some("adapter"), Some(id))
        );
        store.remove_note(id).unwrap();
        let a = answer(text, false);
        assert_eq!(
            check_claim(&store, &a, None).unwrap(),
            Some(Claim::Unsupported)
        );
        let mut a = answer(text, false);
        a.claim = check_claim(&store, &a, None).unwrap();
        assert_eq!(a.citation(), " (no current note supports this)");
        let j = turn_json(&a, Some(1), true, &[]);
        assert_eq!(j["unsupported_claim"], true);
        // No claim: nothing to check.
        assert_eq!(
            check_claim(&store, &answer("Paris.", true), None).unwrap(),
            None
        );
    }

    #[test]
    fn the_adapter_reads_notes_in_the_prompt_only_when_it_learned_them_all() {
        let m = |id, learned| crate::retrieve::NoteMatch {
            id,
            content: String::new(),
            learned,
            matched: 2,
            terms: 2,
            rare: 0,
        };
        assert!(adapter_reads(&[m(1, true)]));
        assert!(adapter_reads(&[m(1, true), m(2, true)]));
        assert!(!adapter_reads(&[m(1, true), m(2, false)]));
        assert!(!adapter_reads(&[m(1, false)]));
        assert!(!adapter_reads(&[]));
    }

    #[test]
    fn an_answer_read_from_notes_holds_only_their_numbers() {
        let note = "Bashir's driving test is on 23 October; he has had 34 lessons (€1,470 so far).";
        let q = "When is Bashir's driving test?";
        let ok = |a: &str| numbers_supported(a, &[note, q]);
        assert!(ok(
            "Your notes say: Bashir's driving test is on 23 October."
        ));
        assert!(ok("It is on the 23rd; 34 lessons, €1,470."));
        assert!(ok("On 023 October"), "leading zeros are the same number");
        assert!(ok("No numbers at all."));
        assert!(!ok("Bashir's driving test is on 26 October."));
        assert!(
            !ok("On 23 October at 13:50."),
            "one number not in the note is enough"
        );
        assert!(!ok("€1470"), "digits split differently are another number");
        // The question's numbers count too.
        assert!(numbers_supported(
            "In 3 weeks",
            &[note, "Which day is it in 3 weeks?"]
        ));
        assert!(!numbers_supported("7 days", &["six days"]));
    }

    #[test]
    fn the_newest_user_message_gets_the_notes_it_is_about() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        store
            .add_note(
                "My locker at the Harrowgate pool is number 311.",
                None,
                None,
            )
            .unwrap();
        let q = "What is my locker number at the Harrowgate pool?";
        let msgs = vec![
            Message::system("Be brief."),
            Message::user("Hello"),
            Message::assistant("Hi"),
            Message::user(q),
        ];
        let (with, found) = with_retrieved_notes(&store, &msgs, &crate::retrieve::Common).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(with.len(), 4);
        assert_eq!(&with[..3], &msgs[..3]);
        assert_eq!(
            with[3].content,
            format!("My notes:\n- My locker at the Harrowgate pool is number 311.\n{q}")
        );
        let (same, none) = with_retrieved_notes(
            &store,
            &[Message::user("What is the capital of France?")],
            &crate::retrieve::Common,
        )
        .unwrap();
        assert!(none.is_empty());
        assert_eq!(same[0].content, "What is the capital of France?");
        // The newest message is not the user's: nothing is retrieved.
        let (_, none) = with_retrieved_notes(&store, &msgs[..3], &crate::retrieve::Common).unwrap();
        assert!(none.is_empty());
    }

    /// `--with-notes` puts the newest notes that fit beside the answer, oldest of them first,
    /// however many notes there are (it used to take the 50 newest and fail when they did not fit).
    #[test]
    fn with_notes_takes_the_newest_notes_that_fit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_model(&path, &crate::tiny::TinySpec::default()).unwrap();
        let engine = Engine::load("tiny", &path, &crate::engine::LoadOptions::default()).unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        let note = |i: usize| format!("Note number {i}: the spare key {i} is under stone {i}.");
        for i in 0..3 {
            store.add_note(&note(i), None, None).unwrap();
        }
        let system = Message::system("Be brief.");
        let reserve = 48;
        let max = engine.model.max_context();
        let tokens = |content: &str| {
            engine
                .chat_tokens(&[system.clone(), Message::user(content)])
                .unwrap()
                .len()
        };
        // Few notes: all of them, oldest first.
        let p = with_recent_notes(&engine, &store, Some(&system), "Where is the key?", reserve)
            .unwrap();
        assert!(p.find(&note(0)).unwrap() < p.find(&note(2)).unwrap(), "{p}");
        // Many more than fit: the newest, up to the context less the answer's room.
        for i in 3..400 {
            store.add_note(&note(i), None, None).unwrap();
        }
        let p = with_recent_notes(&engine, &store, Some(&system), "Where is the key?", reserve)
            .unwrap();
        assert!(
            tokens(&p) + reserve <= max,
            "{} + {reserve} > {max}",
            tokens(&p)
        );
        assert!(p.contains(&note(399)), "the newest note is in");
        assert!(!p.contains(&note(0)), "the oldest is not");
        assert!(p.find(&note(398)).unwrap() < p.find(&note(399)).unwrap());
        assert!(p.ends_with("Where is the key?"));
        // Filled: adding the next older note would not have fitted in a much larger budget.
        let kept = (0..400).filter(|&i| p.contains(&note(i))).count();
        assert!(
            kept > 5 && tokens(&p) + reserve > max - 40,
            "{kept} notes, {} tokens",
            tokens(&p)
        );
    }
}

#[cfg(test)]
mod reading_tests {
    use super::*;
    use crate::engine::LoadOptions;
    use crate::lora::LoraWeights;
    use crate::retrieve::NoteMatch;
    use std::sync::atomic::AtomicBool;

    fn note(content: &str) -> NoteMatch {
        NoteMatch {
            id: 1,
            content: content.into(),
            learned: true,
            matched: 2,
            terms: 2,
            rare: 0,
        }
    }

    /// The weights' own answer replaces a reading of learned notes only when it quotes a note
    /// found and the reading does not, or quotes the sentence that holds more of the question.
    #[test]
    fn the_weights_answer_wins_only_when_it_quotes_the_note_better() {
        let run =
            note("Run log, 14 March: the Osterfeld loop, 8 km in 44 minutes; the knee felt fine.");
        let waste = note(
            "Bins: recycling is collected every other Thursday; general waste goes out every Monday night.",
        );
        let quote = "Your notes say: Run log, 14 March: the Osterfeld loop, 8 km in 44 minutes.";
        // A short pick out of the note loses to the note's sentence.
        assert!(weights_answer_better(
            "How far did I run on 14 March?",
            "44",
            quote,
            std::slice::from_ref(&run),
            None
        ));
        // A weights' answer that makes words up never wins, however the reading went.
        let made_up = "Your notes say: you ran a marathon in Berlin with your cousin Pedro.";
        assert!(!weights_answer_better(
            "How far did I run on 14 March?",
            "44",
            made_up,
            std::slice::from_ref(&run),
            None
        ));
        // Nor one that does not claim the notes.
        assert!(!weights_answer_better(
            "How far did I run on 14 March?",
            "44",
            "Run log, 14 March: the Osterfeld loop, 8 km in 44 minutes.",
            std::slice::from_ref(&run),
            None
        ));
        // Both quote the note: the one holding more of the question's words.
        let q = "When does the general waste go out?";
        let wrong_sentence = "Your notes say: recycling is collected every other Thursday.";
        let right_sentence = "Your notes say: general waste goes out every Monday night.";
        assert!(weights_answer_better(
            q,
            wrong_sentence,
            right_sentence,
            std::slice::from_ref(&waste),
            None
        ));
        assert!(!weights_answer_better(
            q,
            right_sentence,
            wrong_sentence,
            std::slice::from_ref(&waste),
            None
        ));
        // A tie keeps the reading.
        assert!(!weights_answer_better(
            q,
            right_sentence,
            right_sentence,
            std::slice::from_ref(&waste),
            None
        ));
        // The trained opening counts as a claim too.
        assert!(weights_answer_better(
            q,
            wrong_sentence,
            "From my notes: general waste goes out every Monday night.",
            &[waste],
            Some("From my notes:")
        ));
        assert_eq!(
            quote_share("44", "44 minutes"),
            0.0,
            "too short to be a quotation"
        );
        assert_eq!(
            question_words_held("Who waters the plants?", "She watered the plants"),
            2
        );
    }

    /// A tiny random model with random adapters: the adapter's reading is kept when the notes
    /// hold its numbers; else the base model's, when they hold its numbers; else nothing is
    /// shown and None says the notes do not hold the answer.
    #[test]
    fn a_reading_of_learned_notes_is_kept_only_when_they_hold_its_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_model(&path, &crate::tiny::TinySpec::default()).unwrap();
        let mut e = Engine::load("tiny", &path, &LoadOptions::default()).unwrap();
        let greedy = SamplingParams::greedy();
        let cancel = AtomicBool::new(false);
        let (mut refused, mut fell_back) = (0, 0);
        for seed in 0..12u64 {
            let w = Arc::new(
                LoraWeights::random_for_tests(&e.model.cfg, seed)
                    .prepare()
                    .unwrap(),
            );
            let prompt = e
                .text_tokens(&format!("note {seed}: 1 2 3"), false)
                .unwrap();
            e.model.set_adapter(None);
            e.reset();
            let base = e
                .generate(&prompt, &greedy, 16, &cancel, &mut |_| {})
                .unwrap();
            e.model.set_adapter(Some(w));
            e.reset();
            let adapted = e
                .generate(&prompt, &greedy, 16, &cancel, &mut |_| {})
                .unwrap();
            let mut read = |content: &str, shown: &mut String| {
                answer_with_notes(
                    &mut e,
                    &[note(content)],
                    "",
                    &prompt,
                    None,
                    &greedy,
                    16,
                    &cancel,
                    &mut |t| shown.push_str(t),
                )
                .unwrap()
            };
            // Notes holding the adapter's numbers: its answer, shown whole.
            let mut shown = String::new();
            let g = read(&adapted.text, &mut shown).expect("the adapter's numbers are there");
            assert_eq!((g.tokens, g.by_base), (adapted.tokens.clone(), false));
            assert_eq!(shown, adapted.text);
            // Notes holding only the base model's numbers.
            let mut shown = String::new();
            let g = read(&base.text, &mut shown);
            if numbers_supported(&adapted.text, &[&base.text]) {
                assert_eq!(g.unwrap().tokens, adapted.tokens);
            } else {
                let g = g.expect("the base model's numbers are there");
                assert!(g.by_base && g.tokens == base.tokens);
                assert_eq!(shown, base.text);
                fell_back += 1;
            }
            // Notes holding no number.
            let mut shown = String::new();
            let g = read("no numbers here", &mut shown);
            let none =
                !numbers_supported(&adapted.text, &[]) && !numbers_supported(&base.text, &[]);
            assert_eq!(g.is_none(), none, "{:?} / {:?}", adapted.text, base.text);
            if none {
                assert!(shown.is_empty(), "{shown:?}");
                refused += 1;
            }
            assert!(
                e.model.adapter().is_some(),
                "the adapter is back afterwards"
            );
        }
        assert!(fell_back > 0 && refused > 0, "{fell_back} {refused}");
    }
}
