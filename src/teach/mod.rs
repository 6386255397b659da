//! SEAL's outer loop on the device: the self-edit writer learns which training data to write,
//! rewarded by how well the student answers afterwards (ReST-EM: sample, filter by reward,
//! fine-tune).
//!
//! One round ([`train`]): for each training note, sample K self-edits from the writer
//! (`learn::writer`); for each, a small inner update from the base model on the note plus the
//! self-edit and its reward on the note's held-out questions, minus the same for a
//! passage-only update of the same steps (`reward`); keep the best sample when it beats the
//! passage; then fine-tune the writer's adapter on (note → kept self-edit) and save it as a new
//! writer version. A slice of the notes never trains the writer: the mean reward of the
//! writer's samples there, measured before the first round and after each, says whether the
//! writer is getting better on notes it never saw. With a teacher, the teacher writes and is
//! the one trained; the student is the one updated and asked.
//!
//! Every sample, score and decision is stored (`records`), a note at a time, so a round
//! stopped by the cancel flag (or killed) continues after the last finished note.
//!
//! It must NOT answer the user or touch the answering adapters; it prints nothing (progress
//! goes to the caller's callback).

pub mod records;
pub mod report;
pub mod reward;

use crate::adapters::{self, Kind, ModelId};
use crate::engine::{Engine, LoadOptions};
use crate::eval::{QaNote, Question};
use crate::home::Home;
use crate::learn::contains_answer;
use crate::learn::selfedit::{self, Candidate};
use crate::learn::writer::{self, Writer, WriterChoice};
use crate::lora::{LoraConfig, Target};
use crate::registry::ModelChoice;
use crate::store::Store;
use crate::train::data::Example;
use crate::train::job::{BadCheckpoint, JobSpec, TrainJob};
use crate::train::optim::Decay;
use crate::train::plan::PlanRequest;
use crate::train::{AdamWParamsCfg, Outcome, TrainConfig};
use anyhow::{bail, Context, Result};
use records::Sample;
use reward::{Inner, Score};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What `hone writer train` may do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeachOptions {
    /// Training rounds to run in this call.
    pub rounds: usize,
    /// Self-edits sampled per note.
    pub samples: usize,
    /// Training notes per round (None: all of them); later rounds take the next ones.
    pub notes_per_round: Option<usize>,
    /// Notes set aside (never trained on) to measure the writer between rounds.
    pub holdout: usize,
    pub temperature: f32,
    pub inner: Inner,
    /// The writer adapter's rank, learning rate and passes over a round's kept self-edits.
    pub writer_rank: usize,
    pub writer_lr: f64,
    pub writer_epochs: usize,
    /// The writer that starts when the model has no writer version yet.
    pub start: WriterChoice,
    pub max_memory: Option<u64>,
    pub seed: u64,
    /// The teacher's name, when a teacher writes (for the record).
    pub teacher_name: Option<String>,
    /// What rewards a sample: the note's questions, or its rule-made probes (all that a user's
    /// own note has).
    pub reward_on: RewardOn,
}

/// Which questions reward a self-edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardOn {
    Questions,
    Probes,
}

impl Default for TeachOptions {
    fn default() -> Self {
        Self {
            rounds: 1,
            samples: 4,
            notes_per_round: Some(40),
            holdout: 10,
            temperature: 0.9,
            inner: Inner::default(),
            writer_rank: 16,
            writer_lr: 1e-3,
            writer_epochs: 4,
            start: WriterChoice::Active,
            max_memory: None,
            seed: 0,
            teacher_name: None,
            reward_on: RewardOn::Questions,
        }
    }
}

/// One round's figures (round 0: the writer before any round of this run, measured only).
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: usize,
    pub id: i64,
    /// Mean reward of the chosen samples' notes over all samples (training notes).
    pub mean_reward: Option<f64>,
    /// Mean reward of the writer's samples on the held-out slice, after this round.
    pub holdout_reward: Option<f64>,
    pub kept: usize,
    pub notes: usize,
    pub wall_s: f64,
    pub writer: Option<i64>,
    /// Spearman correlation of the probe reward with the question reward over the round's
    /// samples.
    pub probe_agreement: Option<f64>,
}

