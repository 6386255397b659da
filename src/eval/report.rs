//! What `hone eval` prints after its modes ran: the table of accuracy, retention, tokens and
//! times per mode, the batches of a sequential run, the gate's reports, and the JSON object for
//! scripts ([`table`]).
//!
//! It must not run anything or print: it renders the results for the command line to print.

use super::ModeResult;
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The results of `hone eval` for `model` as a Markdown table with notes under each mode, and
/// with `json_out` the JSON object as the last line.
pub fn table(model: &str, results: &[(String, ModeResult)], json_out: bool) -> String {
    let mut s = String::new();
    let before = results
        .iter()
        .find(|(m, _)| m == "base")
        .and_then(|(_, r)| r.retention_after);
    let base_right: Vec<String> = results
        .iter()
        .find(|(m, _)| m == "base")
        .map(|(_, r)| {
            r.retention_answers
                .iter()
                .filter(|a| a.correct)
                .map(|a| a.q.clone())
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(s, "model: {model}");
    let _ = writeln!(
        s,
        "| mode | accuracy | correct | retention before -> after | lost | tokens trained | cycle s | wall s | peak RSS MiB |",
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let mut modes = serde_json::Map::new();
    for (m, r) in results {
        let lost = r
            .retention_answers
            .iter()
            .filter(|a| !a.correct && base_right.contains(&a.q))
            .count();
        let _ = writeln!(
            s,
            "| {m} | {:.1}% | {}/{} | {} -> {} | {} | {} | {:.0} | {:.0} | {:.0} |",
            r.accuracy * 100.0,
            r.correct,
            r.total,
            before
                .map(|b| format!("{:.0}%", b * 100.0))
                .unwrap_or("-".into()),
            r.retention_after
                .map(|b| format!("{:.0}%", b * 100.0))
                .unwrap_or("-".into()),
            if r.retention_answers.is_empty() {
                "-".to_string()
            } else {
                lost.to_string()
            },
            r.train_tokens,
            r.cycle_s,
            r.wall_s,
            r.peak_rss_mb
        );
        let mut o = json!({"accuracy": r.accuracy, "correct": r.correct, "total": r.total,
            "retention_before": before, "retention_after": r.retention_after,
            "retention_lost": before.map(|_| lost), "train_tokens": r.train_tokens, "cycle_s": r.cycle_s,
            "wall_s": r.wall_s, "peak_rss_mb": r.peak_rss_mb, "gate": r.gate});
        if !r.batches.is_empty() {
            o["batches"] = serde_json::to_value(&r.batches).unwrap_or(Value::Null);
        }
        if !r.unrouted_retention_answers.is_empty() {
            let correct = r.unrouted_answers.iter().filter(|a| a.correct).count();
            let lost = r
                .unrouted_retention_answers
                .iter()
                .filter(|a| !a.correct && base_right.contains(&a.q))
                .count();
            let _ = writeln!(
                s,
                "    the adapter alone, without routing: {correct}/{} correct, {lost} general questions lost",
                r.unrouted_answers.len()
            );
            o["unrouted"] = json!({"correct": correct, "total": r.unrouted_answers.len(),
                "retention_lost": lost});
        }
        if !r.weights_answers.is_empty() {
            let correct = r.weights_answers.iter().filter(|a| a.correct).count();
            let _ = writeln!(
                s,
                "    the same cycle's weights alone (no retrieval, as `learn`): {correct}/{} correct",
                r.weights_answers.len()
            );
            o["weights_alone"] = json!({"correct": correct, "total": r.weights_answers.len()});
        }
        modes.insert(m.clone(), o);
        for (i, b) in r.batches.iter().enumerate() {
            let _ = writeln!(
                s,
                "    batch {}: {} notes, {} questions: {:.0}% after its own cycle, {:.0}% after the last (kept {:.0}%)",
                i + 1,
                b.notes,
                b.questions,
                b.after_own * 100.0,
                b.after_last * 100.0,
                if b.after_own > 0.0 { b.after_last / b.after_own * 100.0 } else { 100.0 }
            );
        }
        if let Some(g) = &r.gate {
            let _ = writeln!(s, "    gate: {g}");
        }
        if let (Some((planned, trained)), Some(p)) = (r.steps, r.phases) {
            let _ = writeln!(s, "    cycle: {trained} of {planned} steps; {p}");
        }
    }
    let acc = |m: &str| {
        results
            .iter()
            .find(|(x, _)| x == m)
            .map(|(_, r)| r.accuracy)
    };
    if let (Some(l), Some(c)) = (acc("learn"), acc("in-context")) {
        if c > 0.0 {
            let _ = writeln!(s, "learn / in-context = {:.0}%", l / c * 100.0);
        }
    }
    if let (Some(l), Some(p)) = (acc("learn"), acc("passage")) {
        let _ = writeln!(s, "learn - passage = {:+.1} points", (l - p) * 100.0);
    }
    if json_out {
        let _ = writeln!(s, "{}", json!({"model": model, "modes": modes}));
    }
    s
}
