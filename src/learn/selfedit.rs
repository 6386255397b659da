//! Self-edits written by a model: the strategies, their versioned prompt templates
//! (`prompts/*.txt`, compiled in), parsing the model's text into items, and the filters that
//! decide which items are kept (parseable, not empty, not duplicated, not too long, grounded in
//! the note).
//!
//! It must NOT train or store anything; generation goes through the [`Engine`] it is given.

use crate::engine::Engine;
use crate::sample::SamplingParams;
use crate::template::Message;
use anyhow::Result;
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;

/// A way of turning a note into training data.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The note's own text.
    Passage,
    /// Rule-based fill-in-the-blank items: the note with one key span blanked (no model).
    Cloze,
    /// Rule-based recall questions: "What do my notes say about <name>?" answered with the
    /// whole note (no model).
    Recall,
    /// Rule-based wh-questions from "<subject> is <complement>" clauses (no model).
    Questions,
    /// Question-answer pairs written by the model.
    Qa,
    /// Implications of the note (SEAL's self-edit), written by the model.
    Implications,
    /// Paraphrases of the note, written by the model.
    Rewrites,
    /// Question-answer pairs written by the self-edit writer: the model with its writer adapter
    /// (`learn::writer`), trained on reward by `teach`. Answers may hold numbers the note only
    /// implies ("2021" from "three years after 2018").
    Writer,
}

impl Strategy {
    pub const ALL: [Strategy; 8] = [
        Strategy::Passage,
        Strategy::Cloze,
        Strategy::Recall,
        Strategy::Questions,
        Strategy::Qa,
        Strategy::Implications,
        Strategy::Rewrites,
        Strategy::Writer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Passage => "passage",
            Strategy::Cloze => "cloze",
            Strategy::Recall => "recall",
            Strategy::Questions => "questions",
            Strategy::Qa => "qa",
            Strategy::Implications => "implications",
            Strategy::Rewrites => "rewrites",
            Strategy::Writer => "writer",
        }
    }

    pub fn parse(s: &str) -> Result<Strategy, String> {
        Strategy::ALL
            .into_iter()
            .find(|x| x.name() == s.trim())
            .ok_or_else(|| {
                format!("unknown strategy {s:?}: use passage, cloze, recall, questions, qa, implications, rewrites or writer")
            })
    }

    pub fn parse_list(s: &str) -> Result<Vec<Strategy>, String> {
        if s.trim() == "all" {
            return Ok(Strategy::ALL.to_vec());
        }
        let mut v: Vec<Strategy> = s
            .split(',')
            .filter(|x| !x.trim().is_empty())
            .map(Strategy::parse)
            .collect::<Result<_, _>>()?;
        v.sort();
        v.dedup();
        if v.is_empty() {
            return Err("no strategy given".into());
        }
        Ok(v)
    }

    /// Whether a model writes this strategy's items.
    pub fn generated(self) -> bool {
        matches!(
            self,
            Strategy::Qa | Strategy::Implications | Strategy::Rewrites | Strategy::Writer
        )
    }

    /// The prompt template and its version, for generated strategies.
    pub fn template(self) -> Option<(&'static str, &'static str)> {
        match self {
            Strategy::Qa => Some(("qa.v1", include_str!("../../prompts/qa.v1.txt"))),
            Strategy::Implications => Some((
                "implications.v1",
                include_str!("../../prompts/implications.v1.txt"),
            )),
            Strategy::Rewrites => {
                Some(("rewrites.v1", include_str!("../../prompts/rewrites.v1.txt")))
            }
            Strategy::Writer => Some(("writer.v1", include_str!("../../prompts/writer.v1.txt"))),
            _ => None,
        }
    }
}

/// A candidate item from a model, before and after filtering.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The user turn (QA), or None for plain text (implications, rewrites).
    pub prompt: Option<String>,
    pub completion: String,
    /// None when kept; else why it was dropped.
    pub dropped: Option<String>,
}

/// Sampling for self-edits.
pub fn sampling(seed: u64, temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.1,
        repeat_last_n: 64,
        seed,
    }
}

/// Asks `engine` (student or teacher) to write one sample of `strategy` for `note`.
pub fn generate(
    engine: &mut Engine,
    system: Option<&str>,
    strategy: Strategy,
    note: &str,
    params: &SamplingParams,
    max_tokens: usize,
    cancel: &AtomicBool,
) -> Result<String> {
    let Some(prompt) = prompt_for(strategy, note) else {
        return Ok(String::new());
    };
    let mut msgs: Vec<Message> = system.map(Message::system).into_iter().collect();
    msgs.push(Message::user(&prompt));
    let toks = engine.chat_tokens(&msgs)?;
    let g = engine.generate(&toks, params, max_tokens, cancel, &mut |_| {})?;
    Ok(g.text)
}

