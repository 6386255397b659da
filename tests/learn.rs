//! The learning cycle on the real default model: self-edits with verdicts, an interrupted
//! cycle that resumes, a gate decision that is recorded, and notes answered from the weights
//! with no note in the prompt.

mod common;

use common::{home_with_model, hone, last_json, run, stderr, stdout};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Fictional notes, written for this test (not the dev set).
const NOTES: &[&str] = &[
    "The spare key to the garden shed is hidden under the blue flowerpot by the back door.",
    "My piano teacher is Ottilie Brandvold and my lesson is every Thursday at 17:30.",
    "The wifi password at the cabin is marmot-lantern-42.",
];

fn cycle_status(home: &Path) -> Option<String> {
    let store = hone::store::Store::open(&home.join("hone.db")).ok()?;
    hone::learn::records::recent(&store, 1)
        .ok()?
        .first()
        .map(|c| c.status.clone())
}

fn ask(home: &Path, q: &str, base: bool) -> String {
    let mut c = hone(home);
    // From the weights: no retrieved note in the prompt.
    c.args([
        "ask",
        "--json",
        "--no-retrieval",
        "--temperature",
        "0",
        "-n",
        "40",
    ]);
    if base {
        c.arg("--base");
    }
    c.arg(q);
    last_json(&run(&mut c, true))["answer"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_cycle_learns_notes_resumes_after_sigint_and_records_the_gate() {
    let home = home_with_model();
    let h = home.path();
    for n in NOTES {
        run(hone(h).args(["note", "add", n]), true);
    }
    // Dry run: self-edits with verdicts, nothing stored or trained.
    let d = last_json(&run(hone(h).args(["learn", "--dry-run", "--json"]), true));
    assert_eq!(d["outcome"], "dry-run");
    let items: Vec<&serde_json::Value> = d["notes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n[1].as_array().unwrap())
        .collect();
    assert!(items
        .iter()
        .any(|i| i["strategy"] == "cloze" && i["verdict"] == "kept"));
    assert!(items
        .iter()
        .any(|i| i["strategy"] == "recall" && i["verdict"] == "kept"));
    assert!(items.iter().any(|i| i["role"] == "probe"));
    assert!(cycle_status(h).is_none(), "a dry run records no cycle");

    // The estimate: the cycle's own training set, planned and timed here; nothing stored.
    let e = last_json(&run(hone(h).args(["learn", "--estimate", "--json"]), true));
    assert_eq!(
        e["notes"].as_array().map(|n| n.len()),
        Some(NOTES.len()),
        "{e}"
    );
    assert!(e["sequences"].as_u64().unwrap() >= 1, "{e}");
    assert!(e["steps_planned"].as_u64().unwrap() >= 100, "{e}");
    let expected = e["steps_expected"].as_u64().unwrap();
    assert!(
        expected >= 1 && expected <= e["steps_planned"].as_u64().unwrap(),
        "{e}"
    );
    // Steps whose sequence is skipped as learned cost nothing: training is timed on the rest.
    let trained = e["steps_trained"].as_u64().unwrap();
    assert!(trained >= 1 && trained <= expected, "{e}");
    let per_step = e["seconds_per_step"].as_f64().unwrap();
    let training = e["phases"][3][1].as_f64().unwrap();
    assert_eq!(e["phases"][3][0], "training", "{e}");
    assert!(
        per_step > 0.0 && (training - per_step * trained as f64).abs() < 1e-6,
        "{e}"
    );
    assert!(e["total_seconds"].as_f64().unwrap() >= training, "{e}");
    // No anchoring answer is written yet: one batch of them is answered and timed, kept nowhere.
    let missing = e["anchors_missing"].as_u64().unwrap();
    let per_anchor = e["seconds_per_anchor"].as_f64().unwrap();
    assert_eq!(e["phases"][2][0], "anchors", "{e}");
    assert!(
        missing >= 1
            && per_anchor > 0.0
            && (e["phases"][2][1].as_f64().unwrap() - per_anchor * missing as f64).abs() < 1e-6,
        "{e}"
    );
    assert!(cycle_status(h).is_none(), "an estimate records no cycle");

    // A cycle interrupted by SIGINT once it trains.
    let args = ["learn", "--json", "--epochs", "6", "--seed", "1"];
    let child = hone(h)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while cycle_status(h).as_deref() != Some("training") {
        assert!(
            Instant::now() < deadline,
            "the cycle never reached training"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    eprintln!(
        "SIGINT during the cycle's training to exit: {:.2} s",
        took.as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(last_json(&out)["outcome"], "interrupted");
    assert_eq!(cycle_status(h).as_deref(), Some("training"));

    // The same command continues the cycle (same cycle id) and finishes it.
    let t = Instant::now();
    let o = run(hone(h).args(args), true);
    let j = last_json(&o);
    eprintln!("resumed cycle: {:.0} s: {j}", t.elapsed().as_secs_f64());
    assert_eq!(j["outcome"], "done", "{}", stdout(&o));
    assert_eq!(j["cycle"], 1);
    let gate = &j["gate"];
    assert!(gate["new_probes"].as_u64().unwrap() >= 3, "{gate}");
    assert!(
        gate["general_prompts"].as_u64().unwrap() >= 20,
        "the gate measures drift on held-out prompts: {gate}"
    );
    let reason = j["reason"].as_str().unwrap().to_string();
    // The log shows the decision and the items.
    let log = stdout(&run(hone(h).args(["learn", "--log"]), true));
    assert!(log.contains(&reason), "{log}");
    assert!(log.contains("recall kept"), "{log}");
    // The notes are learned: nothing more to do.
    let again = last_json(&run(hone(h).args(["learn", "--json"]), true));
    if j["activated"].is_null() {
        // A rejected candidate keeps the notes in the queue for one more try.
        assert!(reason.starts_with("rejected"), "{reason}");
        return;
    }
    assert_eq!(again["outcome"], "nothing");
    assert!(gate["new_correct"].as_u64().unwrap() * 2 >= gate["new_probes"].as_u64().unwrap());
    // Answers from the weights, with no note in the prompt; the base model does not know.
    let q = "What is the wifi password at the cabin?";
    let with = ask(h, q, false);
    let base = ask(h, q, true);
    eprintln!("adapter: {with:?}\nbase: {base:?}");
    assert!(with.to_lowercase().contains("marmot-lantern-42"), "{with}");
    assert!(!base.to_lowercase().contains("marmot-lantern"), "{base}");
    // A general question: the adapter does not claim the notes, so the base model answers it
    // exactly as before learning.
    let q = "What is the capital of France?";
    assert_eq!(ask(h, q, false), ask(h, q, true));

    // The claims check: the adapter's "Your notes say: ..." rests on a current note, named (once
    // that note is removed, no answer presents it as a current note: below).
    let j = last_json(&run(
        hone(h).args([
            "ask",
            "--json",
            "--no-retrieval",
            "--temperature",
            "0",
            "-n",
            "40",
            "What is the wifi password at the cabin?",
        ]),
        true,
    ));
    assert_eq!(j["claims_notes"], true, "{j}");
    assert_eq!(j["supported_by"], 3, "{j}");

    // Forgetting: the wifi note is removed. At once, its answer is held back (the base model
    // answers, with retrieval and without), and the next cycle rebuilds the adapter without it.
    let wifi = "What is the wifi password at the cabin?";
    run(hone(h).args(["note", "rm", "3"]), true);
    let held = last_json(&run(
        hone(h).args(["ask", "--json", "--temperature", "0", "-n", "40", wifi]),
        true,
    ));
    assert_eq!(held["held_back_note"], 3, "{held}");
    assert!(held["supported_by"].is_null(), "{held}");
    assert_eq!(held["claims_notes"], held["unsupported_claim"], "{held}");
    let a = held["answer"].as_str().unwrap_or("").to_lowercase();
    assert!(!a.contains("marmot-lantern"), "{a}");
    assert!(!ask(h, wifi, false)
        .to_lowercase()
        .contains("marmot-lantern"));
    let t = Instant::now();
    let f = last_json(&run(
        hone(h).args(["learn", "--forget-now", "--json", "--seed", "1"]),
        true,
    ));
    eprintln!("rebuild: {:.0} s: {f}", t.elapsed().as_secs_f64());
    assert_eq!(f["outcome"], "done", "{f}");
    let reason = f["reason"].as_str().unwrap();
    let after = ask(h, wifi, false).to_lowercase();
    assert!(!after.contains("marmot-lantern"), "{after}");
    if f["activated"].is_null() {
        // A rejected rebuild: the adapter from before the note (the base model) answers, and
        // the other notes wait to be learned again.
        assert!(reason.contains("did not pass the gate"), "{reason}");
    } else {
        assert!(reason.contains("rebuilt without note 3"), "{reason}");
        let teacher = ask(h, "Who is my piano teacher?", false);
        assert!(teacher.contains("Brandvold"), "{teacher}");
    }
    // Nothing of the note is left: not its text, its self-edits, nor an adapter trained on it.
    let db = rusqlite::Connection::open(h.join("hone.db")).unwrap();
    let left: i64 = db
        .query_row(
            "SELECT (SELECT count(*) FROM learn_items WHERE completion LIKE '%marmot%')
                  + (SELECT count(*) FROM forgotten_notes WHERE content != '')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    let versions = stdout(&run(hone(h).args(["adapters", "list", "--json"]), true));
    for v in versions
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        assert_ne!(v["version"], j["activated"], "{versions}");
    }
    let again = last_json(&run(
        hone(h).args(["learn", "--forget-now", "--json"]),
        true,
    ));
    assert_eq!(again["outcome"], "nothing", "{again}");
}
