//! The learning cycle's records in SQLite: cycles (notes, options, status, candidate, gate
//! decision), self-edit items with their provenance and verdicts, and the base model's answers
//! to the anchoring prompts. Tables are created by the store's migration v3.
//!
//! It must NOT decide anything: it reads and writes rows.

use crate::codec::SoftTargets;
use crate::store::{now_rfc3339, Store};
use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// One learning cycle.
#[derive(Debug, Clone, Serialize)]
pub struct Cycle {
    pub id: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub model: String,
    pub model_sha256: String,
    /// selfedits | training | gate | done
    pub status: String,
    pub notes: Vec<i64>,
    pub options: String,
    pub parent_adapter: Option<i64>,
    pub candidate_adapter: Option<i64>,
    pub activated: bool,
    pub train_tokens: i64,
    pub gate: Option<String>,
    pub reason: Option<String>,
}

/// A self-edit item to store.
#[derive(Debug, Clone, Serialize)]
pub struct NewItem {
    pub strategy: String,
    /// The model that wrote it, or "rules" / "note".
    pub generator: String,
    pub prompt_version: Option<String>,
    pub sampling: Option<String>,
    /// "train" or "probe".
    pub role: String,
    /// The user turn; None for plain text.
    pub prompt: Option<String>,
    pub completion: String,
    /// "kept", "dropped" or "unused" (a strategy not selected).
    pub verdict: String,
    pub reason: Option<String>,
}

/// A stored item.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub id: i64,
    pub cycle: i64,
    pub note_id: i64,
    pub strategy: String,
    pub generator: String,
    pub role: String,
    pub prompt: Option<String>,
    pub completion: String,
    pub verdict: String,
    pub reason: Option<String>,
}

const CYCLE_COLUMNS: &str =
    "id, started_at, finished_at, model, model_sha256, status, notes, options, \
     parent_adapter, candidate_adapter, activated, train_tokens, gate, reason";
const ITEM_COLUMNS: &str =
    "id, cycle, note_id, strategy, generator, role, prompt, completion, verdict, reason";

fn cycle_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Cycle> {
    let notes: String = r.get(6)?;
    Ok(Cycle {
        id: r.get(0)?,
        started_at: r.get(1)?,
        finished_at: r.get(2)?,
        model: r.get(3)?,
        model_sha256: r.get(4)?,
        status: r.get(5)?,
        notes: serde_json::from_str(&notes).unwrap_or_default(),
        options: r.get(7)?,
        parent_adapter: r.get(8)?,
        candidate_adapter: r.get(9)?,
        activated: r.get::<_, i64>(10)? != 0,
        train_tokens: r.get(11)?,
        gate: r.get(12)?,
        reason: r.get(13)?,
    })
}

fn item_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    Ok(Item {
        id: r.get(0)?,
        cycle: r.get(1)?,
        note_id: r.get(2)?,
        strategy: r.get(3)?,
        generator: r.get(4)?,
        role: r.get(5)?,
        prompt: r.get(6)?,
        completion: r.get(7)?,
        verdict: r.get(8)?,
        reason: r.get(9)?,
    })
}

/// The unfinished cycle of this model, if any.
pub fn unfinished(store: &Store, model_sha256: &str) -> Result<Option<Cycle>> {
    Ok(store
        .conn()
        .query_row(
            &format!(
                "SELECT {CYCLE_COLUMNS} FROM learn_cycles WHERE model_sha256 = ?1 AND status != 'done' ORDER BY id DESC LIMIT 1"
            ),
            params![model_sha256],
            cycle_row,
        )
        .optional()?)
}

