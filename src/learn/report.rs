//! What `hone learn` shows, as text and JSON: its progress ([`progress_line`],
//! [`progress_message`]), a cycle's outcome ([`outcome_text`],
//! [`outcome_json`]), the estimate of the next cycle ([`estimate_text`]) and the log of recorded
//! cycles ([`log`]).
//!
//! It must not print, learn or change anything: it renders what the cycle, the estimate and the
//! records give, for the command line to print.

use super::estimate::Estimate;
use super::{records, CycleOutcome, Progress};
use crate::store::Store;
use anyhow::Result;
use serde_json::{json, Value};
use std::fmt::Write as _;

/// A progress line for a log without a progress bar (eval's child processes, output to a file).
pub fn progress_line(p: &Progress) -> String {
    format!(
        "   [{}] {}/{} {} | peak {:.0} MiB{}",
        p.phase.name(),
        p.done,
        p.total,
        p.message,
        p.peak_rss as f64 / 1048576.0,
        if p.tokens_per_s > 0.0 {
            format!(" | {:.0} tok/s", p.tokens_per_s)
        } else {
            String::new()
        }
    )
}

/// The message beside a progress bar: speed, what is done, peak memory.
pub fn progress_message(p: &Progress) -> String {
    let tps = if p.tokens_per_s > 0.0 {
        format!("{:.0} tok/s | ", p.tokens_per_s)
    } else {
        String::new()
    };
    format!(
        "{tps}{} | peak {:.0} MiB",
        p.message,
        p.peak_rss as f64 / 1048576.0
    )
}

/// The outcome as `hone learn --json` prints it (one object).
pub fn outcome_json(out: &CycleOutcome) -> Value {
    match out {
        CycleOutcome::NothingToLearn => json!({"outcome": "nothing"}),
        CycleOutcome::Forgotten { message } => json!({"outcome": "forgotten", "reason": message}),
        CycleOutcome::DryRun(notes) => json!({"outcome": "dry-run", "notes": notes}),
        CycleOutcome::Interrupted { cycle } => json!({"outcome": "interrupted", "cycle": cycle}),
        CycleOutcome::Done {
            cycle,
            activated,
            reason,
            gate,
            train_tokens,
            seconds,
        } => json!({"outcome": "done", "cycle": cycle, "activated": activated, "reason": reason,
               "gate": gate, "train_tokens": train_tokens, "seconds": seconds,
               "peak_rss_mb": crate::sys::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0}),
    }
}

