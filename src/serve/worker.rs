//! The model thread of `hone serve`: it loads the model and the active adapter, then answers
//! the queued requests one at a time, in the order they came (a FIFO channel), as `hone ask`
//! answers, streaming pieces back to the HTTP side and recording every exchange.
//!
//! It must not speak HTTP. The engine is not `Sync` and runs its parallel work on rayon's
//! pool with this thread as worker 0 (`sys::adopt_compute_pool`), so nothing else touches it.

use super::api::{finish_reason, ApiError, Input, Request, StopFilter};
use crate::assistant::{self, Recorded, SamplingOverrides};
use crate::engine::{Backend, Engine};
use crate::home::Home;
use crate::presence::UserRequest;
use crate::registry::ModelChoice;
use crate::store::Store;
use crate::template::Message;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::{mpsc::UnboundedSender, watch};

/// What the model thread says about itself.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Loading,
    Ready {
        /// Context length the model was loaded with.
        ctx: usize,
        adapter: Option<i64>,
        /// Default answer length (the model's chat default).
        max_tokens: usize,
    },
    Failed(String),
}

/// What a request hears back, in order: `Started`, any number of `Text`, then `Done`; or a
/// single `Error`.
#[derive(Debug)]
pub enum Event {
    Started,
    Text(String),
    Done(Done),
    Error(ApiError),
}

#[derive(Debug, Clone)]
pub struct Done {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: &'static str,
    /// hone's part of the response (`"hone": {...}`: the exchange, citations, claims check,
    /// candidate notes; see `assistant::turn_json`).
    pub hone: serde_json::Value,
}

/// A request waiting for the model.
pub struct Job {
    pub request: Request,
    /// Set when the client went away: the job is skipped, or its generation stops.
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<Event>,
    /// Held from arrival to the end: background learning yields meanwhile.
    pub presence: UserRequest,
}

/// How to load the model.
pub struct WorkerConfig {
    pub home: Home,
    pub choice: ModelChoice,
    pub ctx: Option<usize>,
    pub backend: Backend,
    pub threads: usize,
    /// Put the notes a chat message is about into the prompt.
    pub retrieval: bool,
}

/// Runs the model thread until the job channel closes.
pub fn run(
    cfg: WorkerConfig,
    jobs: mpsc::Receiver<Job>,
    state: watch::Sender<State>,
    queued: Arc<AtomicUsize>,
) {
    crate::sys::adopt_compute_pool(cfg.threads);
    let loaded = (|| -> anyhow::Result<(Store, Engine, Option<i64>)> {
        let store = Store::open(&cfg.home.db_path())?;
        let mut engine = assistant::load_engine(&cfg.choice, cfg.ctx, cfg.backend)?;
        let (adapter, warning) =
            assistant::attach_active_adapter(&cfg.home, &store, &cfg.choice, &mut engine)?;
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        Ok((store, engine, adapter))
    })();
    let (store, mut engine, adapter) = match loaded {
        Ok(x) => x,
        Err(e) => {
            let _ = state.send(State::Failed(format!("{e:#}")));
            return;
        }
    };
    let max_tokens = cfg.choice.chat_defaults().max_tokens;
    let _ = state.send(State::Ready {
        ctx: engine.model.max_context(),
        adapter,
        max_tokens,
    });
    tracing::info!(
        "model {} loaded in {:.0} ms",
        cfg.choice.name,
        engine.load_time.as_secs_f64() * 1000.0
    );
    let adapter = adapter.map(|v| v.to_string());
    while let Ok(job) = jobs.recv() {
        queued.fetch_sub(1, Ordering::SeqCst);
        if job.cancel.load(Ordering::SeqCst) {
            continue; // the client left while it waited
        }
        let events = job.events.clone();
        let r = answer(
            &cfg,
            &store,
            &mut engine,
            adapter.as_deref(),
            max_tokens,
            &job,
        );
        match r {
            Ok(done) => {
                let _ = events.send(Event::Done(done));
            }
            Err(e) => {
                tracing::warn!("request failed: {e}");
                let _ = events.send(Event::Error(e));
            }
        }
        // The request is over: background learning may resume (after its idle time).
        let Job { presence, .. } = job;
        drop(presence);
    }
}

