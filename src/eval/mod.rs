//! Knowledge-incorporation evaluation: read a set of notes with questions (the format of
//! `eval/ki-dev.jsonl`) and a retention set, run one pipeline (base, in-context, a learning
//! cycle with chosen strategies, or K cycles in sequence) in the data directory it is given, ask
//! every question greedily, and score an answer correct when it contains an accepted alias
//! (case-insensitive).
//!
//! It must NOT pick the data directory (the caller gives it a fresh one) or print; [`harness`]
//! runs each mode in its own process, [`report`] renders the table the command line prints.

pub mod harness;
pub mod report;

use crate::engine::{Engine, LoadOptions};
use crate::home::Home;
use crate::learn::{self, CycleOutcome, LearnOptions, Progress};
use crate::registry::ModelChoice;
use crate::store::{NewNote, Store};
use crate::template::Message;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    pub q: String,
    pub a: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QaNote {
    pub id: String,
    pub note: String,
    pub questions: Vec<Question>,
}

fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path, what: &str) -> Result<Vec<T>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line).with_context(|| {
                format!("{} line {}: not a {what} object", path.display(), i + 1)
            })?,
        );
    }
    if out.is_empty() {
        bail!("{} has no {what} lines", path.display());
    }
    Ok(out)
}

/// Notes with questions: `{"id", "note", "questions": [{"q", "a": [aliases]}]}` per line.
pub fn read_qa(path: &Path) -> Result<Vec<QaNote>> {
    let v: Vec<QaNote> = read_lines(path, "{\"id\",\"note\",\"questions\"}")?;
    for n in &v {
        if n.note.trim().is_empty() || n.questions.iter().any(|q| q.a.is_empty()) {
            bail!(
                "{}: note {:?} has an empty note or a question without answers",
                path.display(),
                n.id
            );
        }
    }
    Ok(v)
}

/// General questions: `{"id", "q", "a": [aliases]}` per line.
pub fn read_retention(path: &Path) -> Result<Vec<Question>> {
    read_lines(path, "{\"q\",\"a\"}")
}

/// One asked question.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Answered {
    pub q: String,
    pub answer: String,
    pub correct: bool,
    /// The notes retrieval put in the prompt (ids), when it did.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cited: Vec<i64>,
}

/// Asks each question (with its context, if any) greedily and scores it.
pub fn ask_all(
    engine: &mut Engine,
    system: Option<&str>,
    items: &[(&Question, Option<&str>)],
    store: Option<&Store>,
    cancel: &AtomicBool,
) -> Result<Vec<Answered>> {
    ask_all_with(engine, system, items, store, false, cancel)
}

