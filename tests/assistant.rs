//! The assistant on the real default model: `ask`, `chat` (streaming, commands, Ctrl-C),
//! notes, history and status, with every exchange in a private SQLite file.

mod common;

use common::*;
use std::io::{Read, Write};
use std::process::Stdio;

fn model_arg() -> std::ffi::OsString {
    default_model().into_os_string()
}

#[test]
fn ask_json_answers_and_records_the_exchange() {
    let home = temp_home();
    let o = run(
        hone(home.path()).arg("--model").arg(model_arg()).args([
            "ask",
            "--json",
            "--temperature",
            "0",
            "What is the capital of France?",
        ]),
        true,
    );
    let j = last_json(&o);
    let answer = j["answer"].as_str().unwrap();
    assert!(answer.contains("Paris"), "answer: {answer}");
    assert_eq!(j["model"], "smollm2-135m-instruct");
    assert!(j["adapter"].is_null());
    assert!(j["prompt_tokens"].as_u64().unwrap() > 10);
    assert!(j["completion_tokens"].as_u64().unwrap() > 0);

    let h = run(hone(home.path()).args(["history", "--json"]), true);
    let line = stdout(&h);
    let e: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(e["prompt"], "What is the capital of France?");
    assert_eq!(e["answer"], j["answer"]);
    assert_eq!(e["kind"], "ask");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["hone.db", "hone.db-wal"] {
            let p = home.path().join(f);
            if p.exists() {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
            }
        }
        let mode = std::fs::metadata(home.path().join("models"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }
}

#[test]
fn same_seed_same_answer() {
    let home = temp_home();
    let ask = || {
        let o = run(
            hone(home.path()).arg("--model").arg(model_arg()).args([
                "ask",
                "--json",
                "--temperature",
                "0.9",
                "--seed",
                "7",
                "-n",
                "24",
                "Tell me a short story about a fox.",
            ]),
            true,
        );
        last_json(&o)["answer"].as_str().unwrap().to_string()
    };
    assert_eq!(ask(), ask());
}

#[test]
fn chat_streams_remembers_and_keeps_context() {
    let home = temp_home();
    let mut child = hone(home.path())
        .arg("--model")
        .arg(model_arg())
        .args(["chat", "--temperature", "0", "-n", "40"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"/remember My locker number is 4417.\n/help\nMy name is Ada. Please remember it.\nWhat is my name?\n/new\n/bogus\n/quit\n",
        )
        .unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("stored as note"), "{out}");
    assert!(out.contains("/remember TEXT"), "{out}");
    assert!(out.contains("(new conversation)"), "{out}");
    assert!(out.contains("unknown command /bogus"), "{out}");

    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    let notes = store.list_notes(None).unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].content, "My locker number is 4417.");
    assert_eq!(notes[0].source.as_deref(), Some("chat"));
    let ex = store.recent_exchanges(10).unwrap();
    assert_eq!(ex.len(), 2);
    assert!(ex.iter().all(|e| e.kind == "chat"));
    assert_eq!(ex[0].session_id, ex[1].session_id);
    // The second turn's prompt included the first turn.
    assert!(ex[0].prompt_tokens > ex[1].prompt_tokens);
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_the_answer_not_the_chat() {
    let home = temp_home();
    let mut child = hone(home.path())
        .arg("--model")
        .arg(model_arg())
        .args(["chat", "--temperature", "0.7", "--seed", "1", "-n", "400"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"Write a very long essay about the history of bread, in many paragraphs.\n")
        .unwrap();
    stdin.flush().unwrap();
    let mut stdout_pipe = child.stdout.take().unwrap();
    // Wait until the answer has started streaming.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < 40 {
        let n = stdout_pipe.read(&mut buf).unwrap();
        assert!(n > 0, "chat ended before answering");
        got.extend_from_slice(&buf[..n]);
    }
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    stdin.write_all(b"/quit\n").unwrap();
    drop(stdin);
    let mut rest = Vec::new();
    stdout_pipe.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();
    got.extend(rest);
    let out = String::from_utf8_lossy(&got);
    assert!(status.success(), "chat did not survive Ctrl-C: {out}");
    assert!(out.contains("[stopped]"), "{out}");
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    let ex = store.recent_exchanges(5).unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].stop_reason.as_deref(), Some("cancelled"));
    assert!(ex[0].completion_tokens < 400);
}

