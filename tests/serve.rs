//! `hone serve` on the real default model, over HTTP from a small client on std's TcpStream:
//! answers as `hone ask` gives them, streaming, the recorded exchanges, the errors, several
//! clients at once, a client that leaves mid-answer, hone's own endpoints and the page.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running `hone serve` on a free port; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    home: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Self::start_with(&default_model(), temp_home(), extra)
    }

    fn start_with(model: &std::path::Path, home: tempfile::TempDir, extra: &[&str]) -> Server {
        let mut child = hone(home.path())
            .env_remove("HONE_API_KEY")
            .arg("--model")
            .arg(model)
            .args(["serve", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hone serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        let s = Server { child, addr, home };
        let t0 = Instant::now();
        loop {
            let (status, _, _) = s.request("GET", "/health", &[], None);
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "while loading, /health says 503");
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the model never loaded"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// One request on its own connection: (status, headers lower-cased, body de-chunked).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let given = |k: &str| headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k));
        let mut h: Vec<(&str, &str)> = vec![("Connection", "close")];
        if !given("Host") {
            h.push(("Host", "127.0.0.1"));
        }
        if method == "POST" && !given("Content-Type") {
            h.push(("Content-Type", "application/json"));
        }
        h.extend_from_slice(headers);
        let mut s = self.send(method, path, &h, body.as_bytes());
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read the response");
        parse_response(&raw)
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("send headers");
        s.write_all(body).expect("send body");
        s
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, _, b) = self.request("POST", path, &[], Some(&body));
        (status, json_of(&b))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (status, _, b) = self.request("GET", path, &[], None);
        (status, json_of(&b))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16)
            .expect("chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn chat(q: &str, extra: Value) -> Value {
    let mut b = json!({"model": "smollm2-135m-instruct",
                       "messages": [{"role": "user", "content": q}], "temperature": 0});
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    b
}

fn history(home: &std::path::Path) -> Vec<Value> {
    let o = run(hone(home).args(["history", "--json", "-n", "50"]), true);
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("history line"))
        .collect()
}

const Q: &str = "What is the capital of France?";
/// An answer that runs to any max_tokens up to 300 (greedy).
const STORY: &str = "Write a long story about a dragon who lives in a castle.";

