//! What writer training stores in SQLite: its rounds and every sampled self-edit with its
//! score, reward and whether it was kept (`hone writer log`). A note's samples are written in
//! one transaction, so an interrupted round continues after the last finished note.
//!
//! It must NOT decide anything; it reads and writes rows.

use super::reward::Score;
use crate::store::{now_rfc3339, Store};
use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

/// One round as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub id: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub model: String,
    pub model_sha256: String,
    /// The questions file and its sha256.
    pub source: String,
    pub options: String,
    /// `samples`, `training`, `done` (or `measured` for round 0, which only measures).
    pub status: String,
    pub parent_writer: Option<i64>,
    pub writer: Option<i64>,
    pub notes: usize,
    pub kept: usize,
    pub mean_reward: Option<f64>,
    pub holdout_reward: Option<f64>,
    /// Rank correlation (Spearman) of the probe reward with the question reward over the
    /// round's samples: whether the user's own notes, which have only probes, can reward.
    pub probe_agreement: Option<f64>,
    pub wall_s: Option<f64>,
}

const ROUND_COLUMNS: &str = "id, started_at, finished_at, model, model_sha256, source, options, \
    status, parent_writer, writer, notes, kept, mean_reward, holdout_reward, wall_s, probe_agreement";

fn round_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Round> {
    Ok(Round {
        id: r.get(0)?,
        started_at: r.get(1)?,
        finished_at: r.get(2)?,
        model: r.get(3)?,
        model_sha256: r.get(4)?,
        source: r.get(5)?,
        options: r.get(6)?,
        status: r.get(7)?,
        parent_writer: r.get(8)?,
        writer: r.get(9)?,
        notes: r.get::<_, i64>(10)? as usize,
        kept: r.get::<_, i64>(11)? as usize,
        mean_reward: r.get(12)?,
        holdout_reward: r.get(13)?,
        wall_s: r.get(14)?,
        probe_agreement: r.get(15)?,
    })
}

/// One sampled self-edit (or a note's passage-only baseline, `k` = -1).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub note_key: String,
    pub note_sha256: String,
    /// `train`, `holdout`, `baseline` or `holdout-baseline`.
    pub role: String,
    pub k: i64,
    pub seed: Option<u64>,
    pub text: String,
    pub items: usize,
    pub accuracy: f64,
    pub loglik: f64,
    pub reward: Option<f64>,
    /// The same after the same update, on the note's rule-made probes instead of its questions.
    pub probe: Score,
    pub probe_reward: Option<f64>,
    pub chosen: bool,
    pub reason: Option<String>,
}

pub fn start(
    store: &Store,
    model: &str,
    model_sha256: &str,
    source: &str,
    options: &str,
    status: &str,
    parent_writer: Option<i64>,
) -> Result<Round> {
    store.conn().execute(
        "INSERT INTO writer_rounds (started_at, model, model_sha256, source, options, status, parent_writer)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![now_rfc3339(), model, model_sha256, source, options, status, parent_writer],
    )?;
    let id = store.conn().last_insert_rowid();
    get(store, id)?.context("the new writer round vanished")
}

pub fn get(store: &Store, id: i64) -> Result<Option<Round>> {
    Ok(store
        .conn()
        .query_row(
            &format!("SELECT {ROUND_COLUMNS} FROM writer_rounds WHERE id = ?1"),
            params![id],
            round_row,
        )
        .optional()?)
}

