//! Rule-based self-edits that need no model: the key spans of a note (names, numbers, codes,
//! what follows "is", places after a preposition) and, for each, cloze items (the note with the
//! span blanked out) and recall items ("What do my notes say about X?" → the note).
//!
//! It must NOT call a model or touch the database: text in, items out, deterministic.

/// A span of the note worth remembering, by byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub text: String,
    /// A name (capitalised run) rather than a number or phrase: used for recall questions.
    pub entity: bool,
}

/// Words that start sentences or are capitalised for grammar, not because they name something.
const NOT_NAMES: &[&str] = &[
    "a", "an", "the", "my", "our", "your", "his", "her", "their", "its", "i", "we", "you", "he",
    "she", "they", "it", "this", "that", "these", "those", "in", "on", "at", "by", "to", "for",
    "from", "with", "every", "each", "when", "if", "after", "before", "there", "and", "but", "or",
    "so", "also", "then", "please", "remember", "note", "do", "don't", "is", "are", "was", "were",
];
const COPULAS: &[&str] = &["is", "are", "was", "were"];
const PREPOSITIONS: &[&str] = &[
    "in", "at", "on", "behind", "under", "near", "from", "to", "by", "with", "inside", "beside",
    "above", "below", "next",
];
const STOPS: &[&str] = &[
    "and", "but", "who", "which", "that", "because", "so", "while", "where", "when", "or", "if",
];
const ARTICLES: &[&str] = &["a", "an", "the"];

#[derive(Debug, Clone)]
struct Word<'a> {
    start: usize,
    end: usize,
    core: &'a str,
    /// Punctuation after the word ends a phrase.
    breaks: bool,
    /// The first word of a sentence.
    initial: bool,
}

fn words(text: &str) -> Vec<Word<'_>> {
    let mut out: Vec<Word> = Vec::new();
    let mut prev_break_sentence = true;
    let mut i = 0;
    let b = text.as_bytes();
    while i < b.len() {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let s = i;
        while i < b.len() && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let raw = &text[s..i];
        let lead = raw.len() - raw.trim_start_matches(['"', '\'', '(', '[']).len();
        let trimmed = raw.trim_end_matches(['.', ',', ';', ':', '!', '?', '"', '\'', ')', ']']);
        let core = &raw[lead.min(trimmed.len())..trimmed.len()];
        let tail = &raw[trimmed.len()..];
        let ends_sentence = tail.contains(['.', '!', '?']);
        out.push(Word {
            start: s + lead.min(trimmed.len()),
            end: s + trimmed.len(),
            core,
            breaks: !tail.is_empty(),
            initial: prev_break_sentence,
        });
        prev_break_sentence = ends_sentence;
    }
    out
}

fn is_cap(w: &str) -> bool {
    w.chars().next().is_some_and(|c| c.is_uppercase())
}
/// Capitalised because it names something, not for grammar.
fn is_name_word(w: &str) -> bool {
    is_cap(w) && !NOT_NAMES.contains(&lower(w).as_str())
}
fn has_digit(w: &str) -> bool {
    w.chars().any(|c| c.is_ascii_digit())
}
fn lower(w: &str) -> String {
    w.to_lowercase()
}