#[test]
fn answers_as_ask_does_streams_and_records_every_exchange() {
    let s = Server::start(&[]);
    // Not streamed: the same answer `hone ask --temperature 0` gives.
    let (status, j) = s.post("/v1/chat/completions", chat(Q, json!({})));
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["model"], "smollm2-135m-instruct");
    let answer = j["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    let ask = run(
        hone(s.home.path())
            .arg("--model")
            .arg(default_model())
            .args(["ask", "--json", "--temperature", "0", Q]),
        true,
    );
    let ask = last_json(&ask);
    assert_eq!(answer, ask["answer"].as_str().unwrap());
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(j["usage"]["prompt_tokens"], ask["prompt_tokens"]);
    assert_eq!(j["usage"]["completion_tokens"], ask["completion_tokens"]);

    // Streamed: the chunks make the same answer, then the finish, the usage and [DONE].
    let (status, headers, body) = s.request(
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&chat(Q, json!({"stream": true}))),
    );
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    assert!(
        !headers
            .iter()
            .any(|(k, _)| k.starts_with("access-control-")),
        "no CORS headers: {headers:?}"
    );
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() > 3, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, answer);
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["completion_tokens"],
        j["usage"]["completion_tokens"]
    );
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));

    // A stop sequence cuts the answer before it; max_tokens cuts it with "length".
    let (_, j2) = s.post("/v1/chat/completions", chat(Q, json!({"stop": [" Paris"]})));
    let cut = j2["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.starts_with(cut) && !cut.contains("Paris"), "{cut:?}");
    assert_eq!(j2["choices"][0]["finish_reason"], "stop");
    let (_, j3) = s.post("/v1/chat/completions", chat(Q, json!({"max_tokens": 3})));
    assert_eq!(j3["choices"][0]["finish_reason"], "length");
    assert_eq!(j3["usage"]["completion_tokens"], 3);

    // Plain completions, and the model list.
    let (status, c) = s.post(
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(!c["choices"][0]["text"].as_str().unwrap().is_empty());
    let (status, m) = s.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(m["data"][0]["id"], "smollm2-135m-instruct");

    // Every exchange is in the database, as `ask` records it (newest first).
    let h = history(s.home.path());
    let served: Vec<&Value> = h.iter().filter(|e| e["kind"] == "serve").collect();
    assert_eq!(served.len(), 5, "{h:?}");
    assert_eq!(served[4]["prompt"], Q);
    assert_eq!(served[4]["answer"], answer);
    assert_eq!(served[3]["answer"], answer, "the streamed one");
    assert_eq!(served[2]["answer"], cut);
    assert_eq!(served[0]["prompt"], "The capital of France is");

    // The page.
    let (status, headers, page) = s.request("GET", "/", &[], None);
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/html")));
    let page = String::from_utf8_lossy(&page);
    assert!(page.contains("/v1/chat/completions") && page.contains("/v1/hone/notes"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN"
    );
}

#[test]
fn errors_come_as_openai_error_json_with_their_status() {
    let s = Server::start(&["--api-key", "sesame"]);
    let key = [("Authorization", "Bearer sesame")];
    let err = |status: u16, body: &[u8], want: u16| -> Value {
        assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
        let j = json_of(body);
        assert!(
            j["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{j}"
        );
        assert!(j["error"]["type"].is_string(), "{j}");
        assert!(j["error"].as_object().unwrap().contains_key("param"), "{j}");
        assert!(j["error"].as_object().unwrap().contains_key("code"), "{j}");
        j
    };
    // 401 without the key or with a wrong one; the page and /health stay open.
    let (st, _, b) = s.request(
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&chat(Q, json!({}))),
    );
    err(st, &b, 401);
    let (st, _, b) = s.request(
        "GET",
        "/v1/hone/notes",
        &[("Authorization", "Bearer nope")],
        None,
    );
    let j = err(st, &b, 401);
    assert_eq!(j["error"]["code"], "invalid_api_key");
    assert_eq!(s.request("GET", "/v1/models", &key, None).0, 200);
    assert_eq!(s.request("GET", "/", &[], None).0, 200);

    // 400: a body that is not JSON, a bad parameter (named), no user message.
    let mut conn = s.send(
        "POST",
        "/v1/chat/completions",
        &[
            ("Host", "localhost:1"),
            ("Connection", "close"),
            ("Content-Type", "application/json"),
            key[0],
        ],
        b"{\"messages\": [",
    );
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let (st, _, b) = parse_response(&raw);
    err(st, &b, 400);
    for (body, param) in [
        (chat(Q, json!({"temperature": 7})), "temperature"),
        (chat(Q, json!({"max_tokens": 1_000_000})), "max_tokens"),
        (chat(Q, json!({"stop": 5})), ""),
        (json!({"messages": []}), "messages"),
    ] {
        let (st, _, b) = s.request("POST", "/v1/chat/completions", &key, Some(&body));
        let j = err(st, &b, 400);
        if !param.is_empty() {
            assert_eq!(j["error"]["param"], param, "{j}");
        }
    }
    // A prompt longer than the context.
    let long = "word ".repeat(20_000);
    let (st, _, b) = s.request(
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat(&long, json!({}))),
    );
    let j = err(st, &b, 400);
    assert_eq!(j["error"]["code"], "context_length_exceeded");

    // 413: a body over 1 MiB is refused from its declared length, before it is read.
    let mut conn = s.send(
        "POST",
        "/v1/chat/completions",
        &[
            ("Host", "127.0.0.1"),
            ("Content-Type", "application/json"),
            ("Content-Length", "2000000"),
            key[0],
        ],
        b"",
    );
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let (st, _, b) = parse_response(&raw);
    err(st, &b, 413);
    // 404, 405, 415 (not JSON), 403 (a Host that is not this machine: DNS rebinding).
    let (st, _, b) = s.request("GET", "/v1/nothing", &key, None);
    err(st, &b, 404);
    let (st, _, b) = s.request("GET", "/v1/chat/completions", &key, None);
    err(st, &b, 405);
    let (st, _, b) = s.request(
        "POST",
        "/v1/hone/notes",
        &[("Content-Type", "text/plain"), key[0]],
        Some(&json!({"text": "x"})),
    );
    err(st, &b, 415);
    let (st, _, b) = s.request(
        "GET",
        "/v1/models",
        &[("Host", "evil.example"), key[0]],
        None,
    );
    err(st, &b, 403);

    // The server answers normally after all that.
    let (st, _, b) = s.request(
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat(Q, json!({}))),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));

    // Beyond loopback only with a key.
    let home = temp_home();
    let o = run(
        hone(home.path())
            .env_remove("HONE_API_KEY")
            .args(["serve", "--host", "0.0.0.0", "--port", "0"]),
        false,
    );
    assert!(stderr(&o).contains("--api-key"), "{}", stderr(&o));
    // A model that cannot be loaded stops the server with the reason (it listened meanwhile).
    let bad = home.path().join("missing.gguf");
    let o = run(
        hone(home.path())
            .arg("--model")
            .arg(&bad)
            .args(["serve", "--port", "0"]),
        false,
    );
    assert!(stderr(&o).contains("loading model"), "{}", stderr(&o));
}

