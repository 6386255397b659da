//! Forgetting a note the adapter has learned. Removing (or editing) a learned note deletes it
//! from the notes at once, but its knowledge stays in the weights of every adapter trained since
//! the cycle that first learned it. The store records such a removal in `forgotten_notes`
//! (`Store::remove_note_because`); from then on answers that rest on it are held back
//! (`retrieve::forgotten_about`, used by `assistant`), and the next learning cycle is a
//! **rebuild**: it starts again from the adapter the note's first cycle was built on and trains
//! the notes learned since (their stored self-edits, copied into the new cycle) without it, with
//! the usual replay of earlier notes, anchors and gate. When the rebuilt adapter passes the gate
//! it becomes the active one; when it does not, the older adapter becomes active and the notes
//! learned since go back in the queue. Either way the removed note's text and self-edits are
//! erased.
//!
//! It must not delete notes (the store does, and records them here), train or gate (the
//! learning cycle does, with this module's plan), or keep a removed note's text or self-edits
//! after the rebuild.

use super::records::{self, Cycle};
use crate::home::Home;
use crate::store::{now_rfc3339, Store};
use anyhow::Result;
use rusqlite::params;

/// A removed note the weights may still hold.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Forgotten {
    pub note_id: i64,
    /// The first activated cycle that learned it (for this model).
    pub first_cycle: i64,
    pub removed_at: String,
    pub reason: String,
}

