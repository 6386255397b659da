//! Feedback on answers: `/good`, `/bad` and `/fix TEXT` in `hone chat`, and
//! `POST /v1/hone/feedback` in `hone serve`. A rating is stored with the exchange it judges; a
//! bad rating of an answer the adapter gave from its learned knowledge puts the note it rests on
//! back in the learning queue; a correction becomes a note that supersedes the note the answer
//! rested on (a cited note, else the learned note it was about), through the same path as
//! `hone note edit` (`notes::supersede`), or a new note when the answer rested on none.
//!
//! It reads where an answer came from as `assistant` recorded it (`Store::exchange_sources`).
//! It must not print, load a model, or change any note but the one the answer rested on.

use crate::notes::{EditError, Superseded};
use crate::store::{NewFeedback, NoteAdded, Store};

/// How the user judged an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rating {
    Good,
    Bad,
}

impl Rating {
    pub fn as_str(self) -> &'static str {
        match self {
            Rating::Good => "good",
            Rating::Bad => "bad",
        }
    }
}

impl std::str::FromStr for Rating {
    type Err = FeedbackError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "good" => Ok(Rating::Good),
            "bad" => Ok(Rating::Bad),
            other => Err(FeedbackError::BadRating(other.to_string())),
        }
    }
}

/// Why feedback was not stored.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("there is no exchange {0} (see `hone history`); nothing was stored")]
    NoSuchExchange(i64),
    #[error("the rating is {0:?}; it must be \"good\" or \"bad\"")]
    BadRating(String),
    #[error("the correction is empty; say what the right answer is")]
    EmptyCorrection,
    #[error(transparent)]
    Edit(#[from] EditError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What feedback did.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Outcome {
    pub feedback_id: i64,
    /// The learned note put back in the learning queue (a bad answer from the weights).
    pub requeued_note: Option<i64>,
    /// The note a correction became.
    pub note: Option<i64>,
    /// The note that note superseded (removed; forgotten when it was learned).
    pub superseded: Option<i64>,
}

impl Outcome {
    /// What `/good`, `/bad` and `/fix` say they did, e.g. "feedback stored; note 12 is back in
    /// the learning queue".
    pub fn summary(&self) -> String {
        let mut s = String::from("feedback stored");
        if let Some(n) = self.requeued_note {
            s.push_str(&format!("; note {n} is back in the learning queue"));
        }
        match (self.note, self.superseded) {
            (Some(n), Some(old)) => s.push_str(&format!(
                "; the correction is note {n}, replacing note {old} (learned next cycle)"
            )),
            (Some(n), None) => s.push_str(&format!("; the correction is note {n}")),
            _ => {}
        }
        s
    }
}

/// Stores a rating of exchange `exchange_id`. A bad answer from the adapter's weights puts the
/// learned note it rested on back in the learning queue.
pub fn rate(store: &Store, exchange_id: i64, rating: Rating) -> Result<Outcome, FeedbackError> {
    let src = store
        .exchange_sources(exchange_id)?
        .ok_or(FeedbackError::NoSuchExchange(exchange_id))?;
    let mut requeued = None;
    if rating == Rating::Bad && src.answered_from.as_deref() == Some("adapter") {
        if let Some(n) = src.about {
            if store.requeue_note(n)? {
                requeued = Some(n);
            }
        }
    }
    let id = store.add_feedback(&NewFeedback {
        exchange_id,
        rating: rating.as_str(),
        correction: None,
        note_id: None,
        requeued_note: requeued,
    })?;
    Ok(Outcome {
        feedback_id: id,
        requeued_note: requeued,
        ..Outcome::default()
    })
}

/// A correction of exchange `exchange_id`'s answer (`/fix TEXT`): `text` supersedes the note the
/// answer rested on (of the cited notes, the one sharing most words with the correction; else
/// the learned note it was about), or becomes a new note when it rested on none (or that note
/// is gone). Stored as a bad rating with the correction.
pub fn correct(store: &Store, exchange_id: i64, text: &str) -> Result<Outcome, FeedbackError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(FeedbackError::EmptyCorrection);
    }
    let src = store
        .exchange_sources(exchange_id)?
        .ok_or(FeedbackError::NoSuchExchange(exchange_id))?;
    let source = src.kind.as_str();
    let target = rested_on(store, &src.cited, src.about, text)?;
    let (note, superseded) = match target {
        Some(old) => {
            let Superseded { old, new } =
                match crate::notes::supersede(store, old, text, Some(source), "corrected") {
                    // The answer already says what the note says: the correction is that note.
                    Err(EditError::Unchanged(id)) => Superseded {
                        old: id,
                        new: NoteAdded::Duplicate(id),
                    },
                    other => other?,
                };
            (new.id(), (new.id() != old).then_some(old))
        }
        None => {
            if text.len() as u64 > crate::notes::DEFAULT_MAX_FILE_BYTES {
                return Err(EditError::TooLarge {
                    id: 0,
                    bytes: text.len() as u64,
                }
                .into());
            }
            (store.add_note(text, Some(source), None)?.id(), None)
        }
    };
    let id = store.add_feedback(&NewFeedback {
        exchange_id,
        rating: "bad",
        correction: Some(text),
        note_id: Some(note),
        requeued_note: None,
    })?;
    Ok(Outcome {
        feedback_id: id,
        requeued_note: None,
        note: Some(note),
        superseded,
    })
}

