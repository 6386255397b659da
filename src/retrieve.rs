//! Which of the user's notes a question is about: SQLite's full-text index over the notes (FTS5,
//! BM25 ranking, Porter stemming; the `notes_fts` table that `store`'s triggers keep in step
//! with every add, edit and removal), and the rule that says a question is about a note.
//!
//! Answering uses it to route: a question about a learned note is answered by the adapter from
//! its weights (`Engine::answer_routed`), whatever opening the adapter would have chosen.
//!
//! Must not: change anything in the database, send a question anywhere, or call a question
//! "about a note" on one shared common word (general questions share words with notes by
//! chance; a rare word, see [`Lexicon`], they share only when they are about the same thing).

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
    /// How many of the matched words are rare (names, technical terms; see [`Lexicon`]).
    pub rare: usize,
}

impl NoteMatch {
    /// The rule: one rare word of the question's in common, or at least two of its content
    /// words and at least half of them.
    pub fn is_about(&self) -> bool {
        self.rare >= 1 || (self.matched >= 2 && 2 * self.matched >= self.terms)
    }

    /// How close the note is to the question, for ranking: rare words in common, then words.
    pub fn closeness(&self) -> (usize, usize) {
        (self.rare, self.matched)
    }
}

/// Tells rare words (a person's or a place's name, a drug, a dish: words that name one thing)
/// from the words any question may use. A question that shares a rare word with a note is about
/// that note even when its other words are not in it ("When is Oksana's birthday?" and "Our
/// neighbour Oksana waters the tomatoes"); common words must be two, and half the question's.
pub trait Lexicon {
    fn is_rare(&self, word: &str) -> bool;
}

/// A lexicon in which no word is rare: the two-word rule alone.
pub struct Common;

impl Lexicon for Common {
    fn is_rare(&self, _: &str) -> bool {
        false
    }
}

/// The smallest vocabulary taken as a word-frequency list (a test model's few hundred byte
/// pieces split every word; real models have 32,000 to 150,000 pieces).
const LEXICON_MIN_VOCAB: usize = 16_000;