/// The outcome as `hone learn` prints it: the dry run's self-edits and verdicts per note, or one
/// line (for an interrupted cycle, the line is for standard error).
pub fn outcome_text(out: &CycleOutcome) -> String {
    let mut s = String::new();
    match out {
        CycleOutcome::NothingToLearn => {
            s.push_str("nothing to learn: every note is learned (add some with `hone note add`)\n")
        }
        CycleOutcome::Forgotten { message } => {
            let _ = writeln!(s, "{message}");
        }
        CycleOutcome::DryRun(notes) => {
            for (nid, items) in notes {
                let _ = writeln!(s, "note {nid}:");
                for it in items.iter().filter(|i| i.verdict != "unused") {
                    let what = match &it.prompt {
                        Some(p) => format!("{p} => {}", it.completion),
                        None => it.completion.clone(),
                    };
                    let _ = writeln!(
                        s,
                        "  [{:<7}] {:<12} {:<5} {}{}",
                        it.verdict,
                        it.strategy,
                        it.role,
                        what.replace('\n', " "),
                        it.reason
                            .as_deref()
                            .map(|r| format!("  ({r})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        CycleOutcome::Interrupted { cycle } => {
            let _ = writeln!(
                s,
                "interrupted: cycle {cycle} continues where it stopped on the next `hone learn`"
            );
        }
        CycleOutcome::Done {
            cycle,
            activated,
            reason,
            gate,
            train_tokens,
            seconds,
        } => {
            let steps = if gate.steps_trained > 0 && gate.steps_trained < gate.steps_planned {
                format!(
                    ", stopped after {} of {} steps: learned what it could",
                    gate.steps_trained, gate.steps_planned
                )
            } else {
                String::new()
            };
            let skipped = if gate.seqs_skipped > 0 {
                format!(
                    ", {} passes over sequences already learned skipped",
                    gate.seqs_skipped
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "cycle {cycle} ({seconds:.0} s, {train_tokens} tokens trained{steps}{skipped}): {}{reason}",
                activated
                    .map(|v| format!("adapter v{v} is active; "))
                    .unwrap_or_default()
            );
            if let Some(p) = &gate.phases {
                let _ = writeln!(s, "  time: {p}");
            }
        }
    }
    s
}

/// `hone learn --estimate`: how long the next cycle would take, per phase, and what it rests on.
pub fn estimate_text(e: &Estimate) -> String {
    let mut s = String::new();
    let what = match e.continues {
        Some(c) => format!("continuing cycle {c}"),
        None => "the next cycle".to_string(),
    };
    let _ = writeln!(
        s,
        "{what}: {} notes, about {:.0} s ({:.1} min) on this machine with {} training kernels",
        e.notes.len(),
        e.total_seconds,
        e.total_seconds / 60.0,
        crate::kernels::train_kernels().name()
    );
    for (phase, secs) in &e.phases {
        let _ = writeln!(s, "  {phase:<10} {secs:>7.0} s");
    }
    let _ = writeln!(
        s,
        "  {} items + {} replayed + {} anchors ({} to answer, at {:.2} s each) -> {} sequences of {}; {} of {} planned steps expected ({:.0}%: {}), {} of them training a sequence not yet learned, at {:.2} s/step; {} new and {} earlier probes at {:.2} s each",
        e.train_items,
        e.replay_items,
        e.anchors,
        e.anchors_missing,
        e.seconds_per_anchor,
        e.sequences,
        e.seq_len,
        e.steps_expected,
        e.steps_planned,
        e.step_share * 100.0,
        e.step_share_from,
        e.steps_trained,
        e.seconds_per_step,
        e.new_probes,
        e.old_probes,
        e.seconds_per_probe
    );
    let _ = writeln!(s, "  (measured in {:.0} s)", e.measured_in);
    s
}

/// `hone learn --log`: the 50 most recent cycles, newest first, with their items' verdicts per
/// strategy; with `json` one object per cycle (the cycle and its items) per line.
pub fn log(store: &Store, json: bool) -> Result<String> {
    let cycles = records::recent(store, 50)?;
    let mut s = String::new();
    if json {
        for c in &cycles {
            let items = records::cycle_items(store, c.id)?;
            let _ = writeln!(s, "{}", json!({"cycle": c, "items": items}));
        }
        return Ok(s);
    }
    if cycles.is_empty() {
        s.push_str("no learning cycles yet: `hone learn` runs one\n");
    }
    for c in &cycles {
        let items = records::cycle_items(store, c.id)?;
        let mut per: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for i in &items {
            *per.entry((i.strategy.clone(), i.verdict.clone()))
                .or_default() += 1;
        }
        let counts: Vec<String> = per
            .iter()
            .filter(|((_, v), _)| v != "unused")
            .map(|((st, v), n)| format!("{st} {v} {n}"))
            .collect();
        let version = |v: Option<i64>| v.map(|v| format!("v{v}")).unwrap_or("-".into());
        let _ = writeln!(
            s,
            "cycle {} {} {} | {} notes | parent {} -> candidate {} | {} tokens | {}",
            c.id,
            &c.started_at[..c.started_at.len().min(19)],
            c.status,
            c.notes.len(),
            version(c.parent_adapter),
            version(c.candidate_adapter),
            c.train_tokens,
            c.reason.as_deref().unwrap_or("(unfinished)")
        );
        let _ = writeln!(s, "    items: {}", counts.join(", "));
    }
    Ok(s)
}