#[test]
fn notes_import_list_remove_and_dedupe() {
    let home = temp_home();
    let dir = home.path().join("my-notes");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(
        dir.join("garden.md"),
        "# Tomatoes\nWater them every morning.\n\n# Basil\nKeep it on the windowsill.\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("sub/car.txt"),
        "The car is due for service in May.\n",
    )
    .unwrap();
    std::fs::write(dir.join("sub/image.png"), [0u8, 1, 2]).unwrap();
    let o = run(hone(home.path()).args(["note", "import"]).arg(&dir), true);
    assert!(stdout(&o).contains("3 new notes"), "{}", stdout(&o));
    let o = run(hone(home.path()).args(["note", "import"]).arg(&dir), true);
    assert!(
        stdout(&o).contains("0 new notes, 3 already stored"),
        "{}",
        stdout(&o)
    );
    let o = run(hone(home.path()).args(["note", "list", "--json"]), true);
    let notes: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(notes.len(), 3);
    assert!(notes.iter().any(|n| n["section"] == "Basil"));
    let id = notes[0]["id"].as_i64().unwrap();
    run(
        hone(home.path()).args(["note", "rm", &id.to_string()]),
        true,
    );
    let o = hone(home.path())
        .args(["note", "rm", &id.to_string()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("no note {id}")));
    let s = last_json(&run(hone(home.path()).args(["status", "--json"]), true));
    assert_eq!(s["notes"], 2);
    assert!(notes.iter().all(|n| n["learned_at"].is_null()));
    // Several ids: all or none.
    let (a, b) = (
        notes[1]["id"].as_i64().unwrap(),
        notes[2]["id"].as_i64().unwrap(),
    );
    let o = hone(home.path())
        .args(["note", "rm", &a.to_string(), &id.to_string()])
        .output()
        .unwrap();
    assert!(stderr(&o).contains("nothing was removed"), "{}", stderr(&o));
    let s = last_json(&run(hone(home.path()).args(["status", "--json"]), true));
    assert_eq!(s["notes"], 2);
    run(
        hone(home.path()).args(["note", "rm", &a.to_string(), &b.to_string()]),
        true,
    );
    let s = last_json(&run(hone(home.path()).args(["status", "--json"]), true));
    assert_eq!(s["notes"], 0);
    assert_eq!(s["schema_version"], hone::store::SCHEMA_VERSION);
}

#[test]
fn ask_with_notes_answers_from_the_notes() {
    let home = temp_home();
    run(
        hone(home.path()).args([
            "note",
            "add",
            "The spare key is under the blue flowerpot by the back door.",
        ]),
        true,
    );
    let o = run(
        hone(home.path()).arg("--model").arg(model_arg()).args([
            "ask",
            "--json",
            "--with-notes",
            "--temperature",
            "0",
            "Where is the spare key?",
        ]),
        true,
    );
    let a = last_json(&o)["answer"].as_str().unwrap().to_lowercase();
    assert!(a.contains("flowerpot"), "{a}");
}

/// Retrieval: the note a question is about goes into the prompt and the answer cites it;
/// `--no-retrieval` leaves it out; a question about nothing stored cites nothing.
#[test]
fn ask_retrieves_the_note_a_question_is_about_and_cites_it() {
    let home = temp_home();
    let h = home.path();
    run(
        hone(h).args([
            "note",
            "add",
            "My locker at the Harrowgate pool is number 311.",
        ]),
        true,
    );
    run(
        hone(h).args(["note", "add", "The plumber Edvin Sorrel comes on Tuesday."]),
        true,
    );
    let ask = |extra: &[&str], q: &str| {
        let mut c = hone(h);
        c.arg("--model")
            .arg(model_arg())
            .args(["ask", "--json", "--temperature", "0", "-n", "40"]);
        c.args(extra).arg(q);
        last_json(&run(&mut c, true))
    };
    let j = ask(&[], "What is my locker number at the Harrowgate pool?");
    let cited = j["citations"].as_array().unwrap();
    assert_eq!(cited.len(), 1, "{j}");
    assert_eq!(cited[0]["id"], 1, "{j}");
    assert!(cited[0]["passage"].as_str().unwrap().contains("311"));
    assert!(j["answer"].as_str().unwrap().contains("311"), "{j}");
    let j = ask(
        &["--no-retrieval"],
        "What is my locker number at the Harrowgate pool?",
    );
    assert!(j["citations"].as_array().unwrap().is_empty(), "{j}");
    let j = ask(&[], "What is the capital of France?");
    assert!(j["citations"].as_array().unwrap().is_empty(), "{j}");
    // The text answer names the note it rests on.
    let mut c = hone(h);
    c.arg("--model")
        .arg(model_arg())
        .args(["ask", "--temperature", "0", "-n", "30"]);
    let o = run(c.arg("When does the plumber Edvin Sorrel come?"), true);
    assert!(
        stdout(&o).trim_end().ends_with("[note 2]"),
        "{}",
        stdout(&o)
    );
}