/// The user turn that asks for `strategy`'s self-edit of `note` (None for rule strategies).
pub fn prompt_for(strategy: Strategy, note: &str) -> Option<String> {
    let (_, tmpl) = strategy.template()?;
    Some(
        tmpl.replace("{{ note }}", note.trim())
            .trim_end()
            .to_string(),
    )
}

fn strip_bullet(l: &str) -> &str {
    let t = l.trim();
    let t = t.trim_start_matches(['-', '*', '•']).trim_start();
    // "1." / "2)" numbering
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 && t[digits..].starts_with(['.', ')']) {
        return t[digits + 1..].trim_start();
    }
    t
}

fn strip_prefix_ci<'a>(s: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    for p in prefixes {
        if s.len() >= p.len() && s.is_char_boundary(p.len()) && s[..p.len()].eq_ignore_ascii_case(p)
        {
            return Some(s[p.len()..].trim());
        }
    }
    None
}

/// Parses "Q: ... / A: ..." pairs (also "Question:"/"Answer:", numbered or bulleted).
pub fn parse_qa(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut q: Option<String> = None;
    for line in text.lines() {
        let l = strip_bullet(line);
        if let Some(x) = strip_prefix_ci(l, &["question:", "q:"]) {
            // "Q: ... A: ..." on one line.
            if let Some(i) = x.find(" A: ").or_else(|| x.find(" Answer: ")) {
                let (qq, rest) = x.split_at(i);
                let a = rest
                    .trim_start()
                    .split_once(':')
                    .map(|x| x.1)
                    .unwrap_or("")
                    .trim();
                out.push((qq.trim().to_string(), a.to_string()));
                continue;
            }
            q = Some(x.to_string());
        } else if let Some(x) = strip_prefix_ci(l, &["answer:", "a:"]) {
            if let Some(qq) = q.take() {
                out.push((qq, x.to_string()));
            }
        }
    }
    out
}

/// Parses one statement per line (implications), dropping headings and empty lines.
pub fn parse_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(strip_bullet)
        .filter(|l| !l.is_empty() && !l.ends_with(':'))
        .map(str::to_string)
        .collect()
}

/// Lower-case alphanumeric words.
pub fn content_words(s: &str) -> Vec<String> {
    const STOP: &[&str] = &[
        "a", "an", "the", "is", "are", "was", "were", "of", "to", "in", "on", "at", "by", "and",
        "or", "my", "your", "it", "its", "for", "with", "be", "that", "this", "i", "you", "he",
        "she", "they", "we", "our", "their", "his", "her", "as", "from",
    ];
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .filter(|w| !STOP.contains(&w.as_str()))
        .collect()
}

/// A capitalised word inside `q` (not its first word, not "I") that the note never uses: a
/// name the writer brought from elsewhere (its worked example, or nowhere).
fn foreign_name(q: &str, note_words: &HashSet<String>) -> Option<String> {
    q.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .skip(1)
        .map(|w| w.trim_end_matches("'s"))
        .find(|w| {
            w.chars().next().is_some_and(char::is_uppercase)
                && *w != "I"
                && !note_words.contains(&w.to_lowercase())
        })
        .map(str::to_string)
}

/// Numbers and capitalised words: what a faithful restatement must keep.
fn key_terms(s: &str) -> HashSet<String> {
    s.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == ':'))
        .filter(|w| {
            w.chars().any(|c| c.is_ascii_digit())
                || w.chars().next().is_some_and(char::is_uppercase)
        })
        .filter(|w| w.len() > 1)
        .map(|w| w.to_lowercase())
        .collect()
}

