//! The model thread of `hone serve`: it loads the model and the active adapter, then answers
//! up to `parallel` requests at once in slots, as llama-server's parallel slots do. Every step
//! runs one new request's prompt (the oldest waiting, so arrivals are served in order) and
//! then one decoding pass for all the answers under way together: their next tokens are
//! stacked into one batch, so the weights are read once per step for all of them
//! (`Model::forward_batch`), while each keeps its own KV cache, position, sampler, stop
//! sequences and adapter choice (`engine::Decoder`). Each answer is routed as `hone ask`
//! routes it (a question about a learned note to the adapter, the held opening otherwise; a
//! reading of learned notes checked, then weighed against the adapter's answer from its weights,
//! as `assistant::answer_with_notes` does), streams its pieces back to the HTTP side, stops when
//! its client leaves, and is recorded.
//! A finished slot keeps its KV cache, and the next prompt starts from the cache that shares
//! the longest prefix with it (a conversation's next turn, a common system message).
//!
//! It must not speak HTTP. The engine is not `Sync` and runs its parallel work on rayon's
//! pool with this thread as worker 0 (`sys::adopt_compute_pool`), so nothing else touches it.

use super::api::{finish_reason, ApiError, Input, Request, StopFilter};
use crate::assistant::{self, Recorded, SamplingOverrides};
use crate::engine::{About, Backend, Decoder, Engine, EngineError, Generation, Step, StopReason};
use crate::home::Home;
use crate::model::KvCache;
use crate::presence::UserRequest;
use crate::registry::ModelChoice;
use crate::retrieve::NoteMatch;
use crate::sample::SamplingParams;
use crate::store::Store;
use crate::template::Message;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
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
    /// Answers decoded together (`--parallel`).
    pub parallel: usize,
    /// Bytes the KV caches of finished answers may keep beyond one per slot (`--prompt-cache`),
    /// so that a prompt seen before, or a conversation going on, starts where it left off.
    pub prompt_cache_bytes: usize,
    /// The most answers one decoding pass has served so far (`/health` shows it).
    pub largest_batch: Arc<AtomicUsize>,
}

/// Runs the model thread until the job channel closes and the last answer is done.
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
    let ctx = engine.model.max_context();
    let _ = state.send(State::Ready {
        ctx,
        adapter,
        max_tokens,
    });
    tracing::info!(
        "model {} loaded in {:.0} ms; {} parallel slots",
        cfg.choice.name,
        engine.load_time.as_secs_f64() * 1000.0,
        cfg.parallel.max(1)
    );
    // Which adapter is active is looked up before each batch of requests: a learning cycle
    // (the daemon's, or `hone learn`), `hone train` or `hone adapters use` may change it while
    // the server runs, and the server answers with it from the next request on.
    let model_sha = crate::adapters::model_id(&store, &cfg.choice, &engine.model.cfg.arch_name)
        .map(|m| m.sha256)
        .map_err(|e| tracing::warn!("adapters activated later will not be picked up: {e}"))
        .ok();
    let active = |store: &Store| -> Option<i64> {
        let sha = model_sha.as_deref()?;
        store.active_adapter(sha).ok().flatten().map(|r| r.version)
    };
    let mut seen = active(&store);
    let mut attached = adapter;
    let mut free: Vec<Cache> = Vec::new();
    let mut tick = 0u64;
    let parallel = cfg.parallel.max(1);
    loop {
        // Nothing runs: wait for a request.
        let Ok(first) = jobs.recv() else {
            return;
        };
        let now = active(&store);
        if now != seen {
            seen = now;
            match assistant::attach_active_adapter(&cfg.home, &store, &cfg.choice, &mut engine) {
                Ok((v, warning)) => {
                    if let Some(w) = warning {
                        tracing::warn!("{w}");
                    }
                    if v.is_none() {
                        engine.attach(None);
                    }
                    if v != attached {
                        tracing::info!(
                            "answering with adapter {} from now on (was {})",
                            v.map_or("none".to_string(), |v| format!("v{v}")),
                            attached.map_or("none".to_string(), |v| format!("v{v}"))
                        );
                        attached = v;
                        // What was computed with the old adapter would answer with it.
                        free.retain(|c| !c.lora);
                        let _ = state.send(State::Ready {
                            ctx,
                            adapter: attached,
                            max_tokens,
                        });
                    }
                }
                Err(e) => tracing::warn!(
                    "the active adapter changed, but it could not be loaded ({e:#}); answering with {} as before",
                    attached.map_or("the base model".to_string(), |v| format!("v{v}"))
                ),
            }
        }
        let mut w = Slots {
            cfg: &cfg,
            store: &store,
            engine: &engine,
            adapter: attached.map(|v| v.to_string()),
            default_max_tokens: max_tokens,
            active: Vec::new(),
            free: std::mem::take(&mut free),
            tick,
        };
        let mut open = true;
        let mut next = Some(first);
        loop {
            // Take new requests while a slot is free.
            while open && w.active.len() < parallel {
                let job = match next.take().map(Ok).unwrap_or_else(|| jobs.try_recv()) {
                    Ok(j) => j,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                };
                queued.fetch_sub(1, Ordering::SeqCst);
                if job.cancel.load(Ordering::SeqCst) {
                    continue; // the client left while it waited
                }
                w.admit(job);
            }
            if w.active.is_empty() {
                break;
            }
            w.step();
        }
        free = std::mem::take(&mut w.free);
        tick = w.tick;
        if !open {
            return;
        }
    }
}

/// What a request's answer shows its client: the stop-sequence filter in front of the events.
struct Out {
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    filter: StopFilter,
    shown: String,
    /// A stop sequence was met.
    stopped: bool,
    /// Nothing is shown: the adapter's answer from its weights, to be weighed against a reading
    /// of the notes before either is shown.
    silent: bool,
}

