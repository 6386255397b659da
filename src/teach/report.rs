//! What `hone writer` shows: a finished round ([`round_line`]), the log of rounds
//! ([`log_line`]) and of one round's samples ([`sample_text`]), writer versions
//! ([`version_line`]).
//!
//! It must not print, train or change anything: it renders what `teach` and its records give,
//! for the command line to print.

use super::records::{Round, Sample};
use super::RoundReport;
use crate::store::AdapterRecord;

fn signed(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:+.digits$}"))
}

fn writer_name(v: Option<i64>) -> String {
    v.map_or("none".into(), |v| format!("w{v}"))
}

/// One line per round of `hone writer train`.
pub fn round_line(r: &RoundReport) -> String {
    format!(
        "round {}: {} notes, {} self-edits kept, mean reward {}, held-out reward {}, probe/question rank agreement {}, {:.0} s, writer {}",
        r.round,
        r.notes,
        r.kept,
        signed(r.mean_reward, 3),
        signed(r.holdout_reward, 3),
        signed(r.probe_agreement, 2),
        r.wall_s,
        writer_name(r.writer)
    )
}

/// One line per stored round (`hone writer log`).
pub fn log_line(r: &Round) -> String {
    format!(
        "#{:<3} {} {} {:<9} {} notes, {} kept, mean reward {}, held-out {}, agreement {}, {:.0} s, writer {} -> {}",
        r.id,
        &r.started_at[..r.started_at.len().min(19)],
        r.model,
        r.status,
        r.notes,
        r.kept,
        signed(r.mean_reward, 3),
        signed(r.holdout_reward, 3),
        signed(r.probe_agreement, 2),
        r.wall_s.unwrap_or(0.0),
        writer_name(r.parent_writer),
        writer_name(r.writer),
    )
}

/// A sample with its scores and decision, then the first lines of its text.
pub fn sample_text(s: &Sample) -> String {
    let mut out = format!(
        "{} {:<16} {:<16} k={:<2} acc {:.2} ll {:+.2} reward {} probe reward {} items {} {}",
        if s.chosen { "*" } else { " " },
        s.note_key,
        s.role,
        s.k,
        s.accuracy,
        s.loglik,
        signed(s.reward, 3),
        signed(s.probe_reward, 3),
        s.items,
        s.reason.as_deref().unwrap_or("")
    );
    if s.k >= 0 {
        for l in s.text.lines().take(8) {
            out.push_str(&format!("\n      | {l}"));
        }
    }
    out
}

/// One line per writer version (`hone writer list`; `*` marks the one in use).
pub fn version_line(r: &AdapterRecord) -> String {
    format!(
        "{} w{:<3} {} parent {} | {} steps | {} | {}",
        if r.active { "*" } else { " " },
        r.version,
        &r.created_at[..r.created_at.len().min(19)],
        writer_name(r.parent),
        r.steps,
        crate::sys::human_bytes(r.bytes),
        r.data.as_deref().unwrap_or("")
    )
}

/// What `hone writer list` says when the model has no writer version.
pub fn no_versions(model: &str, shipped: bool) -> String {
    format!(
        "no writer versions for {model}: the {} writes (`hone writer train --qa FILE` trains one)",
        if shipped {
            "writer shipped with hone"
        } else {
            "model alone"
        }
    )
}

/// `hone writer log`: one line per round, or how to start when there is none.
pub fn log_text(rounds: &[Round]) -> String {
    if rounds.is_empty() {
        return "no writer rounds yet: `hone writer train --qa FILE`".into();
    }
    rounds.iter().map(log_line).collect::<Vec<_>>().join("\n")
}

/// `hone writer list`: one line per version, or what writes when there is none.
pub fn versions_text(all: &[AdapterRecord], model: &str, shipped: bool) -> String {
    if all.is_empty() {
        return no_versions(model, shipped);
    }
    all.iter().map(version_line).collect::<Vec<_>>().join("\n")
}
