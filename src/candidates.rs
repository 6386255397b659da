//! Candidate notes from what the user says: in `hone chat` and through `hone serve`, a sentence
//! in which the user states a fact about themselves ("my daughter's name is Noor", "I moved the
//! meeting to Friday") is stored as a pending candidate (`note_candidates`), which the user keeps
//! (`hone note keep`, `/remember` in chat) or discards (`hone note discard`); with the setting
//! [`AUTO_KEEP`] on (off by default) it is kept as a note at once, and the caller says so.
//!
//! Detection is a rule, not a model call (see [`is_statement`]): first person, then a fact-like
//! verb, and no question. It must not store anything as a note unless the user kept it or turned
//! [`AUTO_KEEP`] on, must not print, and must not call a model.

use crate::store::{Candidate, NoteAdded, Store};
use anyhow::Result;

/// The settings key that keeps candidates as notes without asking ("on"; anything else is off).
pub const AUTO_KEEP: &str = "candidates.auto_keep";

/// Words that say the speaker talks about themselves, then what may follow them.
const SUBJECT: &[&str] = &["i", "we"];
const POSSESSIVE: &[&str] = &["my", "our"];
/// Contractions that already hold the verb ("i'm" = "i am").
const CONTRACTED: &[&str] = &["i'm", "we're", "i've", "we've"];
/// Verbs that state a fact (after "I"/"we", or within a few words after "my"/"our").
const FACT_VERBS: &[&str] = &[
    "am",
    "is",
    "are",
    "was",
    "were",
    "have",
    "has",
    "had",
    "live",
    "lives",
    "lived",
    "moved",
    "move",
    "work",
    "works",
    "worked",
    "started",
    "start",
    "starts",
    "bought",
    "booked",
    "scheduled",
    "rescheduled",
    "changed",
    "switched",
    "got",
    "own",
    "owns",
    "prefer",
    "prefers",
    "like",
    "likes",
    "love",
    "loves",
    "hate",
    "hates",
    "married",
    "called",
    "named",
    "keep",
    "keeps",
    "parked",
    "park",
    "go",
    "goes",
    "take",
    "takes",
    "play",
    "plays",
    "drive",
    "drives",
    "finished",
    "ends",
    "begins",
    "costs",
    "opens",
    "closes",
    "left",
    "joined",
    "teach",
    "teaches",
    "study",
    "studies",
    "speak",
    "speaks",
    "grew",
];
/// Words right after "I"/"I'm" that make a sentence a wish, a doubt or a request, not a fact.
const NOT_FACTS: &[&str] = &[
    "not",
    "sure",
    "wondering",
    "wonder",
    "looking",
    "trying",
    "curious",
    "asking",
    "thinking",
    "think",
    "want",
    "wanted",
    "need",
    "would",
    "could",
    "should",
    "might",
    "guess",
    "hope",
    "wish",
    "feel",
    "mean",
    "just",
    "really",
    "confused",
    "interested",
    "going",
    "forgot",
    "don't",
    "can't",
    "didn't",
    "been",
    "also",
    "got",
];
/// A sentence starting with one of these asks or tells the assistant something.
const REQUESTS: &[&str] = &[
    "please", "can", "could", "would", "will", "tell", "what", "how", "why", "when", "where",
    "who", "which", "do", "does", "did", "is", "are", "let's", "help", "write", "explain",
    "remember", "give", "show", "list", "if",
];

/// The sentences of `text` in which the user states a fact about themselves, trimmed, in order,
/// each once.
pub fn detect(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in sentences(text) {
        if is_statement(&s) && !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// The rule: no question mark; at least three words; not a request to the assistant; and
/// either "I"/"we" followed by a fact-like verb (or "I'm"/"I've" followed by something that is
/// not a doubt or a wish), or "my"/"our" followed within five words by a fact-like verb.
pub fn is_statement(sentence: &str) -> bool {
    if sentence.contains('?') {
        return false;
    }
    let words: Vec<String> = sentence
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'')
                .replace('’', "'")
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    if words.len() < 3 || REQUESTS.contains(&words[0].as_str()) {
        return false;
    }
    for (i, w) in words.iter().enumerate() {
        let next = words.get(i + 1).map(String::as_str).unwrap_or("");
        if SUBJECT.contains(&w.as_str()) {
            return FACT_VERBS.contains(&next);
        }
        if CONTRACTED.contains(&w.as_str()) {
            return !next.is_empty() && !NOT_FACTS.contains(&next);
        }
        if POSSESSIVE.contains(&w.as_str()) {
            return words[i + 1..]
                .iter()
                .take(5)
                .any(|v| FACT_VERBS.contains(&v.as_str()) || (v.ends_with("'s") && v.len() > 2));
        }
    }
    false
}

/// `text` cut into sentences at '.', '!', '?' followed by a space (the mark stays with its
/// sentence) and at line ends.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut start = 0;
        let chars: Vec<(usize, char)> = line.char_indices().collect();
        for (k, &(i, c)) in chars.iter().enumerate() {
            let end_of_sentence = matches!(c, '.' | '!' | '?')
                && chars.get(k + 1).is_none_or(|&(_, n)| n.is_whitespace());
            if end_of_sentence {
                let s = line[start..i + c.len_utf8()].trim();
                if !s.is_empty() {
                    out.push(s.to_string());
                }
                start = i + c.len_utf8();
            }
        }
        let s = line[start..].trim();
        if !s.is_empty() {
            out.push(s.to_string());
        }
    }
    out
}

/// A candidate stored from what the user said.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Collected {
    /// The candidate's id.
    pub id: i64,
    pub content: String,
    /// The note it became at once ([`AUTO_KEEP`] on), else None (pending).
    pub note: Option<i64>,
}

