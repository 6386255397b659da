//! The note sets of bench/NOTES-SETS.md: `bench/notes-train.jsonl` (what the self-edit writer
//! may train on), `bench/notes-holdout.jsonl` (never trained on) and, when this checkout sits
//! beside it, `../shared/eval/ki-dev.jsonl` (never trained on). No model is needed: these check
//! that the files parse, that a `fact` answer is written in its note and an `inference` answer is
//! not (else reciting the note would score it), and that no training note shares a name, a
//! distinctive number or a six-word phrase with a note used for evaluation.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Question {
    q: String,
    a: Vec<String>,
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Note {
    id: String,
    note: String,
    questions: Vec<Question>,
}

/// SHA-256 of the first 16 lines of `bench/notes-holdout.jsonl` (h01-h16, newlines included):
/// earlier benchmarks were measured on exactly these lines.
const HOLDOUT_FIRST_16_SHA256: &str =
    "c9dfaa01de513fdf758c8ca79f7724690e0e383f45d3c958a1b0847463514b7b";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &Path) -> Vec<Note> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut notes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n: Note = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
        let at = format!("{}:{} ({})", path.display(), i + 1, n.id);
        assert!(!n.id.trim().is_empty(), "{at}: empty id");
        assert!(!n.note.trim().is_empty(), "{at}: empty note");
        assert!(!n.questions.is_empty(), "{at}: no questions");
        for q in &n.questions {
            assert!(!q.q.trim().is_empty(), "{at}: empty question");
            assert!(!q.a.is_empty(), "{at}: no accepted answer for {:?}", q.q);
        }
        notes.push(n);
    }
    notes
}

fn train() -> Vec<Note> {
    load(&root().join("bench/notes-train.jsonl"))
}

fn holdout() -> Vec<Note> {
    load(&root().join("bench/notes-holdout.jsonl"))
}

/// The dev set lives outside the repository; a clean clone (CI) does not have it.
fn dev() -> Option<Vec<Note>> {
    let path = root().join("../shared/eval/ki-dev.jsonl");
    if path.exists() {
        Some(load(&path))
    } else {
        eprintln!(
            "note: {} is absent (a clean clone?); skipping the checks against the dev set",
            path.display()
        );
        None
    }
}

// ---- one fact in several written forms ----

fn fold(c: char) -> Option<&'static str> {
    Some(match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' => "a",
        'æ' => "ae",
        'ç' | 'ć' | 'č' => "c",
        'ď' | 'đ' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ě' | 'ę' => "e",
        'ğ' => "g",
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'ı' => "i",
        'ł' | 'ľ' => "l",
        'ñ' | 'ń' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' => "o",
        'œ' => "oe",
        'ř' | 'ŕ' => "r",
        'ś' | 'š' | 'ş' => "s",
        'ß' => "ss",
        'ť' | 'ţ' => "t",
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' => "u",
        'ý' | 'ÿ' => "y",
        'ž' | 'ź' | 'ż' => "z",
        '&' => " and ",
        '£' => " gbp ",
        '€' => " eur ",
        '$' => " usd ",
        '%' => " percent ",
        _ => return None,
    })
}

const NUMBER_WORDS: [(&str, u32); 28] = [
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
];

const ORDINAL_WORDS: [(&str, u32); 12] = [
    ("first", 1),
    ("second", 2),
    ("third", 3),
    ("fourth", 4),
    ("fifth", 5),
    ("sixth", 6),
    ("seventh", 7),
    ("eighth", 8),
    ("ninth", 9),
    ("tenth", 10),
    ("eleventh", 11),
    ("twelfth", 12),
];

const UNITS: [(&str, &str); 23] = [
    ("grams", "g"),
    ("gram", "g"),
    ("kilograms", "kg"),
    ("kilogram", "kg"),
    ("kilos", "kg"),
    ("kilo", "kg"),
    ("kilometres", "km"),
    ("kilometers", "km"),
    ("kilometre", "km"),
    ("kilometer", "km"),
    ("metres", "m"),
    ("meters", "m"),
    ("metre", "m"),
    ("meter", "m"),
    ("minutes", "min"),
    ("minute", "min"),
    ("mins", "min"),
    ("pounds", "gbp"),
    ("pound", "gbp"),
    ("euros", "eur"),
    ("euro", "eur"),
    ("dollars", "usd"),
    ("dollar", "usd"),
];

const MONTHS: [&str; 12] = [
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
];

fn lookup<T: Copy>(table: &[(&str, T)], word: &str) -> Option<T> {
    table.iter().find(|(w, _)| *w == word).map(|(_, v)| *v)
}

