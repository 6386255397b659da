//! hone's own data for `/v1/hone/...` and the page: notes, the learning log, the schedule's
//! decision and the daemon's status, as JSON, from the same library calls the command line
//! uses (`hone note`, `hone learn --log`, `hone schedule show`, `hone daemon status`).
//!
//! Feedback on an answer (`POST /v1/hone/feedback`) goes through `feedback` as `/good`, `/bad`
//! and `/fix` do in chat; candidate notes are listed, kept and discarded through `candidates`.
//!
//! It must not change anything but notes, candidate notes and feedback, and must not start or
//! stop learning.

use crate::daemon;
use crate::daemon_lock;
use crate::device;
use crate::home::Home;
use crate::learn::records;
use crate::signals;
use crate::store::{NoteAdded, Store};
use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

fn open(home: &Home) -> Result<Store> {
    Ok(Store::open(&home.db_path())?)
}

/// The newest `limit` notes.
pub fn notes(home: &Home, limit: usize) -> Result<Value> {
    let notes = open(home)?.list_notes(Some(limit))?;
    let data: Vec<Value> = notes
        .iter()
        .map(|n| {
            json!({"id": n.id, "created_at": n.created_at, "source": n.source,
                   "section": n.section, "content": n.content})
        })
        .collect();
    Ok(json!({"object": "list", "data": data}))
}

/// Stores a note (checked as `hone note add` checks it); `(id, added)`, added false when the
/// same text was stored before.
pub fn add_note(home: &Home, text: &str) -> Result<(i64, bool)> {
    let text = crate::notes::note_from_bytes(text.as_bytes(), "the note")?;
    if text.trim().is_empty() {
        anyhow::bail!("the note is empty");
    }
    Ok(match open(home)?.add_note(&text, Some("serve"), None)? {
        NoteAdded::Added(id) => (id, true),
        NoteAdded::Duplicate(id) => (id, false),
    })
}

/// Removes a note; false when there is none with that id.
pub fn remove_note(home: &Home, id: i64) -> Result<bool> {
    Ok(open(home)?.remove_note(id)?)
}

/// Feedback on exchange `exchange_id` (as `/good`, `/bad`, `/fix TEXT` in chat): a rating
/// ("good" or "bad"; "bad" when only a correction is given), and a correction that becomes a note
/// superseding the note the answer rested on.
pub fn feedback(
    home: &Home,
    exchange_id: i64,
    rating: Option<&str>,
    correction: Option<&str>,
) -> Result<Value, crate::feedback::FeedbackError> {
    use crate::feedback::{self, Rating};
    let store = Store::open(&home.db_path())?;
    let rating: Option<Rating> = rating.map(str::parse).transpose()?;
    let o = match (correction, rating) {
        (Some(c), None | Some(Rating::Bad)) => feedback::correct(&store, exchange_id, c)?,
        (Some(_), Some(Rating::Good)) => {
            return Err(feedback::FeedbackError::BadRating(
                "good with a correction".into(),
            ))
        }
        (None, Some(r)) => feedback::rate(&store, exchange_id, r)?,
        (None, None) => return Err(feedback::FeedbackError::BadRating(String::new())),
    };
    Ok(
        json!({"exchange_id": exchange_id, "feedback_id": o.feedback_id,
              "requeued_note": o.requeued_note, "note": o.note, "superseded": o.superseded,
              "message": o.summary()}),
    )
}

/// The pending candidate notes, newest first (`hone note list --pending`).
pub fn candidates(home: &Home, limit: usize) -> Result<Value> {
    let c = open(home)?.candidates("pending", Some(limit))?;
    Ok(json!({"object": "list", "data": c}))
}

/// Keeps (`keep`) or discards a pending candidate note; the note's id when kept.
pub fn decide_candidate(
    home: &Home,
    id: i64,
    keep: bool,
) -> Result<Option<i64>, crate::candidates::CandidateError> {
    let store = Store::open(&home.db_path())?;
    if keep {
        Ok(Some(crate::candidates::keep(&store, id)?.id()))
    } else {
        crate::candidates::discard(&store, id)?;
        Ok(None)
    }
}

/// The newest `limit` learning cycles with how many items each strategy kept and dropped.
pub fn learning_log(home: &Home, limit: usize) -> Result<Value> {
    let store = open(home)?;
    let mut out = Vec::new();
    for c in records::recent(&store, limit)? {
        let items = records::cycle_items(&store, c.id)?;
        let mut per: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
        for i in &items {
            let e = per.entry(i.strategy.clone()).or_default();
            match i.verdict.as_str() {
                "kept" => e.0 += 1,
                "dropped" => e.1 += 1,
                _ => {}
            }
        }
        let counts: Vec<Value> = per
            .iter()
            .map(|(s, (k, d))| json!({"strategy": s, "kept": k, "dropped": d}))
            .collect();
        out.push(json!({"cycle": c, "items": counts}));
    }
    Ok(json!({"object": "list", "data": out}))
}

fn profile(home: &Home, device: Option<&str>) -> Result<device::Profile> {
    let (p, _) = device::resolve(
        Path::new("/"),
        device,
        Some(&device::override_path(home.root())),
    )?;
    Ok(p)
}

/// The schedule and whether learning may run now, and why (as `hone schedule show --json`).
pub fn schedule(home: &Home, device: Option<&str>) -> Result<Value> {
    let store = open(home)?;
    let profile = profile(home, device)?;
    let probe = signals::system_probe();
    // Two readings 300 ms apart: CPU load from /proc/stat deltas, not the 1-minute average.
    probe.cpu_load();
    std::thread::sleep(Duration::from_millis(300));
    let (s, d) = daemon::decision_now(home.root(), &store, &profile, probe.as_ref())?;
    let pid = daemon_lock::holder(home.root())?;
    Ok(
        json!({"schedule": s, "decision": d, "summary": format!("{d}"),
              "profile": profile.name, "daemon_pid": pid}),
    )
}

/// What the daemon does now (as `hone daemon status --json`), without the 300 ms CPU reading:
/// the decision here is the one `schedule` gives.
pub fn daemon_status(home: &Home) -> Result<Value> {
    let store = open(home)?;
    let pid = daemon_lock::holder(home.root())?;
    let st = daemon::read_status(&daemon::status_path(home.root()))?;
    let current = st.as_ref().filter(|s| Some(s.pid) == pid);
    let today = chrono::Local::now().date_naive();
    let learned = daemon::learned_minutes(&store, today)?;
    let pending = crate::learn::pending_notes(&store)?;
    Ok(json!({
        "running": pid.is_some(),
        "pid": pid,
        "status": current,
        "last_status": if current.is_none() { st.as_ref() } else { None },
        "pending_notes": pending,
        "learned_today_minutes": learned,
    }))
}