#[test]
fn several_clients_are_served_and_a_client_that_leaves_stops_its_answer() {
    let s = Server::start(&[]);
    let long = chat(STORY, json!({"max_tokens": 300}));
    // Two clients at once: both answered in full.
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| s.post("/v1/chat/completions", chat(Q, json!({}))));
        let b = sc.spawn(|| s.post("/v1/chat/completions", long.clone()));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.0, 200, "{}", a.1);
    assert!(a.1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    assert_eq!(b.0, 200, "{}", b.1);
    assert_eq!(b.1["choices"][0]["finish_reason"], "length", "{}", b.1);
    assert_eq!(b.1["usage"]["completion_tokens"], 300);

    // A client that leaves after its first words: its answer stops early, and a client
    // waiting behind it is answered.
    let body = json!({"model": "x", "stream": true, "temperature": 0, "max_tokens": 300,
        "messages": [{"role": "user", "content": STORY}]})
    .to_string();
    let mut conn = s.send(
        "POST",
        "/v1/chat/completions",
        &[("Host", "127.0.0.1"), ("Content-Type", "application/json")],
        body.as_bytes(),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("Once") {
        let n = conn.read(&mut buf).expect("read the stream");
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // While it runs, background learning is told to yield (as for `hone ask`).
    assert!(
        hone::presence::UserWatch::new(s.home.path()).active(),
        "a request holds the user lock"
    );
    let t0 = Instant::now();
    let behind = std::thread::scope(|sc| {
        let h = sc.spawn(|| s.post("/v1/chat/completions", chat(Q, json!({}))));
        std::thread::sleep(Duration::from_millis(100));
        drop(conn);
        h.join().unwrap()
    });
    assert_eq!(behind.0, 200, "{}", behind.1);
    let waited = t0.elapsed();
    let h = history(s.home.path());
    let left = h
        .iter()
        .find(|e| e["prompt"] == STORY && e["id"].as_i64() > b.1["hone"]["exchange_id"].as_i64())
        .unwrap_or_else(|| panic!("the cut answer is recorded: {h:?}"));
    let n = left["completion_tokens"].as_u64().unwrap();
    assert!(
        n < 300,
        "the answer went on after the client left: {n} tokens"
    );
    eprintln!("client left: answer stopped after {n} tokens; the next request took {waited:?}");
    // A client that leaves while waiting for a whole (not streamed) answer stops it too.
    let before = h.iter().filter_map(|e| e["id"].as_i64()).max().unwrap_or(0);
    let conn = s.send(
        "POST",
        "/v1/chat/completions",
        &[("Host", "127.0.0.1"), ("Content-Type", "application/json")],
        chat(STORY, json!({"max_tokens": 300}))
            .to_string()
            .as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(conn);
    assert_eq!(s.post("/v1/chat/completions", chat(Q, json!({}))).0, 200);
    let h = history(s.home.path());
    let left = h
        .iter()
        .find(|e| e["prompt"] == STORY && e["id"].as_i64() > Some(before))
        .unwrap_or_else(|| panic!("the cut answer is recorded: {h:?}"));
    let n = left["completion_tokens"].as_u64().unwrap();
    assert!(
        n < 300,
        "the whole answer went on after the client left: {n} tokens"
    );

    // The server goes on serving; with no request running, learning may go on.
    assert_eq!(s.get("/health").0, 200);
    let mut watch = hone::presence::UserWatch::new(s.home.path());
    let t0 = Instant::now();
    while watch.active() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the user lock stays held"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn notes_learning_log_schedule_and_daemon_status_over_http() {
    let s = Server::start(&[]);
    let (st, j) = s.post(
        "/v1/hone/notes",
        json!({"text": "The spare key is under the blue flowerpot."}),
    );
    assert_eq!(st, 201, "{j}");
    let id = j["id"].as_i64().unwrap();
    let (st, j) = s.post(
        "/v1/hone/notes",
        json!({"text": "The spare key is under the blue flowerpot."}),
    );
    assert_eq!(
        (st, j["added"].as_bool()),
        (200, Some(false)),
        "a duplicate"
    );
    let (st, j) = s.post("/v1/hone/notes", json!({"text": "   "}));
    assert_eq!(st, 400, "{j}");
    let (_, j) = s.get("/v1/hone/notes");
    assert_eq!(j["data"][0]["id"], id);
    assert_eq!(
        j["data"][0]["content"],
        "The spare key is under the blue flowerpot."
    );
    // The command line sees it.
    let o = run(hone(s.home.path()).args(["note", "list", "--json"]), true);
    assert!(stdout(&o).contains("blue flowerpot"));
    let (st, _, _) = s.request("DELETE", &format!("/v1/hone/notes/{id}"), &[], None);
    assert_eq!(st, 200);
    let (st, _, _) = s.request("DELETE", &format!("/v1/hone/notes/{id}"), &[], None);
    assert_eq!(st, 404);
    let (st, _, _) = s.request("DELETE", "/v1/hone/notes/abc", &[], None);
    assert_eq!(st, 400);
    assert_eq!(s.get("/v1/hone/notes").1["data"], json!([]));

    let (st, j) = s.get("/v1/hone/learning");
    assert_eq!(st, 200, "{j}");
    assert_eq!(j["data"], json!([]), "no cycles yet");
    let (st, j) = s.get("/v1/hone/daemon");
    assert_eq!(st, 200, "{j}");
    assert_eq!(j["running"], false);
    assert_eq!(j["pending_notes"], 0);
    let (st, j) = s.get("/v1/hone/schedule");
    assert_eq!(st, 200, "{j}");
    assert!(j["decision"]["allowed"].is_boolean(), "{j}");
    assert!(j["summary"].as_str().is_some_and(|t| !t.is_empty()), "{j}");
}

/// The official `openai` Python package as a client, streaming and not. Skipped (with a
/// message) where python3 cannot import it; `.ci/run` installs it.
#[test]
fn the_openai_python_package_talks_to_it() {
    let python = std::env::var("HONE_PYTHON").unwrap_or_else(|_| "python3".into());
    let have = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!(
            "SKIPPED: {python} cannot import openai (install it with `{python} -m pip install openai`)"
        );
        return;
    }
    let s = Server::start(&["--api-key", "sk-local"]);
    let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="sk-local", max_retries=0)
q = [{"role": "user", "content": "What is the capital of France?"}]
r = c.chat.completions.create(model="smollm2-135m-instruct", messages=q, temperature=0)
streamed, usage, finish = "", None, None
for ch in c.chat.completions.create(model="smollm2-135m-instruct", messages=q, temperature=0,
                                    stream=True, stream_options={"include_usage": True}):
    if ch.usage: usage = ch.usage.completion_tokens
    for x in ch.choices:
        streamed += x.delta.content or ""
        finish = x.finish_reason or finish
t = c.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                         max_tokens=4, temperature=0)
try:
    c.chat.completions.create(model="m", messages=q, temperature=7)
    bad = None
except openai.BadRequestError as e:
    bad = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
try:
    openai.OpenAI(base_url=sys.argv[1], api_key="wrong", max_retries=0).models.list()
    unauth = None
except openai.AuthenticationError as e:
    unauth = e.status_code
print(json.dumps({"answer": r.choices[0].message.content, "usage": r.usage.completion_tokens,
    "streamed": streamed, "stream_usage": usage, "finish": finish, "text": t.choices[0].text,
    "models": [m.id for m in c.models.list()], "bad": bad, "unauth": unauth}))
"#;
    let o = run(
        std::process::Command::new(&python)
            .args(["-c", script, &format!("http://{}/v1", s.addr)])
            .env_remove("OPENAI_BASE_URL"),
        true,
    );
    let j = last_json(&o);
    let answer = j["answer"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{j}");
    assert_eq!(j["streamed"], j["answer"], "{j}");
    assert_eq!(j["stream_usage"], j["usage"], "{j}");
    assert_eq!(j["finish"], "stop");
    assert!(!j["text"].as_str().unwrap().is_empty());
    assert_eq!(j["models"], json!(["smollm2-135m-instruct"]));
    assert_eq!(j["bad"], json!([400, "temperature"]));
    assert_eq!(j["unauth"], 401);
}

/// The page in a real browser: Debian's headless `chromium` driven by `chromedriver` through
/// selenium types a question and reads the streamed answer, adds a note and sees it listed,
/// removes it, and sees the learning panels filled. Skipped (with a message) where chromium,
/// chromedriver or selenium is missing.
#[test]
fn the_page_works_in_headless_chromium() {
    let python = std::env::var("HONE_PYTHON").unwrap_or_else(|_| "python3".into());
    let find = |names: &[&str]| {
        names
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.is_file())
    };
    let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    let selenium = std::process::Command::new(&python)
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    let (Some(chromium), Some(driver), true) = (chromium, driver, selenium) else {
        eprintln!(
            "SKIPPED: needs chromium and chromedriver (apt-get install chromium chromium-driver) \
             and selenium ({python} -m pip install selenium)"
        );
        return;
    };
    let s = Server::start(&[]);
    let profile = temp_home();
    let script = r##"
import json, sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
url, chromium, driver, profile = sys.argv[1:5]
o = webdriver.ChromeOptions()
o.binary_location = chromium
for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run",
          "--disable-dev-shm-usage", "--user-data-dir=" + profile]:
    o.add_argument(a)