/// [`ask_all`]; with `retrieval`, a question with no context gets the stored notes it is about
/// in the prompt (answered by the base model, citing them), as `hone ask` does.
pub fn ask_all_with(
    engine: &mut Engine,
    system: Option<&str>,
    items: &[(&Question, Option<&str>)],
    store: Option<&Store>,
    retrieval: bool,
    cancel: &AtomicBool,
) -> Result<Vec<Answered>> {
    let mut out = Vec::new();
    for (q, ctx) in items {
        let found = match (store, ctx, retrieval) {
            (Some(s), None, true) => crate::retrieve::relevant(s, &q.q, 3, &engine.tokenizer)?,
            _ => Vec::new(),
        };
        let content = match ctx {
            Some(n) => crate::assistant::notes_prompt(&[n], &q.q),
            None if !found.is_empty() => {
                let notes: Vec<&str> = found.iter().map(|m| m.content.as_str()).collect();
                crate::assistant::notes_prompt(&notes, &q.q)
            }
            None => q.q.clone(),
        };
        let mut msgs: Vec<Message> = system.map(Message::system).into_iter().collect();
        msgs.push(Message::user(&content));
        let toks = engine.chat_tokens(&msgs)?;
        let params = Default::default();
        // As `hone ask` answers: with notes in the prompt, the reader `answer_with_notes`
        // picks; when the notes do not hold the answer (None), as if none were found.
        // The question without notes (the weights' own answer, and the answer when the notes
        // found do not hold what was asked).
        let plain = match found.is_empty() {
            true => toks.clone(),
            false => {
                let mut m: Vec<Message> = system.map(Message::system).into_iter().collect();
                m.push(Message::user(&q.q));
                engine.chat_tokens(&m)?
            }
        };
        let read = match found.is_empty() {
            true => None,
            false => crate::assistant::answer_with_notes(
                engine,
                &found,
                &q.q,
                &toks,
                Some(&plain),
                &params,
                48,
                cancel,
                &mut |_| {},
            )?,
        };
        let (g, found) = match read {
            Some(g) => (g, found),
            None => {
                // A question about a learned note goes to the adapter. With retrieval, nothing
                // found means no note is about the question: no second search.
                // Notes found that do not hold the answer: not routed as a question about them.
                let about = match (store, ctx) {
                    (Some(s), None) if !retrieval && found.is_empty() => {
                        let note = crate::assistant::note_about(s, engine, Some(&q.q))?;
                        crate::assistant::about(note.as_ref())
                    }
                    _ => crate::engine::About::No,
                };
                let g = engine.answer_routed(&plain, &params, 48, cancel, &mut |_| {}, about)?;
                (g, Vec::new())
            }
        };
        let answer = g.text.trim().to_string();
        let correct = q.a.iter().any(|a| learn::contains_answer(&answer, a));
        out.push(Answered {
            q: q.q.clone(),
            answer,
            correct,
            cited: found.iter().map(|m| m.id).collect(),
        });
    }
    Ok(out)
}

/// What a mode runs.
#[derive(Debug, Clone)]
pub enum Pipeline {
    /// The base model, no notes.
    Base,
    /// The base model with the question's note in the prompt.
    InContext,
    /// One learning cycle over all notes.
    Learn(LearnOptions),
    /// The notes stored, not learned; each question answered with the notes retrieval finds.
    Retrieval,
    /// The notes stored, not learned; each question answered with the newest notes that fit
    /// in the prompt (`hone ask --with-notes`), found or not.
    Newest,
    /// One learning cycle, then retrieval: found notes in the prompt, else the adapter's
    /// weights (routed as `learn`).
    Hybrid(LearnOptions),
    /// The notes split into K batches, learned one cycle after another.
    Sequential(LearnOptions, usize),
}

/// One mode's result (a child process prints it as JSON; missing fields read as empty).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ModeResult {
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
    pub retention_after: Option<f64>,
    pub retention_correct: Option<usize>,
    pub train_tokens: u64,
    pub cycle_s: f64,
    pub wall_s: f64,
    pub peak_rss_mb: f64,
    pub gate: Option<String>,
    /// The learning cycle's steps (planned, trained) and where its time went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<(usize, usize)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<learn::PhaseTimes>,
    pub answers: Vec<Answered>,
    pub retention_answers: Vec<Answered>,
    /// Sequential: per batch, accuracy right after its own cycle and after the last.
    pub batches: Vec<BatchResult>,
    /// When answers were routed (see `Engine::answer`): the same questions answered by the
    /// adapter alone, to show what routing kept.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unrouted_answers: Vec<Answered>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unrouted_retention_answers: Vec<Answered>,
    /// Hybrid: the same questions answered by the weights alone after the same cycle (retrieval
    /// off, routed as `learn`), so one cycle measures both and their difference is retrieval's.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub weights_answers: Vec<Answered>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BatchResult {
    pub notes: usize,
    pub questions: usize,
    pub after_own: f64,
    pub after_last: f64,
}

fn frac(a: &[Answered]) -> f64 {
    if a.is_empty() {
        0.0
    } else {
        a.iter().filter(|x| x.correct).count() as f64 / a.len() as f64
    }
}

