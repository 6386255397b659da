//! How long the pending learning cycle will take on this machine, before it starts: the cycle's
//! own training set is built as the cycle would build it (the same self-edits, replay, anchors,
//! packing and plan), then a few training steps and probe answers are timed here, now, and the
//! phases are added up. The daemon uses it not to start a cycle that cannot finish in the time
//! the schedule leaves (it learns fewer notes instead), and `hone learn --estimate` prints it.
//!
//! Must not: write anything (no cycle, item, anchor or adapter is stored), generate more than one
//! batch of the missing anchoring answers (a sample: its texts stand in for the others' lengths
//! and its time for theirs, and it is kept nowhere), or train more than a handful of steps.

use super::*;
use crate::train::Trainer;
use cycle::{probe_correct, ANCHOR_TOKENS, ANCHOR_WIDTH, PROBE_WIDTH};
use std::time::Duration;

/// Training steps timed (after one that warms caches up and is not counted), on sequences
/// spread evenly over the cycle's packed data: new items, replayed items and anchors pack into
/// sequences of different lengths and loss positions, and three shuffled ones measured 0.47 to
/// 0.94 s a step where the cycles trained at 0.52-0.61 (BENCHMARKS.md, issue 19).
const TIMED_STEPS: usize = 8;

/// Until this model has finished cycles under the adaptive rule, the share of the planned steps
/// a cycle is expected to train: all of them, as the 20 dev notes' cycle did (its probes still
/// gained at every check; BENCHMARKS.md, issue 19).
pub const DEFAULT_STEP_SHARE: f64 = 1.0;

/// Until then, the share of the planned steps whose sequence is trained rather than skipped as
/// learned (`LearnOptions::skip_learned` at its default): 437 of 630 in the 20 dev notes' cycle
/// (BENCHMARKS.md, issue 19, "Spending less on what is learned").
pub const DEFAULT_TRAINED_SHARE: f64 = 0.69;

/// Until then, the share of the checks between stretches that ask the probes (the others come
/// while the loss still falls, and ask nothing): one of three in the 20 dev notes' cycle (the
/// loss fell by more than a fifth at each of the first two).
pub const DEFAULT_ASKED_SHARE: f64 = 1.0 / 3.0;

/// The estimate and what it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// The notes the cycle would learn (an unfinished cycle's, or the oldest pending ones).
    pub notes: Vec<i64>,
    /// Whether it continues an unfinished cycle (its self-edits may be stored already).
    pub continues: Option<i64>,
    pub train_items: usize,
    pub replay_items: usize,
    pub anchors: usize,
    /// Anchoring answers the base model has not written yet (done once per model).
    pub anchors_missing: usize,
    pub sequences: usize,
    pub seq_len: usize,
    pub steps_planned: usize,
    /// `steps_planned` times the share of planned steps earlier cycles trained.
    pub steps_expected: usize,
    pub step_share: f64,
    /// Of `steps_expected`, the steps expected to train their sequence (the others skip one
    /// already learned and cost nothing).
    pub steps_trained: usize,
    /// Where `step_share` comes from.
    pub step_share_from: String,
    pub seconds_per_step: f64,
    pub seconds_per_probe: f64,
    /// Seconds per anchoring answer not yet written, measured on up to one batch of them.
    pub seconds_per_anchor: f64,
    pub new_probes: usize,
    pub old_probes: usize,
    /// Seconds per phase: load, self-edits, anchors, training, checks, gate.
    pub phases: Vec<(String, f64)>,
    pub total_seconds: f64,
    /// Seconds spent measuring.
    pub measured_in: f64,
}