fn answer(
    cfg: &WorkerConfig,
    store: &Store,
    engine: &mut Engine,
    adapter: Option<&str>,
    default_max_tokens: usize,
    job: &Job,
) -> Result<Done, ApiError> {
    let r = &job.request;
    let o = SamplingOverrides {
        temperature: r.temperature,
        top_k: r.top_k,
        top_p: r.top_p,
        min_p: r.min_p,
        repeat_penalty: r.repeat_penalty,
        seed: r.seed,
    };
    let params = assistant::sampling(&cfg.choice, &o).map_err(|m| ApiError::invalid(m, None))?;
    let mut found = Vec::new();
    let tokens = match &r.input {
        Input::Chat(messages) => {
            let mut m: Vec<Message> = Vec::with_capacity(messages.len() + 1);
            if !messages.iter().any(|m| m.role == "system") {
                // The model's default system message, as `hone ask` uses it.
                m.extend(
                    cfg.choice
                        .chat_defaults()
                        .system
                        .map(|s| Message::system(&s)),
                );
            }
            m.extend(messages.iter().cloned());
            // As `hone ask`: the notes the newest message is about go in the prompt (when they
            // leave room for the answer).
            let reserve = r.max_tokens.unwrap_or(default_max_tokens);
            assistant::chat_tokens_with_notes(engine, store, &m, cfg.retrieval, reserve).map(
                |(tokens, notes)| {
                    found = notes;
                    tokens
                },
            )
        }
        Input::Text(t) => engine.text_tokens(t, false).map_err(anyhow::Error::from),
    }
    .map_err(|e| ApiError::invalid(format!("cannot read the prompt: {e:#}"), Some("messages")))?;
    let ctx = engine.model.max_context();
    if tokens.len() >= ctx {
        return Err(ApiError::invalid(
            format!(
                "the prompt has {} tokens; the model was loaded with a context of {ctx} tokens",
                tokens.len()
            ),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    let asked = r.max_tokens.unwrap_or(default_max_tokens);
    if asked > ctx {
        return Err(ApiError::invalid(
            format!("max_tokens is {asked}; the model was loaded with a context of {ctx} tokens"),
            Some("max_tokens"),
        ));
    }
    // Prompt and answer share the context: the answer gets what the prompt leaves.
    let max_tokens = asked.min(ctx - tokens.len());
    let send = |ev: Event| {
        if job.events.send(ev).is_err() {
            job.cancel.store(true, Ordering::SeqCst);
        }
    };
    send(Event::Started);
    let mut filter = StopFilter::new(r.stop.clone());
    let mut shown = String::new();
    let mut stopped = false;
    // As `hone ask`: a question about a learned note is answered by the adapter from its weights.
    let question = match &r.input {
        Input::Chat(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str()),
        Input::Text(_) => None,
    };
    let about = if found.is_empty() {
        assistant::note_about(store, engine, question)
            .map_err(|e| ApiError::internal(format!("searching the notes failed: {e}")))?
    } else {
        None
    };
    let mut on_piece = |piece: &str| {
        if stopped {
            return;
        }
        let (out, hit) = filter.push(piece);
        if !out.is_empty() {
            shown.push_str(&out);
            send(Event::Text(out));
        }
        if hit {
            stopped = true;
            // Ends the generation after this token (the client has not gone).
            job.cancel.store(true, Ordering::SeqCst);
        }
    };
    let g = if found.is_empty() {
        engine
            .answer_routed(
                &tokens,
                &params,
                max_tokens,
                &job.cancel,
                &mut on_piece,
                about.is_some(),
            )
            .map_err(anyhow::Error::from)
    } else {
        // Notes in the prompt: the base model answers from them and the answer cites them.
        assistant::answer_base(
            engine,
            &tokens,
            &params,
            max_tokens,
            &job.cancel,
            &mut on_piece,
        )
    };
    let mut g = g.map_err(|e| ApiError::internal(format!("generation failed: {e:#}")))?;
    let rest = filter.finish();
    if !rest.is_empty() {
        shown.push_str(&rest);
        send(Event::Text(rest));
    }
    g.text = shown;
    let turn = Recorded {
        kind: "serve",
        session: None,
        prompt: &r.prompt_record,
        model: &cfg.choice.name,
        adapter: adapter.map(str::to_string),
    };
    let exchange_id = match assistant::record(store, &turn, &g, engine, &params) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::error!("could not record the exchange: {e:#}");
            None
        }
    };
    let mut answered = assistant::Answered {
        generation: g,
        about,
        cited: found,
        held_back: None,
        claim: None,
    };
    // The claims check, where the answer came from, candidate notes from the user's words.
    let candidates = match exchange_id {
        Some(id) => assistant::after_answer(
            store,
            &mut answered,
            id,
            adapter.is_some(),
            engine.route.as_deref(),
            question.map(|q| (q, "serve", None)),
        )
        .unwrap_or_else(|e| {
            tracing::error!("could not check or record the answer's notes: {e:#}");
            Vec::new()
        }),
        None => Vec::new(),
    };
    let hone = assistant::turn_json(&answered, exchange_id, adapter.is_some(), &candidates);
    let g = answered.generation;
    Ok(Done {
        text: g.text,
        prompt_tokens: g.prompt_tokens,
        completion_tokens: g.completion_tokens,
        finish_reason: finish_reason(g.stop, stopped),
        hone,
    })
}