impl Out {
    fn send(&self, ev: Event) {
        if self.events.send(ev).is_err() {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }

    fn piece(&mut self, piece: &str) {
        if self.stopped || self.silent {
            return;
        }
        let (out, hit) = self.filter.push(piece);
        if !out.is_empty() {
            self.shown.push_str(&out);
            self.send(Event::Text(out));
        }
        if hit {
            self.stopped = true;
            // Ends the generation after this token (the client has not gone).
            self.cancel.store(true, Ordering::SeqCst);
        }
    }
}

/// Where an answer is in `hone ask`'s routing (`Engine::answer_routed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Generating; the answer is what it generates.
    Plain,
    /// The adapter answers with its opening held back until it shows whether it opens with
    /// the route; if not, `Opening` decides.
    Held,
    /// After the prompt has run with the adapter: the probability of the route's opening
    /// decides between the adapter (forced opening) and the base model, against the least that
    /// `about` asks (`Engine::min_p`).
    Opening { about: About },
    /// A reader of notes in the prompt that the adapter learned (`assistant::answer_with_notes`),
    /// its whole answer held back until the numbers in it are found in the notes or the
    /// question. If not: after the adapter, the base model reads them; after the base model,
    /// the request runs again without notes. A kept reading is then weighed against the
    /// adapter's answer from its weights (the request without the notes, in `Weighed`).
    Checked,
}

/// A kept reading of learned notes, waiting while the adapter answers the question from its
/// weights alone (`assistant::weights_answer_better` chooses, as in `hone ask`).
struct Weighed {
    text: String,
    tokens: Vec<u32>,
    generated: usize,
    by_base: bool,
    stop: StopReason,
    /// The prompt with the notes.
    prompt: Vec<u32>,
    reused: usize,
}

/// A KV cache and the tokens it holds.
struct Cache {
    kv: KvCache,
    tokens: Vec<u32>,
    /// The tokens ran with the adapter.
    lora: bool,
    /// When it was last used (the least recently used leaves the prompt cache first).
    used: u64,
    /// How many of `tokens` were the prompt (the rest is its answer).
    prompt_len: usize,
}

/// One answer under way in a slot.
struct Seq {
    job: Job,
    out: Out,
    params: SamplingParams,
    prompt: Vec<u32>,
    max_tokens: usize,
    cache: Cache,
    decoder: Decoder<'static>,
    phase: Phase,
    /// Tokens to run (the prompt, or the part the cache lacks) before the next sample.
    pending: Vec<u32>,
    /// Logits waiting to be sampled.
    logits: Option<Vec<f32>>,
    /// The route's opening shown ahead of the generated text, and its tokens.
    opening: Option<(String, Vec<u32>)>,
    by_base: bool,
    route_p: Option<f64>,
    reused: usize,
    started: Instant,
    prompt_ms: Option<f64>,
    /// What the prompt rests on: the notes retrieval put in it, the learned note it is about,
    /// the removed note it is held back from, and the user's newest words.
    notes: Notes,
    /// The reading being weighed, while the weights answer (see [`Weighed`]).
    weighing: Option<Weighed>,
}

/// What a request's answer rests on (see [`Slots::prepare`]).
#[derive(Default)]
struct Notes {
    found: Vec<NoteMatch>,
    about: Option<NoteMatch>,
    held_back: Option<i64>,
    question: Option<String>,
    /// The request's prompt without the notes, when a reading of learned notes is to be weighed
    /// against the adapter's answer from its weights.
    plain: Option<Vec<u32>>,
}

/// The check of an answer read from the notes in the prompt (None without notes): every number
/// in it is in the notes or the question (`assistant::numbers_supported`).
fn notes_check(notes: &Notes) -> Option<crate::engine::Hold<'static>> {
    if notes.found.is_empty() {
        return None;
    }
    let mut sources: Vec<String> = notes.found.iter().map(|m| m.content.clone()).collect();
    sources.extend(notes.question.clone());
    let keep: Box<dyn Fn(&str) -> bool> = Box::new(move |t: &str| {
        let s: Vec<&str> = sources.iter().map(String::as_str).collect();
        assistant::numbers_supported(t, &s)
    });
    Some((usize::MAX, keep))
}

/// Whether the answer's client has gone or its request was cancelled.
fn cancelled(s: &Seq) -> bool {
    s.job.cancel.load(Ordering::SeqCst)
}

/// A checked request: its prompt, sampling, answer length and notes.
struct Prepared {
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    notes: Notes,
}

impl Seq {
    fn room(&self, ctx: usize) -> bool {
        self.cache.kv.len() < ctx
    }
}

struct Slots<'a> {
    cfg: &'a WorkerConfig,
    store: &'a Store,
    engine: &'a Engine,
    adapter: Option<String>,
    default_max_tokens: usize,
    active: Vec<Seq>,
    /// Caches of finished answers, kept for the prefixes they hold (the prompt cache).
    free: Vec<Cache>,
    /// Counts uses of the caches, for `Cache::used`.
    tick: u64,
}

