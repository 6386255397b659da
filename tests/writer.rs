//! `hone writer` on the real default model: a round samples self-edits, rewards each after a
//! real inner update, records every sample; a round stopped by SIGTERM and one killed with
//! SIGKILL both continue after the last finished note, with no note done twice; a note whose
//! questions have no answer in it is reported and skipped; the `writer` strategy writes
//! self-edits in `hone learn`.

mod common;

use common::{home_with_model, hone, last_json, run, stderr};
use std::path::Path;
use std::time::{Duration, Instant};

/// Fictional notes with questions, written for this test (not any note set of the repo).
const QA: &str = r#"{"id":"w1","note":"My neighbour Brisco Tallend waters the tomatoes while I am away; he likes to be paid in plums.","questions":[{"q":"Who waters my tomatoes?","a":["Brisco Tallend","Brisco"]},{"q":"How does Brisco like to be paid?","a":["plums","in plums"]}]}
{"id":"w2","note":"The rowing club meets on the Harrow canal every Sunday at 7:15, and the fee is 40 pounds a term.","questions":[{"q":"Where does the rowing club meet?","a":["Harrow canal","the Harrow canal"]},{"q":"How much is the rowing club fee?","a":["40 pounds","40"]}]}
{"id":"w3","note":"Grandma Ysolde turned 88 in March; her brother Alric is four years younger.","questions":[{"q":"How old is Grandma Ysolde?","a":["88"]},{"q":"How old is Alric?","a":["84"]}]}
{"id":"w4","note":"The printer jammed again today.","questions":[{"q":"What is the capital of Peru?","a":["Lima"]}]}
"#;

fn samples(home: &Path) -> Vec<(i64, String, String)> {
    let Ok(store) = hone::store::Store::open(&home.join("hone.db")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for r in hone::teach::records::all_rounds(&store).unwrap_or_default() {
        if let Ok(v) = hone::teach::records::samples(&store, r.id) {
            out.extend(v.into_iter().map(|s| (r.id, s.note_key, s.role)));
        }
    }
    out
}

/// Starts `writer train`, waits until more notes are done than `after`, then sends `signal`.
fn interrupt_after(home: &Path, args: &[&str], after: usize, signal: i32) -> std::process::Output {
    let child = hone(home)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn hone");
    let t0 = Instant::now();
    let done = |h: &Path| {
        samples(h)
            .iter()
            .filter(|s| s.2.ends_with("baseline"))
            .count()
    };
    while done(home) <= after && t0.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(200));
    }
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    child.wait_with_output().expect("wait hone")
}

#[test]
fn a_writer_round_records_rewards_and_resumes_after_sigterm_and_sigkill() {
    let home = home_with_model();
    let h = home.path();
    let qa = h.join("qa.jsonl");
    std::fs::write(&qa, QA).unwrap();
    let qa_s = qa.to_str().unwrap();
    let args = [
        "writer",
        "train",
        "--qa",
        qa_s,
        "--notes",
        "2",
        "--holdout",
        "1",
        "--samples",
        "2",
        "--inner-steps",
        "3",
        "--json",
    ];
    // SIGTERM after the first note: a clean stop that says how to continue.
    let o = interrupt_after(h, &args, 0, libc::SIGTERM);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("continues after the last finished note"));
    let before = samples(h).len();
    assert!(
        before >= 3,
        "the first note's baseline and samples are stored"
    );
    // SIGKILL after one more note: nothing is cleaned up, the next run continues.
    let _ = interrupt_after(
        h,
        &args,
        samples(h)
            .iter()
            .filter(|s| s.2.ends_with("baseline"))
            .count(),
        libc::SIGKILL,
    );
    let o = run(hone(h).args(args), true);
    assert!(
        stderr(&o).contains("skipped note w4"),
        "a note whose questions have no answer in it is reported: {}",
        stderr(&o)
    );
    let j = last_json(&o);
    let rounds = j["rounds"].as_array().unwrap();
    let last = rounds.last().unwrap();
    assert_eq!(last["notes"], 2, "{j}");
    for k in [
        "round",
        "mean_reward",
        "kept",
        "notes",
        "wall_s",
        "holdout_reward",
    ] {
        assert!(last.get(k).is_some(), "{k} missing: {j}");
    }
    assert!(j["writer"].is_string(), "{j}");
    // Every note was done once per round: one baseline row per (round, note).
    let all = samples(h);
    let mut seen = std::collections::HashSet::new();
    for s in all.iter().filter(|s| s.2.ends_with("baseline")) {
        assert!(
            seen.insert((s.0, s.1.clone())),
            "note {} done twice in round {}",
            s.1,
            s.0
        );
    }
    assert!(
        !all.iter().any(|s| s.1 == "w4"),
        "the skipped note has no samples"
    );
    // Round 0 measured the held-out note; round 1 trained on the two others.
    let log = last_json(&run(hone(h).args(["writer", "log", "--json"]), true));
    let log = log.as_array().unwrap();
    assert!(
        log.iter().any(|r| r["status"] == "done" && r["notes"] == 2),
        "{log:?}"
    );
    let round = log.last().unwrap()["id"].as_i64().unwrap().to_string();
    let s = last_json(&run(
        hone(h).args(["writer", "log", "--round", &round, "--json"]),
        true,
    ));
    let s = s.as_array().unwrap();
    assert!(
        s.iter().any(|x| x["role"] == "train" && x["k"] == 1),
        "{s:?}"
    );
    assert!(s.iter().all(|x| x["accuracy"].as_f64().unwrap() <= 1.0));

    // The writer strategy in a learning cycle's dry run: the writer's items with verdicts.
    run(
        hone(h).args(["note", "add", "My locker at the pool is number 311."]),
        true,
    );
    let d = last_json(&run(
        hone(h).args(["learn", "--dry-run", "--strategies", "writer", "--json"]),
        true,
    ));
    let items: Vec<&serde_json::Value> = d["notes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n[1].as_array().unwrap())
        .collect();
    assert!(
        items.iter().any(|i| i["strategy"] == "writer"
            && i["generator"].as_str().unwrap_or("").contains("+writer:")),
        "{d}"
    );
}

#[test]
fn a_writer_file_for_another_model_is_refused_with_the_fix() {
    let home = home_with_model();
    let h = home.path();
    let bogus = h.join("w.safetensors");
    std::fs::write(&bogus, b"not a writer").unwrap();
    run(
        hone(h).args(["note", "add", "My locker at the pool is number 311."]),
        true,
    );
    let o = run(
        hone(h).args([
            "learn",
            "--dry-run",
            "--strategies",
            "writer",
            "--writer",
            bogus.to_str().unwrap(),
        ]),
        false,
    );
    assert!(stderr(&o).contains("w.safetensors"), "{}", stderr(&o));
}
