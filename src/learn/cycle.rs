//! The learning cycle as a list of named steps: pick the notes, write their self-edits, build
//! the training set, add the general anchors, train a candidate adapter, gate it. Each step
//! stores what it made (the cycle record, items, anchors, the candidate version), so an
//! interrupted cycle continues at the step it stopped in.
//!
//! It must not print (progress goes to the caller's callback) or decide the gate's policy
//! (that is [`super::decide`]); training itself is [`crate::train::job`].

use super::*;
use crate::engine::Until;
use crate::train::job::{BadCheckpoint, JobEvent, JobSpec, TrainJob};
use records::Cycle;
use std::time::Duration;

/// What every step of one cycle shares.
struct Run<'a> {
    home: &'a Home,
    store: &'a mut Store,
    choice: &'a ModelChoice,
    cancel: &'a AtomicBool,
    progress: &'a mut dyn FnMut(&Progress),
    l: Loaded,
}

impl Run<'_> {
    fn report(&mut self, phase: Phase, done: usize, total: usize, tps: f64, message: String) {
        (self.progress)(&Progress {
            phase,
            done,
            total,
            tokens_per_s: tps,
            peak_rss: crate::sys::peak_rss_bytes().unwrap_or(0),
            message,
            estimate_s: None,
        })
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn system(&self) -> Option<String> {
        self.l.system.clone()
    }
}

/// Step 1's answer.
enum Picked {
    Cycle(Box<Cycle>),
    Nothing,
    DryRun(Vec<i64>),
    /// Removed notes forgotten without training (`forget::roll_back`).
    Forgotten(String),
}

/// The cycle's training data (step 3 and 4).
struct TrainingSet {
    items: Vec<Item>,
    earlier: Vec<Item>,
    examples: Vec<data::Example>,
    sha: Sha256,
    /// Held-out anchoring prompts with the base model's answers: the gate's drift measure.
    anchor_held: Vec<(String, String)>,
}

/// Step 5's answer: the candidate version and how training went.
struct Trained {
    candidate: i64,
    steps_planned: usize,
    steps_trained: usize,
    seqs_skipped: u64,
    checks: Vec<adaptive::Check>,
}