/// Removed notes still in this model's weights (not rebuilt away yet), oldest cycle first.
pub fn pending(store: &Store, model_sha256: &str) -> Result<Vec<Forgotten>> {
    let mut st = store.conn().prepare(
        "SELECT note_id, first_cycle, removed_at, reason FROM forgotten_notes
         WHERE model_sha256 = ?1 AND rebuilt_at IS NULL ORDER BY first_cycle, note_id",
    )?;
    let v = st
        .query_map(params![model_sha256], |r| {
            Ok(Forgotten {
                note_id: r.get(0)?,
                first_cycle: r.get(1)?,
                removed_at: r.get(2)?,
                reason: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

/// How many removed notes wait to be rebuilt away, over every model (cheap: the daemon asks).
pub fn pending_count(store: &Store) -> Result<usize> {
    let n: i64 = store.conn().query_row(
        "SELECT count(DISTINCT note_id) FROM forgotten_notes WHERE rebuilt_at IS NULL",
        [],
        |r| r.get(0),
    )?;
    Ok(n as usize)
}

/// What a rebuild does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The first cycle that learned a removed note: everything it and later cycles trained is
    /// redone.
    pub from_cycle: i64,
    /// The adapter that cycle was built on (None: the base model).
    pub parent: Option<i64>,
    /// Notes learned by those cycles that still exist, in id order.
    pub survivors: Vec<i64>,
    /// The removed notes it drops.
    pub forgotten: Vec<i64>,
}

/// The rebuild this model needs, if a removed note is still in its weights.
pub fn plan(store: &Store, model_sha256: &str) -> Result<Option<Plan>> {
    let pending = pending(store, model_sha256)?;
    let Some(from_cycle) = pending.iter().map(|f| f.first_cycle).min() else {
        return Ok(None);
    };
    let parent = records::get(store, from_cycle)?.and_then(|c| c.parent_adapter);
    let mut st = store.conn().prepare(
        "SELECT DISTINCT i.note_id FROM learn_items i JOIN learn_cycles c ON c.id = i.cycle
         WHERE c.model_sha256 = ?1 AND c.activated = 1 AND c.id >= ?2 AND i.verdict = 'kept'
           AND i.note_id IN (SELECT id FROM notes)
         ORDER BY i.note_id",
    )?;
    let survivors = st
        .query_map(params![model_sha256, from_cycle], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    Ok(Some(Plan {
        from_cycle,
        parent,
        survivors,
        forgotten: pending.iter().map(|f| f.note_id).collect(),
    }))
}

/// Starts the rebuild cycle of `plan` (which has survivors): a cycle on the old parent over the
/// surviving notes, their kept self-edits copied in so that none is written again.
pub fn start(
    store: &mut Store,
    model: &str,
    model_sha256: &str,
    plan: &Plan,
    options: &str,
) -> Result<Cycle> {
    let cycle = records::start(
        store,
        model,
        model_sha256,
        &plan.survivors,
        options,
        plan.parent,
    )?;
    let tx = store.conn_mut().transaction()?;
    {
        let mut st = tx.prepare(
            "INSERT INTO learn_items (cycle, note_id, note_sha256, strategy, generator,
                 prompt_version, sampling, role, prompt, completion, verdict, reason, created_at)
             SELECT ?1, i.note_id, i.note_sha256, i.strategy, i.generator, i.prompt_version,
                 i.sampling, i.role, i.prompt, i.completion, i.verdict, i.reason, ?4
             FROM learn_items i JOIN learn_cycles c ON c.id = i.cycle
             WHERE c.model_sha256 = ?2 AND c.activated = 1 AND c.id >= ?3 AND c.id < ?1
               AND i.verdict = 'kept' AND i.note_id = ?5
             ORDER BY i.id",
        )?;
        let now = now_rfc3339();
        for n in &plan.survivors {
            st.execute(params![cycle.id, model_sha256, plan.from_cycle, now, n])?;
        }
    }
    tx.commit()?;
    Ok(cycle)
}

/// Ends a rebuild (cycle `cycle` built from `from_cycle`; `activated`: it passed the gate):
/// the earlier copies of the survivors' self-edits leave the replay pool (the rebuild's own
/// copies replace them), a rejected rebuild makes the old parent active and queues the
/// survivors again, and the removed notes' text and self-edits are erased, as are the adapter
/// versions trained on them (see [`erase`]). Returns a sentence for the cycle's reason.
pub fn complete(
    home: &Home,
    store: &mut Store,
    model_sha256: &str,
    cycle: &Cycle,
    from_cycle: i64,
    activated: bool,
) -> Result<String> {
    // A note removed while the rebuild trained was among its notes: the next cycle forgets it.
    let forgotten: Vec<i64> = pending(store, model_sha256)?
        .iter()
        .map(|f| f.note_id)
        .filter(|n| !cycle.notes.contains(n))
        .collect();
    if !activated {
        store.set_active_adapter(model_sha256, cycle.parent_adapter)?;
    }
    let tx = store.conn_mut().transaction()?;
    tx.execute(
        "UPDATE learn_items SET verdict = 'rebuilt'
         WHERE verdict = 'kept' AND cycle IN (
             SELECT id FROM learn_cycles
             WHERE model_sha256 = ?1 AND activated = 1 AND id >= ?2 AND id < ?3)",
        params![model_sha256, from_cycle, cycle.id],
    )?;
    if !activated {
        for n in &cycle.notes {
            tx.execute(
                "UPDATE notes SET learned_at = NULL, learn_attempts = 0 WHERE id = ?1",
                params![n],
            )?;
        }
    }
    let now = now_rfc3339();
    for n in &forgotten {
        tx.execute(
            "UPDATE forgotten_notes SET content = '', rebuilt_at = ?3, rebuilt_cycle = ?4
             WHERE note_id = ?1 AND model_sha256 = ?2 AND rebuilt_at IS NULL",
            params![n, model_sha256, now, cycle.id],
        )?;
        // The note's self-edits of every cycle go: its text must not outlive the rebuild.
        tx.execute("DELETE FROM learn_items WHERE note_id = ?1", params![n])?;
    }
    tx.commit()?;
    erase(home, store, model_sha256, from_cycle, cycle.id)?;
    let ids = note_list(&forgotten);
    Ok(if activated {
        format!("the adapter was rebuilt without {ids}")
    } else {
        format!(
            "the rebuilt adapter did not pass the gate, so the adapter from before {ids} was first learned is active again and {} note(s) learned since wait to be learned again",
            cycle.notes.len()
        )
    })
}

/// A rebuild with no surviving notes needs no training: the adapter the removed notes' first
/// cycle was built on becomes active again, and their text and self-edits are erased.
pub fn roll_back(
    home: &Home,
    store: &mut Store,
    model_sha256: &str,
    plan: &Plan,
) -> Result<String> {
    store.set_active_adapter(model_sha256, plan.parent)?;
    let now = now_rfc3339();
    let tx = store.conn_mut().transaction()?;
    tx.execute(
        "UPDATE learn_items SET verdict = 'rebuilt'
         WHERE verdict = 'kept' AND cycle IN (
             SELECT id FROM learn_cycles WHERE model_sha256 = ?1 AND activated = 1 AND id >= ?2)",
        params![model_sha256, plan.from_cycle],
    )?;
    for n in &plan.forgotten {
        tx.execute(
            "UPDATE forgotten_notes SET content = '', rebuilt_at = ?3
             WHERE note_id = ?1 AND model_sha256 = ?2 AND rebuilt_at IS NULL",
            params![n, model_sha256, now],
        )?;
        tx.execute("DELETE FROM learn_items WHERE note_id = ?1", params![n])?;
    }
    tx.commit()?;
    erase(home, store, model_sha256, plan.from_cycle, i64::MAX)?;
    let parent = match plan.parent {
        Some(v) => format!("adapter v{v}"),
        None => "the base model".to_string(),
    };
    Ok(format!(
        "{} forgotten: no note learned since depends on it, so {parent} answers again",
        note_list(&plan.forgotten)
    ))
}

/// Deletes the adapter versions that cycles `from_cycle..before_cycle` of this model trained
/// (they hold a removed note: `hone adapters use` must not bring it back), records first, then
/// files; then purges the full-text indexes and the write-ahead log, where a removed note's words
/// would otherwise linger.
fn erase(
    home: &Home,
    store: &mut Store,
    model_sha256: &str,
    from_cycle: i64,
    before_cycle: i64,
) -> Result<()> {
    let active = store.active_adapter(model_sha256)?.map(|a| a.version);
    let files: Vec<(i64, String)> = {
        let mut st = store.conn().prepare(
            "SELECT a.version, a.file FROM adapters a JOIN learn_cycles c
                 ON c.candidate_adapter = a.version
             WHERE c.model_sha256 = ?1 AND c.id >= ?2 AND c.id < ?3",
        )?;
        let v = st
            .query_map(params![model_sha256, from_cycle, before_cycle], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        v.into_iter().filter(|(v, _)| Some(*v) != active).collect()
    };
    let tx = store.conn_mut().transaction()?;
    for (v, _) in &files {
        tx.execute("DELETE FROM adapters WHERE version = ?1", params![v])?;
    }
    tx.commit()?;
    for (v, f) in &files {
        let path = home.root().join(f);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "adapter v{v} held a removed note and its record is gone, but {} could not be deleted: {e}; delete it by hand",
                    path.display()
                );
            }
        }
    }
    store.conn().execute_batch(
        "INSERT INTO notes_fts(notes_fts) VALUES('optimize');
         INSERT INTO forgotten_fts(forgotten_fts) VALUES('optimize');",
    )?;
    // Best effort: another reader may keep the log from being truncated now; later checkpoints
    // overwrite it.
    let _ = store
        .conn()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    Ok(())
}

fn note_list(ids: &[i64]) -> String {
    let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    match s.len() {
        1 => format!("note {}", s[0]),
        _ => format!("notes {}", s.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::records::{add_items, cycle_items, finish, learned_items, NewItem};
    use crate::retrieve::{forgotten_about, Common};

    fn item(text: &str) -> NewItem {
        NewItem {
            strategy: "passage".into(),
            generator: "note".into(),
            prompt_version: None,
            sampling: None,
            role: "train".into(),
            prompt: None,
            completion: text.into(),
            verdict: "kept".into(),
            reason: None,
        }
    }

    /// Two activated cycles (note 1; notes 2 and 3), then note 2 is removed: its answers are
    /// held back, the rebuild redoes the second cycle with note 3 alone, and afterwards nothing
    /// of note 2 is left.
    #[test]
    fn a_removed_note_is_held_back_then_rebuilt_away() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().to_path_buf());
        let mut store = Store::open(&home.db_path()).unwrap();
        let texts = [
            "The bakery on Linden Street closes at 2 pm on Saturdays.",
            "My locker at the climbing gym is number 318, behind the chalk bench.",
            "The dentist appointment moved to the ninth of March at eight.",
        ];
        let ids: Vec<i64> = texts
            .iter()
            .map(|t| store.add_note(t, None, None).unwrap().id())
            .collect();
        let c1 = records::start(&store, "m", "sha", &ids[..1], "{}", None).unwrap();
        add_items(&mut store, c1.id, ids[0], "", &[item(texts[0])]).unwrap();
        finish(&mut store, c1.id, true, "{}", "ok", &ids[..1]).unwrap();
        let c2 = records::start(&store, "m", "sha", &ids[1..], "{}", Some(7)).unwrap();
        for i in 1..3 {
            add_items(&mut store, c2.id, ids[i], "", &[item(texts[i])]).unwrap();
        }
        finish(&mut store, c2.id, true, "{}", "ok", &ids[1..]).unwrap();

        // A note never learned leaves nothing to forget.
        let never = store
            .add_note("A note no cycle saw.", None, None)
            .unwrap()
            .id();
        assert!(store.remove_note(never).unwrap());
        assert!(plan(&store, "sha").unwrap().is_none());

        let q = "Which locker at the climbing gym is mine?";
        assert!(forgotten_about(&store, q, &Common).unwrap().is_none());
        assert!(store.remove_note(ids[1]).unwrap());
        assert_eq!(pending_count(&store).unwrap(), 1);
        assert_eq!(
            forgotten_about(&store, q, &Common).unwrap().map(|m| m.id),
            Some(ids[1])
        );
        // Questions about the other notes are not held back.
        let other = "When does the bakery on Linden Street close?";
        assert!(forgotten_about(&store, other, &Common).unwrap().is_none());

        let p = plan(&store, "sha").unwrap().unwrap();
        assert_eq!(
            p,
            Plan {
                from_cycle: c2.id,
                parent: Some(7),
                survivors: vec![ids[2]],
                forgotten: vec![ids[1]],
            }
        );
        let c3 = start(&mut store, "m", "sha", &p, "{}").unwrap();
        assert_eq!(c3.parent_adapter, Some(7));
        let copied = cycle_items(&store, c3.id).unwrap();
        assert_eq!(copied.len(), 1);
        assert_eq!(copied[0].note_id, ids[2]);
        finish(&mut store, c3.id, true, "{}", "ok", &c3.notes).unwrap();
        let said = complete(&home, &mut store, "sha", &c3, p.from_cycle, true).unwrap();
        assert!(said.contains("rebuilt without note"), "{said}");

        assert_eq!(pending_count(&store).unwrap(), 0);
        assert!(forgotten_about(&store, q, &Common).unwrap().is_none());
        // Replay holds note 1 and the rebuild's copy of note 3, once each; nothing of note 2.
        let pool = learned_items(&store, "sha", i64::MAX).unwrap();
        let notes: Vec<i64> = pool.iter().map(|i| i.note_id).collect();
        assert_eq!(notes, vec![ids[0], ids[2]]);
        let left: i64 = store
            .conn()
            .query_row(
                "SELECT (SELECT count(*) FROM learn_items WHERE note_id = ?1)
                      + (SELECT count(*) FROM forgotten_notes WHERE content LIKE '%locker%')",
                [ids[1]],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
        assert!(plan(&store, "sha").unwrap().is_none());
    }

    /// A removed note that no later note depends on needs no training: the adapter from before
    /// it is active again.
    #[test]
    fn a_note_alone_in_its_cycles_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().to_path_buf());
        let mut store = Store::open(&home.db_path()).unwrap();
        let id = store
            .add_note("The spare key is under the blue flowerpot.", None, None)
            .unwrap()
            .id();
        let c = records::start(&store, "m", "sha", &[id], "{}", None).unwrap();
        add_items(&mut store, c.id, id, "", &[item("spare key flowerpot")]).unwrap();
        finish(&mut store, c.id, true, "{}", "ok", &[id]).unwrap();
        assert!(store.remove_note(id).unwrap());
        let p = plan(&store, "sha").unwrap().unwrap();
        assert!(p.survivors.is_empty());
        let said = roll_back(&home, &mut store, "sha", &p).unwrap();
        assert!(said.contains("the base model answers again"), "{said}");
        assert_eq!(pending_count(&store).unwrap(), 0);
        assert!(store.active_adapter("sha").unwrap().is_none());
    }
}
