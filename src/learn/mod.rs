//! The learning cycle: from the user's recent notes to a new, gated LoRA adapter.
//!
//! One cycle ([`run_cycle`]): pick notes not yet learned → write self-edits (rule-based cloze,
//! the model's own QA pairs, implications, rewrites, optionally by a larger teacher model) →
//! filter them → train the active adapter on notes + kept self-edits + replay of earlier notes +
//! general anchoring answers of the base model → gate the candidate on held-out probes and a
//! general set → activate it or keep the previous adapter, recording why.
//!
//! It must NOT decide *when* to run (that is `schedule` and the daemon), print, or read the
//! user's terminal; it reports progress through a callback and stops at the cancel flag,
//! leaving a resumable state.

use crate::home::Home;
use crate::registry::ModelChoice;
use crate::store::Store;
use anyhow::Result;
use std::sync::atomic::AtomicBool;

/// What one cycle may do.
#[derive(Debug, Clone)]
pub struct LearnOptions {
    /// At most this many notes per cycle (oldest unlearned first).
    pub max_notes: usize,
    /// Only print the self-edits and verdicts; no training.
    pub dry_run: bool,
    /// Process-wide memory budget in bytes.
    pub max_memory: Option<u64>,
    /// Compute threads.
    pub threads: Option<usize>,
}

impl Default for LearnOptions {
    fn default() -> Self {
        Self {
            max_notes: 20,
            dry_run: false,
            max_memory: None,
            threads: None,
        }
    }
}

/// The phase a cycle is in, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    SelfEdits,
    Anchors,
    Training,
    Gate,
}

/// A progress report.
#[derive(Debug, Clone)]
pub struct Progress {
    pub phase: Phase,
    pub done: usize,
    pub total: usize,
    pub tokens_per_s: f64,
    pub peak_rss: u64,
    pub message: String,
}

/// How a cycle ended.
#[derive(Debug, Clone)]
pub enum CycleOutcome {
    /// No unlearned notes.
    NothingToLearn,
    /// The cancel flag was set; the next call continues this cycle where it stopped.
    Interrupted { cycle: i64 },
    /// Finished: the gate's decision.
    Done {
        cycle: i64,
        activated: Option<i64>,
        reason: String,
    },
}

/// Notes waiting to be learned.
pub fn pending_notes(store: &Store) -> Result<usize> {
    Ok(store
        .list_notes(None)?
        .iter()
        .filter(|n| n.learned_at.is_none())
        .count())
}

/// Runs (or continues) one learning cycle.
pub fn run_cycle(
    _home: &Home,
    store: &mut Store,
    _choice: &ModelChoice,
    _opts: &LearnOptions,
    _cancel: &AtomicBool,
    _progress: &mut dyn FnMut(&Progress),
) -> Result<CycleOutcome> {
    if pending_notes(store)? == 0 {
        return Ok(CycleOutcome::NothingToLearn);
    }
    anyhow::bail!("the learning cycle is being built")
}