impl Slots<'_> {
    /// Checks a request, tells its client the model started on it and gives it a slot (or
    /// answers its error).
    fn admit(&mut self, job: Job) {
        self.admit_with(job, self.cfg.retrieval, Instant::now());
    }

    /// [`Slots::admit`], with retrieval on or off, its answer timed from `started`. Off also for
    /// a request whose notes did not hold the answer: it runs again without them and is not
    /// routed as a question about a learned note (as `hone ask`).
    fn admit_with(&mut self, job: Job, retrieval: bool, started: Instant) {
        let t0 = Instant::now();
        let routes = retrieval || !self.cfg.retrieval;
        let prepared = self.prepare(&job, retrieval, routes);
        tracing::debug!("prepared in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
        match prepared {
            Ok(Prepared {
                prompt,
                params,
                max_tokens,
                notes,
            }) => {
                let out = Out {
                    events: job.events.clone(),
                    cancel: job.cancel.clone(),
                    filter: StopFilter::new(job.request.stop.clone()),
                    shown: String::new(),
                    stopped: false,
                    silent: false,
                };
                out.send(Event::Started);
                let e = self.engine;
                let (route, adapter) = (e.route.clone(), e.model.adapter().is_some());
                // Notes in the prompt: the adapter reads the ones it learned, the base model
                // the others; a removed note the adapter still holds: the base model answers
                // (as `hone ask`).
                let reads = assistant::adapter_reads(&notes.found) && adapter;
                let checked = if reads { notes_check(&notes) } else { None };
                let base = (!notes.found.is_empty() && !reads) || notes.held_back.is_some();
                let about = assistant::about(notes.about.as_ref());
                let (phase, lora, hold) = match route {
                    _ if base => (Phase::Plain, false, None),
                    _ if reads => (Phase::Checked, true, checked),
                    Some(route) if adapter => {
                        if about != About::No {
                            (Phase::Opening { about }, true, None)
                        } else {
                            let n = match e.tokenizer.encode(&route, false) {
                                Ok(t) => t.len() + 1,
                                Err(err) => {
                                    let m = format!("generation failed: {err}");
                                    out.send(Event::Error(ApiError::internal(m)));
                                    return;
                                }
                            };
                            let opens: Box<dyn Fn(&str) -> bool> =
                                Box::new(move |t: &str| t.trim_start().starts_with(route.trim()));
                            (Phase::Held, true, Some((n, opens)))
                        }
                    }
                    _ => (Phase::Plain, adapter, None),
                };
                let decoder = Decoder::new(&prompt, &params, max_tokens, hold)
                    .ignoring_eos(job.request.ignore_eos);
                let cache = self.cache_for(&prompt, lora);
                let reused = cache.tokens.len();
                let pending = prompt[reused..].to_vec();
                self.active.push(Seq {
                    job,
                    out,
                    params,
                    prompt,
                    max_tokens,
                    cache,
                    decoder,
                    phase,
                    pending,
                    logits: None,
                    opening: None,
                    by_base: false,
                    route_p: None,
                    reused,
                    started,
                    prompt_ms: None,
                    notes,
                    weighing: None,
                });
            }
            Err(e) => {
                let _ = job.events.send(Event::Error(e));
            }
        }
    }

    /// A cache for `prompt` that already holds as much of it as a kept cache shares (computed
    /// with the same adapter choice); at least one prompt token is left to run. A kept cache
    /// whose prompt `prompt` contains (the same prompt again, or a conversation going on) is
    /// taken; one that shares only the start of its prompt (a system message) is copied up to
    /// there, so that it stays for a request that repeats its prompt.
    fn cache_for(&mut self, prompt: &[u32], lora: bool) -> Cache {
        self.tick += 1;
        let common = |c: &Cache| {
            if c.lora != lora {
                return 0;
            }
            let n = c
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            n.min(c.kv.len()).min(prompt.len().saturating_sub(1))
        };
        let best = (0..self.free.len())
            .map(|i| (common(&self.free[i]), i))
            .filter(|&(n, _)| n > 0)
            .max();
        let fresh = |engine: &Engine| Cache {
            kv: KvCache::new(&engine.model),
            tokens: Vec::new(),
            lora,
            used: 0,
            prompt_len: 0,
        };
        let mut c = match best {
            Some((n, i)) if n + 1 < self.free[i].prompt_len && self.cfg.prompt_cache_bytes > 0 => {
                let kept = &mut self.free[i];
                kept.used = self.tick;
                // Room for the prompt and a short answer before the buffers grow.
                let cap = prompt.len() + 64;
                match kept.kv.prefix_copy(n, cap) {
                    Ok(kv) => Cache {
                        kv,
                        tokens: kept.tokens[..n].to_vec(),
                        lora,
                        used: 0,
                        prompt_len: 0,
                    },
                    Err(e) => {
                        tracing::warn!("could not copy a cached prompt: {e}");
                        fresh(self.engine)
                    }
                }
            }
            Some((n, i)) => {
                let mut c = self.free.swap_remove(i);
                c.kv.truncate(n);
                c.tokens.truncate(n);
                c
            }
            None => fresh(self.engine),
        };
        c.lora = lora;
        c.used = self.tick;
        c.prompt_len = prompt.len();
        c
    }

    /// One step: the oldest waiting prompt runs, then every answer with logits samples its
    /// next token, and the tokens to continue run together in one batch.
    fn step(&mut self) {
        if let Some(i) = self.active.iter().position(|s| !s.pending.is_empty()) {
            if let Err(e) = self.prefill(i) {
                let s = self.active.remove(i);
                self.fail(s, e);
            }
        }
        let ctx = self.engine.model.max_context();
        let tk = &self.engine.tokenizer;
        let mut feed: Vec<(usize, u32)> = Vec::new();
        let mut ended: Vec<(usize, StopReason)> = Vec::new();
        for (i, s) in self.active.iter_mut().enumerate() {
            let Some(logits) = s.logits.take() else {
                continue;
            };
            let room = s.room(ctx);
            let Seq {
                decoder, out, job, ..
            } = s;
            let cancel = job.cancel.clone();
            let r = decoder.step(tk, &logits, &cancel, room, &mut |p| out.piece(p));
            match r {
                Ok(Step::Feed(t)) => feed.push((i, t)),
                Ok(Step::Stop(r)) => ended.push((i, r)),
                Err(e) => {
                    let m = format!("generation failed: {e}");
                    out.send(Event::Error(ApiError::internal(m)));
                    ended.push((i, StopReason::Cancelled));
                    job.cancel.store(true, Ordering::SeqCst);
                }
            }
        }
        if !feed.is_empty() {
            if let Err(e) = self.decode(&feed) {
                tracing::warn!("a batched step failed: {e}");
                for &(i, _) in &feed {
                    let s = &self.active[i];
                    let m = format!("generation failed: {e}");
                    s.out.send(Event::Error(ApiError::internal(m)));
                    s.job.cancel.store(true, Ordering::SeqCst);
                    ended.push((i, StopReason::Cancelled));
                }
            }
        }
        // Highest index first, so the others stay where they are.
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        ended.dedup_by_key(|e| e.0);
        for (i, r) in ended {
            let s = self.active.remove(i);
            if let Some(s) = self.end(s, r) {
                // Routed elsewhere: it runs again from its new prompt.
                self.active.insert(i, s);
            }
        }
    }

    /// Runs the answer's pending tokens into its cache and leaves the logits to sample (or,
    /// in the opening phase, decides the route).
    fn prefill(&mut self, i: usize) -> Result<(), EngineError> {
        let e = self.engine;
        let s = &mut self.active[i];
        let pending = std::mem::take(&mut s.pending);
        let t0 = Instant::now();
        let logits = e.prefill_into(&mut s.cache.kv, &pending, s.cache.lora)?;
        tracing::debug!(
            "prefill of {} tokens after {} reused: {:.1} ms",
            pending.len(),
            s.cache.tokens.len(),
            t0.elapsed().as_secs_f64() * 1000.0
        );
        s.cache.tokens.extend_from_slice(&pending);
        if s.prompt_ms.is_none() {
            s.prompt_ms = Some(s.started.elapsed().as_secs_f64() * 1000.0);
        }
        match s.phase {
            Phase::Opening { about } => Self::route(e, s, logits, about),
            _ => {
                s.logits = Some(logits);
                Ok(())
            }
        }
    }

    /// `Engine::answer_routed` after the adapter's prompt: with the route's opening likely
    /// enough (or a question about the notes) the adapter answers, starting with the opening;
    /// otherwise the base model answers from a fresh cache.
    fn route(e: &Engine, s: &mut Seq, logits: Vec<f32>, about: About) -> Result<(), EngineError> {
        let route = e.route.clone().unwrap_or_default().trim().to_string();
        let ids = e.tokenizer.encode(&route, false)?;
        let ctx = e.model.max_context();
        let fits = !ids.is_empty() && s.prompt.len() + ids.len() < ctx;
        let p = if fits {
            e.opening_probability_after(&mut s.cache.kv, &logits, &ids)?
        } else {
            0.0
        };
        s.route_p = Some(p);
        s.phase = Phase::Plain;
        if fits && p >= e.min_p(about) {
            // The opening is shown as it is; the cache holds all of it but its last token.
            s.cache.tokens.extend_from_slice(&ids[..ids.len() - 1]);
            s.out.piece(&route);
            let mut full = s.prompt.clone();
            full.extend_from_slice(&ids);
            let rest = s.max_tokens.saturating_sub(ids.len());
            s.decoder =
                Decoder::new(&full, &s.params, rest, None).ignoring_eos(s.job.request.ignore_eos);
            s.pending = ids[ids.len() - 1..].to_vec();
            s.opening = Some((route, ids));
        } else {
            s.by_base = true;
            s.cache.kv.clear();
            s.cache.tokens.clear();
            s.cache.lora = false;
            s.decoder = Decoder::new(&s.prompt, &s.params, s.max_tokens, None)
                .ignoring_eos(s.job.request.ignore_eos);
            s.pending = s.prompt.clone();
        }
        Ok(())
    }

    /// One pass of the model for every answer that goes on, its token at its own position.
    fn decode(&mut self, feed: &[(usize, u32)]) -> Result<(), EngineError> {
        let toks: Vec<u32> = feed.iter().map(|f| f.1).collect();
        self.cfg
            .largest_batch
            .fetch_max(toks.len(), Ordering::Relaxed);
        let mut lora = Vec::with_capacity(feed.len());
        let mut caches: Vec<&mut KvCache> = Vec::with_capacity(feed.len());
        let mut next = feed.iter().peekable();
        for (i, s) in self.active.iter_mut().enumerate() {
            if next.peek().is_some_and(|f| f.0 == i) {
                next.next();
                lora.push(s.cache.lora);
                caches.push(&mut s.cache.kv);
            }
        }
        let rows = self
            .engine
            .model
            .forward_batch(&mut caches, &toks, &lora)?
            .to_vec2::<f32>()?;
        for (&(i, t), row) in feed.iter().zip(rows) {
            let s = &mut self.active[i];
            s.cache.tokens.push(t);
            s.logits = Some(row);
        }
        Ok(())
    }

    /// The answer stopped: a refused held opening goes on to the routing decision (returned
    /// to run again); anything else is finished, recorded and answered.
    fn end(&mut self, mut s: Seq, reason: StopReason) -> Option<Seq> {
        let tk = &self.engine.tokenizer;
        let decoder = std::mem::replace(&mut s.decoder, Decoder::new(&[], &s.params, 0, None));
        // A reading that will be weighed is not shown yet.
        let weigh = s.phase == Phase::Checked && s.notes.plain.is_some() && !cancelled(&s);
        let Seq { out, .. } = &mut s;
        let finished = match weigh {
            true => decoder.finish(tk, &mut |_| {}),
            false => decoder.finish(tk, &mut |p| out.piece(p)),
        };
        // What the client saw is `out.shown` (stop sequences cut), not the decoded text.
        let (text, tokens, generated) = match finished {
            Ok(Some(x)) => x,
            Ok(None) if s.phase == Phase::Held && !s.job.cancel.load(Ordering::SeqCst) => {
                // Not the adapter's opening: decide from its probability, after the prompt
                // runs again up to its last token (as the engine's cache reuse does).
                let keep = s.prompt.len() - 1;
                s.cache.kv.truncate(keep);
                s.cache.tokens.truncate(keep);
                s.pending = s.prompt[keep..].to_vec();
                s.phase = Phase::Opening { about: About::No };
                return Some(s);
            }
            Ok(None) if s.phase == Phase::Checked && cancelled(&s) => {
                (String::new(), Vec::new(), 0)
            }
            Ok(None) if s.phase == Phase::Checked && s.cache.lora => {
                // The adapter misread the notes: the base model reads them, from a fresh cache.
                s.by_base = true;
                s.cache.kv.clear();
                s.cache.tokens.clear();
                s.cache.lora = false;
                s.decoder = Decoder::new(&s.prompt, &s.params, s.max_tokens, notes_check(&s.notes))
                    .ignoring_eos(s.job.request.ignore_eos);
                s.pending = s.prompt.clone();
                return Some(s);
            }
            Ok(None) if s.phase == Phase::Checked => {
                // Neither reader found its answer in the notes: they do not hold what was
                // asked, and the request runs again without them.
                let Seq {
                    job,
                    mut cache,
                    started,
                    ..
                } = s;
                cache.kv.clear();
                cache.tokens.clear();
                self.free.push(cache);
                self.admit_with(job, false, started);
                return None;
            }
            Ok(None) => (String::new(), Vec::new(), 0),
            Err(e) => {
                let m = format!("generation failed: {e}");
                s.out.send(Event::Error(ApiError::internal(m)));
                self.release(s);
                return None;
            }
        };
        if weigh {
            // The reading is kept; the adapter now answers the question without the notes.
            let reading = Weighed {
                text,
                tokens,
                generated,
                by_base: s.by_base,
                stop: reason,
                prompt: std::mem::take(&mut s.prompt),
                reused: s.reused,
            };
            return Some(self.weigh(s, reading));
        }
        let (tokens, generated, reason) = match s.weighing.take() {
            Some(reading) => self.choose(&mut s, reading, text, tokens, generated, reason),
            None => (tokens, generated, reason),
        };
        let rest = s.out.filter.finish();
        if !rest.is_empty() {
            s.out.shown.push_str(&rest);
            s.out.send(Event::Text(rest));
        }
        let prompt_ms = s.prompt_ms.unwrap_or(0.0);
        let total_ms = s.started.elapsed().as_secs_f64() * 1000.0;
        let (mut all_tokens, extra) = match &s.opening {
            Some((_, ids)) => (ids.clone(), ids.len()),
            None => (Vec::new(), 0),
        };
        all_tokens.extend(tokens);
        let g = Generation {
            text: std::mem::take(&mut s.out.shown),
            tokens: all_tokens,
            by_base: s.by_base,
            route_p: s.route_p,
            prompt_tokens: s.prompt.len(),
            reused_tokens: s.reused,
            completion_tokens: generated + extra,
            prompt_ms,
            generate_ms: (total_ms - prompt_ms).max(0.0),
            stop: reason,
        };
        let turn = Recorded {
            kind: "serve",
            session: None,
            prompt: &s.job.request.prompt_record,
            model: &self.cfg.choice.name,
            adapter: self.adapter.clone(),
        };
        let exchange_id = match assistant::record(self.store, &turn, &g, self.engine, &s.params) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::error!("could not record the exchange: {e:#}");
                None
            }
        };
        let notes = std::mem::take(&mut s.notes);
        let mut answered = assistant::Answered {
            generation: g,
            about: notes.about,
            cited: notes.found,
            held_back: notes.held_back,
            claim: None,
        };
        let attached = self.adapter.is_some();
        // The claims check, where the answer came from, candidate notes from the user's words.
        let candidates = match exchange_id {
            Some(id) => assistant::after_answer(
                self.store,
                &mut answered,
                id,
                attached,
                self.engine.route.as_deref(),
                notes.question.as_deref().map(|q| (q, "serve", None)),
            )
            .unwrap_or_else(|e| {
                tracing::error!("could not check or record the answer's notes: {e:#}");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let hone = assistant::turn_json(&answered, exchange_id, attached, &candidates);
        let g = answered.generation;
        s.out.send(Event::Done(Done {
            text: g.text,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.completion_tokens,
            finish_reason: finish_reason(g.stop, s.out.stopped),
            hone,
        }));
        self.release(s);
        None
    }

    /// Sets `s` to answer its question without the notes, with the adapter and its opening (as
    /// `Engine::answer_routed` answers a question about a learned note), shown to nobody; the
    /// reading waits in `s.weighing`. The reading's cache is kept for the prompt cache.
    fn weigh(&mut self, mut s: Seq, reading: Weighed) -> Seq {
        let plain = s.notes.plain.take().unwrap_or_default();
        let old = std::mem::replace(&mut s.cache, self.cache_for(&plain, true));
        self.keep(old);
        s.reused = s.cache.tokens.len();
        s.pending = plain[s.reused..].to_vec();
        s.decoder = Decoder::new(&plain, &s.params, s.max_tokens, None)
            .ignoring_eos(s.job.request.ignore_eos);
        s.prompt = plain;
        s.phase = Phase::Opening { about: About::Rare };
        s.by_base = false;
        s.route_p = None;
        s.opening = None;
        s.out.silent = true;
        s.weighing = Some(reading);
        s
    }

    /// The weights have answered (`text`, `tokens`, `generated`): shows the better of their
    /// answer and the waiting reading (`assistant::weights_answer_better`, and every number in
    /// it in the notes or the question, as `assistant::answer_with_notes` chooses) and leaves
    /// `s` describing the one shown. Returns its tokens, count and stop reason.
    fn choose(
        &self,
        s: &mut Seq,
        reading: Weighed,
        text: String,
        tokens: Vec<u32>,
        generated: usize,
        reason: StopReason,
    ) -> (Vec<u32>, usize, StopReason) {
        let weights = match &s.opening {
            Some((route, _)) => format!("{route}{text}"),
            None => text,
        };
        let question = s.notes.question.as_deref().unwrap_or_default();
        let mut sources: Vec<&str> = s.notes.found.iter().map(|m| m.content.as_str()).collect();
        sources.push(question);
        let route = self.engine.route.as_deref();
        let better = assistant::weights_answer_better(
            question,
            &reading.text,
            &weights,
            &s.notes.found,
            route,
        ) && assistant::numbers_supported(&weights, &sources);
        s.out.silent = false;
        if better {
            s.out.piece(&weights);
            return (tokens, generated, reason);
        }
        s.out.piece(&reading.text);
        s.opening = None;
        s.by_base = reading.by_base;
        s.route_p = None;
        s.prompt = reading.prompt;
        s.reused = reading.reused;
        (reading.tokens, reading.generated, reading.stop)
    }

    /// Keeps the answer's cache for a later prompt; the request is over, so background
    /// learning may resume (after its idle time).
    fn release(&mut self, s: Seq) {
        let Seq { job, cache, .. } = s;
        self.keep(cache);
        let Job { presence, .. } = job;
        drop(presence);
    }

    /// Keeps a cache no answer uses any more in the prompt cache, as the most recently used.
    fn keep(&mut self, mut cache: Cache) {
        cache.tokens.truncate(cache.kv.len());
        self.tick += 1;
        cache.used = self.tick;
        self.free.push(cache);
        // One cache per slot is always kept; more while they fit in the prompt cache's bytes.
        // The least recently used go first.
        self.free.sort_by_key(|c| std::cmp::Reverse(c.used));
        let keep = self.cfg.parallel.max(1);
        let mut bytes = 0;
        let mut n = 0;
        for c in &self.free {
            if n >= keep {
                bytes += c.kv.bytes();
                if bytes > self.cfg.prompt_cache_bytes {
                    break;
                }
            }
            n += 1;
        }
        self.free.truncate(n);
    }

    fn fail(&mut self, s: Seq, e: EngineError) {
        tracing::warn!("request failed: {e}");
        s.out.send(Event::Error(ApiError::internal(format!(
            "generation failed: {e}"
        ))));
        self.release(s);
    }

    /// The prompt tokens (with the notes the newest message is about, when retrieval is on),
    /// sampling, answer length and the notes it rests on, or the request's error.
    fn prepare(&self, job: &Job, retrieval: bool, routes: bool) -> Result<Prepared, ApiError> {
        let (cfg, engine, store) = (self.cfg, self.engine, self.store);
        let r = &job.request;
        let o = SamplingOverrides {
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            min_p: r.min_p,
            repeat_penalty: r.repeat_penalty,
            seed: r.seed,
        };
        let params =
            assistant::sampling(&cfg.choice, &o).map_err(|m| ApiError::invalid(m, None))?;
        let mut found = Vec::new();
        let mut plain = None;
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
                // As `hone ask`: the notes the newest message is about go in the prompt (when
                // they leave room for the answer).
                let reserve = r.max_tokens.unwrap_or(self.default_max_tokens);
                assistant::chat_tokens_with_notes(engine, store, &m, retrieval, reserve).and_then(
                    |(tokens, notes)| {
                        // A reading of learned notes is weighed against the adapter's answer
                        // from its weights, to the same messages without the notes.
                        let weighs = engine.route.is_some()
                            && engine.model.adapter().is_some()
                            && assistant::adapter_reads(&notes);
                        if weighs {
                            plain = Some(engine.chat_tokens(&m)?);
                        }
                        found = notes;
                        Ok(tokens)
                    },
                )
            }
            Input::Text(t) => engine.text_tokens(t, false).map_err(anyhow::Error::from),
        }
        .map_err(|e| {
            ApiError::invalid(format!("cannot read the prompt: {e:#}"), Some("messages"))
        })?;
        // As `hone ask`: learned notes found by common words alone are not about a question the
        // adapter would not open with its route; it is answered without them, not routed.
        if let Some(p) = plain
            .as_deref()
            .filter(|_| assistant::about(found.first()) == About::Common)
        {
            let p = engine.route_probability(p).map_err(|e| {
                ApiError::internal(format!("weighing the notes found failed: {e:#}"))
            })?;
            if p.is_some_and(|p| p < engine.about_min_p) {
                return self.prepare(job, false, false);
            }
        }
        let ctx = engine.model.max_context();
        if tokens.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", Some("messages")));
        }
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
        let asked = r.max_tokens.unwrap_or(self.default_max_tokens);
        if asked > ctx {
            return Err(ApiError::invalid(
                format!(
                    "max_tokens is {asked}; the model was loaded with a context of {ctx} tokens"
                ),
                Some("max_tokens"),
            ));
        }
        // Prompt and answer share the context: the answer gets what the prompt leaves.
        let max_tokens = asked.min(ctx - tokens.len());
        // As `hone ask`: a question about a learned note is answered by the adapter from its
        // weights.
        let question = match &r.input {
            Input::Chat(messages) => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.as_str()),
            Input::Text(_) => None,
        };
        let searching =
            |e: anyhow::Error| ApiError::internal(format!("searching the notes failed: {e:#}"));
        let (about, held_back) = match (found.is_empty(), question) {
            (true, Some(q)) if engine.model.adapter().is_some() => {
                // A removed note the adapter still holds is held back, as `hone ask` does.
                match crate::retrieve::forgotten_about(store, q, &engine.tokenizer)
                    .map_err(searching)?
                {
                    Some(gone) => (None, Some(gone.id)),
                    None if routes => (
                        assistant::note_about(store, engine, Some(q)).map_err(searching)?,
                        None,
                    ),
                    None => (None, None),
                }
            }
            _ => (None, None),
        };
        Ok(Prepared {
            prompt: tokens,
            params,
            max_tokens,
            notes: Notes {
                found,
                about,
                held_back,
                question: question.map(str::to_string),
                plain: plain.filter(|_| question.is_some()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::LoadOptions;
    use crate::lora::LoraWeights;
    use tokio::sync::mpsc::UnboundedReceiver;

    /// A tiny model the test writes, a data directory beside it, its store and the engine.
    fn tiny() -> (tempfile::TempDir, std::path::PathBuf, Home, Store, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_model(&path, &crate::tiny::TinySpec::default()).unwrap();
        let home = Home::at(dir.path().join("home"));
        home.ensure().unwrap();
        let store = Store::open(&home.db_path()).unwrap();
        let e = Engine::load("tiny", &path, &LoadOptions::default()).unwrap();
        (dir, path, home, store, e)
    }

    /// The tiny model as the chosen model.
    fn tiny_choice(path: &std::path::Path) -> ModelChoice {
        ModelChoice {
            name: "tiny".into(),
            path: path.to_path_buf(),
            manifest: None,
        }
    }

    /// A one-thread CPU worker's settings.
    fn config(
        home: &Home,
        choice: ModelChoice,
        retrieval: bool,
        parallel: usize,
        prompt_cache_bytes: usize,
    ) -> WorkerConfig {
        WorkerConfig {
            home: home.clone(),
            choice,
            ctx: None,
            backend: Backend::Cpu,
            threads: 1,
            retrieval,
            parallel,
            prompt_cache_bytes,
            largest_batch: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn job(home: &Home, text: &str, max_tokens: usize) -> (Job, UnboundedReceiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let request = Request {
            input: Input::Text(text.into()),
            prompt_record: text.into(),
            model: None,
            temperature: Some(0.0),
            top_p: None,
            top_k: None,
            min_p: None,
            repeat_penalty: None,
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            seed: Some(1),
            stream: false,
            ignore_eos: false,
        };
        let job = Job {
            request,
            cancel: Arc::new(AtomicBool::new(false)),
            events: tx,
            presence: UserRequest::begin(home.root()),
        };
        (job, rx)
    }

    fn done(rx: &mut UnboundedReceiver<Event>) -> Done {
        let mut text = String::new();
        loop {
            match rx.try_recv() {
                Ok(Event::Started) => {}
                Ok(Event::Text(t)) => text.push_str(&t),
                Ok(Event::Done(d)) => {
                    assert_eq!(d.text, text, "the streamed pieces make the answer");
                    return d;
                }
                Ok(Event::Error(e)) => panic!("{e}"),
                Err(e) => panic!("no answer: {e}"),
            }
        }
    }

    /// With an adapter and a route, answers decoded together in slots are routed as
    /// `Engine::answer` routes them one at a time (the held opening kept, refused for the base
    /// model, forced when likely enough), token for token, in batches that mix rows with and
    /// without the adapter.
    #[test]
    fn slots_route_as_the_engine_does() {
        let (_dir, path, home, store, mut e) = tiny();
        let w = Arc::new(
            LoraWeights::random_for_tests(&e.model.cfg, 1)
                .prepare()
                .unwrap(),
        );
        let wc = config(&home, tiny_choice(&path), true, 3, 64 << 20);
        let prompts = ["hello there", "a b c d", "zebra stripes and more"];
        let n = 12;
        // The adapter's own greedy opening of the first prompt: that one keeps the adapter.
        e.attach(Some((w.clone(), None)));
        let o = SamplingOverrides {
            temperature: Some(0.0),
            seed: Some(1),
            ..Default::default()
        };
        let params = assistant::sampling(&wc.choice, &o).unwrap();
        let cancel = AtomicBool::new(false);
        let tokens0 = e.text_tokens(prompts[0], false).unwrap();
        e.reset();
        let adapted = e
            .generate(&tokens0, &params, n, &cancel, &mut |_| {})
            .unwrap();
        let opening: String = adapted.text.chars().take(3).collect();
        let mut kinds = std::collections::BTreeSet::new();
        for (route, min_p) in [
            (opening.clone(), crate::engine::ROUTE_MIN_P),
            ("zebra".to_string(), 0.0),
            ("\u{1}never said".to_string(), crate::engine::ROUTE_MIN_P),
        ] {
            e.attach(Some((w.clone(), Some(route.clone()))));
            e.route_min_p = min_p;
            // One at a time, through the engine.
            let want: Vec<Generation> = prompts
                .iter()
                .map(|p| {
                    let t = e.text_tokens(p, false).unwrap();
                    e.reset();
                    e.answer(&t, &params, n, &cancel, &mut |_| {}).unwrap()
                })
                .collect();
            // Together, in slots.
            let mut slots = Slots {
                cfg: &wc,
                store: &store,
                engine: &e,
                adapter: Some("1".into()),
                default_max_tokens: n,
                active: Vec::new(),
                free: Vec::new(),
                tick: 0,
            };
            let mut rxs = Vec::new();
            for p in prompts {
                let (j, rx) = job(&home, p, n);
                slots.admit(j);
                rxs.push(rx);
            }
            let mut steps = 0;
            while !slots.active.is_empty() {
                slots.step();
                steps += 1;
                assert!(steps < 200, "the slots never finished");
            }
            for ((g, rx), p) in want.iter().zip(&mut rxs).zip(prompts) {
                let d = done(rx);
                assert_eq!(d.text, g.text, "route {route:?}, prompt {p:?}");
                assert_eq!(d.completion_tokens, g.completion_tokens, "{route:?} {p:?}");
                kinds.insert((g.by_base, g.route_p.is_some()));
            }
        }
        // Every way through the routing was taken: kept as held (no probability asked),
        // forced (probability, adapter) and refused (probability, base).
        assert_eq!(
            kinds,
            [(false, false), (false, true), (true, true)]
                .into_iter()
                .collect(),
            "{kinds:?}"
        );
        assert!(wc.largest_batch.load(Ordering::Relaxed) >= 2);
        // Every answer was recorded.
        assert_eq!(store.recent_exchanges(100).unwrap().len(), 9);
    }

    /// A tiny model with one learned note, the worker's configuration with retrieval on, and
    /// greedy sampling with a repeat penalty (it keeps the tiny base model from answering only
    /// line breaks).
    fn learned_note() -> (
        tempfile::TempDir,
        Home,
        Store,
        Engine,
        WorkerConfig,
        SamplingParams,
    ) {
        let (dir, path, home, store, e) = tiny();
        store
            .add_note("the harbour pool locker is by the blue door", None, None)
            .unwrap();
        store
            .conn()
            .execute("UPDATE notes SET learned_at = 'x', learn_attempts = 1", [])
            .unwrap();
        let wc = config(&home, tiny_choice(&path), true, 2, 64 << 20);
        let o = SamplingOverrides {
            temperature: Some(0.0),
            seed: Some(1),
            repeat_penalty: Some(3.0),
            ..Default::default()
        };
        let params = assistant::sampling(&wc.choice, &o).unwrap();
        (dir, home, store, e, wc, params)
    }

    /// Answers `messages` alone in the slots, greedy with a repeat penalty of 3 (as
    /// [`learned_note`]'s sampling), and returns what the client heard.
    fn one_chat(
        wc: &WorkerConfig,
        store: &Store,
        e: &Engine,
        home: &Home,
        messages: &[Message],
        n: usize,
    ) -> Done {
        let mut slots = Slots {
            cfg: wc,
            store,
            engine: e,
            adapter: Some("1".into()),
            default_max_tokens: n,
            active: Vec::new(),
            free: Vec::new(),
            tick: 0,
        };
        let question = messages.last().map_or("", |m| m.content.as_str());
        let (mut j, mut rx) = job(home, question, n);
        j.request.input = Input::Chat(messages.to_vec());
        j.request.repeat_penalty = Some(3.0);
        slots.admit(j);
        let mut steps = 0;
        while !slots.active.is_empty() {
            slots.step();
            steps += 1;
            assert!(steps < 4 * n + 100, "the slots never finished");
        }
        done(&mut rx)
    }

    /// A chat request about a learned note is answered as `hone ask` answers it
    /// (`assistant::answer_with_notes`), token for token: the adapter's reading when the note
    /// holds its numbers, else the base model's (else the request again without the note).
    #[test]
    fn slots_check_readings_of_learned_notes_as_ask_does() {
        let (_dir, home, store, mut e, wc, params) = learned_note();
        let cancel = AtomicBool::new(false);
        let n = 16;
        let mut ways = std::collections::BTreeSet::new();
        let words = "where which what tell say find show give name recall list check".split(' ');
        for (seed, word) in words.enumerate() {
            let question = format!("{word} harbour pool locker");
            let question = question.as_str();
            // Numbers neither the note nor the question holds, for the answers to pick up.
            let system = format!("{} 17 {} 29 {}", seed * 7 + 3, seed * 11 + 5, 41 + seed);
            let messages = vec![Message::system(&system), Message::user(question)];
            let w = Arc::new(
                LoraWeights::random_for_tests(&e.model.cfg, seed as u64)
                    .prepare()
                    .unwrap(),
            );
            e.attach(Some((w, None)));
            // One at a time, as `hone ask` answers.
            let (tokens, found) =
                assistant::chat_tokens_with_notes(&e, &store, &messages, true, n).unwrap();
            assert_eq!(found.len(), 1, "the note is found");
            e.reset();
            let want = match assistant::answer_with_notes(
                &mut e,
                &found,
                question,
                &tokens,
                None,
                &params,
                n,
                &cancel,
                &mut |_| {},
            )
            .unwrap()
            {
                Some(g) => g,
                None => {
                    let plain = e.chat_tokens(&messages).unwrap();
                    e.reset();
                    let mut g = e
                        .generate(&plain, &params, n, &cancel, &mut |_| {})
                        .unwrap();
                    g.route_p = Some(-1.0); // marks the way taken
                    g
                }
            };
            ways.insert((want.by_base, want.route_p.is_some()));
            let d = one_chat(&wc, &store, &e, &home, &messages, n);
            assert_eq!(d.text, want.text, "seed {seed}");
            let cites = d.hone["citations"].as_array().map_or(0, |c| c.len());
            assert_eq!(
                cites,
                usize::from(want.route_p.is_none()),
                "seed {seed}: {}",
                d.hone
            );
        }
        // Kept, and read by the base model. (The tiny base model's chat answers hold no digits,
        // so the third way, the request again without the note, is not reached here; the
        // assistant's `reading_tests` reach it through `answer_with_notes`.)
        assert!(
            ways.contains(&(false, false)) && ways.contains(&(true, false)),
            "{ways:?}"
        );
    }

    /// With a route, a reading of learned notes is weighed against the adapter's answer from its
    /// weights alone, as `hone ask` weighs it (`assistant::answer_with_notes` given the prompt
    /// without the notes), token for token: a note that holds the weights' answer word for word
    /// gives it to them; one that does not leaves the reading; a note found by common words
    /// alone whose route the adapter finds unlikely is not read at all.
    #[test]
    fn slots_weigh_the_weights_answer_as_ask_does() {
        let (_dir, home, store, mut e, wc, params) = learned_note();
        let cancel = AtomicBool::new(false);
        let n = 64;
        let route = "Your notes say:";
        let mut ways = std::collections::BTreeSet::new();
        let words = "where which what tell say find show give name recall list check".split(' ');
        for (seed, word) in words.enumerate() {
            let question = format!("{word} harbour pool locker");
            let question = question.as_str();
            let messages = vec![Message::system("Be brief."), Message::user(question)];
            let w = Arc::new(
                LoraWeights::random_for_tests(&e.model.cfg, 100 + seed as u64)
                    .prepare()
                    .unwrap(),
            );
            e.attach(Some((w, Some(route.to_string()))));
            // The tiny model's vocabulary is too small for rare words, so its note is found by
            // common words alone, and the adapter's probability of its route decides whether the
            // note is about the question: every third time nothing is enough, and the question
            // is answered without the note.
            e.about_min_p = if seed % 3 == 2 { 2.0 } else { 0.0 };
            let plain = e.chat_tokens(&messages).unwrap();
            e.reset();
            let weights = e
                .answer_routed(&plain, &params, n, &cancel, &mut |_| {}, About::Rare)
                .unwrap();
            // Every other note holds the weights' words.
            let note = match (
                seed % 2,
                assistant::after_opening(&weights.text, Some(route)),
            ) {
                (0, Some(said)) => format!("the harbour pool locker. {said}"),
                _ => "the harbour pool locker is by the blue door".to_string(),
            };
            store
                .conn()
                .execute("UPDATE notes SET content = ?1", [&note])
                .unwrap();
            let (tokens, found) =
                assistant::chat_tokens_with_notes(&e, &store, &messages, true, n).unwrap();
            assert_eq!(found.len(), 1, "the note is found");
            e.reset();
            let want = assistant::answer_with_notes(
                &mut e,
                &found,
                question,
                &tokens,
                Some(&plain),
                &params,
                n,
                &cancel,
                &mut |_| {},
            )
            .unwrap();
            let (want, way) = match want {
                Some(g) if g.route_p.is_some() => (g, "weights"),
                Some(g) => (g, "reading"),
                None => {
                    e.reset();
                    let g = e
                        .answer_routed(&plain, &params, n, &cancel, &mut |_| {}, About::No)
                        .unwrap();
                    (g, "without notes")
                }
            };
            ways.insert(way);
            e.reset();
            let d = one_chat(&wc, &store, &e, &home, &messages, n);
            assert_eq!(d.text, want.text, "seed {seed}: {way}");
            assert_eq!(
                d.completion_tokens, want.completion_tokens,
                "seed {seed}: {way}"
            );
            let cites = d.hone["citations"].as_array().map_or(0, |c| c.len());
            assert_eq!(
                cites,
                usize::from(way != "without notes"),
                "seed {seed}: {way}"
            );
        }
        assert_eq!(ways.len(), 3, "{ways:?}");
    }

    /// A prompt seen before starts where its cache left off (the prompt cache), one that shares
    /// only its start with a kept prompt copies that start and leaves the kept one whole, and
    /// the answers are those of a fresh cache.
    #[test]
    fn a_prompt_seen_before_starts_from_the_prompt_cache() {
        let (_dir, path, home, store, mut e) = tiny();
        let prompts = [
            "the same start of a prompt, then one end",
            "the same start of a prompt, then another",
            "the same start of a prompt, then one end",
        ];
        let toks: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| e.text_tokens(p, false).unwrap())
            .collect();
        let shared = toks[0]
            .iter()
            .zip(&toks[1])
            .take_while(|(a, b)| a == b)
            .count();
        assert!(shared > 0 && shared + 1 < toks[0].len(), "{toks:?}");
        let n = 8;
        let o = SamplingOverrides {
            temperature: Some(0.0),
            seed: Some(1),
            ..Default::default()
        };
        let choice = tiny_choice(&path);
        let params = assistant::sampling(&choice, &o).unwrap();
        let cancel = AtomicBool::new(false);
        let want: Vec<String> = toks
            .iter()
            .map(|t| {
                e.reset();
                e.generate(t, &params, n, &cancel, &mut |_| {})
                    .unwrap()
                    .text
            })
            .collect();
        for (budget, third) in [(64usize << 20, toks[0].len() - 1), (0, shared)] {
            let wc = config(&home, choice.clone(), false, 1, budget);
            let mut slots = Slots {
                cfg: &wc,
                store: &store,
                engine: &e,
                adapter: None,
                default_max_tokens: n,
                active: Vec::new(),
                free: Vec::new(),
                tick: 0,
            };
            let mut reused = Vec::new();
            for (p, want) in prompts.iter().zip(&want) {
                let (j, mut rx) = job(&home, p, n);
                slots.admit(j);
                reused.push(slots.active[0].reused);
                while !slots.active.is_empty() {
                    slots.step();
                }
                assert_eq!(&done(&mut rx).text, want, "budget {budget}, prompt {p:?}");
            }
            assert_eq!(reused, [0, shared, third], "budget {budget}");
            if budget == 0 {
                assert_eq!(
                    slots.free.len(),
                    1,
                    "one cache per slot without a prompt cache"
                );
            } else {
                assert_eq!(slots.free.len(), 2, "both prompts kept");
            }
        }
    }
}
