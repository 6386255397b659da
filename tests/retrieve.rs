//! Retrieval with the real default model's vocabulary as its lexicon: a question that shares a
//! rare word (a name, a drug, a dish) with a note is about that note; words the vocabulary keeps
//! whole (country names, everyday nouns) need the two-word rule, so general questions do not
//! pick up notes by one word.

mod common;

use hone::gguf::GgufFile;
use hone::retrieve::{relevant, Common, Lexicon};
use hone::store::Store;
use hone::tokenizer::Tokenizer;

fn tokenizer() -> Tokenizer {
    let file = GgufFile::open(&common::default_model()).unwrap();
    Tokenizer::from_gguf(&file).unwrap()
}

#[test]
fn the_vocabulary_tells_names_from_common_words() {
    let tok = tokenizer();
    for w in ["Oksana", "meloxicam", "falafel", "Vasquez", "flowerpot"] {
        assert!(tok.is_rare(w), "{w} should be rare");
        assert!(
            tok.is_rare(&w.to_lowercase()),
            "{w} lowercase should be rare"
        );
    }
    // Common whatever the casing (" france" is split, " France" is not; " Ottoman" is whole,
    // " ottoman" is not), numbers never.
    for w in [
        "France",
        "france",
        "celsius",
        "router",
        "week",
        "days",
        "capital",
        "birthday",
        "ibuprofen",
        "ottoman",
        "2026",
        "1470",
        "",
    ] {
        assert!(!tok.is_rare(w), "{w:?} should be common");
    }
    assert!(!Common.is_rare("Oksana"));
}

#[test]
fn a_shared_name_finds_the_note_and_a_shared_common_word_does_not() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("hone.db")).unwrap();
    let notes = [
        "Our neighbour Oksana waters the tomatoes while we are in France in July.",
        "The dog's name is Pretzel; the dog sitter comes on Mondays.",
        "The vet said to give the cat half a tablet of meloxicam with food.",
        "We keep the spare key to the shed under the blue flowerpot.",
    ];
    let mut ids = Vec::new();
    for n in notes {
        match store.add_note(n, None, None).unwrap() {
            hone::store::NoteAdded::Added(id) => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    // One word of the question, a name: found with the vocabulary, not without it.
    let q = "When is Oksana's birthday?";
    let found = relevant(&store, q, 3, &tok).unwrap();
    assert_eq!(found.iter().map(|m| m.id).collect::<Vec<_>>(), [ids[0]]);
    assert!(relevant(&store, q, 3, &Common).unwrap().is_empty());
    // A drug named in a long question with few of its words in the note.
    let q = "How much meloxicam should the cat really be getting these days?";
    assert_eq!(relevant(&store, q, 3, &tok).unwrap()[0].id, ids[2]);
    // A country, a general question: one common word is not enough.
    assert!(relevant(&store, "What is the capital of France?", 3, &tok)
        .unwrap()
        .is_empty());
    // A shared name ranks above two shared common words.
    store
        .add_note("The name of the sitter's own dog is Biscuit.", None, None)
        .unwrap();
    let q = "What is the dog's name that Oksana walks?";
    let found = relevant(&store, q, 3, &tok).unwrap();
    assert_eq!(found[0].id, ids[0], "{found:?}");
    assert!(found.iter().all(|m| m.rare >= 1), "{found:?}");
}