fn is_number(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())
}

/// Word tokens with the written forms of one fact made equal: case, common diacritics, digit
/// group separators, number and ordinal words ("twenty-five", "fourth"), "3rd", units and
/// currencies ("grams"/"g", "€12"/"12 euros"), and dates ("3rd of March", "3 March" -> "march 3").
fn tokens(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.to_lowercase().chars().collect();
    let mut text = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let digit_separator = (c == ',' || c == '.')
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if digit_separator {
            continue;
        }
        match fold(c) {
            Some(r) => text.push_str(r),
            None => text.push(c),
        }
    }
    let raw: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    let mut words: Vec<String> = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let t = raw[i];
        let tens = lookup(&NUMBER_WORDS, t).filter(|v| *v >= 20 && v.is_multiple_of(10));
        let unit = raw
            .get(i + 1)
            .and_then(|n| lookup(&NUMBER_WORDS, n))
            .filter(|v| (1..=9).contains(v));
        if let (Some(tens), Some(unit)) = (tens, unit) {
            words.push((tens + unit).to_string());
            i += 2;
            continue;
        }
        let ordinal_digits = ["st", "nd", "rd", "th"]
            .iter()
            .find_map(|suffix| t.strip_suffix(suffix).filter(|d| is_number(d)));
        let word = if let Some(d) = ordinal_digits {
            d.to_string()
        } else if let Some(v) = lookup(&NUMBER_WORDS, t).or_else(|| lookup(&ORDINAL_WORDS, t)) {
            v.to_string()
        } else if let Some(u) = lookup(&UNITS, t) {
            u.to_string()
        } else {
            t.to_string()
        };
        words.push(word);
        i += 1;
    }
    let is_month = |t: &str| MONTHS.contains(&t);
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let t = words[i].as_str();
        let next = words.get(i + 1).map(String::as_str).unwrap_or("");
        let after = words.get(i + 2).map(String::as_str).unwrap_or("");
        if ["gbp", "eur", "usd"].contains(&t) && is_number(next) {
            out.extend([next.to_string(), t.to_string()]);
            i += 2;
        } else if is_number(t) && t.len() <= 2 && next == "of" && is_month(after) {
            out.extend([after.to_string(), t.to_string()]);
            i += 3;
        } else if is_number(t) && t.len() <= 2 && is_month(next) {
            out.extend([next.to_string(), t.to_string()]);
            i += 2;
        } else {
            out.push(t.to_string());
            i += 1;
        }
    }
    out
}

fn normalised(s: &str) -> String {
    tokens(s).concat()
}

/// Whether an answer is written in the note, allowing for the forms `tokens` makes equal.
fn written_in(answer: &str, note: &str) -> bool {
    let a = normalised(answer);
    !a.is_empty() && normalised(note).contains(&a)
}

const GENERIC_ANSWERS: [&str; 17] = [
    "yes", "no", "the", "and", "it", "me", "you", "my", "a", "an", "of", "in", "on", "at", "to",
    "is", "one",
];

/// Problems with the questions of one note that carries `kind` on every question.
fn answer_problems(n: &Note) -> Vec<String> {
    let mut problems = Vec::new();
    let lower_note = n.note.to_lowercase();
    for q in &n.questions {
        let at = format!("{} {:?}", n.id, q.q);
        let mut seen = BTreeSet::new();
        for a in &q.a {
            let t = a.trim();
            if !seen.insert(t.to_lowercase()) {
                problems.push(format!("{at}: answer {a:?} listed twice"));
            }
            let single_digit = t.len() == 1 && t.bytes().all(|b| b.is_ascii_digit());
            if t.chars().count() < 2
                || single_digit
                || GENERIC_ANSWERS.contains(&&*t.to_lowercase())
            {
                problems.push(format!(
                    "{at}: answer {a:?} is so short or common that wrong answers would match it"
                ));
            }
        }
        match q.kind.as_deref() {
            Some("fact") => {
                for a in &q.a {
                    if !written_in(a, &n.note) {
                        problems.push(format!(
                            "{at}: fact answer {a:?} is not written in the note (mark it inference?)"
                        ));
                    }
                }
            }
            // Scoring is a case-insensitive substring match: an accepted answer that occurs in
            // the note would give full credit to a model that merely recites it.
            Some("inference") => {
                for a in &q.a {
                    if lower_note.contains(&a.to_lowercase()) {
                        problems.push(format!(
                            "{at}: inference answer {a:?} occurs in the note, so reciting the note scores it"
                        ));
                    }
                }
            }
            Some(other) => problems.push(format!(
                "{at}: kind {other:?} is neither fact nor inference"
            )),
            None => problems.push(format!("{at}: no kind (fact or inference)")),
        }
    }
    problems
}