/// Stores the statements in `said` as candidates from `source` ("chat", "serve"), kept as notes
/// at once when [`AUTO_KEEP`] is on. A statement already stored as a note is left out.
pub fn collect(
    store: &Store,
    said: &str,
    source: &str,
    session: Option<&str>,
    exchange: Option<i64>,
) -> Result<Vec<Collected>> {
    let found = detect(said);
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let auto = auto_keep(store)?;
    let mut out = Vec::new();
    for content in found {
        if store.has_note_text(&content)? {
            continue;
        }
        let id = store.add_candidate(&content, source, session, exchange)?;
        let note = if auto {
            store.keep_candidate(id)?.map(NoteAdded::id)
        } else {
            None
        };
        out.push(Collected { id, content, note });
    }
    Ok(out)
}

/// Whether candidates are kept as notes without asking.
pub fn auto_keep(store: &Store) -> Result<bool> {
    Ok(store.get_setting(AUTO_KEEP)?.as_deref() == Some("on"))
}

/// Turns keeping candidates without asking on or off.
pub fn set_auto_keep(store: &Store, on: bool) -> Result<()> {
    Ok(store.set_setting(AUTO_KEEP, if on { "on" } else { "off" })?)
}

/// Why a candidate could not be kept or discarded.
#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    #[error("there is no pending candidate note {0} (see `hone note list --pending`)")]
    NoSuchCandidate(i64),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Keeps pending candidate `id` as a note (`hone note keep`).
pub fn keep(store: &Store, id: i64) -> Result<NoteAdded, CandidateError> {
    store
        .keep_candidate(id)?
        .ok_or(CandidateError::NoSuchCandidate(id))
}

/// Discards pending candidate `id` (`hone note discard`).
pub fn discard(store: &Store, id: i64) -> Result<(), CandidateError> {
    if store.discard_candidate(id)? {
        Ok(())
    } else {
        Err(CandidateError::NoSuchCandidate(id))
    }
}

/// Pending candidates as `hone note list --pending` prints them: one JSON object per line with
/// `json`, else one line each, or a hint when there are none.
pub fn list_text(c: &[Candidate], json: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if json {
        for c in c {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({"id": c.id, "created_at": c.created_at, "source": c.source,
                    "content": c.content, "status": c.status})
            );
        }
    } else if c.is_empty() {
        out.push_str("no pending candidate notes\n");
    } else {
        for c in c {
            let date = &c.created_at[..c.created_at.len().min(16)];
            let first: String = c.content.chars().take(70).collect();
            let _ = writeln!(out, "{:>5}  {date}  {:<6}  {first}", c.id, c.source);
        }
        out.push_str("keep one with `hone note keep ID`, or drop it with `hone note discard ID`\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_about_oneself_are_found_and_questions_and_requests_are_not() {
        for yes in [
            "My daughter's name is Noor.",
            "I moved the meeting to Friday",
            "my dentist is Dr. Okafor",
            "I'm allergic to peanuts.",
            "We live in Utrecht now.",
            "Our wifi password is kettle-42.",
            "I work at the library on Mondays.",
            "My car is a blue Volvo.",
            "I’m vegetarian since 2019.",
        ] {
            assert!(is_statement(yes), "{yes}");
        }
        for no in [
            "What is my daughter's name?",
            "Is my meeting on Friday",
            "Can you tell me about Paris.",
            "Please remember it.",
            "I think so.",
            "I want a poem about cats.",
            "I'm not sure about that.",
            "I wonder why the sky is blue.",
            "Write a story about my cat.",
            "The capital of France is Paris.",
            "Thanks a lot.",
            "I see.",
            "My goodness",
            "Tell me what my notes say.",
        ] {
            assert!(!is_statement(no), "{no}");
        }
        assert_eq!(
            detect("My name is Ada. Please remember it. Also, what is 2+2? My name is Ada."),
            ["My name is Ada."]
        );
        assert_eq!(
            detect("Hi!\nI moved the meeting to Friday. Can you note that?"),
            ["I moved the meeting to Friday."]
        );
        assert!(detect("").is_empty());
    }

    #[test]
    fn candidates_wait_for_the_user_unless_auto_keep_is_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hone.db")).unwrap();
        assert!(!auto_keep(&store).unwrap(), "off by default");
        let c = collect(
            &store,
            "My daughter's name is Noor.",
            "chat",
            Some("s"),
            None,
        )
        .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].note, None);
        assert_eq!(store.count_notes().unwrap(), 0, "never kept silently");
        let text = list_text(&store.candidates("pending", None).unwrap(), false);
        assert!(text.contains("My daughter's name is Noor."), "{text}");
        let n = keep(&store, c[0].id).unwrap();
        assert_eq!(
            store.get_note(n.id()).unwrap().unwrap().content,
            "My daughter's name is Noor."
        );
        assert!(matches!(
            keep(&store, c[0].id),
            Err(CandidateError::NoSuchCandidate(_))
        ));
        // Already a note: not a candidate again.
        assert!(
            collect(&store, "My daughter's name is Noor.", "chat", None, None)
                .unwrap()
                .is_empty()
        );
        let d = collect(
            &store,
            "I moved the meeting to Friday.",
            "serve",
            None,
            None,
        )
        .unwrap();
        discard(&store, d[0].id).unwrap();
        assert!(discard(&store, d[0].id)
            .unwrap_err()
            .to_string()
            .contains("note list --pending"));
        set_auto_keep(&store, true).unwrap();
        let e = collect(&store, "We live in Utrecht.", "chat", None, None).unwrap();
        assert!(e[0].note.is_some());
        assert_eq!(store.count_notes().unwrap(), 2);
        assert_eq!(list_text(&[], false), "no pending candidate notes\n");
    }
}