/// The model's rounds, oldest first.
pub fn rounds(store: &Store, model_sha256: &str) -> Result<Vec<Round>> {
    let mut st = store.conn().prepare(&format!(
        "SELECT {ROUND_COLUMNS} FROM writer_rounds WHERE model_sha256 = ?1 ORDER BY id"
    ))?;
    let v = st
        .query_map(params![model_sha256], round_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

/// Every model's rounds, oldest first (a teacher's rounds are kept under the teacher).
pub fn all_rounds(store: &Store) -> Result<Vec<Round>> {
    let mut st = store.conn().prepare(&format!(
        "SELECT {ROUND_COLUMNS} FROM writer_rounds ORDER BY id"
    ))?;
    let v = st
        .query_map([], round_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

/// The model's round that was interrupted, if any.
pub fn unfinished(store: &Store, model_sha256: &str) -> Result<Option<Round>> {
    Ok(rounds(store, model_sha256)?
        .into_iter()
        .rfind(|r| r.finished_at.is_none()))
}

pub fn set_status(store: &Store, id: i64, status: &str) -> Result<()> {
    store.conn().execute(
        "UPDATE writer_rounds SET status = ?2 WHERE id = ?1",
        params![id, status],
    )?;
    Ok(())
}

/// Closes a round with its figures.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    store: &Store,
    id: i64,
    writer: Option<i64>,
    notes: usize,
    kept: usize,
    mean_reward: Option<f64>,
    holdout_reward: Option<f64>,
    probe_agreement: Option<f64>,
    wall_s: f64,
) -> Result<()> {
    store.conn().execute(
        "UPDATE writer_rounds SET finished_at = ?2, status = 'done', writer = ?3, notes = ?4, kept = ?5,
         mean_reward = ?6, holdout_reward = ?7, wall_s = ?8, probe_agreement = ?9 WHERE id = ?1",
        params![id, now_rfc3339(), writer, notes as i64, kept as i64, mean_reward, holdout_reward, wall_s, probe_agreement],
    )?;
    Ok(())
}

/// Adds the time spent in this run of the round (a resumed round adds up its runs).
pub fn add_wall(store: &Store, id: i64, seconds: f64) -> Result<()> {
    store.conn().execute(
        "UPDATE writer_rounds SET wall_s = COALESCE(wall_s, 0) + ?2 WHERE id = ?1",
        params![id, seconds],
    )?;
    Ok(())
}

/// Whether the note's samples of `roles` are stored in this round.
pub fn note_done(store: &Store, round: i64, note_key: &str, baseline_role: &str) -> Result<bool> {
    Ok(store
        .conn()
        .query_row(
            "SELECT 1 FROM writer_samples WHERE round = ?1 AND note_key = ?2 AND role = ?3 LIMIT 1",
            params![round, note_key, baseline_role],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Stores one note's samples (baseline included) in one transaction.
pub fn add_samples(store: &mut Store, round: i64, samples: &[Sample]) -> Result<()> {
    let tx = store.conn_mut().transaction()?;
    for s in samples {
        tx.execute(
            "INSERT INTO writer_samples (round, note_key, note_sha256, role, k, seed, text, items,
             accuracy, loglik, reward, chosen, reason, created_at, probe_accuracy, probe_loglik,
             probe_reward)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                round,
                s.note_key,
                s.note_sha256,
                s.role,
                s.k,
                s.seed.map(|x| x as i64),
                s.text,
                s.items as i64,
                s.accuracy,
                s.loglik,
                s.reward,
                s.chosen as i64,
                s.reason,
                now_rfc3339(),
                s.probe.accuracy,
                s.probe.loglik,
                s.probe_reward
            ],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// A round's samples, in the order they were stored.
pub fn samples(store: &Store, round: i64) -> Result<Vec<Sample>> {
    let mut st = store.conn().prepare(
        "SELECT note_key, note_sha256, role, k, seed, text, items, accuracy, loglik, reward, chosen, reason,
         probe_accuracy, probe_loglik, probe_reward
         FROM writer_samples WHERE round = ?1 ORDER BY id",
    )?;
    let v = st
        .query_map(params![round], |r| {
            Ok(Sample {
                note_key: r.get(0)?,
                note_sha256: r.get(1)?,
                role: r.get(2)?,
                k: r.get(3)?,
                seed: r.get::<_, Option<i64>>(4)?.map(|x| x as u64),
                text: r.get(5)?,
                items: r.get::<_, i64>(6)? as usize,
                accuracy: r.get(7)?,
                loglik: r.get(8)?,
                reward: r.get(9)?,
                chosen: r.get::<_, i64>(10)? != 0,
                reason: r.get(11)?,
                probe: Score {
                    accuracy: r.get::<_, Option<f64>>(12)?.unwrap_or(0.0),
                    loglik: r.get::<_, Option<f64>>(13)?.unwrap_or(0.0),
                },
                probe_reward: r.get(14)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}
