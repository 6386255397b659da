//! Which of the user's notes a question is about: SQLite's full-text index over the notes (FTS5,
//! BM25 ranking, Porter stemming; the `notes_fts` table that `store`'s triggers keep in step
//! with every add, edit and removal), and the rule that says a question is about a note.
//!
//! Answering uses it to route: a question about a learned note is answered by the adapter from
//! its weights (`Engine::answer_routed`), whatever opening the adapter would have chosen.
//!
//! Must not: change anything in the database, send a question anywhere, or call a question
//! "about a note" on one shared word (general questions share words with notes by chance).

use crate::store::Store;
use anyhow::Result;
use rusqlite::params;

/// A note that matches a question.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NoteMatch {
    pub id: i64,
    pub content: String,
    /// The note has been learned into the active adapter's line of cycles.
    pub learned: bool,
    /// How many of the question's content words the note contains (after stemming), of `terms`.
    pub matched: usize,
    pub terms: usize,
}

impl NoteMatch {
    /// The rule: at least two of the question's content words, and at least half of them.
    pub fn is_about(&self) -> bool {
        self.matched >= 2 && 2 * self.matched >= self.terms
    }
}

/// Words that say nothing about which note is meant.
const STOP: &[&str] = &[
    "about", "after", "all", "also", "and", "any", "are", "been", "before", "but", "can", "could",
    "did", "does", "doing", "for", "from", "had", "has", "have", "her", "his", "how", "into",
    "its", "many", "much", "not", "note", "notes", "our", "say", "says", "she", "should", "tell",
    "that", "the", "their", "them", "then", "there", "they", "this", "was", "were", "what", "when",
    "where", "which", "who", "whom", "whose", "why", "will", "with", "would", "you", "your",
    "yours", "mine", "him", "does", "doesn", "don",
];