/// What a call did.
#[derive(Debug, Clone, Serialize)]
pub struct TeachOutcome {
    pub rounds: Vec<RoundReport>,
    /// The writer in use at the end ("w<N>", "shipped" or "none").
    pub writer: String,
    pub interrupted: bool,
    /// Notes left out, with why.
    pub skipped: Vec<(String, String)>,
}

/// A progress report.
#[derive(Debug, Clone)]
pub struct Progress {
    pub round: usize,
    /// `holdout`, `samples` or `writer`.
    pub phase: &'static str,
    pub done: usize,
    pub total: usize,
    pub message: String,
}

/// The notes to train the writer on and how the records name them: a questions file (its path
/// and the start of its sha256), or the user's own notes (rewarded by their probes).
pub fn notes_from(store: &Store, qa: Option<&std::path::Path>) -> Result<(Vec<QaNote>, String)> {
    match qa {
        Some(path) => Ok((
            crate::eval::read_qa(path)?,
            format!(
                "{} (sha256 {})",
                path.display(),
                &crate::digest::sha256_file(path)?[..12]
            ),
        )),
        None => Ok((own_notes(store)?, "your notes".to_string())),
    }
}

/// The rule-made held-out probes of a note, as questions (the reward on a user's own notes).
pub fn probes(note: &str) -> Vec<Question> {
    crate::learn::rules::cloze_items(note, 8)
        .into_iter()
        .filter(|it| it.probe)
        .map(|it| Question {
            q: it.prompt,
            a: vec![it.completion],
        })
        .collect()
}

/// A user's own notes as notes to train the writer on: their questions are their probes.
pub fn own_notes(store: &Store) -> Result<Vec<QaNote>> {
    Ok(store
        .list_notes(None)?
        .into_iter()
        .map(|n| QaNote {
            id: format!("note-{}", n.id),
            questions: probes(&n.content),
            note: n.content,
        })
        .filter(|n| !n.questions.is_empty())
        .collect())
}

/// The notes a round can use: each needs at least one question the note answers, either
/// stating an accepted answer or sharing at least two content words with the question (an
/// answer the note implies, such as a year worked out from it). A note with none is skipped.
pub fn usable<'a>(notes: &[&'a QaNote]) -> (Vec<&'a QaNote>, Vec<(String, String)>) {
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    for n in notes {
        let words: HashSet<String> = selfedit::content_words(&n.note).into_iter().collect();
        let answered = n.questions.iter().any(|q| {
            q.a.iter().any(|a| contains_answer(&n.note, a))
                || selfedit::content_words(&q.q)
                    .iter()
                    .filter(|w| words.contains(*w))
                    .count()
                    >= 2
        });
        if answered {
            ok.push(*n);
        } else {
            skipped.push((
                n.id.clone(),
                "none of its questions is answered in the note".to_string(),
            ));
        }
    }
    (ok, skipped)
}

fn stable(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]))
}

/// Splits the notes into the held-out slice and the training notes, the same way every time.
pub fn split<'a>(notes: &[&'a QaNote], holdout: usize) -> (Vec<&'a QaNote>, Vec<&'a QaNote>) {
    let mut v: Vec<&QaNote> = notes.to_vec();
    v.sort_by_key(|n| stable(&["holdout", &n.id]));
    let k = holdout.min(v.len().saturating_sub(1));
    let train = v.split_off(k);
    (v, train)
}

/// The models of a run: the student (updated and asked) and the writer's engine (the student
/// itself, or the teacher).
struct Models {
    student: Engine,
    student_id: ModelId,
    student_system: Option<String>,
    teacher: Option<(Engine, ModelId, Option<String>)>,
}

impl Models {
    fn writer_id(&self) -> &ModelId {
        self.teacher.as_ref().map_or(&self.student_id, |t| &t.1)
    }
}