/// The fast paths (SIMD dot kernels for decoding, the tiled GEMM for prompts, the one-token
/// decode step) give the same greedy answers as the scalar reference kernels
/// (`HONE_KERNELS=scalar`) and as candle's tensor operations (`HONE_DECODE=candle`).
#[test]
fn greedy_answers_match_the_scalar_kernels() {
    let home = temp_home();
    let prompts = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write one sentence about the sea.",
        "What is 12 times 12?",
    ];
    for p in prompts {
        let mut answers = Vec::new();
        for env in [
            None,
            Some(("HONE_KERNELS", "scalar")),
            Some(("HONE_DECODE", "candle")),
        ] {
            let mut c = hone(home.path());
            if let Some((k, v)) = env {
                c.env(k, v);
            }
            let o = run(
                c.arg("--model").arg(model_arg()).args([
                    "ask",
                    "--json",
                    "--temperature",
                    "0",
                    "-n",
                    "40",
                    p,
                ]),
                true,
            );
            answers.push(last_json(&o)["answer"].as_str().unwrap().to_string());
        }
        assert!(!answers[0].is_empty(), "{p}: empty answer");
        assert_eq!(
            answers[0], answers[1],
            "{p}: fast and scalar paths disagree"
        );
        assert_eq!(
            answers[0], answers[2],
            "{p}: the one-token decode step and candle's tensor path disagree"
        );
    }
}