/// The question's content words: lowercase, three characters or more, no stop words, each once.
pub fn terms(question: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in question
        .split(|c: char| !c.is_alphanumeric())
        .map(|w| w.to_lowercase())
    {
        if w.chars().count() >= 3 && !STOP.contains(&w.as_str()) && !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

/// An FTS5 query matching any of `terms` (each a quoted string, so no word is an operator).
fn any_of(terms: &[String]) -> String {
    terms
        .iter()
        .map(|t| format!("\"{}\"", t.replace('"', "")))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// The notes that share content words with `question`, best first (BM25), at most `limit`.
pub fn search(store: &Store, question: &str, limit: usize) -> Result<Vec<NoteMatch>> {
    search_in(store, question, limit, Index::Notes)
}

/// Which full-text index to search.
#[derive(Clone, Copy)]
enum Index {
    /// The notes (`notes_fts`).
    Notes,
    /// Removed notes the adapter still holds (`forgotten_fts`, see `learn::forget`); a match's
    /// id is the removed note's id, and `learned` is true.
    Forgotten,
}

fn search_in(store: &Store, question: &str, limit: usize, index: Index) -> Result<Vec<NoteMatch>> {
    let terms = terms(question);
    if terms.is_empty() || limit == 0 {
        return Ok(Vec::new());
    }
    let conn = store.conn();
    let (sql, table) = match index {
        Index::Notes => (
            "SELECT n.id, n.content, n.learned_at IS NOT NULL, n.id FROM notes_fts f
             JOIN notes n ON n.id = f.rowid
             WHERE notes_fts MATCH ?1 ORDER BY bm25(notes_fts) LIMIT ?2",
            "notes_fts",
        ),
        Index::Forgotten => (
            "SELECT n.note_id, n.content, 1, n.id FROM forgotten_fts f
             JOIN forgotten_notes n ON n.id = f.rowid
             WHERE forgotten_fts MATCH ?1 AND n.rebuilt_at IS NULL
             ORDER BY bm25(forgotten_fts) LIMIT ?2",
            "forgotten_fts",
        ),
    };
    let mut st = conn.prepare(sql)?;
    let rows = st
        .query_map(params![any_of(&terms), limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut one = conn.prepare(&format!(
        "SELECT count(*) FROM {table} WHERE {table} MATCH ?1 AND rowid = ?2"
    ))?;
    let mut out = Vec::new();
    for (id, content, learned, rowid) in rows {
        let mut matched = 0;
        for t in &terms {
            let n: i64 = one.query_row(params![any_of(std::slice::from_ref(t)), rowid], |r| {
                r.get(0)
            })?;
            matched += (n > 0) as usize;
        }
        out.push(NoteMatch {
            id,
            content,
            learned,
            matched,
            terms: terms.len(),
        });
    }
    // Most words in common first; BM25 breaks ties (the order above).
    out.sort_by_key(|m| std::cmp::Reverse(m.matched));
    Ok(out)
}

/// The notes (learned or not) `question` is about, best first, at most `k`: what retrieval puts
/// in the prompt. Only the notes that share as many of the question's words as the best one
/// are kept: among hundreds of notes of the same shape (lockers, appointments), a runner-up
/// that matches fewer particulars is a distractor a small model answers from.
pub fn relevant(store: &Store, question: &str, k: usize) -> Result<Vec<NoteMatch>> {
    let about: Vec<NoteMatch> = search(store, question, 10)?
        .into_iter()
        .filter(NoteMatch::is_about)
        .collect();
    let best = about.first().map(|m| m.matched).unwrap_or(0);
    Ok(about
        .into_iter()
        .filter(|m| m.matched == best)
        .take(k)
        .collect())
}

/// The removed note, still in the adapter's weights, that `question` is about, when no current
/// note is about it as closely: an answer to it would rest on a note the user deleted, so it is
/// held back (the base model answers) until the adapter is rebuilt (`learn::forget`).
pub fn forgotten_about(store: &Store, question: &str) -> Result<Option<NoteMatch>> {
    let Some(gone) = search_in(store, question, 3, Index::Forgotten)?
        .into_iter()
        .find(NoteMatch::is_about)
    else {
        return Ok(None);
    };
    let current = search(store, question, 3)?
        .into_iter()
        .find(NoteMatch::is_about)
        .map(|m| m.matched)
        .unwrap_or(0);
    Ok((gone.matched > current).then_some(gone))
}

/// The learned note `question` is about, if one is (see [`NoteMatch::is_about`]).
pub fn learned_note_about(store: &Store, question: &str) -> Result<Option<NoteMatch>> {
    Ok(search(store, question, 5)?
        .into_iter()
        .find(|m| m.learned && m.is_about()))
}

/// The current note that supports `claim` (the words of an answer that says it comes from the
/// user's notes), if one does: the best-matching note that holds at least two of the claim's
/// content words and at least half of them (the rule of [`NoteMatch::is_about`]). A claim about
/// a removed note, or one the adapter made up, has none.
pub fn supporting_note(store: &Store, claim: &str) -> Result<Option<NoteMatch>> {
    Ok(search(store, claim, 5)?
        .into_iter()
        .find(NoteMatch::is_about))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_note_a_question_is_about_and_follows_edits_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        let bakery = store
            .add_note(
                "The bakery on Linden Street closes at 2 pm on Saturdays and is closed on Sundays.",
                None,
                None,
            )
            .unwrap();
        store
            .add_note("My sister Ilse collects old postcards.", None, None)
            .unwrap();
        assert_eq!(
            terms("When does the bakery on Linden Street close on Saturdays?"),
            ["bakery", "linden", "street", "close", "saturdays"]
        );
        let m = search(
            &store,
            "When does the bakery on Linden Street close on Saturdays?",
            5,
        )
        .unwrap();
        assert_eq!(m[0].content.split(' ').nth(1), Some("bakery"));
        // Stemming: "close"/"closes", "saturdays"/"Saturdays".
        assert_eq!((m[0].matched, m[0].terms), (5, 5));
        assert!(m[0].is_about());
        // Not learned yet: no learned note is the answer.
        assert!(learned_note_about(&store, "When does the bakery close?")
            .unwrap()
            .is_none());
        assert!(search(&store, "What is the capital of France?", 5)
            .unwrap()
            .is_empty());
        // One shared word is not enough.
        let one = search(&store, "How old is the Eiffel Tower on Saturdays?", 5).unwrap();
        assert!(one.iter().all(|m| !m.is_about()), "{one:?}");
        // A quote or an FTS operator in the question is a word, not syntax.
        assert!(search(&store, "what about \"NEAR\" OR AND *", 5).is_ok());
        // Removed: gone from the index.
        let id = match bakery {
            crate::store::NoteAdded::Added(id) => id,
            other => panic!("{other:?}"),
        };
        // A claim an existing note supports, and one none does.
        let claim = "The bakery on Linden Street closes at 2 pm on Saturdays.";
        assert_eq!(
            supporting_note(&store, claim).unwrap().map(|m| m.id),
            Some(id)
        );
        assert!(
            supporting_note(&store, "Your sister Ilse works at the bakery in Rome.")
                .unwrap()
                .is_none(),
            "two words of seven are not support"
        );
        assert!(store.remove_note(id).unwrap());
        assert!(search(&store, "bakery Linden", 5).unwrap().is_empty());
        assert!(supporting_note(&store, claim).unwrap().is_none());
    }

    #[test]
    fn only_the_closest_notes_go_in_the_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        for n in [
            "My locker at the gym in Brakvik is number 427, next to Gunnar Ulvang's.",
            "My locker at the pool in Brakvik is number 112, next to Tove Falk's.",
            "My locker at the gym in Eskerby is number 903, next to Per Holm's.",
        ] {
            store.add_note(n, None, None).unwrap();
        }
        let q = "What number is my locker at the gym next to Gunnar Ulvang's?";
        let found = relevant(&store, q, 3).unwrap();
        // The other lockers share "locker", "number" and maybe "gym", not Gunnar Ulvang.
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].content.contains("427"));
        // Notes equally close all go in (at most k).
        let q = "Which number is my locker at the gym?";
        let found = relevant(&store, q, 3).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(relevant(&store, q, 1).unwrap().len(), 1);
    }
}