/// The existing note an answer rested on, for a correction: of the cited notes, the one that
/// shares most content words with the correction (the first on a tie); else `about`.
fn rested_on(
    store: &Store,
    cited: &[i64],
    about: Option<i64>,
    correction: &str,
) -> Result<Option<i64>, FeedbackError> {
    let words = crate::retrieve::terms(correction);
    let mut best: Option<(usize, i64)> = None;
    for &id in cited {
        let Some(n) = store.get_note(id)? else {
            continue;
        };
        let text = n.content.to_lowercase();
        let shared = words.iter().filter(|w| text.contains(w.as_str())).count();
        if best.is_none_or(|(b, _)| shared > b) {
            best = Some((shared, id));
        }
    }
    if let Some((_, id)) = best {
        return Ok(Some(id));
    }
    match about {
        Some(id) if store.get_note(id)?.is_some() => Ok(Some(id)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Feedback, NewExchange};

    fn exchange(store: &Store, kind: &str) -> i64 {
        store
            .record_exchange(&NewExchange {
                kind: kind.into(),
                prompt: "q".into(),
                answer: "a".into(),
                model: "m".into(),
                ..NewExchange::default()
            })
            .unwrap()
    }

    #[test]
    fn a_bad_answer_from_the_weights_requeues_its_note_and_a_good_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        let n = store
            .add_note("The gym opens at 6.", None, None)
            .unwrap()
            .id();
        let learned = |store: &Store| store.get_note(n).unwrap().unwrap().learned_at.is_some();
        let mark = || {
            store
                .conn()
                .execute("UPDATE notes SET learned_at = 'x', learn_attempts = 1", [])
                .unwrap();
        };
        mark();
        assert!(learned(&store));
        let ex = exchange(&store, "chat");
        store
            .set_exchange_sources(ex, "adapter", &[], Some(n))
            .unwrap();
        let o = rate(&store, ex, Rating::Good).unwrap();
        assert_eq!(o.requeued_note, None);
        assert!(learned(&store));
        let o = rate(&store, ex, Rating::Bad).unwrap();
        assert_eq!(o.requeued_note, Some(n));
        assert!(!learned(&store), "back in the learning queue");
        // Bad on an answer from notes in the prompt: nothing requeued.
        mark();
        let ex2 = exchange(&store, "chat");
        store
            .set_exchange_sources(ex2, "notes", &[n], None)
            .unwrap();
        assert_eq!(rate(&store, ex2, Rating::Bad).unwrap().requeued_note, None);
        assert!(learned(&store));
        assert_eq!(store.feedback_on(ex).unwrap().len(), 2);
        assert!(matches!(
            rate(&store, 999, Rating::Good),
            Err(FeedbackError::NoSuchExchange(999))
        ));
        assert!("meh".parse::<Rating>().is_err());
    }

    #[test]
    fn a_correction_supersedes_the_note_the_answer_rested_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        let gym = store
            .add_note("The gym opens at 6 on weekdays.", None, None)
            .unwrap()
            .id();
        let pool = store
            .add_note("The pool closes at 9.", None, None)
            .unwrap()
            .id();
        let ex = exchange(&store, "chat");
        store
            .set_exchange_sources(ex, "notes", &[pool, gym], None)
            .unwrap();
        let o = correct(&store, ex, "The gym opens at 7 on weekdays.").unwrap();
        assert_eq!(
            o.superseded,
            Some(gym),
            "the cited note the correction is about"
        );
        let new = o.note.unwrap();
        assert_eq!(store.superseded_by(new).unwrap(), Some(gym));
        assert!(store.get_note(gym).unwrap().is_none());
        assert!(store.get_note(pool).unwrap().is_some());
        assert_eq!(
            store.get_note(new).unwrap().unwrap().source.as_deref(),
            Some("chat")
        );
        assert_eq!(
            store.feedback_on(ex).unwrap(),
            vec![Feedback {
                rating: "bad".to_string(),
                correction: Some("The gym opens at 7 on weekdays.".to_string()),
                note_id: Some(new)
            }]
        );
        // An answer that rested on no note: the correction is a new note.
        let ex = exchange(&store, "serve");
        store.set_exchange_sources(ex, "base", &[], None).unwrap();
        let o = correct(&store, ex, "My cat is called Miso.").unwrap();
        assert_eq!(o.superseded, None);
        assert_eq!(
            store.get_note(o.note.unwrap()).unwrap().unwrap().content,
            "My cat is called Miso."
        );
        assert!(matches!(
            correct(&store, ex, "  "),
            Err(FeedbackError::EmptyCorrection)
        ));
    }
}