/// Chat retrieves per turn: a note stored with /remember is used (and cited) in the same chat;
/// /good, /fix (which supersedes the note the answer rested on) and a candidate note from what
/// the user says, kept with /remember alone.
#[test]
fn chat_uses_notes_from_the_same_chat_takes_feedback_and_candidate_notes() {
    let home = temp_home();
    let mut child = hone(home.path())
        .arg("--model")
        .arg(model_arg())
        .args(["chat", "--temperature", "0", "-n", "40"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"/good\n/remember My locker at the Harrowgate pool is number 311.\n\
              What is my locker number at the Harrowgate pool?\n/good\n\
              /fix My locker at the Harrowgate pool is number 312.\n\
              My daughter's name is Noor.\n/remember\n/quit\n",
        )
        .unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("(no answer to judge yet)"), "{out}");
    assert!(
        out.contains("311"),
        "the note from this chat is used: {out}"
    );
    assert!(out.contains(" [note 1]"), "and cited: {out}");
    assert!(out.contains("(feedback stored)"), "{out}");
    assert!(
        out.contains("the correction is note 2, replacing note 1"),
        "{out}"
    );
    assert!(
        out.contains("(candidate note 1: \"My daughter's name is Noor.\"; /remember keeps it)"),
        "{out}"
    );
    assert!(out.contains("(kept as note 3)"), "{out}");
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    let notes = store.list_notes(None).unwrap();
    let texts: Vec<&str> = notes.iter().map(|n| n.content.as_str()).collect();
    assert_eq!(
        texts,
        [
            "My daughter's name is Noor.",
            "My locker at the Harrowgate pool is number 312."
        ]
    );
    assert_eq!(store.superseded_by(2).unwrap(), Some(1));
    let ex = store.recent_exchanges(10).unwrap();
    let asked = ex.iter().find(|e| e.prompt.contains("locker")).unwrap();
    let src = store.exchange_sources(asked.id).unwrap().unwrap();
    assert_eq!(src.answered_from.as_deref(), Some("notes"));
    assert_eq!(src.cited, [1]);
    let fb = store.feedback_on(asked.id).unwrap();
    assert_eq!(fb.len(), 2, "{fb:?}");
    assert_eq!(fb[0].rating, "good");
    assert_eq!(fb[1].note_id, Some(2));

    // --no-retrieval: the note is not put in the prompt, nothing cited.
    let mut child = hone(home.path())
        .arg("--model")
        .arg(model_arg())
        .args(["chat", "--no-retrieval", "--temperature", "0", "-n", "30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"What is my locker number at the Harrowgate pool?\n/quit\n")
        .unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(!stdout(&o).contains("[note"), "{}", stdout(&o));

    // A note too long for the context with the message: answered without it, not refused.
    let long = format!(
        "My locker at the Harrowgate pool is number 311. {}",
        "The changing rooms are cleaned every evening by the staff. ".repeat(60)
    );
    run(hone(home.path()).args(["note", "add", &long]), true);
    let mut child = hone(home.path())
        .arg("--model")
        .arg(model_arg())
        .args(["--ctx", "512", "chat", "--temperature", "0", "-n", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"What is my locker number at the Harrowgate pool?\n/quit\n")
        .unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("error"), "{}", stderr(&o));
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    let last = &store.recent_exchanges(1).unwrap()[0];
    let src = store.exchange_sources(last.id).unwrap().unwrap();
    assert!(src.cited.is_empty(), "{src:?}");
}

/// `note edit` supersedes: the old note goes, the new text is a new unlearned note linked to
/// it; the size limit and unknown ids are refused with nothing changed; pending candidates are
/// listed, kept and discarded from the command line.
#[test]
fn note_edit_supersedes_and_candidates_are_kept_or_discarded() {
    let home = temp_home();
    let h = home.path();
    run(hone(h).args(["note", "add", "The gym opens at 6."]), true);
    let o = run(
        hone(h).args(["note", "edit", "1", "The gym opens at 7."]),
        true,
    );
    assert!(
        stdout(&o).contains("note 1 is now note 2"),
        "{}",
        stdout(&o)
    );
    let o = run(hone(h).args(["note", "list", "--json"]), true);
    let notes: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0]["content"], "The gym opens at 7.");
    assert!(notes[0]["learned_at"].is_null());
    // From standard input, over the limit: refused.
    let mut c = hone(h)
        .args(["note", "edit", "2", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let _ = stdin.write_all(&vec![b'x'; 8 * 1024 * 1024 + 10]);
    drop(stdin);
    let o = c.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("8 MiB limit"), "{}", stderr(&o));
    let o = hone(h).args(["note", "edit", "9", "x"]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no note 9"), "{}", stderr(&o));
    // Without text and without a terminal: say how to give it.
    let o = hone(h)
        .args(["note", "edit", "2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("or - to read it"), "{}", stderr(&o));

    // Candidates (as chat and serve collect them).
    let store = hone::store::Store::open(&h.join("hone.db")).unwrap();
    let c = hone::candidates::collect(&store, "I moved the meeting to Friday.", "chat", None, None)
        .unwrap();
    let d =
        hone::candidates::collect(&store, "My car is a blue Volvo.", "chat", None, None).unwrap();
    let o = run(hone(h).args(["note", "list", "--pending"]), true);
    assert!(
        stdout(&o).contains("I moved the meeting to Friday."),
        "{}",
        stdout(&o)
    );
    let o = run(hone(h).args(["note", "keep", &c[0].id.to_string()]), true);
    assert!(stdout(&o).contains("as note 3"), "{}", stdout(&o));
    run(
        hone(h).args(["note", "discard", &d[0].id.to_string()]),
        true,
    );
    let o = run(hone(h).args(["note", "list", "--pending"]), true);
    assert_eq!(stdout(&o), "no pending candidate notes\n");
    let o = run(hone(h).args(["note", "auto-keep"]), true);
    assert!(
        stdout(&o).contains("only when you say so"),
        "{}",
        stdout(&o)
    );
    run(hone(h).args(["note", "auto-keep", "on"]), true);
    assert!(hone::candidates::auto_keep(&store).unwrap());
}

/// `note import` goes on past a bad file, reports it, and fails only when nothing was imported.
#[test]
fn note_import_goes_on_past_bad_files() {
    let home = temp_home();
    let dir = home.path().join("my-notes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("good.md"), "The gate code is 4471.\n").unwrap();
    std::fs::write(dir.join("latin1.txt"), b"caf\xE9\n").unwrap();
    let o = run(hone(home.path()).args(["note", "import"]).arg(&dir), true);
    let out = stdout(&o);
    assert!(out.contains("imported 1 files: 1 new notes"), "{out}");
    assert!(out.contains("latin1.txt is not valid UTF-8"), "{out}");
    // Every note of one imported file, removed by its source.
    let good = dir.join("good.md");
    let o = run(
        hone(home.path())
            .args(["note", "rm", "--source"])
            .arg(&good),
        true,
    );
    assert_eq!(stdout(&o), "removed note 1\n");
    let o = hone(home.path())
        .args(["note", "rm", "--source"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(stderr(&o).contains("nothing was removed"), "{}", stderr(&o));
    let o = hone(home.path())
        .args(["note", "import"])
        .arg(dir.join("latin1.txt"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("latin1.txt is not valid UTF-8"),
        "{}",
        stderr(&o)
    );
    std::fs::write(dir.join("also-bad.md"), b"\xFF\n").unwrap();
    let o = hone(home.path())
        .args(["note", "import"])
        .arg(dir.join("latin1.txt"))
        .arg(dir.join("also-bad.md"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no note was imported: none of the 2 files"),
        "{}",
        stderr(&o)
    );
}