b = webdriver.Chrome(service=Service(executable_path=driver), options=o)
out = {}
try:
    b.get(url)
    w = WebDriverWait(b, 60)
    w.until(lambda b: "smollm2" in b.find_element(By.ID, "model").text)
    q = b.find_element(By.ID, "q")
    q.send_keys("What is the capital of France?")
    q.send_keys(Keys.ENTER)
    w.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
    out["answer"] = b.find_element(By.CSS_SELECTOR, ".msg.assistant").text
    out["errors"] = [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.error")]
    n = b.find_element(By.ID, "note")
    n.send_keys("The spare key is under the blue flowerpot.")
    n.send_keys(Keys.ENTER)
    w.until(lambda b: "blue flowerpot" in b.find_element(By.ID, "notes").text)
    out["notes"] = b.find_element(By.ID, "notes").text
    b.find_element(By.CSS_SELECTOR, "#notes li button").click()
    w.until(lambda b: "no notes yet" in b.find_element(By.ID, "notes").text)
    w.until(lambda b: "Notes waiting" in b.find_element(By.ID, "now").text)
    out["now"] = b.find_element(By.ID, "now").text
    out["cycles"] = b.find_element(By.ID, "cycles").text
finally:
    b.quit()
print(json.dumps(out))
"##;
    let o = run(
        std::process::Command::new(&python)
            .args(["-c", script, &format!("http://{}/", s.addr)])
            .arg(chromium)
            .arg(driver)
            .arg(profile.path())
            .env("SE_OFFLINE", "true"),
        true,
    );
    let j = last_json(&o);
    // The page samples with the model's defaults, so the answer varies: it must be the one
    // recorded, shown whole.
    assert_eq!(j["errors"], json!([]), "{j}");
    let words = |v: &Value| -> String {
        v.as_str()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let shown = words(&j["answer"]);
    assert!(!shown.is_empty(), "{j}");
    assert!(
        j["notes"].as_str().unwrap().contains("blue flowerpot"),
        "{j}"
    );
    assert!(j["now"].as_str().unwrap().contains("not running"), "{j}");
    assert!(
        j["cycles"]
            .as_str()
            .unwrap()
            .contains("no learning cycles yet"),
        "{j}"
    );
    // What the page did is in the database: the question, and the note added and removed.
    let h = history(s.home.path());
    let asked = h
        .iter()
        .find(|e| e["kind"] == "serve" && e["prompt"] == Q)
        .unwrap_or_else(|| panic!("the page's question is recorded: {h:?}"));
    assert_eq!(words(&asked["answer"]), shown);
    let notes = run(hone(s.home.path()).args(["note", "list", "--json"]), true);
    assert_eq!(stdout(&notes).trim(), "");
}

/// Chat completions retrieve the notes a message is about and carry them, with passages, in
/// `hone.citations`; statements about oneself become pending candidate notes, kept or discarded
/// over HTTP; feedback and corrections go to `/v1/hone/feedback`; `--no-retrieval` turns
/// retrieval off.
#[test]
fn notes_are_retrieved_cited_judged_and_collected_over_http() {
    let s = Server::start(&[]);
    let (st, _) = s.post(
        "/v1/hone/notes",
        json!({"text": "My locker at the Harrowgate pool is number 311."}),
    );
    assert_eq!(st, 201);
    let q = "What is my locker number at the Harrowgate pool?";
    let (st, j) = s.post("/v1/chat/completions", chat(q, json!({"max_tokens": 40})));
    assert_eq!(st, 200, "{j}");
    let answer = j["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("311"), "{answer}");
    assert_eq!(j["hone"]["citations"][0]["id"], 1, "{j}");
    assert!(j["hone"]["citations"][0]["passage"]
        .as_str()
        .unwrap()
        .contains("311"));
    assert_eq!(j["hone"]["answered_from"], "notes", "{j}");
    let ex = j["hone"]["exchange_id"].as_i64().unwrap();
    // Streamed: the last chunk before [DONE] carries the citations too.
    let (_, _, body) = s.request(
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&chat(q, json!({"max_tokens": 10, "stream": true}))),
    );
    let ev = events(&body);
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["hone"]["citations"][0]["id"], 1, "{usage}");
    let (_, j) = s.post("/v1/chat/completions", chat(Q, json!({"max_tokens": 10})));
    assert_eq!(j["hone"]["citations"], json!([]), "{j}");

    // A statement about oneself: a pending candidate, never a note on its own.
    let (_, j) = s.post(
        "/v1/chat/completions",
        chat("My daughter's name is Noor.", json!({"max_tokens": 10})),
    );
    let c = &j["hone"]["candidate_notes"][0];
    assert_eq!(c["content"], "My daughter's name is Noor.", "{j}");
    assert!(c["note"].is_null());
    let (_, list) = s.get("/v1/hone/candidates");
    assert_eq!(list["data"][0]["content"], "My daughter's name is Noor.");
    assert_eq!(
        s.get("/v1/hone/notes").1["data"].as_array().unwrap().len(),
        1
    );
    let cid = c["id"].as_i64().unwrap();
    let (st, k) = s.post(&format!("/v1/hone/candidates/{cid}"), json!({"keep": true}));
    assert_eq!(st, 200, "{k}");
    assert!(k["note"].as_i64().is_some(), "{k}");
    let (st, _) = s.post(
        &format!("/v1/hone/candidates/{cid}"),
        json!({"keep": false}),
    );
    assert_eq!(st, 404, "already kept");

    // Feedback: a rating, then a correction that supersedes the cited note.
    let (st, f) = s.post(
        "/v1/hone/feedback",
        json!({"exchange_id": ex, "rating": "good"}),
    );
    assert_eq!(st, 201, "{f}");
    let (st, f) = s.post(
        "/v1/hone/feedback",
        json!({"exchange_id": ex, "rating": "bad",
               "correction": "My locker at the Harrowgate pool is number 312."}),
    );
    assert_eq!(st, 201, "{f}");
    assert_eq!(f["superseded"], 1, "{f}");
    let notes = s.get("/v1/hone/notes").1;
    let texts: Vec<&str> = notes["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["content"].as_str().unwrap())
        .collect();
    assert!(
        texts.contains(&"My locker at the Harrowgate pool is number 312."),
        "{texts:?}"
    );
    assert!(!texts.iter().any(|t| t.contains("311")), "{texts:?}");
    let (st, e) = s.post(
        "/v1/hone/feedback",
        json!({"exchange_id": ex, "rating": "meh"}),
    );
    assert_eq!(
        (st, e["error"]["param"].as_str()),
        (400, Some("rating")),
        "{e}"
    );
    let (st, _) = s.post(
        "/v1/hone/feedback",
        json!({"exchange_id": 9999, "rating": "bad"}),
    );
    assert_eq!(st, 404);
    drop(s);

    let s = Server::start(&["--no-retrieval"]);
    s.post(
        "/v1/hone/notes",
        json!({"text": "My locker at the Harrowgate pool is number 311."}),
    );
    let (_, j) = s.post("/v1/chat/completions", chat(q, json!({"max_tokens": 10})));
    assert_eq!(j["hone"]["citations"], json!([]), "{j}");
    drop(s);

    // A note too long for the context with the question: answered without it, not refused.
    let s = Server::start(&["--ctx", "512"]);
    let long = format!(
        "My locker at the Harrowgate pool is number 311. {}",
        "The changing rooms are cleaned every evening by the staff. ".repeat(60)
    );
    s.post("/v1/hone/notes", json!({ "text": long }));
    let (st, j) = s.post("/v1/chat/completions", chat(q, json!({"max_tokens": 20})));
    assert_eq!(st, 200, "{j}");
    assert_eq!(j["hone"]["citations"], json!([]), "{j}");
}

/// Answers decoded together in one batch are the answers each gets alone (greedy, the real
/// default model), and they were decoded together (`/health` tells the largest batch).
#[test]
fn batched_answers_are_the_answers_given_alone() {
    let s = Server::start(&["--parallel", "4"]);
    let (_, h) = s.get("/health");
    assert_eq!(h["parallel"], 4, "{h}");
    let questions = [
        Q,
        "Name three colours of the rainbow.",
        "What is two plus two?",
        STORY,
    ];
    let body = |q: &str| chat(q, json!({"max_tokens": 40}));
    let alone: Vec<Value> = questions
        .iter()
        .map(|q| {
            let (status, j) = s.post("/v1/chat/completions", body(q));
            assert_eq!(status, 200, "{j}");
            j
        })
        .collect();
    let (_, h) = s.get("/health");
    assert_eq!(h["largest_batch"], 1, "one at a time: {h}");
    // Together: started at once, so their decoding overlaps.
    let barrier = std::sync::Barrier::new(questions.len());
    let together: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = questions
            .iter()
            .map(|q| {
                let (s, barrier) = (&s, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    let (status, j) = s.post("/v1/chat/completions", body(q));
                    assert_eq!(status, 200, "{j}");
                    j
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (_, h) = s.get("/health");
    let largest = h["largest_batch"].as_u64().unwrap();
    assert!(largest >= 2, "the answers were not decoded together: {h}");
    for (a, t) in alone.iter().zip(&together) {
        let msg = |j: &Value| {
            j["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(msg(a), msg(t), "batched answer differs");
        assert_eq!(a["usage"], t["usage"]);
        assert_eq!(
            a["choices"][0]["finish_reason"],
            t["choices"][0]["finish_reason"]
        );
    }
    eprintln!("largest batch {largest}");
    // llama-server's ignore_eos: the answer that ended by itself runs to max_tokens.
    let short = alone[0]["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(short < 40 && alone[0]["choices"][0]["finish_reason"] == "stop");
    let (status, j) = s.post(
        "/v1/chat/completions",
        chat(Q, json!({"max_tokens": 40, "ignore_eos": true})),
    );
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["usage"]["completion_tokens"], 40, "{j}");
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    // Every exchange is recorded.
    let served = history(s.home.path())
        .into_iter()
        .filter(|e| e["kind"] == "serve")
        .count();
    assert_eq!(served, 2 * questions.len() + 1);
}

/// A client that stops reading is cut off after the write timeout: it cannot hold its
/// connection (here, by pipelining requests for the page and reading none of the answers).
#[test]
fn a_client_that_stops_reading_is_cut_off() {
    let s = Server::start(&["--write-timeout", "2"]);
    let mut conn = TcpStream::connect(&s.addr).expect("connect");
    // Thousands of pipelined requests: far more answer than the socket buffers hold.
    let one = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let n = 4000;
    let req = one.repeat(n);
    conn.set_write_timeout(Some(Duration::from_secs(30))).ok();
    // The server stops reading requests once its answers back up; write what it takes.
    let writer = {
        let mut c = conn.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = c.write_all(req.as_bytes());
        })
    };
    std::thread::sleep(Duration::from_secs(5));
    // Now read: the server gave up on the connection, so the stream ends well before all
    // the answers (each about 10 kB).
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let t0 = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        match conn.read(&mut buf) {
            Ok(0) => break true,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("reading: {e} after {got} bytes"),
        }
        if t0.elapsed() > Duration::from_secs(30) {
            break false;
        }
    };
    let page = s.request("GET", "/", &[], None).2.len();
    assert!(ended, "the connection was not closed");
    assert!(
        got < page * n / 2,
        "{got} bytes came: the server kept writing to a client that did not read"
    );
    eprintln!("cut off after {got} bytes of {} asked", page * n);
    drop(conn);
    let _ = writer.join();
    assert_eq!(s.get("/health").0, 200, "the server goes on serving");
}

/// A server left running while `hone train` (or a learning cycle, or `hone adapters use`)
/// activates another adapter answers with it from the next request on, without a restart, and
/// goes back to the base model when the adapters are rolled back. On a tiny model the test
/// writes (the answers do not matter here, only which weights gave them).
#[test]
fn a_newly_activated_adapter_answers_from_the_next_request() {
    let home = temp_home();
    let model = home.path().join("tiny.gguf");
    hone::tiny::write_tiny_model(&model, &hone::tiny::TinySpec::default()).unwrap();
    let data = home.path().join("train.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"The heron waits in the shallow water until a fish comes near.\"}\n",
    )
    .unwrap();
    let s = Server::start_with(&model, home, &[]);
    let ask = || {
        let (status, v) = s.post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}),
        );
        assert_eq!(status, 200, "{v}");
    };
    let last_adapter = || {
        let h = history(s.home.path());
        h.first().expect("an exchange")["adapter"]
            .to_string()
            .trim_matches('"')
            .to_string()
    };
    ask();
    assert_eq!(last_adapter(), "null");
    assert_eq!(s.get("/health").1["adapter"], Value::Null);

    let o = hone(s.home.path())
        .arg("--model")
        .arg(&model)
        .args(["train", "--data"])
        .arg(&data)
        .args(["--max-steps", "2", "--seq-len", "32"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    ask();
    assert_eq!(
        last_adapter(),
        "1",
        "the exchange names the adapter that answered"
    );
    assert_eq!(s.get("/health").1["adapter"], json!(1));

    let o = hone(s.home.path())
        .arg("--model")
        .arg(&model)
        .args(["adapters", "rollback"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    ask();
    assert_eq!(
        last_adapter(),
        "null",
        "rolled back: the base model answers"
    );
    assert_eq!(s.get("/health").1["adapter"], Value::Null);
}