fn numbers(s: &str) -> HashSet<String> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Applies the filters to a model's raw output for `strategy` and returns every candidate with
/// its verdict. `seen` holds normalised items already kept for this note (duplicates drop).
pub fn filter(
    strategy: Strategy,
    note: &str,
    raw: &str,
    seen: &mut HashSet<String>,
) -> Vec<Candidate> {
    let note_words: HashSet<String> = content_words(note).into_iter().collect();
    let note_numbers = numbers(note);
    let norm = |s: &str| content_words(s).join(" ");
    let mut out = Vec::new();
    match strategy {
        Strategy::Qa | Strategy::Writer => {
            // The writer may state what the note implies: a number worked out from it.
            let implied_ok = strategy == Strategy::Writer;
            let pairs = parse_qa(raw);
            if pairs.is_empty() && !raw.trim().is_empty() {
                out.push(Candidate {
                    prompt: None,
                    completion: raw.trim().to_string(),
                    dropped: Some("unparseable: no Q:/A: pairs".into()),
                });
            }
            for (q, a) in pairs {
                let a_words = content_words(&a);
                let verdict = if q.len() < 8 || !q.contains('?') {
                    Some("not a question".to_string())
                } else if a_words.is_empty() {
                    Some("empty answer".to_string())
                } else if a.split_whitespace().count() > 12 {
                    Some("answer too long (over 12 words)".to_string())
                } else if let Some(w) = a_words.iter().find(|w| {
                    let implied_number = implied_ok && w.chars().all(|c| c.is_ascii_digit());
                    !(note_words.contains(*w) || implied_number)
                }) {
                    Some(format!(
                        "answer not grounded in the note ({w:?} is not in it)"
                    ))
                } else if content_words(&q).iter().all(|w| !note_words.contains(w)) {
                    Some("question shares no word with the note".to_string())
                } else if let Some(name) =
                    implied_ok.then(|| foreign_name(&q, &note_words)).flatten()
                {
                    Some(format!("question names {name:?}, who is not in the note"))
                } else if !seen.insert(norm(&q)) {
                    Some("duplicate".to_string())
                } else {
                    None
                };
                out.push(Candidate {
                    prompt: Some(q),
                    completion: a,
                    dropped: verdict,
                });
            }
        }
        Strategy::Implications | Strategy::Rewrites => {
            let items = if strategy == Strategy::Rewrites {
                vec![raw.trim().to_string()]
            } else {
                parse_lines(raw)
            };
            let keys = key_terms(note);
            for it in items {
                let words = it.split_whitespace().count();
                let it_keys = key_terms(&it);
                let kept_keys = keys.iter().filter(|k| it_keys.contains(*k)).count();
                let new_number = numbers(&it).into_iter().find(|n| !note_numbers.contains(n));
                let (lo, hi) = if strategy == Strategy::Rewrites {
                    (
                        note.split_whitespace().count() / 2,
                        note.split_whitespace().count() * 3 + 10,
                    )
                } else {
                    (5, 40)
                };
                let verdict = if it.is_empty() {
                    Some("empty".to_string())
                } else if words < lo.max(3) || words > hi {
                    Some(format!("length {words} words outside {}..{hi}", lo.max(3)))
                } else if let Some(n) = new_number {
                    Some(format!("number {n} is not in the note"))
                } else if strategy == Strategy::Rewrites && (kept_keys * 10) < keys.len() * 7 {
                    Some(format!(
                        "keeps {kept_keys} of {} names and numbers",
                        keys.len()
                    ))
                } else if strategy == Strategy::Implications && !keys.is_empty() && kept_keys == 0 {
                    Some("mentions none of the note's names or numbers".to_string())
                } else if norm(&it) == norm(note) {
                    Some("same as the note".to_string())
                } else if !seen.insert(norm(&it)) {
                    Some("duplicate".to_string())
                } else {
                    None
                };
                out.push(Candidate {
                    prompt: None,
                    completion: it,
                    dropped: verdict,
                });
            }
        }
        Strategy::Passage | Strategy::Cloze | Strategy::Recall | Strategy::Questions => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTE: &str = "My accountant is Marisol Eberhardt and she needs the expense receipts by the 10th of January.";

    #[test]
    fn qa_parsing_and_grounding() {
        assert_eq!(parse_qa("Q: Who? A: Me").len(), 1);
        let raw = "Q: Who is my accountant?\nA: Marisol Eberhardt\n\n2. Question: When are receipts due?\nAnswer: by the 10th of January\nQ: What is her phone number?\nA: 555-0199\nQ: Who is my accountant?\nA: Marisol";
        let mut seen = HashSet::new();
        let c = filter(Strategy::Qa, NOTE, raw, &mut seen);
        assert_eq!(c.len(), 4);
        assert!(c[0].dropped.is_none(), "{c:?}");
        assert!(c[1].dropped.is_none(), "{c:?}");
        assert!(c[2].dropped.as_deref().unwrap().contains("not grounded"));
        assert_eq!(c[3].dropped.as_deref(), Some("duplicate"));
        let c = filter(Strategy::Qa, NOTE, "I cannot do that.", &mut seen);
        assert!(c[0].dropped.as_deref().unwrap().starts_with("unparseable"));
    }

    #[test]
    fn rewrites_must_keep_names_and_numbers() {
        let mut seen = HashSet::new();
        let good = "Marisol Eberhardt, who does my accounts, wants the expense receipts before the 10th of January.";
        let bad = "My accountant needs receipts by the 12th of January.";
        let c = filter(Strategy::Rewrites, NOTE, good, &mut seen);
        assert!(c[0].dropped.is_none(), "{c:?}");
        let c = filter(Strategy::Rewrites, NOTE, bad, &mut seen);
        assert!(c[0].dropped.is_some(), "{c:?}");
    }

    #[test]
    fn strategies_parse() {
        assert_eq!(
            Strategy::parse_list("qa,cloze").unwrap(),
            vec![Strategy::Cloze, Strategy::Qa]
        );
        assert_eq!(Strategy::parse_list("all").unwrap().len(), 8);
        assert!(Strategy::parse_list("qa,nope").is_err());
    }
}