fn load_engine(choice: &ModelChoice) -> Result<Engine> {
    let opts = LoadOptions {
        ctx: 1024,
        ..LoadOptions::default()
    };
    Engine::load(&choice.name, &choice.path, &opts)
        .with_context(|| format!("loading model {}", choice.name))
}

/// Refuses a teacher that would not fit the memory budget, before loading it.
fn check_teacher_fits(
    student: &ModelChoice,
    teacher: &ModelChoice,
    budget: Option<u64>,
) -> Result<()> {
    let Some(budget) = budget else {
        return Ok(());
    };
    let size = |c: &ModelChoice| std::fs::metadata(&c.path).map(|m| m.len()).unwrap_or(0);
    // Both models mapped, their caches and a training run of the writer (measured: ~300 MiB for
    // the 135M model's rank-16 run beside the weights).
    let need = size(student) + size(teacher) + (400 << 20);
    if need > budget {
        bail!(
            "the teacher {} does not fit the memory budget: the student, the teacher and a writer run need about {}, the budget is {}; a budget of at least {} fits, or write with the student alone (no --teacher)",
            teacher.name,
            crate::units::format_bytes(need),
            crate::units::format_bytes(budget),
            crate::units::format_bytes(need)
        );
    }
    Ok(())
}

/// Runs `opts.rounds` rounds of writer training on `notes` (from `source`, named in the
/// records), continuing an interrupted round first.
#[allow(clippy::too_many_arguments)]
pub fn train(
    home: &Home,
    store: &mut Store,
    student: &ModelChoice,
    teacher: Option<&ModelChoice>,
    notes: &[QaNote],
    source: &str,
    opts: &TeachOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TeachOutcome> {
    if let Some(t) = teacher {
        check_teacher_fits(student, t, opts.max_memory)?;
    }
    // Split first, then drop unusable notes on each side: the held-out slice stays the same
    // notes whatever the usability rule says about others.
    let all: Vec<&QaNote> = notes.iter().collect();
    let (holdout, train_notes) = split(&all, opts.holdout);
    let (holdout, mut skipped) = usable(&holdout);
    let (train_notes, skipped_train) = usable(&train_notes);
    skipped.extend(skipped_train);
    if train_notes.is_empty() {
        bail!("{source}: no training note has a question answered in the note; a writer cannot be trained on it");
    }
    let engine = load_engine(student)?;
    let student_id = adapters::model_id(store, student, &engine.model.cfg.arch_name)?;
    let mut m = Models {
        student: engine,
        student_id,
        student_system: student.chat_defaults().system,
        teacher: None,
    };
    if let Some(t) = teacher {
        let e = load_engine(t)?;
        let id = adapters::model_id(store, t, &e.model.cfg.arch_name)?;
        m.teacher = Some((e, id, t.chat_defaults().system));
    }
    let writer_sha = m.writer_id().sha256.clone();
    let options_json = serde_json::to_string(opts)?;
    let mut out = TeachOutcome {
        rounds: Vec::new(),
        writer: String::new(),
        interrupted: false,
        skipped,
    };
    let mut history = records::rounds(store, &writer_sha)?;
    // Round 0: the writer as it starts, on the held-out notes (once per model).
    if !holdout.is_empty() && !history.iter().any(|r| r.finished_at.is_some()) {
        let w = current_writer(home, store, &m, opts)?;
        let r0 = match records::unfinished(store, &writer_sha)? {
            Some(r) if r.status == "measured" => r,
            _ => records::start(
                store,
                &m.writer_id().name,
                &writer_sha,
                source,
                &options_json,
                "measured",
                w.version,
            )?,
        };
        let t0 = Instant::now();
        let Some(h) = measure(
            store, &mut m, &w, &holdout, opts, r0.id, 0, cancel, progress,
        )?
        else {
            records::add_wall(store, r0.id, t0.elapsed().as_secs_f64())?;
            out.interrupted = true;
            out.writer = w.label;
            return Ok(out);
        };
        records::add_wall(store, r0.id, t0.elapsed().as_secs_f64())?;
        let wall = records::get(store, r0.id)?
            .and_then(|r| r.wall_s)
            .unwrap_or(0.0);
        records::finish(store, r0.id, w.version, 0, 0, None, Some(h), None, wall)?;
        out.rounds.push(RoundReport {
            round: 0,
            id: r0.id,
            mean_reward: None,
            holdout_reward: Some(h),
            kept: 0,
            notes: 0,
            wall_s: wall,
            writer: w.version,
            probe_agreement: None,
        });
        history = records::rounds(store, &writer_sha)?;
    }
    let mut done_rounds = history
        .iter()
        .filter(|r| r.status == "done" && r.notes > 0)
        .count();
    for _ in 0..opts.rounds {
        let number = done_rounds + 1;
        let w = current_writer(home, store, &m, opts)?;
        let round = match records::unfinished(store, &writer_sha)? {
            Some(r) if r.status != "measured" => r,
            _ => records::start(
                store,
                &m.writer_id().name,
                &writer_sha,
                source,
                &options_json,
                "samples",
                w.version,
            )?,
        };
        let chosen_notes = round_notes(&train_notes, opts.notes_per_round, number);
        let t0 = Instant::now();
        let report = run_round(
            home,
            store,
            &mut m,
            &w,
            &chosen_notes,
            &holdout,
            opts,
            round.id,
            number,
            cancel,
            progress,
        );
        records::add_wall(store, round.id, t0.elapsed().as_secs_f64())?;
        match report? {
            Some(r) => {
                out.rounds.push(r);
                done_rounds += 1;
            }
            None => {
                out.interrupted = true;
                break;
            }
        }
    }
    out.writer = current_writer(home, store, &m, opts)?.label;
    Ok(out)
}

/// The training notes of round `number` (1-based): the next `per_round` after the previous
/// rounds', wrapping around.
fn round_notes<'a>(
    train: &[&'a QaNote],
    per_round: Option<usize>,
    number: usize,
) -> Vec<&'a QaNote> {
    let n = per_round.unwrap_or(train.len()).min(train.len()).max(1);
    let start = ((number - 1) * n) % train.len().max(1);
    (0..n).map(|i| train[(start + i) % train.len()]).collect()
}