/// Notes waiting to be learned: never-tried first (so one refused batch does not keep newer
/// notes waiting behind its retry), then oldest first. A note rejected by the gate twice waits
/// for the user (`hone learn --retry`).
pub fn pending_note_ids(store: &Store, limit: usize) -> Result<Vec<i64>> {
    let mut st = store.conn().prepare(
        "SELECT id FROM notes WHERE learned_at IS NULL AND learn_attempts < 2
         ORDER BY learn_attempts, id LIMIT ?1",
    )?;
    let ids = st
        .query_map(params![limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    Ok(ids)
}

/// The cycle that trained adapter `version`, if a cycle did.
pub fn cycle_of_adapter(store: &Store, version: i64) -> Result<Option<Cycle>> {
    Ok(store
        .conn()
        .query_row(
            &format!("SELECT {CYCLE_COLUMNS} FROM learn_cycles WHERE candidate_adapter = ?1"),
            params![version],
            cycle_row,
        )
        .optional()?)
}

/// Those of `ids` that exist and are not learned yet, in order.
pub fn unlearned(store: &Store, ids: &[i64]) -> Result<Vec<i64>> {
    let mut st = store
        .conn()
        .prepare("SELECT 1 FROM notes WHERE id = ?1 AND learned_at IS NULL")?;
    let mut out = Vec::new();
    for id in ids {
        if st.exists(params![id])? {
            out.push(*id);
        }
    }
    Ok(out)
}

/// How many notes wait to be learned (cheap: the daemon asks every few seconds).
pub fn pending_count(store: &Store) -> Result<usize> {
    let n: i64 = store.conn().query_row(
        "SELECT COUNT(*) FROM notes WHERE learned_at IS NULL AND learn_attempts < 2",
        [],
        |r| r.get(0),
    )?;
    Ok(n as usize)
}

/// Puts notes the gate gave up on back in the queue.
pub fn retry_rejected(store: &Store) -> Result<usize> {
    Ok(store.conn().execute(
        "UPDATE notes SET learn_attempts = 0 WHERE learned_at IS NULL AND learn_attempts > 0",
        [],
    )?)
}

/// Starts a cycle over `notes`.
pub fn start(
    store: &Store,
    model: &str,
    model_sha256: &str,
    notes: &[i64],
    options: &str,
    parent_adapter: Option<i64>,
) -> Result<Cycle> {
    store.conn().execute(
        "INSERT INTO learn_cycles (started_at, model, model_sha256, status, notes, options, parent_adapter)
         VALUES (?1, ?2, ?3, 'selfedits', ?4, ?5, ?6)",
        params![now_rfc3339(), model, model_sha256, serde_json::to_string(notes)?, options, parent_adapter],
    )?;
    let id = store.conn().last_insert_rowid();
    get(store, id)?.context("the new cycle vanished")
}

pub fn get(store: &Store, id: i64) -> Result<Option<Cycle>> {
    Ok(store
        .conn()
        .query_row(
            &format!("SELECT {CYCLE_COLUMNS} FROM learn_cycles WHERE id = ?1"),
            params![id],
            cycle_row,
        )
        .optional()?)
}

/// The most recent cycles, newest first.
pub fn recent(store: &Store, limit: usize) -> Result<Vec<Cycle>> {
    let mut st = store.conn().prepare(&format!(
        "SELECT {CYCLE_COLUMNS} FROM learn_cycles ORDER BY id DESC LIMIT ?1"
    ))?;
    let v = st
        .query_map(params![limit as i64], cycle_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

pub fn set_status(store: &Store, id: i64, status: &str) -> Result<()> {
    store.conn().execute(
        "UPDATE learn_cycles SET status = ?2 WHERE id = ?1",
        params![id, status],
    )?;
    Ok(())
}

/// Replaces a finished cycle's recorded reason (a rebuild adds what it forgot).
pub fn set_reason(store: &Store, id: i64, reason: &str) -> Result<()> {
    store.conn().execute(
        "UPDATE learn_cycles SET reason = ?2 WHERE id = ?1",
        params![id, reason],
    )?;
    Ok(())
}

pub fn set_candidate(store: &Store, id: i64, version: i64, train_tokens: u64) -> Result<()> {
    store.conn().execute(
        "UPDATE learn_cycles SET candidate_adapter = ?2, train_tokens = ?3, status = 'gate' WHERE id = ?1",
        params![id, version, train_tokens as i64],
    )?;
    Ok(())
}

/// Records the gate's decision and what it means for the notes, in one transaction.
pub fn finish(
    store: &mut Store,
    id: i64,
    activated: bool,
    gate_json: &str,
    reason: &str,
    notes: &[i64],
) -> Result<()> {
    let tx = store.conn_mut().transaction()?;
    let now = now_rfc3339();
    tx.execute(
        "UPDATE learn_cycles SET status = 'done', finished_at = ?2, activated = ?3, gate = ?4, reason = ?5 WHERE id = ?1",
        params![id, now, activated as i64, gate_json, reason],
    )?;
    for n in notes {
        if activated {
            tx.execute(
                "UPDATE notes SET learned_at = ?2 WHERE id = ?1",
                params![n, now],
            )?;
        } else {
            tx.execute(
                "UPDATE notes SET learn_attempts = learn_attempts + 1 WHERE id = ?1",
                params![n],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Whether the note's self-edits for this cycle are stored (they are written in one transaction).
pub fn has_items(store: &Store, cycle: i64, note_id: i64) -> Result<bool> {
    Ok(store
        .conn()
        .query_row(
            "SELECT 1 FROM learn_items WHERE cycle = ?1 AND note_id = ?2 LIMIT 1",
            params![cycle, note_id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Stores a note's items for a cycle, all or none.
pub fn add_items(
    store: &mut Store,
    cycle: i64,
    note_id: i64,
    note_sha256: &str,
    items: &[NewItem],
) -> Result<()> {
    let tx = store.conn_mut().transaction()?;
    let now = now_rfc3339();
    {
        let mut st = tx.prepare(
            "INSERT INTO learn_items (cycle, note_id, note_sha256, strategy, generator, prompt_version, sampling, role, prompt, completion, verdict, reason, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        for it in items {
            st.execute(params![
                cycle,
                note_id,
                note_sha256,
                it.strategy,
                it.generator,
                it.prompt_version,
                it.sampling,
                it.role,
                it.prompt,
                it.completion,
                it.verdict,
                it.reason,
                now
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Items of one cycle (all verdicts), in insertion order.
pub fn cycle_items(store: &Store, cycle: i64) -> Result<Vec<Item>> {
    let mut st = store.conn().prepare(&format!(
        "SELECT {ITEM_COLUMNS} FROM learn_items WHERE cycle = ?1 ORDER BY id"
    ))?;
    let v = st
        .query_map(params![cycle], item_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

/// Kept items of earlier cycles of this model whose adapter was activated (replay and old
/// probes), oldest first. A note the user removed is not among them: its items leave the replay
/// pool, and the gate no longer guards its probes.
pub fn learned_items(store: &Store, model_sha256: &str, before_cycle: i64) -> Result<Vec<Item>> {
    let mut st = store.conn().prepare(&format!(
        "SELECT {} FROM learn_items i JOIN learn_cycles c ON c.id = i.cycle
         WHERE c.model_sha256 = ?1 AND c.activated = 1 AND c.id < ?2 AND i.verdict = 'kept'
           AND i.note_id IN (SELECT id FROM notes)
         ORDER BY i.id",
        ITEM_COLUMNS
            .split(", ")
            .map(|c| format!("i.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))?;
    let v = st
        .query_map(params![model_sha256, before_cycle], item_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

/// The base model's stored answers to anchoring prompts.
pub fn anchors(store: &Store, model_sha256: &str) -> Result<Vec<(String, String)>> {
    Ok(anchors_with_soft(store, model_sha256)?
        .into_iter()
        .map(|(p, a, _)| (p, a))
        .collect())
}

/// An anchoring prompt, the base model's answer and the distribution kept over it.
pub type StoredAnchor = (String, String, Option<Vec<u8>>);

/// The base model's stored answers to anchoring prompts, with the distribution kept over each
/// (see [`soft_blob`]).
pub fn anchors_with_soft(store: &Store, model_sha256: &str) -> Result<Vec<StoredAnchor>> {
    let mut st = store
        .conn()
        .prepare("SELECT prompt, answer, soft FROM anchors WHERE model_sha256 = ?1")?;
    let v = st
        .query_map(params![model_sha256], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

pub fn add_anchor(
    store: &Store,
    model_sha256: &str,
    prompt: &str,
    answer: &str,
    soft: Option<&[u8]>,
) -> Result<()> {
    store.conn().execute(
        "INSERT OR REPLACE INTO anchors (model_sha256, prompt, answer, created_at, soft) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![model_sha256, prompt, answer, now_rfc3339(), soft],
    )?;
    Ok(())
}

/// Keeps the distribution over a stored anchoring answer.
pub fn set_anchor_soft(store: &Store, model_sha256: &str, prompt: &str, soft: &[u8]) -> Result<()> {
    store.conn().execute(
        "UPDATE anchors SET soft = ?3 WHERE model_sha256 = ?1 AND prompt = ?2",
        params![model_sha256, prompt, soft],
    )?;
    Ok(())
}

/// The base model's mean loss over a stored anchoring answer, as kept by [`set_anchor_base_nll`]
/// (None when none is kept).
pub fn anchor_base_nll(store: &Store, model_sha256: &str, prompt: &str) -> Result<Option<Vec<u8>>> {
    let v = store
        .conn()
        .query_row(
            "SELECT base_nll FROM anchors WHERE model_sha256 = ?1 AND prompt = ?2",
            params![model_sha256, prompt],
            |r| r.get::<_, Option<Vec<u8>>>(0),
        )
        .optional()?;
    Ok(v.flatten())
}

/// Keeps the base model's mean loss over a stored anchoring answer.
pub fn set_anchor_base_nll(
    store: &Store,
    model_sha256: &str,
    prompt: &str,
    blob: &[u8],
) -> Result<()> {
    store.conn().execute(
        "UPDATE anchors SET base_nll = ?3 WHERE model_sha256 = ?1 AND prompt = ?2",
        params![model_sha256, prompt, blob],
    )?;
    Ok(())
}

/// A mean loss as stored: the first 8 bytes of the sha256 of the tokens it was measured on, then
/// the loss (f64 LE). Tied to the exact tokens, like [`soft_blob`].
pub fn nll_blob(tokens: &[u32], nll: f64) -> Vec<u8> {
    let mut out = tokens_digest(tokens).to_vec();
    out.extend_from_slice(&nll.to_le_bytes());
    out
}

/// The loss in `blob` when it was measured on these very `tokens`.
pub fn nll_from_blob(blob: &[u8], tokens: &[u32]) -> Option<f64> {
    if blob.len() != 16 || blob[..8] != tokens_digest(tokens) {
        return None;
    }
    let v = f64::from_le_bytes(blob[8..].try_into().ok()?);
    v.is_finite().then_some(v)
}

const SOFT_MAGIC: &[u8; 4] = b"HSF1";

/// Soft targets as stored: magic, k (u8), the first 8 bytes of the sha256 of the token sequence
/// they belong to, then per position its index (u32 LE), its count (u8) and (token u32, p f32)
/// pairs. Tied to `k` and to the exact tokens, so a changed template, system prompt or k is
/// never served a stale distribution.
pub fn soft_blob(k: usize, tokens: &[u32], soft: &SoftTargets) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + soft.len() * (5 + 8 * k));
    out.extend_from_slice(SOFT_MAGIC);
    out.push(k.min(255) as u8);
    out.extend_from_slice(&tokens_digest(tokens));
    for (i, dist) in soft {
        out.extend_from_slice(&(*i as u32).to_le_bytes());
        out.push(dist.len().min(255) as u8);
        for (t, p) in dist.iter().take(255) {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    out
}

/// The soft targets in `blob` when it was written for `k` and these very `tokens`; None
/// otherwise (or when it is damaged: the caller computes them again).
pub fn soft_from_blob(blob: &[u8], k: usize, tokens: &[u32]) -> Option<SoftTargets> {
    let rest = blob.strip_prefix(SOFT_MAGIC)?;
    let (&bk, rest) = rest.split_first()?;
    if bk as usize != k.min(255) || rest.len() < 8 || rest[..8] != tokens_digest(tokens) {
        return None;
    }
    let mut rest = &rest[8..];
    let mut out = Vec::new();
    let u32_at =
        |b: &[u8]| -> Option<u32> { Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)) };
    while !rest.is_empty() {
        let i = u32_at(rest)? as usize;
        let n = *rest.get(4)? as usize;
        rest = &rest[5..];
        let mut dist = Vec::with_capacity(n);
        for _ in 0..n {
            let t = u32_at(rest)?;
            let p = f32::from_le_bytes(rest.get(4..8)?.try_into().ok()?);
            if !p.is_finite() || i >= tokens.len() {
                return None;
            }
            dist.push((t, p));
            rest = &rest[8..];
        }
        out.push((i, dist));
    }
    Some(out)
}

fn tokens_digest(tokens: &[u32]) -> [u8; 8] {
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_notes_wait_behind_notes_never_tried() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("hone.db")).unwrap();
        let ids: Vec<i64> = ["first note", "second note", "third note"]
            .iter()
            .map(|n| store.add_note(n, None, None).unwrap().id())
            .collect();
        assert_eq!(pending_note_ids(&store, 2).unwrap(), ids[..2]);
        let c = start(&store, "m", "sha", &ids[..2], "{}", None).unwrap();
        finish(&mut store, c.id, false, "{}", "rejected", &ids[..2]).unwrap();
        // The refused pair goes behind the third note, still oldest first among themselves.
        assert_eq!(
            pending_note_ids(&store, 3).unwrap(),
            vec![ids[2], ids[0], ids[1]]
        );
        let c = start(&store, "m", "sha", &ids[2..], "{}", None).unwrap();
        finish(&mut store, c.id, true, "{}", "activated", &ids[2..]).unwrap();
        assert_eq!(pending_note_ids(&store, 3).unwrap(), ids[..2]);
        assert_eq!(pending_count(&store).unwrap(), 2);
    }

    #[test]
    fn a_removed_note_leaves_the_replay_pool() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("hone.db")).unwrap();
        let ids: Vec<i64> = ["kept note", "removed note"]
            .iter()
            .map(|n| store.add_note(n, None, None).unwrap().id())
            .collect();
        let c = start(&store, "m", "sha", &ids, "{}", None).unwrap();
        let item = |text: &str| NewItem {
            strategy: "passage".into(),
            generator: "note".into(),
            prompt_version: None,
            sampling: None,
            role: "train".into(),
            prompt: None,
            completion: text.into(),
            verdict: "kept".into(),
            reason: None,
        };
        for (id, text) in ids.iter().zip(["kept note", "removed note"]) {
            add_items(&mut store, c.id, *id, "", &[item(text)]).unwrap();
        }
        finish(&mut store, c.id, true, "{}", "activated", &ids).unwrap();
        assert_eq!(learned_items(&store, "sha", c.id + 1).unwrap().len(), 2);
        assert!(store.remove_note(ids[1]).unwrap());
        let left = learned_items(&store, "sha", c.id + 1).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].note_id, ids[0]);
    }

    #[test]
    fn kept_soft_targets_come_back_only_for_their_tokens_and_k() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        let tokens = [5u32, 6, 7, 8];
        let soft: SoftTargets = vec![(2, vec![(7, 0.75), (1, 0.25)]), (3, vec![(8, 1.0)])];
        let blob = soft_blob(2, &tokens, &soft);
        add_anchor(&store, "m", "What is rain?", "Water falling.", Some(&blob)).unwrap();
        add_anchor(&store, "m", "Why?", "Because.", None).unwrap();
        let got = anchors_with_soft(&store, "m").unwrap();
        let kept = got.iter().find(|a| a.0 == "What is rain?").unwrap();
        let back = soft_from_blob(kept.2.as_ref().unwrap(), 2, &tokens).unwrap();
        assert_eq!(back, soft);
        assert!(got.iter().any(|a| a.0 == "Why?" && a.2.is_none()));
        // Another k, other tokens, or a damaged blob: computed again, never served.
        assert!(soft_from_blob(&blob, 4, &tokens).is_none());
        assert!(soft_from_blob(&blob, 2, &[5, 6, 7, 9]).is_none());
        assert!(soft_from_blob(&blob[..blob.len() - 3], 2, &tokens).is_none());
        // The base model's loss over an answer, kept the same way.
        assert_eq!(anchor_base_nll(&store, "m", "Why?").unwrap(), None);
        set_anchor_base_nll(&store, "m", "Why?", &nll_blob(&tokens, 0.75)).unwrap();
        let kept = anchor_base_nll(&store, "m", "Why?").unwrap().unwrap();
        assert_eq!(nll_from_blob(&kept, &tokens), Some(0.75));
        assert_eq!(nll_from_blob(&kept, &[5, 6, 7]), None);
        assert_eq!(nll_from_blob(&kept[..12], &tokens), None);
        set_anchor_soft(&store, "m", "Why?", &blob).unwrap();
        assert!(anchors_with_soft(&store, "m")
            .unwrap()
            .iter()
            .all(|a| a.2.is_some()));
    }
}