// ---- what a training note must not share with an evaluation note ----

/// Capitalised words that are not names: months, weekdays, sentence openings, relations and
/// titles, and the generic parts of place and company names ("Street", "Hotel").
const NOT_NAMES: &str = "\
January February March April June July August September October November December Monday \
Tuesday Wednesday Thursday Friday Saturday Sunday Mondays Tuesdays Wednesdays Thursdays \
Fridays Saturdays Sundays The This That These Those Then There They Their When What Which \
Where Whose Every After Before Since From With Also Note Next Last Each Some Once Until Only \
Still Just Over Into Please Here Your Have Will Should Need Must Correction Update Change \
Decided Decision Diary Message Text Email Voicemail WhatsApp List Receipts Packing Grandma \
Grandpa Granny Nana Auntie Aunt Uncle Mum Mom Dad Papa Mama Miss Señora Senora Doctor Street \
Road Lane Avenue Square Park Hall House Bank Market Motors Energy Hotel Project Room Centre \
Center Clinic Health Building Society Foundation Primary School Outdoor Insurance Components \
Logistics Heating Repairs Builders Direct Cover Fibre Leisure Depot Court Trust Cross Baths \
Farm Garage Library Stage Year Christmas Easter";

fn full_text(n: &Note) -> String {
    let mut t = n.note.clone();
    for q in &n.questions {
        t.push(' ');
        t.push_str(&q.q);
        for a in &q.a {
            t.push(' ');
            t.push_str(a);
        }
    }
    t
}

/// Words of at least four letters starting with a capital letter, minus `NOT_NAMES`.
fn names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphabetic())
        .filter(|w| w.chars().count() >= 4)
        .filter(|w| w.chars().next().is_some_and(char::is_uppercase))
        .filter(|w| !NOT_NAMES.split_whitespace().any(|n| n == *w))
        .map(str::to_string)
        .collect()
}

/// Numbers of three or more digits ("1,150" counts as 1150), except years 1900-2099 and
/// multiples of 100: codes, amounts and readings that identify a note.
fn distinctive_numbers(text: &str) -> BTreeSet<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut numbers = BTreeSet::new();
    let mut current = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_digit() {
            current.push(c);
            continue;
        }
        let separator =
            c == ',' && !current.is_empty() && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if separator {
            continue;
        }
        numbers.insert(std::mem::take(&mut current));
    }
    numbers.insert(current);
    numbers
        .into_iter()
        .filter(|n| n.len() >= 3)
        .filter(|n| {
            let v: u64 = n.parse().unwrap_or(0);
            let year = n.len() == 4 && (1900..=2099).contains(&v);
            !year && !v.is_multiple_of(100)
        })
        .collect()
}

fn phrases(note: &str) -> BTreeSet<String> {
    let lower = note.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(6).map(|w| w.join(" ")).collect()
}

/// Every name, distinctive number and six-word phrase of a note in `a` that also occurs in a
/// note in `b`.
fn shared(a: &[Note], b: &[Note]) -> Vec<String> {
    let mut seen: BTreeMap<(char, String), Vec<&str>> = BTreeMap::new();
    for n in b {
        let text = full_text(n);
        for x in names(&text) {
            seen.entry(('n', x)).or_default().push(&n.id);
        }
        for x in distinctive_numbers(&text) {
            seen.entry(('#', x)).or_default().push(&n.id);
        }
        for x in phrases(&n.note) {
            seen.entry(('p', x)).or_default().push(&n.id);
        }
    }
    let mut found = Vec::new();
    for n in a {
        let text = full_text(n);
        let keys = names(&text)
            .into_iter()
            .map(|x| ('n', x))
            .chain(distinctive_numbers(&text).into_iter().map(|x| ('#', x)))
            .chain(phrases(&n.note).into_iter().map(|x| ('p', x)));
        for key in keys {
            if let Some(ids) = seen.get(&key) {
                let what = match key.0 {
                    'n' => "name",
                    '#' => "number",
                    _ => "phrase",
                };
                found.push(format!(
                    "{} shares the {what} {:?} with {ids:?}",
                    n.id, key.1
                ));
            }
        }
    }
    found
}

// ---- the checks ----