/// The note's key spans, most specific first (names and numbers, then phrases), at most `max`.
pub fn key_spans(note: &str, max: usize) -> Vec<Span> {
    let ws = words(note);
    let mut named: Vec<Span> = Vec::new();
    let mut phrases: Vec<Span> = Vec::new();
    let span = |a: usize, b: usize, entity: bool| Span {
        start: ws[a].start,
        end: ws[b].end,
        text: note[ws[a].start..ws[b].end].to_string(),
        entity,
    };
    // Names (capitalised runs, "of" inside) and numbers/codes (with "of <Month>" style tails).
    let mut i = 0;
    while i < ws.len() {
        let w = ws[i].core;
        let name_start = is_name_word(w);
        if name_start || has_digit(w) {
            let mut j = i;
            while j + 1 < ws.len() && !ws[j].breaks {
                let n = ws[j + 1].core;
                let joins = is_cap(n) && !NOT_NAMES.contains(&lower(n).as_str())
                    || has_digit(n)
                    || (n == "of"
                        && j + 2 < ws.len()
                        && is_cap(ws[j + 2].core)
                        && !ws[j + 1].breaks);
                if !joins {
                    break;
                }
                j += 1;
            }
            if ws[j].core == "of" {
                j -= 1;
            }
            // A single capitalised word opening a sentence is a name only if no common word.
            if !(ws[i].initial && j == i && !has_digit(w) && w.len() < 3) {
                named.push(span(i, j, !has_digit(w)));
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    // Phrases after a copula or a preposition, up to a break or a joining word (≤ 6 words).
    for (k, w) in ws.iter().enumerate() {
        let lw = lower(w.core);
        let is_cop = COPULAS.contains(&lw.as_str());
        let is_prep = PREPOSITIONS.contains(&lw.as_str());
        if !(is_cop || is_prep) || w.breaks {
            continue;
        }
        let mut a = k + 1;
        while a < ws.len() && ARTICLES.contains(&lower(ws[a].core).as_str()) && !ws[a].breaks {
            a += 1;
        }
        if a >= ws.len() || STOPS.contains(&lower(ws[a].core).as_str()) {
            continue;
        }
        let mut b = a;
        while b < ws.len() && b - a < 6 {
            if ws[b].breaks {
                break;
            }
            if b + 1 < ws.len() {
                let n = lower(ws[b + 1].core);
                if STOPS.contains(&n.as_str()) || (is_prep && PREPOSITIONS.contains(&n.as_str())) {
                    break;
                }
            }
            b += 1;
        }
        let b = b.min(ws.len() - 1);
        // Verbs after "is" ("is afraid", "is every Wednesday") stay: they are what was said.
        let s = span(a, b, false);
        if s.text.len() >= 2 {
            phrases.push(s);
        }
    }
    let mut out: Vec<Span> = Vec::new();
    for s in named.into_iter().chain(phrases) {
        if out.len() >= max {
            break;
        }
        if out.iter().any(|o| o.text.eq_ignore_ascii_case(&s.text)) {
            continue;
        }
        out.push(s);
    }
    out
}

/// Words that open a topic phrase ("our weekly grocery order", "the car's next service").
const TOPIC_OPENERS: &[&str] = &["my", "our", "the", "his", "her", "their"];

/// The note's topic phrases: a possessive or "the" and the words after it, up to a break, a
/// preposition, a copula, a joining word or a past-tense verb (at most four words). People
/// ask about a note by its topic ("the grocery order") as often as by its names; recall items
/// keyed on topics bind those words to the note too. At most `max`, in order, no repeats.
pub fn topic_phrases(note: &str, max: usize) -> Vec<String> {
    let ws = words(note);
    let mut out: Vec<String> = Vec::new();
    for (k, w) in ws.iter().enumerate() {
        if out.len() >= max {
            break;
        }
        let opener = lower(w.core);
        if !TOPIC_OPENERS.contains(&opener.as_str()) || w.breaks || k + 1 >= ws.len() {
            continue;
        }
        let ends = |x: &str| {
            let x = lower(x);
            COPULAS.contains(&x.as_str())
                || PREPOSITIONS.contains(&x.as_str())
                || STOPS.contains(&x.as_str())
                || NOT_NAMES.contains(&x.as_str())
                || (x.len() > 4 && x.ends_with("ed"))
                || has_digit(&x)
        };
        let a = k + 1;
        let mut b = a;
        if ends(ws[a].core) {
            continue;
        }
        while b + 1 < ws.len() && b - a < 3 && !ws[b].breaks && !ends(ws[b + 1].core) {
            b += 1;
        }
        let phrase = &note[ws[a].start..ws[b].end];
        // One short word ("the end", "my car") is kept only when it is not a bare pronoun.
        if phrase.chars().count() < 3 {
            continue;
        }
        let topic = format!("{} {}", opener, phrase);
        if !out.iter().any(|o| o.eq_ignore_ascii_case(&topic)) {
            out.push(topic);
        }
    }
    out
}

/// A rule-made training or probe item: a user turn and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleItem {
    pub prompt: String,
    pub completion: String,
    /// Held out for the gate, never trained.
    pub probe: bool,
    pub kind: &'static str,
}

/// The note with `s` replaced by a blank.
pub fn blank(note: &str, s: &Span) -> String {
    format!("{}____{}", &note[..s.start], &note[s.end..])
}

/// Cloze and recall items for a note. Every span gets a fill-in-the-blank item; names also
/// get recall items. One sentence-completion item per note (the first span that has text
/// before it) is held out as a probe.
pub fn cloze_items(note: &str, max_spans: usize) -> Vec<RuleItem> {
    let note = note.trim();
    let spans = key_spans(note, max_spans);
    let mut out = Vec::new();
    for s in &spans {
        out.push(RuleItem {
            prompt: format!("Fill in the blank in my note: \"{}\"", blank(note, s)),
            completion: s.text.clone(),
            probe: false,
            kind: "blank",
        });
    }
    for s in spans
        .iter()
        .filter(|s| s.entity && s.text.chars().count() >= 3)
        .take(3)
    {
        out.push(RuleItem {
            prompt: format!("What do my notes say about {}?", s.text),
            completion: note.to_string(),
            probe: false,
            kind: "recall",
        });
    }
    for t in topic_phrases(note, 2) {
        out.push(RuleItem {
            prompt: format!("What do my notes say about {t}?"),
            completion: note.to_string(),
            probe: false,
            kind: "recall",
        });
    }
    let mut probes = 0;
    for s in &spans {
        let before = note[..s.start].trim_end();
        if before.split_whitespace().count() < 2 || probes >= 2 {
            continue;
        }
        out.push(RuleItem {
            prompt: format!("Complete this sentence from my notes: \"{before} ...\""),
            completion: s.text.clone(),
            probe: true,
            kind: "complete",
        });
        probes += 1;
    }
    out
}

const TIME_WORDS: &[&str] = &[
    "every",
    "each",
    "on",
    "before",
    "after",
    "until",
    "during",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "today",
    "tomorrow",
    "tonight",
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "midnight",
    "noon",
];
const PLACE_WORDS: &[&str] = &[
    "in", "at", "under", "behind", "near", "inside", "beside", "above", "below", "next", "outside",
];
const PRONOUNS: &[&str] = &[
    "it", "he", "she", "they", "this", "that", "there", "which", "who",
];

/// Wh-questions made by inverting "<subject> is <complement>" clauses, the wh-word chosen by
/// the complement (when: times and days; where: places and "<participle> in ..."; who: a
/// multi-word name; else what). Returns (question, complement, the sentence it came from).
pub fn wh_questions(note: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for sentence in sentences(note) {
        let full = sentence.trim().to_string();
        let sentence = sentence.trim_end_matches(['.', '!', '?', ';']);
        // Clauses: split at ", " and the joining words; a clause needs its own subject.
        let mut clauses: Vec<Vec<&str>> = vec![Vec::new()];
        for w in sentence.split_whitespace() {
            let lw = w.to_lowercase();
            if matches!(
                lw.as_str(),
                "and" | "but" | "while" | "because" | "so" | "who" | "which" | "where"
            ) {
                clauses.push(Vec::new());
                continue;
            }
            let ends = w.ends_with(',');
            if let Some(c) = clauses.last_mut() {
                c.push(w.trim_end_matches(','));
            }
            if ends {
                clauses.push(Vec::new());
            }
        }
        for c in clauses {
            if let Some((q, a)) = first_person_question(&c) {
                out.push((q, a, full.clone()));
            }
            let Some(k) = c
                .iter()
                .position(|w| COPULAS.contains(&w.to_lowercase().as_str()))
            else {
                continue;
            };
            if k == 0 || k + 1 >= c.len() || k > 8 {
                continue;
            }
            let subj_words = &c[..k];
            if subj_words.len() == 1 && PRONOUNS.contains(&subj_words[0].to_lowercase().as_str()) {
                continue;
            }
            let mut subj: Vec<String> = subj_words.iter().map(|w| w.to_string()).collect();
            if NOT_NAMES.contains(&subj[0].to_lowercase().as_str()) {
                subj[0] = subj[0].to_lowercase();
            }
            let subj = subj.join(" ");
            let cop = c[k].to_lowercase();
            let comp = &c[k + 1..];
            let first = comp[0].to_lowercase();
            let answer = comp.join(" ");
            let caps = comp.iter().filter(|w| is_name_word(w)).count();
            // The reverse question, answered by the subject: models trained on "A is B" do not
            // answer "what is B?" unless they saw it asked that way (the reversal curse).
            if comp.len() <= 8 && !TIME_WORDS.contains(&first.as_str()) {
                let wh = if subj_words.iter().all(|w| is_name_word(w)) {
                    "Who"
                } else {
                    "What"
                };
                out.push((format!("{wh} {cop} {answer}?"), subj.clone(), full.clone()));
            }
            if first.ends_with("ing") && comp.len() >= 2 {
                // "Giulia is bringing the cake": what is Giulia bringing?
                let rest = comp[1..].join(" ");
                out.push((
                    format!("What {cop} {subj} {}?", comp[0]),
                    rest,
                    full.clone(),
                ));
                continue;
            }
            let q = if (first.ends_with("ed") || first.ends_with("en"))
                && comp.len() > 2
                && PLACE_WORDS.contains(&comp[1].to_lowercase().as_str())
            {
                format!("Where {cop} {subj} {}?", comp[0])
            } else if TIME_WORDS.contains(&first.as_str())
                || comp.iter().any(|w| w.contains(':') && has_digit(w))
            {
                format!("When {cop} {subj}?")
            } else if PLACE_WORDS.contains(&first.as_str()) {
                format!("Where {cop} {subj}?")
            } else if caps >= 2 && caps == comp.len() {
                format!("Who {cop} {subj}?")
            } else {
                format!("What {cop} {subj}?")
            };
            out.push((q, answer, full.clone()));
        }
    }
    out
}

/// Titles and abbreviations whose full stop does not end a sentence.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "st", "no", "nr", "mt", "jr", "sr", "vs", "etc", "e.g", "i.e",
    "approx", "ave", "rd", "fig", "ca",
];

/// The note's sentences (and ";"-separated parts), each with its end mark. A full stop after a
/// title or abbreviation ("Dr.", "No.", "St."), a single capital ("J.") or inside a number
/// ("2.5") does not end one.
fn sentences(note: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, ch) in note.char_indices() {
        if !matches!(ch, '.' | '!' | '?' | ';') {
            continue;
        }
        let end = i + ch.len_utf8();
        if ch == '.' {
            let next_is_text = note[end..]
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace());
            let word = note[start..i]
                .rsplit(|c: char| c.is_whitespace() || c == '(')
                .next()
                .unwrap_or("");
            let single_cap = word.chars().count() == 1 && word.chars().all(char::is_uppercase);
            if next_is_text || single_cap || ABBREVIATIONS.contains(&word.to_lowercase().as_str()) {
                continue;
            }
        }
        out.push(&note[start..end]);
        start = end;
    }
    if start < note.len() {
        out.push(&note[start..]);
    }
    out
}