/// Of this model's finished cycles under the adaptive rule (medians, and how many): the share
/// of planned steps reached, the share whose sequence was trained rather than skipped as
/// learned (one sequence per step, so a skipped step cost nothing), and the share of checks
/// that asked the probes.
fn step_share(store: &Store, model_sha256: &str) -> Result<Option<(f64, f64, f64, usize)>> {
    let reports: Vec<GateReport> = records::recent(store, 50)?
        .into_iter()
        .filter(|c| c.model_sha256 == model_sha256)
        .filter_map(|c| {
            c.gate
                .and_then(|g| serde_json::from_str::<GateReport>(&g).ok())
        })
        .filter(|g| g.steps_planned > 0 && g.steps_trained > 0 && !g.checks.is_empty())
        .collect();
    if reports.is_empty() {
        return Ok(None);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let reached = reports
        .iter()
        .map(|g| g.steps_trained as f64 / g.steps_planned as f64)
        .collect();
    let trained = reports
        .iter()
        .map(|g| {
            g.steps_trained
                .saturating_sub(g.seqs_skipped as usize)
                .max(1) as f64
                / g.steps_planned as f64
        })
        .collect();
    let asked = reports
        .iter()
        .map(|g| {
            g.checks.iter().filter(|c| c.correct.is_some()).count() as f64 / g.checks.len() as f64
        })
        .collect();
    Ok(Some((
        median(reached),
        median(trained),
        median(asked),
        reports.len(),
    )))
}

/// Estimates the next cycle of `choice`'s model with `opts`; None when no note is pending.
pub fn estimate(
    store: &Store,
    choice: &ModelChoice,
    opts: &LearnOptions,
    cancel: &AtomicBool,
) -> Result<Option<Estimate>> {
    let t0 = Instant::now();
    let mut l = load(choice, store, 1024)?;
    let load_s = l.engine.load_time.as_secs_f64();
    let unfinished = records::unfinished(store, &l.id.sha256)?;
    let (notes, cycle_id) = match &unfinished {
        Some(c) => (c.notes.clone(), c.id),
        None => (
            records::pending_note_ids(store, opts.max_notes.max(1))?,
            records::recent(store, 1)?.first().map_or(1, |c| c.id + 1),
        ),
    };
    if notes.is_empty() {
        return Ok(None);
    }
    let Some((items, selfedit_s)) = self_edits(
        store,
        &mut l,
        opts,
        &notes,
        unfinished.as_ref(),
        cycle_id,
        cancel,
    )?
    else {
        return Ok(None);
    };
    let new_probes: Vec<&Item> = items
        .iter()
        .filter(|i| i.role == "probe" && i.verdict == "kept")
        .collect();
    let Some(set) = training_examples(store, &mut l, opts, &items, cycle_id, cancel)? else {
        return Ok(None);
    };
    let t = plan_training(&l, choice, opts, &set.examples, String::new(), cycle_id)?;
    let Some(per_step) = time_steps(&l, &t, cancel)? else {
        return Ok(None);
    };
    // Probe answers, timed as the checks and the gate answer them: as many decoded together
    // as they decode (24 tokens at most).
    let sample: Vec<&Item> = new_probes.iter().take(PROBE_WIDTH).copied().collect();
    let tp = Instant::now();
    let sys = l.system.clone();
    if probe_correct(&mut l.engine, sys.as_deref(), &sample, cancel)?.is_none() {
        return Ok(None);
    }
    let per_probe = if sample.is_empty() {
        0.5
    } else {
        tp.elapsed().as_secs_f64() / sample.len() as f64
    };
    // Two general prompts scored, timed.
    let ts = Instant::now();
    for ex in &set.held_sample {
        l.engine.scored_nll(&ex.tokens, &ex.learn)?;
    }
    let per_scored = if set.held_sample.is_empty() {
        0.2 * per_probe
    } else {
        ts.elapsed().as_secs_f64() / set.held_sample.len() as f64
    };
    let planned = t.cfg.steps;
    let history = step_share(store, &l.id.sha256)?;
    let (share, trained_share, asked_share, from) = match (opts.adaptive, history) {
        (false, _) => (1.0, DEFAULT_TRAINED_SHARE, 0.0, "--fixed-steps".to_string()),
        (true, Some((s, t, a, n))) => (
            s,
            t,
            a,
            format!("median of {n} earlier cycles of this model"),
        ),
        (true, None) => (
            DEFAULT_STEP_SHARE,
            DEFAULT_TRAINED_SHARE,
            DEFAULT_ASKED_SHARE,
            "no earlier cycle of this model yet: the dev notes' share".to_string(),
        ),
    };
    // Without skipping, every step reached trains its sequence.
    let trained_share = if opts.skip_learned > 0.0 {
        trained_share.min(share)
    } else {
        share
    };
    let expected = ((planned as f64 * share).round() as usize).clamp(1, planned);
    let trained = ((planned as f64 * trained_share).round() as usize).clamp(1, expected);
    let stopper = adaptive::EarlyStop::new(t.ds.seqs.len(), planned, new_probes.len(), 0.5);
    // Checks while the loss still falls ask nothing; the last one (a cycle that stops early
    // stops at a check that asked) always counts.
    let due = if opts.adaptive {
        (1..=expected).filter(|s| stopper.due(*s)).count()
    } else {
        0
    };
    let checks = if due == 0 {
        0.0
    } else {
        (due as f64 * asked_share).max(1.0)
    };
    let gate_s = if opts.no_gate {
        0.0
    } else {
        // New probes once, old probes with the previous and the new adapter, and the general
        // prompts scored with the candidate, and with the base model where its loss is not
        // kept yet.
        per_probe * (new_probes.len() + 2 * set.old_probes) as f64
            + per_scored * (set.held + set.held_unscored) as f64
    };
    let phases = vec![
        ("load".to_string(), load_s),
        ("self-edits".to_string(), selfedit_s),
        (
            "anchors".to_string(),
            set.anchors_missing as f64 * set.seconds_per_anchor,
        ),
        ("training".to_string(), trained as f64 * per_step),
        (
            "checks".to_string(),
            checks * new_probes.len() as f64 * per_probe,
        ),
        ("gate".to_string(), gate_s),
    ];
    let total = phases.iter().map(|p| p.1).sum();
    Ok(Some(Estimate {
        notes,
        continues: unfinished.map(|c| c.id),
        train_items: set.train_items,
        replay_items: set.replay_items,
        anchors: set.anchors,
        anchors_missing: set.anchors_missing,
        sequences: t.ds.seqs.len(),
        seq_len: t.cfg.seq_len,
        steps_planned: planned,
        steps_expected: expected,
        step_share: share,
        steps_trained: trained,
        step_share_from: from,
        seconds_per_step: per_step,
        seconds_per_probe: per_probe,
        seconds_per_anchor: set.seconds_per_anchor,
        new_probes: new_probes.len(),
        old_probes: set.old_probes,
        phases,
        total_seconds: total,
        measured_in: t0.elapsed().as_secs_f64(),
    }))
}

/// The self-edits: stored ones for a continued cycle, else the rule-made ones now (fast);
/// generated strategies are timed on the first note and counted for every note. Returns the
/// items and the seconds the generated ones are expected to take; None when cancelled.
fn self_edits(
    store: &Store,
    l: &mut Loaded,
    opts: &LearnOptions,
    notes: &[i64],
    unfinished: Option<&records::Cycle>,
    cycle_id: i64,
    cancel: &AtomicBool,
) -> Result<Option<(Vec<Item>, f64)>> {
    let rules_only = LearnOptions {
        strategies: opts
            .strategies
            .iter()
            .copied()
            .filter(|s| !s.generated())
            .collect(),
        ..opts.clone()
    };
    let generated = opts.strategies.iter().any(|s| s.generated());
    let mut items: Vec<Item> = Vec::new();
    let mut selfedit_s = 0.0;
    let stored = match unfinished {
        Some(c) => records::cycle_items(store, c.id)?,
        None => Vec::new(),
    };
    let sys = l.system.clone();
    for (i, nid) in notes.iter().enumerate() {
        if stored.iter().any(|it| it.note_id == *nid) {
            items.extend(stored.iter().filter(|it| it.note_id == *nid).cloned());
            continue;
        }
        let Some(note) = store.get_note(*nid)? else {
            continue;
        };
        let o = if generated && i == 0 {
            opts
        } else {
            &rules_only
        };
        let ts = Instant::now();
        let name = l.id.name.clone();
        let Some(new) = note_items(
            &note.content,
            *nid,
            o,
            &mut l.engine,
            &name,
            sys.as_deref(),
            None,
            cancel,
        )?
        else {
            return Ok(None);
        };
        if generated {
            selfedit_s +=
                ts.elapsed().as_secs_f64() * if i == 0 { notes.len() as f64 } else { 0.0 };
        }
        items.extend(new.into_iter().map(|n| Item {
            id: 0,
            cycle: cycle_id,
            note_id: *nid,
            strategy: n.strategy,
            generator: n.generator,
            role: n.role,
            prompt: n.prompt,
            completion: n.completion,
            verdict: n.verdict,
            reason: n.reason,
        }));
    }
    Ok(Some((items, selfedit_s)))
}

/// The cycle's examples as the cycle would build them, and what they are made of.
struct Examples {
    examples: Vec<data::Example>,
    train_items: usize,
    replay_items: usize,
    old_probes: usize,
    anchors: usize,
    anchors_missing: usize,
    /// Held-out anchoring prompts the gate scores.
    held: usize,
    /// Of them, those whose base-model loss is not kept yet (the gate scores those twice).
    held_unscored: usize,
    /// The first two of them as examples (the stored answer or the stand-in), to time scoring.
    held_sample: Vec<data::Example>,
    /// Seconds per missing anchoring answer, measured on a sample (0 when none is missing).
    seconds_per_anchor: f64,
}

/// New items, replay and anchors as examples; anchors without a stored answer are answered for
/// one batch ([`sample_anchors`]), and the others get those answers as stand-ins (in turn). None
/// when there is nothing to train or when cancelled.
fn training_examples(
    store: &Store,
    l: &mut Loaded,
    opts: &LearnOptions,
    items: &[Item],
    cycle_id: i64,
    cancel: &AtomicBool,
) -> Result<Option<Examples>> {
    let system = l.system.clone();
    let sys = system.as_deref();
    let new_train: Vec<&Item> = items
        .iter()
        .filter(|i| i.role == "train" && i.verdict == "kept")
        .collect();
    let earlier = records::learned_items(store, &l.id.sha256, cycle_id)?;
    let replay = replay_items(&earlier, new_train.len(), opts, cycle_id);
    let old_probes = earlier.iter().filter(|i| i.role == "probe").count();
    let mut examples = Vec::new();
    for it in new_train.iter().chain(replay.iter()) {
        examples.push(example(&l.engine, sys, it)?);
    }
    let prompts = anchor_prompts();
    let (chosen, held) = anchor_choice(&prompts, examples.len(), opts, cycle_id);
    let have: BTreeMap<String, String> =
        records::anchors(store, &l.id.sha256)?.into_iter().collect();
    let missing: Vec<&String> = chosen
        .iter()
        .chain(held.iter())
        .copied()
        .filter(|p| !have.contains_key(*p))
        .collect();
    let anchors_missing = missing.len();
    let sample = &missing[..missing.len().min(ANCHOR_WIDTH)];
    let Some((sampled, seconds_per_anchor)) =
        sample_anchors(l, sys, sample, opts.anchor_topk, cancel)?
    else {
        return Ok(None);
    };
    let fallback = "word ".repeat(ANCHOR_TOKENS);
    let texts: Vec<&String> = sampled.values().collect();
    let mut next = 0usize;
    // A missing answer's stand-in: its own sampled answer, or the sampled ones in turn.
    let mut stand_in = |p: &String| -> String {
        if let Some(a) = sampled.get(p) {
            return a.clone();
        }
        next += 1;
        texts
            .get(next % texts.len().max(1))
            .map_or_else(|| fallback.clone(), |a| (*a).clone())
    };
    let mut held_unscored = 0;
    for p in &held {
        if records::anchor_base_nll(store, &l.id.sha256, p)?.is_none() {
            held_unscored += 1;
        }
    }
    let mut held_sample = Vec::new();
    for p in held.iter().take(2) {
        let a = have.get(*p).cloned().unwrap_or_else(|| stand_in(p));
        held_sample.push(data::chat_pair(&l.engine.codec(), sys, p, &a)?);
    }
    for p in &chosen {
        let a = have.get(*p).cloned().unwrap_or_else(|| stand_in(p));
        if a.is_empty() {
            continue;
        }
        examples.push(data::chat_pair(&l.engine.codec(), sys, p, &a)?);
    }
    if examples.is_empty() {
        return Ok(None);
    }
    Ok(Some(Examples {
        examples,
        train_items: new_train.len(),
        replay_items: replay.len(),
        old_probes,
        anchors: chosen.len(),
        anchors_missing,
        held: held.len(),
        held_unscored,
        held_sample,
        seconds_per_anchor,
    }))
}

/// Up to one batch of the missing anchoring answers, decoded by the base model as the cycle
/// decodes them (`ANCHOR_WIDTH` together, their top-k kept): their texts by prompt, and the
/// seconds per answer. Stored nowhere. None when cancelled.
fn sample_anchors(
    l: &mut Loaded,
    sys: Option<&str>,
    prompts: &[&String],
    k: usize,
    cancel: &AtomicBool,
) -> Result<Option<(BTreeMap<String, String>, f64)>> {
    let mut out = BTreeMap::new();
    if prompts.is_empty() {
        return Ok(Some((out, 0.0)));
    }
    let tokens = anchor_tokens(&l.engine, sys, prompts)?;
    // The base model answers (as in the cycle); the adapter is put back for the probes.
    let adapter = l.engine.model.adapter().cloned();
    l.engine.model.set_adapter(None);
    let t0 = Instant::now();
    let mut batch = l
        .engine
        .decode_top_k(tokens, ANCHOR_WIDTH, ANCHOR_TOKENS, k);
    let done = loop {
        match l.engine.next_answer(&mut batch, cancel) {
            Ok(Some((i, g))) => {
                out.insert(prompts[i].clone(), g.generation.text.trim().to_string());
            }
            Ok(None) => break Ok(!cancel.load(Ordering::Relaxed)),
            Err(e) => break Err(e),
        }
    };
    let seconds = t0.elapsed().as_secs_f64() / prompts.len() as f64;
    l.engine.model.set_adapter(adapter);
    Ok(done?.then_some((out, seconds)))
}

/// Seconds per training step of this very data on this machine, now: the mean over
/// [`TIMED_STEPS`] sequences spread evenly over the data, after one more that warms caches up.
/// None when cancelled.
fn time_steps(l: &Loaded, t: &Training, cancel: &AtomicBool) -> Result<Option<f64>> {
    let n = t.ds.seqs.len();
    let timed = n.clamp(1, TIMED_STEPS);
    let picks: Vec<usize> = (0..timed).map(|i| (2 * i + 1) * n / (2 * timed)).collect();
    // The warm-up step's sequence is one of them again (the trainer shuffles the order).
    let ds = data::Dataset {
        seqs: std::iter::once(picks[0])
            .chain(picks.iter().copied())
            .filter_map(|i| t.ds.seqs.get(i).cloned())
            .collect(),
        examples: t.ds.examples,
        target_tokens: t.ds.target_tokens,
        sha256: t.ds.sha256.clone(),
        description: t.ds.description.clone(),
    };
    if ds.seqs.len() < 2 {
        return Ok(Some(0.0));
    }
    let fork = l.engine.model.fork();
    let mut cfg = t.cfg.clone();
    cfg.steps = ds.seqs.len();
    let mut tr = Trainer::new(&fork, cfg, ds, &l.id.sha256)?;
    tr.cache_limit = t.cache_limit;
    let mut total = Duration::ZERO;
    for k in 0..=timed {
        let ts = Instant::now();
        if tr.train_step(cancel)?.is_none() {
            return Ok(None);
        }
        if k > 0 {
            total += ts.elapsed();
        }
    }
    Ok(Some(total.as_secs_f64() / timed as f64))
}