/// The writer the next round samples from.
fn current_writer(home: &Home, store: &Store, m: &Models, opts: &TeachOptions) -> Result<Writer> {
    let (engine, id) = match &m.teacher {
        Some((e, id, _)) => (e, id),
        None => (&m.student, &m.student_id),
    };
    let choice = match store.active_writer(&id.sha256)? {
        Some(_) => WriterChoice::Active,
        None => opts.start.clone(),
    };
    writer::load(home, store, id, &engine.model.cfg, &choice)
}

/// One training round: samples and rewards per note, then the writer's fine-tune and the
/// held-out measure. None when cancelled.
#[allow(clippy::too_many_arguments)]
fn run_round(
    home: &Home,
    store: &mut Store,
    m: &mut Models,
    w: &Writer,
    notes: &[&QaNote],
    holdout: &[&QaNote],
    opts: &TeachOptions,
    round: i64,
    number: usize,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Option<RoundReport>> {
    if !sample_all(
        store, m, w, notes, opts, round, number, "train", cancel, progress,
    )? {
        return Ok(None);
    }
    if cancel.load(Ordering::Relaxed) {
        return Ok(None);
    }
    records::set_status(store, round, "training")?;
    let all = records::samples(store, round)?;
    let train_rows: Vec<&Sample> = all.iter().filter(|s| s.role == "train").collect();
    let rewards: Vec<f64> = train_rows.iter().filter_map(|s| s.reward).collect();
    let (q, p): (Vec<f64>, Vec<f64>) = train_rows
        .iter()
        .filter_map(|s| Some((s.reward?, s.probe_reward?)))
        .unzip();
    let probe_agreement = reward::spearman(&q, &p);
    let mean_reward =
        (!rewards.is_empty()).then(|| rewards.iter().sum::<f64>() / rewards.len() as f64);
    let kept: Vec<(&QaNote, String)> = train_rows
        .iter()
        .filter(|s| s.chosen)
        .filter_map(|s| {
            let n = notes.iter().find(|n| n.id == s.note_key)?;
            Some((*n, kept_text(&n.note, &s.text)))
        })
        .collect();
    progress(&Progress {
        round: number,
        phase: "writer",
        done: 0,
        total: 1,
        message: format!("training the writer on {} kept self-edits", kept.len()),
    });
    let version = if kept.is_empty() {
        w.version
    } else if let Some(v) = round_writer(store, m.writer_id(), round)? {
        // Saved before an interruption: the round only has its measure left.
        Some(v)
    } else {
        match train_writer(home, store, m, false, w, &kept, opts, round, cancel)? {
            Some(v) => Some(v),
            None => return Ok(None),
        }
    };
    // With a teacher, the student's own writer learns the teacher's kept self-edits, so that
    // the default model writes them on its own later (no teacher needed to learn notes).
    if m.teacher.is_some()
        && !kept.is_empty()
        && round_writer(store, &m.student_id, round)?.is_none()
    {
        let parent = writer::load(
            home,
            store,
            &m.student_id,
            &m.student.model.cfg,
            &WriterChoice::Active,
        )?;
        if train_writer(home, store, m, true, &parent, &kept, opts, round, cancel)?.is_none() {
            return Ok(None);
        }
    }
    let after = if kept.is_empty() {
        w.clone()
    } else {
        current_writer(home, store, m, opts)?
    };
    let holdout_reward = if holdout.is_empty() {
        None
    } else {
        match measure(
            store, m, &after, holdout, opts, round, number, cancel, progress,
        )? {
            Some(h) => Some(h),
            None => return Ok(None),
        }
    };
    let wall = records::get(store, round)?
        .and_then(|r| r.wall_s)
        .unwrap_or(0.0);
    records::finish(
        store,
        round,
        version,
        notes.len(),
        kept.len(),
        mean_reward,
        holdout_reward,
        probe_agreement,
        wall,
    )?;
    Ok(Some(RoundReport {
        round: number,
        id: round,
        mean_reward,
        holdout_reward,
        kept: kept.len(),
        notes: notes.len(),
        wall_s: wall,
        writer: version,
        probe_agreement,
    }))
}

/// The writer version of `model` that round `round` already saved, if any (a resumed round
/// does not train it twice).
fn round_writer(store: &Store, model: &ModelId, round: i64) -> Result<Option<i64>> {
    let tag = format!("writer round {round}:");
    Ok(writer::versions(store, &model.sha256)?
        .iter()
        .find(|r| r.data.as_deref().is_some_and(|d| d.starts_with(&tag)))
        .map(|r| r.version))
}

/// The kept items of a stored raw self-edit, as the canonical text the writer learns.
fn kept_text(note: &str, raw: &str) -> String {
    let mut seen = HashSet::new();
    let c = writer::items(note, raw, false, &mut seen);
    let kept: Vec<&Candidate> = c.iter().filter(|c| c.dropped.is_none()).collect();
    writer::render(&kept)
}

/// Marks the best sample (by the reward `on`) when it beats the passage-only update.
fn choose(samples: &mut [Sample], on: RewardOn) {
    let best = samples
        .iter()
        .enumerate()
        .filter(|(_, s)| s.role == "train" || s.role == "holdout")
        .filter_map(|(i, s)| {
            match on {
                RewardOn::Questions => s.reward,
                RewardOn::Probes => s.probe_reward,
            }
            .map(|r| (i, r))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((i, r)) = best {
        if r > 0.0 {
            samples[i].chosen = true;
        } else {
            samples[i].reason = Some("best sample, but no better than the passage alone".into());
        }
    }
}

/// Samples and scores every note of `notes` that `round` has not stored yet as `role` (`train`:
/// the best sample is chosen; `holdout`: only measured), a note per transaction. False when
/// cancelled.
#[allow(clippy::too_many_arguments)]
fn sample_all(
    store: &mut Store,
    m: &mut Models,
    w: &Writer,
    notes: &[&QaNote],
    opts: &TeachOptions,
    round: i64,
    number: usize,
    role: &str,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<bool> {
    let holdout = role == "holdout";
    let baseline = if holdout {
        "holdout-baseline"
    } else {
        "baseline"
    };
    for (i, n) in notes.iter().enumerate() {
        if records::note_done(store, round, &n.id, baseline)? {
            continue;
        }
        progress(&Progress {
            round: number,
            phase: if holdout { "holdout" } else { "samples" },
            done: i,
            total: notes.len(),
            message: format!(
                "{}note {} ({}/{})",
                if holdout { "held-out " } else { "" },
                n.id,
                i + 1,
                notes.len()
            ),
        });
        let Some(mut samples) = sample_note(m, w, n, opts, round, role, cancel)? else {
            return Ok(false);
        };
        if !holdout {
            choose(&mut samples, opts.reward_on);
        }
        records::add_samples(store, round, &samples)?;
    }
    Ok(!cancel.load(Ordering::Relaxed))
}

/// The held-out slice's mean reward for writer `w` (stored as `holdout` rows of `round`).
#[allow(clippy::too_many_arguments)]
fn measure(
    store: &mut Store,
    m: &mut Models,
    w: &Writer,
    holdout: &[&QaNote],
    opts: &TeachOptions,
    round: i64,
    number: usize,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Option<f64>> {
    if !sample_all(
        store, m, w, holdout, opts, round, number, "holdout", cancel, progress,
    )? {
        return Ok(None);
    }
    let rows = records::samples(store, round)?;
    // A sample with no usable item counts as the passage alone: reward 0. Only this slice's
    // notes count (an earlier run of the round may have measured others).
    let r: Vec<f64> = rows
        .iter()
        .filter(|s| s.role == "holdout" && holdout.iter().any(|n| n.id == s.note_key))
        .map(|s| s.reward.unwrap_or(0.0))
        .collect();
    Ok(Some(if r.is_empty() {
        0.0
    } else {
        r.iter().sum::<f64>() / r.len() as f64
    }))
}

/// The passage-only baseline and K scored samples of one note.
fn sample_note(
    m: &mut Models,
    w: &Writer,
    n: &QaNote,
    opts: &TeachOptions,
    round: i64,
    role: &str,
    cancel: &AtomicBool,
) -> Result<Option<Vec<Sample>>> {
    let sha = crate::digest::sha256_hex(n.note.as_bytes());
    let inner_seed = stable(&["inner", &n.id]) ^ opts.seed;
    let qs: &[Question] = &n.questions;
    let pr = probes(&n.note);
    let sys = m.student_system.clone();
    let student_sha = m.student_id.sha256.clone();
    let Some(base) = reward::score_update(
        &mut m.student,
        sys.as_deref(),
        &n.note,
        &[],
        qs,
        &pr,
        &opts.inner,
        inner_seed,
        &student_sha,
        cancel,
    )?
    else {
        return Ok(None);
    };
    let (base, base_probe) = base;
    let baseline_role = match role {
        "holdout" => "holdout-baseline",
        _ => "baseline",
    };
    let mut out = vec![row(
        n,
        &sha,
        baseline_role,
        -1,
        None,
        n.note.clone(),
        0,
        (base, base_probe),
        None,
        None,
    )];
    for k in 0..opts.samples.max(1) {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let seed = stable(&[&n.id, &round.to_string(), &k.to_string()]) ^ opts.seed;
        let params = selfedit::sampling(seed, opts.temperature);
        let raw = match m.teacher.as_mut() {
            Some((e, _, s)) => writer::write(e, w, s.as_deref(), &n.note, &params, 200, cancel)?,
            None => writer::write(
                &mut m.student,
                w,
                sys.as_deref(),
                &n.note,
                &params,
                200,
                cancel,
            )?,
        };
        let mut seen = HashSet::new();
        let cands = writer::items(&n.note, &raw, true, &mut seen);
        let items: Vec<reward::Item> = cands
            .iter()
            .filter(|c| c.dropped.is_none())
            .map(|c| (c.prompt.clone(), c.completion.clone()))
            .collect();
        if items.is_empty() {
            out.push(row(
                n,
                &sha,
                role,
                k as i64,
                Some(seed),
                raw,
                0,
                Default::default(),
                None,
                Some("no usable items".into()),
            ));
            continue;
        }
        let Some(s) = reward::score_update(
            &mut m.student,
            sys.as_deref(),
            &n.note,
            &items,
            qs,
            &pr,
            &opts.inner,
            inner_seed,
            &student_sha,
            cancel,
        )?
        else {
            return Ok(None);
        };
        let r = (
            s.0.reward(&base, &opts.inner),
            s.1.reward(&base_probe, &opts.inner),
        );
        out.push(row(
            n,
            &sha,
            role,
            k as i64,
            Some(seed),
            raw,
            items.len(),
            s,
            Some(r),
            None,
        ));
    }
    Ok(Some(out))
}

#[allow(clippy::too_many_arguments)]
fn row(
    n: &QaNote,
    sha: &str,
    role: &str,
    k: i64,
    seed: Option<u64>,
    text: String,
    items: usize,
    (s, probe): (Score, Score),
    reward: Option<(f64, f64)>,
    reason: Option<String>,
) -> Sample {
    Sample {
        note_key: n.id.clone(),
        note_sha256: sha.to_string(),
        role: role.to_string(),
        k,
        seed,
        text,
        items,
        accuracy: s.accuracy,
        loglik: s.loglik,
        reward: reward.map(|r| r.0),
        probe,
        probe_reward: reward.map(|r| r.1),
        chosen: false,
        reason,
    }
}

/// Fine-tunes a writer on (note → kept self-edit), continuing `w`'s weights when their shape
/// matches, and saves a new writer version (made the writer). `student`: the student's own
/// writer learns the teacher's kept self-edits (the student pipeline); otherwise the writing
/// model (the teacher, or the student when it writes) learns its own. None when cancelled.
#[allow(clippy::too_many_arguments)]
fn train_writer(
    home: &Home,
    store: &mut Store,
    m: &Models,
    student: bool,
    w: &Writer,
    kept: &[(&QaNote, String)],
    opts: &TeachOptions,
    round: i64,
    cancel: &AtomicBool,
) -> Result<Option<i64>> {
    let (engine, id, system) = match (&m.teacher, student) {
        (Some((e, id, s)), false) => (e, id, s.clone()),
        _ => (&m.student, &m.student_id, m.student_system.clone()),
    };
    let codec = engine.codec();
    let mut examples: Vec<Example> = Vec::new();
    let mut sha = Sha256::new();
    for (n, text) in kept {
        examples.push(writer::example(&codec, system.as_deref(), &n.note, text)?);
        sha.update(n.note.as_bytes());
        sha.update(text.as_bytes());
    }
    let mcfg = engine.model.cfg.clone();
    let lora = LoraConfig::top_layers(
        opts.writer_rank,
        2.0 * opts.writer_rank as f32,
        Target::ALL.to_vec(),
        mcfg.n_layers,
        mcfg.n_layers,
    )?;
    let req = PlanRequest {
        budget: opts.max_memory,
        seq_len: Some(512),
        micro_batch: None,
        layers: Some(mcfg.n_layers),
        checkpointing: None,
        rank: opts.writer_rank,
        targets: Target::ALL.to_vec(),
        model_bytes: 0,
        cache_seqs: 0,
        max_micro_batch: Some(1),
    };
    let packed = crate::train::job::plan_and_pack(
        &mcfg,
        &req,
        &codec,
        &format!("writer round {round}"),
        &examples,
        format!("{:x}", sha.finalize()),
    )?;
    let mut cfg = TrainConfig {
        lora: lora.clone(),
        lr: opts.writer_lr,
        min_lr_ratio: 0.1,
        warmup: 0,
        decay: Decay::Cosine,
        adamw: AdamWParamsCfg::default(),
        clip: 1.0,
        seq_len: packed.plan.seq_len,
        micro_batch: packed.plan.micro_batch,
        accum: 1,
        steps: 1,
        seed: opts.seed ^ round as u64,
        checkpointing: packed.plan.checkpointing,
        skip_learned: 0.0,
    };
    cfg.steps = cfg.steps_for_epochs(packed.data.seqs.len(), opts.writer_epochs.max(1));
    cfg.warmup = (cfg.steps / 10).min(10);
    let init = w
        .weights
        .as_ref()
        .filter(|x| x.cfg == lora)
        .map(|x| (**x).clone());
    let spec = JobSpec {
        cfg,
        data: packed.data,
        cache_limit: packed.cache_limit,
        checkpoint: home.root().join("writers").join(format!(
            "round-{round}{}.ckpt",
            if student { "-student" } else { "" }
        )),
        init,
        bad_checkpoint: BadCheckpoint::Restart,
        save_every_steps: None,
        save_every: Duration::from_secs(60),
    };
    let mut job = TrainJob::start(&engine.model, &id.sha256, spec)?;
    if job.run(cancel, &mut |_| {})? == Outcome::Interrupted {
        return Ok(None);
    }
    let data = format!("writer round {round}: {} kept self-edits", kept.len());
    let done = job.finish_as(Kind::Writer, home, store, id, w.version, data, true)?;
    done.clear_checkpoint();
    Ok(Some(done.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(id: &str, text: &str, answers: &[&str]) -> QaNote {
        QaNote {
            id: id.into(),
            note: text.into(),
            questions: answers
                .iter()
                .map(|a| Question {
                    q: "Q?".into(),
                    a: vec![a.to_string()],
                })
                .collect(),
        }
    }

    #[test]
    fn notes_without_answers_are_skipped_and_the_split_is_stable() {
        let v = [
            note("a", "The gym opens at 6.", &["6"]),
            note("b", "Nothing here.", &["Paris"]),
            note("c", "My sister is Ana.", &["Ana"]),
            note("d", "Rent is 900.", &["900", "nowhere"]),
        ];
        let refs: Vec<&QaNote> = v.iter().collect();
        let (ok, skipped) = usable(&refs);
        assert_eq!(ok.len(), 3);
        assert_eq!(
            skipped,
            vec![(
                "b".to_string(),
                "none of its questions is answered in the note".to_string()
            )]
        );
        let (h1, t1) = split(&ok, 1);
        let (h2, t2) = split(&ok, 1);
        assert_eq!(h1.len(), 1);
        assert_eq!(t1.len(), 2);
        assert_eq!(h1[0].id, h2[0].id);
        assert_eq!(
            t1.iter().map(|n| &n.id).collect::<Vec<_>>(),
            t2.iter().map(|n| &n.id).collect::<Vec<_>>()
        );
        // Rounds walk through the training notes.
        let r1 = round_notes(&t1, Some(1), 1);
        let r2 = round_notes(&t1, Some(1), 2);
        assert_ne!(r1[0].id, r2[0].id);
    }

    #[test]
    fn the_best_sample_is_kept_only_when_it_beats_the_passage() {
        let s = |reward: Option<f64>| Sample {
            note_key: "n".into(),
            note_sha256: String::new(),
            role: "train".into(),
            k: 0,
            seed: None,
            text: String::new(),
            items: 1,
            accuracy: 0.0,
            loglik: 0.0,
            reward,
            probe: Score::default(),
            probe_reward: reward.map(|r| -r),
            chosen: false,
            reason: None,
        };
        let mut v = vec![s(Some(-0.1)), s(Some(0.3)), s(None), s(Some(0.2))];
        choose(&mut v, RewardOn::Questions);
        assert!(v[1].chosen && !v[0].chosen && !v[3].chosen);
        let mut v = vec![s(Some(-0.1)), s(Some(0.3)), s(None), s(Some(0.2))];
        choose(&mut v, RewardOn::Probes);
        assert!(v[0].chosen && !v[1].chosen);
        let mut v = vec![s(Some(-0.1)), s(Some(0.0))];
        choose(&mut v, RewardOn::Questions);
        assert!(v.iter().all(|x| !x.chosen));
        assert!(v[1].reason.is_some());
    }
}