/// "I volunteer at the shelter on Sundays" → ("Where do I volunteer?", "at the shelter on
/// Sundays"); the same for "we", and "when" for a time. Present tense only: the question needs
/// the verb's base form, which is the present tense's for "I" and "we".
fn first_person_question(c: &[&str]) -> Option<(String, String)> {
    let [who, verb, prep, ..] = c else {
        return None;
    };
    let who = match who.to_lowercase().as_str() {
        "i" => "I",
        "we" => "we",
        _ => return None,
    };
    let verb_l = verb.to_lowercase();
    if !verb.chars().all(|ch| ch.is_lowercase())
        || verb_l.ends_with("ed")
        || COPULAS.contains(&verb_l.as_str())
        || NOT_NAMES.contains(&verb_l.as_str())
        || matches!(
            verb_l.as_str(),
            "have" | "had" | "am" | "will" | "would" | "can" | "could" | "should" | "must" | "may"
        )
        || c.len() < 4
    {
        return None;
    }
    let p = prep.to_lowercase();
    let wh = if TIME_WORDS.contains(&p.as_str()) && p != "on" {
        "When"
    } else if PLACE_WORDS.contains(&p.as_str()) {
        "Where"
    } else {
        return None;
    };
    Some((format!("{wh} do {who} {verb}?"), c[2..].join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(note: &str) -> Vec<String> {
        key_spans(note, 12).into_iter().map(|s| s.text).collect()
    }

    #[test]
    fn names_numbers_and_phrases() {
        let t = texts("My accountant is Marisol Eberhardt and she needs the expense receipts by the 10th of January.");
        assert!(t.contains(&"Marisol Eberhardt".to_string()), "{t:?}");
        assert!(t.contains(&"10th of January".to_string()), "{t:?}");
        let t = texts("The bicycle lock code is 7-3-9-1 and the bike is chained in the courtyard behind building C.");
        assert!(t.contains(&"7-3-9-1".to_string()), "{t:?}");
        assert!(t.iter().any(|s| s.contains("courtyard")), "{t:?}");
        // Grammar words are not names.
        assert!(!t.iter().any(|s| s == "The"), "{t:?}");
    }

    #[test]
    fn questions_by_inversion() {
        let q = wh_questions(
            "The spare key is hidden under the blue flowerpot, and the gate code is 4417.",
        );
        let qa: Vec<(String, String)> = q.iter().map(|(q, a, _)| (q.clone(), a.clone())).collect();
        assert!(
            qa.contains(&(
                "Where is the spare key hidden?".into(),
                "hidden under the blue flowerpot".into()
            )),
            "{q:?}"
        );
        assert!(
            qa.contains(&("What is the gate code?".into(), "4417".into())),
            "{q:?}"
        );
        assert!(q.iter().all(|(_, _, s)| s.ends_with('.')), "{q:?}");
        let q = wh_questions("My landlord is Oskar Lindqvist. The rent is due every first Monday.");
        assert!(
            q.iter().any(|(q, a, s)| q == "Who is my landlord?"
                && a == "Oskar Lindqvist"
                && s == "My landlord is Oskar Lindqvist."),
            "{q:?}"
        );
        assert!(wh_questions("It is fine.").is_empty());
    }

    #[test]
    fn sentences_do_not_end_at_titles_or_inside_numbers() {
        let v = sentences(
            "Dr. Amsel moved the check-up to 10.30 because St. Ida's is closed. Ask Mr. J. Brook; he knows! Fine",
        );
        assert_eq!(
            v,
            [
                "Dr. Amsel moved the check-up to 10.30 because St. Ida's is closed.",
                " Ask Mr. J. Brook;",
                " he knows!",
                " Fine"
            ]
        );
        assert!(sentences("").is_empty());
        assert_eq!(sentences("..."), ["..."]);
    }

    #[test]
    fn questions_the_other_way_round_and_about_habits() {
        let qa = |note: &str| -> Vec<(String, String)> {
            wh_questions(note)
                .into_iter()
                .map(|(q, a, _)| (q, a))
                .collect()
        };
        // Reversed: answered by the subject.
        let q = qa("Henrike Vogt is the treasurer of the rowing club.");
        assert!(
            q.contains(&(
                "Who is the treasurer of the rowing club?".into(),
                "Henrike Vogt".into()
            )),
            "{q:?}"
        );
        // A progressive clause asks for its subject and its object.
        let q = qa("The picnic is on Sunday, and Tomasz is baking the bread.");
        assert!(
            q.contains(&("Who is baking the bread?".into(), "Tomasz".into())),
            "{q:?}"
        );
        assert!(
            q.contains(&("What is Tomasz baking?".into(), "the bread".into())),
            "{q:?}"
        );
        assert!(!q.iter().any(|(q, _)| q == "What is Tomasz?"), "{q:?}");
        // Times are not reversed ("What is on Sunday?" asks nothing).
        assert!(!q.iter().any(|(q, _)| q.starts_with("What is on")), "{q:?}");
        // First-person habits: where and when.
        let q = qa("We swim at the Nordbad before work, where the lifeguard is Ines Kahl.");
        assert!(
            q.contains(&(
                "Where do we swim?".into(),
                "at the Nordbad before work".into()
            )),
            "{q:?}"
        );
        assert!(
            q.contains(&("Who is the lifeguard?".into(), "Ines Kahl".into())),
            "{q:?}"
        );
        assert!(qa("I walked to the shop.").is_empty());
        assert!(qa("I am in the garden.")
            .iter()
            .all(|(q, _)| !q.starts_with("Where do")));
    }

    #[test]
    fn topic_phrases_stop_at_verbs_prepositions_and_copulas() {
        assert_eq!(
            topic_phrases(
                "Our weekly grocery order from Fernbrook Market arrives on Saturdays.",
                3
            ),
            vec!["our weekly grocery order"]
        );
        assert_eq!(
            topic_phrases(
                "The spare key is under the blue flowerpot by the back door.",
                3
            ),
            vec!["the spare key", "the blue flowerpot", "the back door"]
        );
        assert_eq!(
            topic_phrases("My sister moved to the city; her dog stayed.", 3),
            vec!["my sister", "the city", "her dog"]
        );
        assert!(topic_phrases("", 3).is_empty());
        assert!(topic_phrases("the", 3).is_empty());
        assert!(topic_phrases("It is the 4th.", 3).is_empty());
    }

    #[test]
    fn spans_are_byte_exact_and_blanks_rebuild_the_note() {
        let note = "Grüße: the café «Zur Linde» opens at 07:30, says Jürgen Weiß.";
        for s in key_spans(note, 12) {
            assert_eq!(&note[s.start..s.end], s.text);
            let b = blank(note, &s);
            assert_eq!(b.replacen("____", &s.text, 1), note);
        }
    }

    #[test]
    fn items_hold_out_probes_and_never_panic() {
        let items = cloze_items(
            "Our dog Brisket is a three-year-old corgi who is afraid of thunderstorms.",
            8,
        );
        assert!(items.iter().any(|i| i.probe));
        assert!(items.iter().any(|i| !i.probe && i.kind == "blank"));
        assert!(items
            .iter()
            .any(|i| i.kind == "recall" && i.prompt.contains("Brisket")));
        for odd in ["", "   ", "is", "a b c", "\"\"", "…", "1", "In. At. By."] {
            let _ = cloze_items(odd, 8);
        }
    }
}