#[test]
fn forms_of_one_fact_normalise_alike() {
    for (answer, note) in [
        ("March 3", "on the 3rd of March"),
        ("3 March", "on March 3rd"),
        ("twenty-five metres", "she swims 25 m"),
        ("1210 euros", "rent is €1,210"),
        ("£85", "85 pounds"),
        ("Kovac", "Radomir Kovač"),
        ("4th floor", "fourth floor"),
        ("Crown and Heron", "the Crown & Heron"),
        ("5-0-8", "code 508"),
    ] {
        assert!(
            written_in(answer, note),
            "{answer:?} should be found in {note:?}"
        );
    }
    for (answer, note) in [
        ("March 13", "March 3"),
        ("2027", "2025"),
        ("Tuesday", "Monday"),
    ] {
        assert!(
            !written_in(answer, note),
            "{answer:?} must not be found in {note:?}"
        );
    }
}

#[test]
fn training_notes_are_well_formed_and_a_third_of_questions_need_inference() {
    let notes = train();
    assert!(
        notes.len() >= 120,
        "notes-train has {} notes, want >= 120",
        notes.len()
    );
    let mut problems = Vec::new();
    let (mut questions, mut inference) = (0usize, 0usize);
    for n in &notes {
        if !n.id.starts_with('t') {
            problems.push(format!("{}: training ids start with t", n.id));
        }
        if !(2..=4).contains(&n.questions.len()) {
            problems.push(format!(
                "{}: {} questions, want 2-4",
                n.id,
                n.questions.len()
            ));
        }
        problems.extend(answer_problems(n));
        questions += n.questions.len();
        inference += n
            .questions
            .iter()
            .filter(|q| q.kind.as_deref() == Some("inference"))
            .count();
    }
    assert!(problems.is_empty(), "notes-train:\n{}", problems.join("\n"));
    assert!(
        inference * 3 >= questions,
        "only {inference} of {questions} training questions are kind=inference, want a third"
    );
}

#[test]
fn held_out_notes_keep_their_first_sixteen_lines_and_new_ones_are_checked() {
    let path = root().join("bench/notes-holdout.jsonl");
    let bytes = std::fs::read(&path).unwrap();
    let end = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(15)
        .map(|(i, _)| i + 1)
        .expect("notes-holdout has at least 16 lines");
    assert_eq!(
        hex::encode(Sha256::digest(&bytes[..end])),
        HOLDOUT_FIRST_16_SHA256,
        "h01-h16 changed: earlier benchmarks were measured on them; append instead"
    );
    let notes = holdout();
    let mut problems = Vec::new();
    for (i, n) in notes.iter().enumerate() {
        if !n.id.starts_with('h') {
            problems.push(format!("{}: held-out ids start with h", n.id));
        }
        if !(2..=4).contains(&n.questions.len()) {
            problems.push(format!(
                "{}: {} questions, want 2-4",
                n.id,
                n.questions.len()
            ));
        }
        // h01-h16 predate `kind`; every later note carries it.
        if i >= 16 {
            problems.extend(answer_problems(n));
        }
    }
    assert!(
        problems.is_empty(),
        "notes-holdout:\n{}",
        problems.join("\n")
    );
}

#[test]
fn ids_are_unique_across_the_sets() {
    let mut all: Vec<Note> = train();
    all.extend(holdout());
    all.extend(dev().unwrap_or_default());
    let mut seen = BTreeSet::new();
    let dups: Vec<&str> = all
        .iter()
        .filter(|n| !seen.insert(n.id.as_str()))
        .map(|n| n.id.as_str())
        .collect();
    assert!(dups.is_empty(), "duplicate ids: {dups:?}");
}

#[test]
fn training_notes_share_no_name_number_or_phrase_with_evaluation_notes() {
    let train = train();
    let holdout = holdout();
    let mut found = shared(&train, &holdout);
    if let Some(dev) = dev() {
        found.extend(shared(&train, &dev));
        // The new held-out notes must not echo the dev notes either.
        found.extend(shared(&holdout[16..], &dev));
    }
    found.extend(shared(&holdout[16..], &holdout[..16]));
    assert!(
        found.is_empty(),
        "training and evaluation notes overlap:\n{}",
        found.join("\n")
    );
}

#[test]
fn copying_an_evaluation_note_into_training_would_be_caught() {
    let mut evaluation = holdout();
    evaluation.extend(dev().unwrap_or_default());
    for n in &evaluation {
        assert!(
            !shared(std::slice::from_ref(n), &evaluation).is_empty(),
            "{} copied into notes-train would go unnoticed",
            n.id
        );
    }
}