/// The model's own vocabulary as the word-frequency list: byte-pair merges are learned in order
/// of how often a string occurs, so a word that a large vocabulary keeps whole, after a space,
/// lowercase or capitalised ("router", "France", "Celsius"), is common, and one it splits in both
/// spellings ("Oksana", "meloxicam", "falafel") is rare. Words with a digit are never
/// rare (many vocabularies split numbers digit by digit).
impl Lexicon for crate::tokenizer::Tokenizer {
    fn is_rare(&self, word: &str) -> bool {
        if self.vocab_size() < LEXICON_MIN_VOCAB || !word.chars().all(char::is_alphabetic) {
            return false;
        }
        let lower = word.to_lowercase();
        let mut chars = lower.chars();
        let capital: String = match chars.next() {
            Some(c) => c.to_uppercase().chain(chars).collect(),
            None => return false,
        };
        // Pieces of the word after another word, so a tokenizer that marks word starts (" x",
        // "▁x") is counted as it splits the word inside a sentence.
        let before = self.encode("a", false).map(|t| t.len()).unwrap_or(0);
        let pieces = |w: &str| {
            self.encode(&format!("a {w}"), false)
                .map(|t| t.len().saturating_sub(before))
                .unwrap_or(1)
        };
        pieces(&lower) >= 2 && pieces(&capital) >= 2
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
pub fn search(
    store: &Store,
    question: &str,
    limit: usize,
    lex: &dyn Lexicon,
) -> Result<Vec<NoteMatch>> {
    search_in(store, question, limit, Index::Notes, lex)
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

fn search_in(
    store: &Store,
    question: &str,
    limit: usize,
    index: Index,
    lex: &dyn Lexicon,
) -> Result<Vec<NoteMatch>> {
    let terms = terms(question);
    let rare: Vec<bool> = terms.iter().map(|t| lex.is_rare(t)).collect();
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
        let (mut matched, mut rare_matched) = (0, 0);
        for (t, &is_rare) in terms.iter().zip(&rare) {
            let n: i64 = one.query_row(params![any_of(std::slice::from_ref(t)), rowid], |r| {
                r.get(0)
            })?;
            matched += (n > 0) as usize;
            rare_matched += (n > 0 && is_rare) as usize;
        }
        out.push(NoteMatch {
            id,
            content,
            learned,
            matched,
            terms: terms.len(),
            rare: rare_matched,
        });
    }
    // Most rare words in common first (a shared name says more than two shared common words),
    // then most words; BM25 breaks ties (the order above).
    out.sort_by_key(|m| std::cmp::Reverse(m.closeness()));
    Ok(out)
}

/// The notes (learned or not) `question` is about, best first, at most `k`: what retrieval puts
/// in the prompt. Only the notes as close to the question as the best one (as many rare words,
/// as many words in common) are kept: among hundreds of notes of the same shape (lockers, appointments), a runner-up
/// that matches fewer particulars is a distractor a small model answers from.
pub fn relevant(
    store: &Store,
    question: &str,
    k: usize,
    lex: &dyn Lexicon,
) -> Result<Vec<NoteMatch>> {
    let about: Vec<NoteMatch> = search(store, question, 10, lex)?
        .into_iter()
        .filter(NoteMatch::is_about)
        .collect();
    let best = about.first().map(NoteMatch::closeness);
    Ok(about
        .into_iter()
        .filter(|m| Some(m.closeness()) == best)
        .take(k)
        .collect())
}

/// The removed note, still in the adapter's weights, that `question` is about, when no current
/// note is about it as closely: an answer to it would rest on a note the user deleted, so it is
/// held back (the base model answers) until the adapter is rebuilt (`learn::forget`).
pub fn forgotten_about(
    store: &Store,
    question: &str,
    lex: &dyn Lexicon,
) -> Result<Option<NoteMatch>> {
    let Some(gone) = search_in(store, question, 3, Index::Forgotten, lex)?
        .into_iter()
        .find(NoteMatch::is_about)
    else {
        return Ok(None);
    };
    let current = search(store, question, 3, lex)?
        .into_iter()
        .find(NoteMatch::is_about)
        .map(|m| m.closeness())
        .unwrap_or((0, 0));
    Ok((gone.closeness() > current).then_some(gone))
}

/// The learned note `question` is about, if one is (see [`NoteMatch::is_about`]).
pub fn learned_note_about(
    store: &Store,
    question: &str,
    lex: &dyn Lexicon,
) -> Result<Option<NoteMatch>> {
    Ok(search(store, question, 5, lex)?
        .into_iter()
        .find(|m| m.learned && m.is_about()))
}

/// The current note that supports `claim` (the words of an answer that says it comes from the
/// user's notes), if one does: the best-matching note that holds at least two of the claim's
/// content words and at least half of them (the rule of [`NoteMatch::is_about`]). A claim about
/// a removed note, or one the adapter made up, has none.
pub fn supporting_note(store: &Store, claim: &str, lex: &dyn Lexicon) -> Result<Option<NoteMatch>> {
    Ok(search(store, claim, 5, lex)?
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
            &Common,
        )
        .unwrap();
        assert_eq!(m[0].content.split(' ').nth(1), Some("bakery"));
        // Stemming: "close"/"closes", "saturdays"/"Saturdays".
        assert_eq!((m[0].matched, m[0].terms), (5, 5));
        assert!(m[0].is_about());
        // Not learned yet: no learned note is the answer.
        assert!(
            learned_note_about(&store, "When does the bakery close?", &Common)
                .unwrap()
                .is_none()
        );
        assert!(search(&store, "What is the capital of France?", 5, &Common)
            .unwrap()
            .is_empty());
        // One shared word is not enough.
        let one = search(
            &store,
            "How old is the Eiffel Tower on Saturdays?",
            5,
            &Common,
        )
        .unwrap();
        assert!(one.iter().all(|m| !m.is_about()), "{one:?}");
        // A quote or an FTS operator in the question is a word, not syntax.
        assert!(search(&store, "what about \"NEAR\" OR AND *", 5, &Common).is_ok());
        // Removed: gone from the index.
        let id = match bakery {
            crate::store::NoteAdded::Added(id) => id,
            other => panic!("{other:?}"),
        };
        // A claim an existing note supports, and one none does.
        let claim = "The bakery on Linden Street closes at 2 pm on Saturdays.";
        assert_eq!(
            supporting_note(&store, claim, &Common)
                .unwrap()
                .map(|m| m.id),
            Some(id)
        );
        assert!(
            supporting_note(
                &store,
                "Your sister Ilse works at the bakery in Rome.",
                &Common
            )
            .unwrap()
            .is_none(),
            "two words of seven are not support"
        );
        assert!(store.remove_note(id).unwrap());
        assert!(search(&store, "bakery Linden", 5, &Common)
            .unwrap()
            .is_empty());
        assert!(supporting_note(&store, claim, &Common).unwrap().is_none());
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
        let found = relevant(&store, q, 3, &Common).unwrap();
        // The other lockers share "locker", "number" and maybe "gym", not Gunnar Ulvang.
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].content.contains("427"));
        // Notes equally close all go in (at most k).
        let q = "Which number is my locker at the gym?";
        let found = relevant(&store, q, 3, &Common).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(relevant(&store, q, 1, &Common).unwrap().len(), 1);
    }
}