/// Runs (or continues) one learning cycle for `choice`'s model.
pub fn run_cycle(
    home: &Home,
    store: &mut Store,
    choice: &ModelChoice,
    opts: &LearnOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CycleOutcome> {
    let first = run_one(home, store, choice, opts, None, cancel, progress)?;
    let CycleOutcome::Done {
        cycle,
        activated: None,
        reason,
        gate,
        train_tokens,
        seconds,
    } = &first
    else {
        return Ok(first);
    };
    if opts.retries == 0 || opts.no_gate || !forgot(gate, &opts.gate) {
        return Ok(first);
    }
    // Rejected for forgetting earlier notes: the lever is replay, so the same notes get one more
    // cycle from the same parent with twice the replay (a new cycle record: `hone learn --log`
    // shows both attempts).
    let notes = records::get(store, *cycle)?
        .map(|c| c.notes)
        .unwrap_or_default();
    let mut o = opts.clone();
    o.retries -= 1;
    o.replay_ratio *= 2.0;
    o.replay_per_note *= 2;
    tracing::info!("cycle {cycle} {reason}; retrying its notes with twice the replay");
    match run_one(home, store, choice, &o, Some(&notes), cancel, progress)? {
        CycleOutcome::Done {
            cycle: c2,
            activated,
            reason: r2,
            gate: g2,
            train_tokens: t2,
            seconds: s2,
        } => Ok(CycleOutcome::Done {
            cycle: c2,
            activated,
            reason: format!(
                "cycle {cycle} {reason}; retried with twice the replay as cycle {c2}: {r2}"
            ),
            gate: g2,
            train_tokens: train_tokens + t2,
            seconds: seconds + s2,
        }),
        CycleOutcome::NothingToLearn => Ok(first),
        other => Ok(other),
    }
}

/// One cycle; `only`: start a new cycle over these notes (those still unlearned) instead of the
/// oldest unlearned ones.
fn run_one(
    home: &Home,
    store: &mut Store,
    choice: &ModelChoice,
    opts: &LearnOptions,
    only: Option<&[i64]>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CycleOutcome> {
    let t0 = Instant::now();
    progress(&Progress {
        phase: Phase::Load,
        done: 0,
        total: 1,
        tokens_per_s: 0.0,
        peak_rss: crate::sys::peak_rss_bytes().unwrap_or(0),
        message: format!("loading {}", choice.name),
        estimate_s: None,
    });
    let l = load(choice, store, 1024)?;
    let mut run = Run {
        home,
        store,
        choice,
        cancel,
        progress,
        l,
    };
    let cycle = match pick_notes(&mut run, opts, only)? {
        Picked::Cycle(c) => *c,
        Picked::Nothing => return Ok(CycleOutcome::NothingToLearn),
        Picked::Forgotten(message) => return Ok(CycleOutcome::Forgotten { message }),
        Picked::DryRun(ids) => {
            return dry_run(
                run.home,
                run.store,
                &ids,
                opts,
                &mut run.l,
                cancel,
                run.progress,
            )
        }
    };
    let interrupted = CycleOutcome::Interrupted { cycle: cycle.id };
    let opts = &resumed_options(&cycle, opts);
    let mut phases = PhaseTimes::default();
    let mut lap = Instant::now();
    let mut next_lap = || {
        std::mem::replace(&mut lap, Instant::now())
            .elapsed()
            .as_secs_f64()
    };
    if !write_self_edits(&mut run, &cycle, opts)? {
        return Ok(interrupted);
    }
    let mut set = training_set(&mut run, &cycle, opts)?;
    phases.self_edits_s = next_lap();
    if !add_anchors(&mut run, &cycle, opts, &mut set)? {
        return Ok(interrupted);
    }
    phases.anchors_s = next_lap();
    if set.examples.is_empty() {
        return nothing_to_train(&mut run, &cycle, t0);
    }
    let Some(trained) = train_candidate(&mut run, &cycle, opts, &mut set)? else {
        return Ok(interrupted);
    };
    phases.training_s = next_lap();
    let Some((mut g, activated, reason)) = gate(&mut run, &cycle, opts, &set, &trained)? else {
        return Ok(interrupted);
    };
    phases.gate_s = next_lap();
    g.phases = Some(phases);
    let mut out = finish(
        &mut run,
        &cycle,
        g,
        activated,
        reason,
        trained.candidate,
        t0,
    )?;
    if let (
        Some(from),
        CycleOutcome::Done {
            cycle: id,
            activated,
            reason,
            ..
        },
    ) = (opts.rebuild_from, &mut out)
    {
        let sha = run.l.id.sha256.clone();
        let said = forget::complete(run.home, run.store, &sha, &cycle, from, activated.is_some())?;
        *reason = format!("{said} ({reason})");
        records::set_reason(run.store, *id, reason)?;
    }
    Ok(out)
}

/// Step 1: the unfinished cycle, or a new one over the oldest unlearned notes (or `only`).
fn pick_notes(run: &mut Run, opts: &LearnOptions, only: Option<&[i64]>) -> Result<Picked> {
    if let Some(c) = records::unfinished(run.store, &run.l.id.sha256)? {
        if !opts.dry_run {
            return Ok(Picked::Cycle(Box::new(c)));
        }
    }
    // A learned note the user removed is forgotten before anything new is learned.
    if !opts.dry_run {
        if let Some(plan) = forget::plan(run.store, &run.l.id.sha256)? {
            if plan.survivors.is_empty() {
                let message = forget::roll_back(run.home, run.store, &run.l.id.sha256, &plan)?;
                return Ok(Picked::Forgotten(message));
            }
            let mut o = opts.clone();
            o.rebuild_from = Some(plan.from_cycle);
            o.forget_only = false;
            let c = forget::start(
                run.store,
                &run.choice.name,
                &run.l.id.sha256,
                &plan,
                &serde_json::to_string(&o)?,
            )?;
            return Ok(Picked::Cycle(Box::new(c)));
        }
        if opts.forget_only {
            return Ok(Picked::Nothing);
        }
    }
    let ids = match only {
        Some(only) => records::unlearned(run.store, only)?,
        None => records::pending_note_ids(run.store, opts.max_notes.max(1))?,
    };
    if ids.is_empty() {
        return Ok(Picked::Nothing);
    }
    if opts.dry_run {
        return Ok(Picked::DryRun(ids));
    }
    // A damaged active adapter is not built on: the nearest good parent (or none) is, and
    // becomes the active one, as `hone ask` does.
    let mcfg = run.l.engine.model.cfg.clone();
    let (found, warning) =
        adapters::load_active_or_fallback(run.home, run.store, &run.l.id, &mcfg)?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let parent = found.map(|(r, _)| r.version);
    Ok(Picked::Cycle(Box::new(records::start(
        run.store,
        &run.choice.name,
        &run.l.id.sha256,
        &ids,
        &serde_json::to_string(opts)?,
        parent,
    )?)))
}

/// A resumed cycle keeps the replay it started with (a retry's is doubled).
fn resumed_options(cycle: &Cycle, opts: &LearnOptions) -> LearnOptions {
    let mut own = opts.clone();
    if let Ok(r) = serde_json::from_str::<LearnOptions>(&cycle.options) {
        own.replay_ratio = r.replay_ratio;
        own.replay_per_note = r.replay_per_note;
        own.rebuild_from = r.rebuild_from;
    }
    own
}

/// Step 2: self-edits for the cycle's notes that have none stored yet. False: interrupted.
fn write_self_edits(run: &mut Run, cycle: &Cycle, opts: &LearnOptions) -> Result<bool> {
    let mut teacher: Option<Loaded> = None;
    let mut trained_writer: Option<writer::Writer> = None;
    let total = cycle.notes.len();
    for (i, nid) in cycle.notes.iter().enumerate() {
        if records::has_items(run.store, cycle.id, *nid)? {
            continue;
        }
        let Some(note) = run.store.get_note(*nid)? else {
            // Removed since the cycle started: nothing to learn from it.
            records::add_items(run.store, cycle.id, *nid, "", &[])?;
            continue;
        };
        run.report(
            Phase::SelfEdits,
            i,
            total,
            0.0,
            format!("note {}/{total}", i + 1),
        );
        let needs_model = opts.strategies.iter().any(|s| s.generated());
        if needs_model && teacher.is_none() {
            if let Some(t) = &opts.teacher {
                teacher = Some(load(t, run.store, 1024)?);
            }
        }
        let system = run.system();
        let (writer, writer_id, writer_name, writer_system) = match teacher.as_mut() {
            Some(t) => (
                &mut t.engine,
                t.id.clone(),
                t.id.name.clone(),
                t.system.clone(),
            ),
            None => {
                run.l.engine.model.set_adapter(None);
                let id = run.l.id.clone();
                (&mut run.l.engine, id, run.l.id.name.clone(), system)
            }
        };
        if opts.strategies.contains(&Strategy::Writer) && trained_writer.is_none() {
            let cfg = writer.model.cfg.clone();
            trained_writer = Some(writer::load(
                run.home,
                run.store,
                &writer_id,
                &cfg,
                &opts.writer,
            )?);
        }
        let Some(items) = note_items(
            &note.content,
            *nid,
            opts,
            writer,
            &writer_name,
            writer_system.as_deref(),
            trained_writer.as_ref(),
            run.cancel,
        )?
        else {
            return Ok(false);
        };
        records::add_items(run.store, cycle.id, *nid, &note.sha256, &items)?;
    }
    Ok(!run.cancelled())
}

/// Step 3: this cycle's kept items and replay of earlier learned notes, as examples.
fn training_set(run: &mut Run, cycle: &Cycle, opts: &LearnOptions) -> Result<TrainingSet> {
    let items = records::cycle_items(run.store, cycle.id)?;
    // A rebuild redoes the cycles from `rebuild_from` on: only earlier ones are replayed.
    let before = opts.rebuild_from.unwrap_or(cycle.id);
    let earlier = records::learned_items(run.store, &run.l.id.sha256, before)?;
    let mut examples = Vec::new();
    let mut sha = Sha256::new();
    {
        let new_train: Vec<&Item> = items
            .iter()
            .filter(|i| i.role == "train" && i.verdict == "kept")
            .collect();
        let replay = replay_items(&earlier, new_train.len(), opts, cycle.id);
        let sys = run.l.system.as_deref();
        for it in new_train.iter().chain(replay.iter()) {
            examples.push(example(&run.l.engine, sys, it)?);
            sha.update(it.id.to_le_bytes());
        }
    }
    Ok(TrainingSet {
        items,
        earlier,
        examples,
        sha,
        anchor_held: Vec::new(),
    })
}

/// Anchoring prompts the base model answers together, one pass over the weights per token for
/// all of them (`examples/anchor_batch.rs` measures the widths; BENCHMARKS.md, issue 19).
pub(super) const ANCHOR_WIDTH: usize = 16;

/// The longest base-model answer an anchor keeps, in tokens.
pub(super) const ANCHOR_TOKENS: usize = 48;

/// Probes answered together by a check or the gate, and the longest answer one gets (it stops
/// sooner, once it holds the expected span).
pub(super) const PROBE_WIDTH: usize = 16;
const PROBE_TOKENS: usize = 24;

/// Step 4: general anchoring: the base model's answers (stored once per model) to a rotating
/// share of the anchoring prompts, plus the held-out ones the gate measures drift on, and the
/// base model's top-k distribution over each trained answer (kept with it, and taken while the
/// answer is generated, so that no answer runs through the model twice). False: interrupted.
fn add_anchors(
    run: &mut Run,
    cycle: &Cycle,
    opts: &LearnOptions,
    set: &mut TrainingSet,
) -> Result<bool> {
    let prompts = anchor_prompts();
    let (chosen, held) = anchor_choice(&prompts, set.examples.len(), opts, cycle.id);
    let k = opts.anchor_topk;
    run.l.engine.model.set_adapter(None);
    let mut have: BTreeMap<String, (String, Option<Vec<u8>>)> =
        records::anchors_with_soft(run.store, &run.l.id.sha256)?
            .into_iter()
            .map(|(p, a, soft)| (p, (a, soft)))
            .collect();
    let missing: Vec<&String> = chosen
        .iter()
        .chain(held.iter())
        .copied()
        .filter(|p| !have.contains_key(*p))
        .collect();
    let system = run.system();
    let prompts = anchor_tokens(&run.l.engine, system.as_deref(), &missing)?;
    // Decoded together: one pass over the weights per token for ANCHOR_WIDTH answers.
    let mut batch = run
        .l
        .engine
        .decode_top_k(prompts, ANCHOR_WIDTH, ANCHOR_TOKENS, k);
    let mut done = 0;
    loop {
        run.report(
            Phase::Anchors,
            done,
            missing.len(),
            0.0,
            format!("base answer {}/{}", done + 1, missing.len()),
        );
        let Some((i, g)) = run.l.engine.next_answer(&mut batch, run.cancel)? else {
            break;
        };
        if run.cancelled() {
            return Ok(false);
        }
        let p = missing[i];
        let a = g.generation.text.trim().to_string();
        // The held prompts are answered only: the gate scores them, nothing trains on them.
        let soft = if k > 0 && !held.contains(&p) && !a.is_empty() {
            let ex = data::chat_pair(&run.l.engine.codec(), system.as_deref(), p, &a)?;
            if ex.tokens.len() >= 2 {
                let soft = run.l.engine.top_k_targets_of(g, &ex.tokens, &ex.learn, k)?;
                Some(records::soft_blob(k, &ex.tokens, &soft))
            } else {
                None
            }
        } else {
            None
        };
        records::add_anchor(run.store, &run.l.id.sha256, p, &a, soft.as_deref())?;
        have.insert(p.clone(), (a, soft));
        done += 1;
    }
    if run.cancelled() {
        return Ok(false);
    }
    let pair = |p: &String| {
        have.get(p)
            .filter(|(a, _)| !a.is_empty())
            .map(|(a, soft)| (p.clone(), a.clone(), soft.clone()))
    };
    set.anchor_held = held
        .iter()
        .filter_map(|p| pair(p))
        .map(|(p, a, _)| (p, a))
        .collect();
    for (p, a, blob) in chosen.iter().filter_map(|p| pair(p)) {
        let mut ex = data::chat_pair(&run.l.engine.codec(), system.as_deref(), &p, &a)?;
        if k > 0 && ex.tokens.len() >= 2 {
            // The base model's own distribution (no adapter is set here), as kept with the
            // answer, or computed now and kept.
            ex.soft = match blob.and_then(|b| records::soft_from_blob(&b, k, &ex.tokens)) {
                Some(soft) => soft,
                None => {
                    let soft = run.l.engine.top_k_targets(&ex.tokens, &ex.learn, k)?;
                    let b = records::soft_blob(k, &ex.tokens, &soft);
                    records::set_anchor_soft(run.store, &run.l.id.sha256, &p, &b)?;
                    soft
                }
            };
        }
        ex.weights = lead_weights(&ex.learn, opts.anchor_lead, opts.anchor_lead_weight);
        set.examples.push(ex);
        set.sha.update(p.as_bytes());
    }
    Ok(true)
}

/// Every self-edit was dropped: the cycle ends without training.
fn nothing_to_train(run: &mut Run, cycle: &Cycle, t0: Instant) -> Result<CycleOutcome> {
    let reason = "no training data: every self-edit was dropped";
    records::finish(run.store, cycle.id, false, "{}", reason, &cycle.notes)?;
    Ok(CycleOutcome::Done {
        cycle: cycle.id,
        activated: None,
        reason: reason.into(),
        gate: GateReport::default(),
        train_tokens: 0,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The kept probes of the cycle's new notes.
fn new_probes(items: &[Item]) -> Vec<&Item> {
    items
        .iter()
        .filter(|i| i.role == "probe" && i.verdict == "kept")
        .collect()
}

/// Step 5: trains the candidate adapter (continuing the parent when it has this configuration)
/// unless the cycle already has one. `None`: interrupted (the run is checkpointed).
fn train_candidate(
    run: &mut Run,
    cycle: &Cycle,
    opts: &LearnOptions,
    set: &mut TrainingSet,
) -> Result<Option<Trained>> {
    let data_sha = hex::encode(std::mem::take(&mut set.sha).finalize());
    let Training {
        cfg,
        ds,
        lora,
        cache_limit,
    } = plan_training(&run.l, run.choice, opts, &set.examples, data_sha, cycle.id)?;
    let steps_planned = cfg.steps;
    if let Some(candidate) = cycle.candidate_adapter {
        return Ok(Some(Trained {
            candidate,
            steps_planned,
            steps_trained: 0,
            seqs_skipped: 0,
            checks: Vec::new(),
        }));
    }
    let mcfg = run.l.engine.model.cfg.clone();
    let parent = match cycle
        .parent_adapter
        .and_then(|v| run.store.adapter(v).ok().flatten())
    {
        Some(rec) => {
            let w = adapters::load_version(run.home, &rec, &run.l.id, &mcfg)?;
            (w.cfg == lora).then_some(w)
        }
        None => None,
    };
    records::set_status(run.store, cycle.id, "training")?;
    run.l.engine.model.set_adapter(None);
    run.l.engine.reset();
    // The trainer holds a second model on the same weights, so the engine can answer the
    // probes with the adapter as it is between stretches of training.
    let train_model = run.l.engine.model.fork();
    let mut job = TrainJob::start(
        &train_model,
        &run.l.id.sha256,
        JobSpec {
            cfg,
            data: ds,
            cache_limit,
            checkpoint: adapters::adapters_dir(run.home)
                .join(format!("learn-cycle-{}.safetensors", cycle.id)),
            init: parent,
            bad_checkpoint: BadCheckpoint::Restart,
            save_every_steps: None,
            save_every: Duration::from_secs(60),
        },
    )?;
    let probes = new_probes(&set.items);
    let Some(checks) = train_adaptively(run, cycle, opts, &mut job, &probes)? else {
        return Ok(None);
    };
    let steps_trained = job.trainer.step;
    let seqs_skipped = job.trainer.skipped;
    let description = format!(
        "learning cycle {}: {} notes, {}",
        cycle.id,
        cycle.notes.len(),
        job.trainer.data().description
    );
    let done = job.finish(
        run.home,
        run.store,
        &run.l.id,
        cycle.parent_adapter,
        description,
        false,
    )?;
    records::set_candidate(run.store, cycle.id, done.version, done.tokens)?;
    done.clear_checkpoint();
    Ok(Some(Trained {
        candidate: done.version,
        steps_planned,
        steps_trained,
        seqs_skipped,
        checks,
    }))
}

/// Trains in stretches; between them (with `opts.adaptive`) answers the new probes with the
/// adapter so far and stops once [`adaptive::EarlyStop`] says the notes are learned. `None`:
/// interrupted (checkpointed).
fn train_adaptively(
    run: &mut Run,
    cycle: &Cycle,
    opts: &LearnOptions,
    job: &mut TrainJob,
    probes: &[&Item],
) -> Result<Option<Vec<adaptive::Check>>> {
    let steps = job.trainer.cfg.steps;
    let mut stopper = adaptive::EarlyStop::new(
        job.trainer.data().seqs.len(),
        steps,
        probes.len(),
        opts.gate.min_new,
    );
    let tt = Instant::now();
    let mut run_tokens = 0usize;
    let system = run.system();
    loop {
        let until = if opts.adaptive {
            stopper.next_check(job.trainer.step)
        } else {
            steps
        };
        let cancel = run.cancel;
        let outcome = job.run_until(until, cancel, &mut |ev| match ev {
            JobEvent::Step(r) => {
                run_tokens += r.tokens;
                let tps = run_tokens as f64 / tt.elapsed().as_secs_f64().max(1e-9);
                run.report(
                    Phase::Training,
                    r.step,
                    steps,
                    tps,
                    format!("loss {:.3} | {:.0} MiB", r.loss, mib(r.peak_rss)),
                );
            }
            JobEvent::CheckpointFailed { step, error, .. } => tracing::warn!(
                "cycle {}: could not save the checkpoint at step {step} ({error}); training goes on and retries after every step",
                cycle.id
            ),
            JobEvent::CheckpointRecovered { step } => {
                tracing::info!("cycle {}: checkpoint saved again at step {step}", cycle.id)
            }
        })?;
        if outcome == Outcome::Interrupted {
            return Ok(None);
        }
        let step = job.trainer.step;
        if step >= steps || !opts.adaptive || !stopper.due(step) {
            break;
        }
        // While the loss still falls, training goes on whatever the probes say: they are not
        // asked (each check answers every new probe, a few seconds per ten).
        let correct = if stopper.loss_is_flat(&job.trainer.losses) {
            run.report(
                Phase::Training,
                step,
                steps,
                0.0,
                "checking the new probes".into(),
            );
            let adapter = Arc::new(job.trainer.weights()?.prepare()?);
            run.l.engine.model.set_adapter(Some(adapter));
            let answered = probe_correct(&mut run.l.engine, system.as_deref(), probes, run.cancel)?;
            run.l.engine.model.set_adapter(None);
            let Some(correct) = answered else {
                job.save_checkpoint()?;
                return Ok(None);
            };
            Some(correct)
        } else {
            None
        };
        let stop = stopper.decide(step, correct, &job.trainer.losses);
        tracing::info!(
            "cycle {}: step {step}/{steps}: {} new probes, loss {:.3} (before {:.3}){}",
            cycle.id,
            correct.map_or("not asked (loss still falling):".to_string(), |c| format!(
                "{c}/{}",
                probes.len()
            )),
            stopper.checks.last().map_or(0.0, |c| c.loss),
            stopper.checks.last().map_or(0.0, |c| c.loss_before),
            if stop {
                ": learned what it can, stopping"
            } else {
                ""
            }
        );
        if stop {
            break;
        }
    }
    Ok(Some(stopper.checks))
}

/// Step 6: the gate: general drift on held-out anchors, the earlier notes' probes before and
/// after, and the new notes' probes, then [`decide`]. `None`: interrupted.
fn gate(
    run: &mut Run,
    cycle: &Cycle,
    opts: &LearnOptions,
    set: &TrainingSet,
    trained: &Trained,
) -> Result<Option<(GateReport, bool, String)>> {
    let new_probes = new_probes(&set.items);
    let old_probes: Vec<&Item> = set.earlier.iter().filter(|i| i.role == "probe").collect();
    let mut g = GateReport {
        new_probes: new_probes.len(),
        old_probes: old_probes.len(),
        general_prompts: set.anchor_held.len(),
        skipped: opts.no_gate,
        steps_planned: trained.steps_planned,
        steps_trained: trained.steps_trained,
        seqs_skipped: trained.seqs_skipped,
        checks: trained.checks.clone(),
        ..GateReport::default()
    };
    if opts.no_gate {
        return Ok(Some((
            g,
            true,
            "activated without a gate (--no-gate)".to_string(),
        )));
    }
    let mcfg = run.l.engine.model.cfg.clone();
    let cand_rec = run
        .store
        .adapter(trained.candidate)?
        .context("the candidate adapter's record is missing")?;
    let cand = adapters::load_version(run.home, &cand_rec, &run.l.id, &mcfg)?;
    let system = run.system();
    let sys = system.as_deref();
    run.report(Phase::Gate, 0, 3, 0.0, "general drift".into());
    run.l.engine.model.set_adapter(None);
    let Some(base_nll) = base_general_nll(run, sys, &set.anchor_held)? else {
        return Ok(None);
    };
    if !old_probes.is_empty() {
        let prev = match cycle
            .parent_adapter
            .and_then(|v| run.store.adapter(v).ok().flatten())
        {
            Some(rec) => Some(Arc::new(
                adapters::load_version(run.home, &rec, &run.l.id, &mcfg)?.prepare()?,
            )),
            None => None,
        };
        run.l.engine.model.set_adapter(prev);
        let Some(n) = probe_correct(&mut run.l.engine, sys, &old_probes, run.cancel)? else {
            return Ok(None);
        };
        g.old_correct_before = n;
    }
    run.l
        .engine
        .model
        .set_adapter(Some(Arc::new(cand.prepare()?)));
    run.report(Phase::Gate, 1, 3, 0.0, "probes".into());
    let Some(n) = probe_correct(&mut run.l.engine, sys, &new_probes, run.cancel)? else {
        return Ok(None);
    };
    g.new_correct = n;
    let Some(n) = probe_correct(&mut run.l.engine, sys, &old_probes, run.cancel)? else {
        return Ok(None);
    };
    g.old_correct_after = n;
    run.report(Phase::Gate, 2, 3, 0.0, "general drift".into());
    let Some(after) = general_nll(&mut run.l.engine, sys, &set.anchor_held, run.cancel)? else {
        return Ok(None);
    };
    g.general_nll_base = base_nll;
    g.general_nll_after = after;
    let (activated, reason) = decide(&g, &opts.gate);
    Ok(Some((g, activated, reason)))
}

/// Records the gate's decision, activating the candidate when it passed.
fn finish(
    run: &mut Run,
    cycle: &Cycle,
    g: GateReport,
    activated: bool,
    reason: String,
    candidate: i64,
    t0: Instant,
) -> Result<CycleOutcome> {
    if activated {
        run.store
            .set_active_adapter(&run.l.id.sha256, Some(candidate))?;
    }
    records::finish(
        run.store,
        cycle.id,
        activated,
        &serde_json::to_string(&g)?,
        &reason,
        &cycle.notes,
    )?;
    let train_tokens = records::get(run.store, cycle.id)?
        .map(|c| c.train_tokens.max(0) as u64)
        .unwrap_or(0);
    Ok(CycleOutcome::Done {
        cycle: cycle.id,
        activated: activated.then_some(candidate),
        reason,
        gate: g,
        train_tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Accuracy of `engine` on probe items (answer contains the expected span). The greedy answer
/// stops as soon as it contains the span: the rest could not change the verdict.
pub(super) fn probe_correct(
    engine: &mut Engine,
    system: Option<&str>,
    probes: &[&Item],
    cancel: &AtomicBool,
) -> Result<Option<usize>> {
    let mut prompts: Vec<(Vec<u32>, Until)> = Vec::with_capacity(probes.len());
    for p in probes {
        let mut msgs: Vec<Message> = system.map(Message::system).into_iter().collect();
        msgs.push(Message::user(p.prompt.as_deref().unwrap_or("")));
        let expected = p.completion.clone();
        prompts.push((
            engine.chat_tokens(&msgs)?,
            Box::new(move |so_far: &str| contains_answer(so_far, &expected)),
        ));
    }
    // Decoded together, each answer stopped once it holds the expected span.
    let mut batch = engine.decode_until(prompts, PROBE_WIDTH, PROBE_TOKENS);
    let mut n = 0;
    while let Some((i, a)) = engine.next_answer(&mut batch, cancel)? {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if probes
            .get(i)
            .is_some_and(|p| contains_answer(a.generation.text.trim(), &p.completion))
        {
            n += 1;
        }
    }
    if cancel.load(Ordering::Relaxed) {
        return Ok(None);
    }
    Ok(Some(n))
}

/// [`general_nll`] of the base model (no adapter may be set), each prompt's loss taken from
/// the anchors where it is kept and kept there when it is not: it is the same every cycle.
fn base_general_nll(
    run: &mut Run,
    system: Option<&str>,
    held: &[(String, String)],
) -> Result<Option<f64>> {
    let mut sum = 0.0;
    for (p, a) in held {
        if run.cancelled() {
            return Ok(None);
        }
        let ex = data::chat_pair(&run.l.engine.codec(), system, p, a)?;
        let kept = records::anchor_base_nll(run.store, &run.l.id.sha256, p)?
            .and_then(|b| records::nll_from_blob(&b, &ex.tokens));
        sum += match kept {
            Some(nll) => nll,
            None => {
                let nll = run.l.engine.scored_nll(&ex.tokens, &ex.learn)?;
                let b = records::nll_blob(&ex.tokens, nll);
                records::set_anchor_base_nll(run.store, &run.l.id.sha256, p, &b)?;
                nll
            }
        };
    }
    Ok(Some(sum / held.len().max(1) as f64))
}

/// Mean answer NLL over held-out general prompts (the gate's drift measure).
fn general_nll(
    engine: &mut Engine,
    system: Option<&str>,
    held: &[(String, String)],
    cancel: &AtomicBool,
) -> Result<Option<f64>> {
    let mut sum = 0.0;
    for (p, a) in held {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let ex = data::chat_pair(&engine.codec(), system, p, a)?;
        sum += engine.scored_nll(&ex.tokens, &ex.learn)?;
    }
    Ok(Some(sum / held.len().max(1) as f64))
}