fn load_with_active(home: &Home, store: &Store, choice: &ModelChoice) -> Result<Engine> {
    let mut engine = Engine::load(
        &choice.name,
        &choice.path,
        &LoadOptions {
            ctx: 1024,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading model {}", choice.name))?;
    // As `hone ask` attaches it: with its route, falling back from a damaged file.
    let (_, warning) = crate::assistant::attach_active_adapter(home, store, choice, &mut engine)?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(engine)
}

fn import(store: &mut Store, notes: &[&QaNote]) -> Result<()> {
    let items: Vec<NewNote> = notes
        .iter()
        .map(|n| NewNote {
            content: n.note.trim().to_string(),
            source: Some(format!("eval:{}", n.id)),
            section: None,
        })
        .collect();
    store.add_notes(&items)?;
    Ok(())
}

/// Runs one pipeline in `home` (which should be fresh, or with `answer_only` a copy of a kept
/// learn or hybrid run, whose notes are not learned again) and scores it.
#[allow(clippy::too_many_arguments)]
pub fn run(
    home: &Home,
    choice: &ModelChoice,
    pipeline: &Pipeline,
    qa: &[QaNote],
    retention: Option<&[Question]>,
    answer_only: bool,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ModeResult> {
    let t0 = Instant::now();
    home.ensure()?;
    let mut store = Store::open(&home.db_path())?;
    let system = choice.chat_defaults().system;
    let sys = system.as_deref();
    let mut r = ModeResult::default();
    let all_q = |notes: &[&QaNote], ctx: bool| -> Vec<(Question, Option<String>)> {
        notes
            .iter()
            .flat_map(|n| {
                n.questions
                    .iter()
                    .map(move |q| (q.clone(), ctx.then(|| n.note.clone())))
            })
            .collect()
    };
    let retrieval = matches!(pipeline, Pipeline::Retrieval | Pipeline::Hybrid(_));
    let ask = |engine: &mut Engine, store: &Store, qs: &[(Question, Option<String>)]| {
        let v: Vec<(&Question, Option<&str>)> = qs.iter().map(|(q, c)| (q, c.as_deref())).collect();
        ask_all_with(engine, sys, &v, Some(store), retrieval, cancel)
    };
    let notes: Vec<&QaNote> = qa.iter().collect();
    match pipeline {
        Pipeline::Base | Pipeline::InContext => {
            let mut engine = load_with_active(home, &store, choice)?;
            r.answers = ask(
                &mut engine,
                &store,
                &all_q(&notes, matches!(pipeline, Pipeline::InContext)),
            )?;
        }
        Pipeline::Retrieval => {
            import(&mut store, &notes)?;
            let mut engine = load_with_active(home, &store, choice)?;
            r.answers = ask(&mut engine, &store, &all_q(&notes, false))?;
        }
        Pipeline::Newest => {
            import(&mut store, &notes)?;
            let mut engine = load_with_active(home, &store, choice)?;
            let system = sys.map(Message::system);
            for (q, _) in all_q(&notes, false) {
                let content = crate::assistant::with_recent_notes(
                    &engine,
                    &store,
                    system.as_ref(),
                    &q.q,
                    48,
                )?;
                let mut msgs: Vec<Message> = system.clone().into_iter().collect();
                msgs.push(Message::user(&content));
                let toks = engine.chat_tokens(&msgs)?;
                let g = crate::assistant::answer_base(
                    &mut engine,
                    &toks,
                    &Default::default(),
                    48,
                    cancel,
                    &mut |_| {},
                )?;
                let answer = g.text.trim().to_string();
                let correct = q.a.iter().any(|a| learn::contains_answer(&answer, a));
                r.answers.push(Answered {
                    q: q.q.clone(),
                    answer,
                    correct,
                    cited: Vec::new(),
                });
            }
        }
        Pipeline::Learn(opts) | Pipeline::Hybrid(opts) => {
            // With `answer_only`, `home` is a copy of a kept learn or hybrid run: its notes are
            // learned already.
            if !answer_only {
                import(&mut store, &notes)?;
                let mut o = opts.clone();
                o.max_notes = notes.len();
                let tc = Instant::now();
                match learn::run_cycle(home, &mut store, choice, &o, cancel, progress)? {
                    CycleOutcome::Done {
                        train_tokens,
                        reason,
                        gate,
                        ..
                    } => {
                        r.train_tokens = train_tokens;
                        r.gate = Some(reason);
                        r.steps = Some((gate.steps_planned, gate.steps_trained));
                        r.phases = gate.phases;
                    }
                    other => bail!("the learning cycle did not finish: {other:?}"),
                }
                r.cycle_s = tc.elapsed().as_secs_f64();
            }
            let mut engine = load_with_active(home, &store, choice)?;
            r.answers = ask(&mut engine, &store, &all_q(&notes, false))?;
            if retrieval {
                let qs = all_q(&notes, false);
                let v: Vec<(&Question, Option<&str>)> =
                    qs.iter().map(|(q, c)| (q, c.as_deref())).collect();
                r.weights_answers =
                    ask_all_with(&mut engine, sys, &v, Some(&store), false, cancel)?;
            }
        }
        Pipeline::Sequential(opts, k) => {
            let k = (*k).clamp(1, notes.len());
            let per = notes.len().div_ceil(k);
            let batches: Vec<Vec<&QaNote>> = notes.chunks(per).map(|c| c.to_vec()).collect();
            let mut gates = Vec::new();
            for b in &batches {
                import(&mut store, b)?;
                let mut o = opts.clone();
                o.max_notes = b.len();
                let tc = Instant::now();
                match learn::run_cycle(home, &mut store, choice, &o, cancel, progress)? {
                    CycleOutcome::Done {
                        train_tokens,
                        reason,
                        ..
                    } => {
                        r.train_tokens += train_tokens;
                        gates.push(reason);
                    }
                    other => bail!("a learning cycle did not finish: {other:?}"),
                }
                r.cycle_s += tc.elapsed().as_secs_f64();
                let mut engine = load_with_active(home, &store, choice)?;
                let a = ask(&mut engine, &store, &all_q(b, false))?;
                r.batches.push(BatchResult {
                    notes: b.len(),
                    questions: a.len(),
                    after_own: frac(&a),
                    after_last: 0.0,
                });
            }
            let mut engine = load_with_active(home, &store, choice)?;
            for (i, b) in batches.iter().enumerate() {
                let a = ask(&mut engine, &store, &all_q(b, false))?;
                r.batches[i].after_last = frac(&a);
                r.answers.extend(a);
            }
            r.gate = Some(gates.join(" | "));
        }
    }
    if let Some(ret) = retention {
        let mut engine = load_with_active(home, &store, choice)?;
        let qs: Vec<(&Question, Option<&str>)> = ret.iter().map(|q| (q, None)).collect();
        r.retention_answers = ask_all_with(&mut engine, sys, &qs, Some(&store), retrieval, cancel)?;
        r.retention_correct = Some(r.retention_answers.iter().filter(|a| a.correct).count());
        r.retention_after = Some(frac(&r.retention_answers));
        if engine.route.take().is_some() {
            r.unrouted_retention_answers = ask_all(&mut engine, sys, &qs, None, cancel)?;
            r.unrouted_answers = ask(&mut engine, &store, &all_q(&notes, false))?;
        }
    }
    r.correct = r.answers.iter().filter(|a| a.correct).count();
    r.total = r.answers.len();
    r.accuracy = frac(&r.answers);
    r.wall_s = t0.elapsed().as_secs_f64();
    r.peak_rss_mb = crate::sys::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0;
    Ok(r)
}
