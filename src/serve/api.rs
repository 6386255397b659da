//! The OpenAI wire format `hone serve` speaks: request bodies (parsed and checked into a
//! [`Request`] for the model thread), response bodies and chunks, and errors as OpenAI's error
//! JSON with their HTTP status.
//!
//! It must not run the model or touch the database: it only translates.

use crate::template::Message;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// Most stop sequences a request may give (as OpenAI allows).
pub const MAX_STOPS: usize = 4;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// An error answered in OpenAI's error JSON:
/// `{"error":{"message":..,"type":..,"param":..,"code":..}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request's JSON or one of its parameters is wrong.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param,
                         "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's `content`: text, or a list of parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// The parameters both endpoints share. Unknown fields are ignored, as OpenAI clients send many.
#[derive(Debug, Deserialize, Default)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f64>,
    #[serde(default)]
    repeat_penalty: Option<f64>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n: Option<i64>,
    /// llama-server's addition: never end the answer at an end-of-turn token.
    #[serde(default)]
    ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<WireMessage>,
    /// hone's addition: a system message without putting it in `messages`.
    #[serde(default)]
    system: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

/// What the model is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A conversation, rendered with the chat template (the model's default system message is
    /// added when it has none, as `hone ask` does).
    Chat(Vec<Message>),
    /// Plain text to continue (`/v1/completions`).
    Text(String),
}

/// A checked request for the model thread.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub input: Input,
    /// What is recorded as the prompt: the last user message, or the text.
    pub prompt_record: String,
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// None: the model's default.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    /// Generate up to `max_tokens` whatever the model says (its end-of-turn tokens are never
    /// picked), as llama-server's `ignore_eos`: for load tests.
    pub ignore_eos: bool,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body does not match the API"
        };
        ApiError::invalid(format!("{what}: {e}"), None)
    })
}

fn checked(c: Common, input: Input, prompt_record: String) -> Result<Request, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("n must be 1 (hone answers one choice per request), not {n}"),
                Some("n"),
            ));
        }
    }
    let temperature = match c.temperature {
        Some(t) if !(0.0..=2.0).contains(&t) => {
            return Err(ApiError::invalid(
                format!("temperature must be between 0 and 2, not {t}"),
                Some("temperature"),
            ))
        }
        t => t.map(|t| t as f32),
    };
    let top_p = match c.top_p {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid(
                format!("top_p must be in (0, 1], not {p}"),
                Some("top_p"),
            ))
        }
        p => p.map(|p| p as f32),
    };
    let min_p = match c.min_p {
        Some(p) if !(0.0..1.0).contains(&p) => {
            return Err(ApiError::invalid(
                format!("min_p must be in [0, 1), not {p}"),
                Some("min_p"),
            ))
        }
        p => p.map(|p| p as f32),
    };
    let repeat_penalty = match c.repeat_penalty {
        Some(p) if !(p > 0.0 && p.is_finite() && p <= 10.0) => {
            return Err(ApiError::invalid(
                format!("repeat_penalty must be in (0, 10], not {p}"),
                Some("repeat_penalty"),
            ))
        }
        p => p.map(|p| p as f32),
    };
    let top_k = match c.top_k {
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(
                format!("top_k must be 0 or more, not {k}"),
                Some("top_k"),
            ))
        }
        k => k.map(|k| k as usize),
    };
    let (param, max) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match max {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                format!("{param} must be at least 1, not {m}"),
                Some(if param == "max_tokens" {
                    "max_tokens"
                } else {
                    "max_completion_tokens"
                }),
            ))
        }
        m => m.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
    };
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("at most {MAX_STOPS} stop sequences, not {}", stop.len()),
            Some("stop"),
        ));
    }
    if stop
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            format!("a stop sequence must have 1 to {MAX_STOP_BYTES} bytes"),
            Some("stop"),
        ));
    }
    Ok(Request {
        input,
        prompt_record,
        model: c.model,
        temperature,
        top_p,
        top_k,
        min_p,
        repeat_penalty,
        max_tokens,
        stop,
        // OpenAI's seed is a signed integer; every value is a distinct seed here.
        seed: c.seed.map(|s| s as u64),
        stream: c.stream.unwrap_or(false),
        ignore_eos: c.ignore_eos.unwrap_or(false),
    })
}

/// Parses and checks a `/v1/chat/completions` body.
pub fn chat_request(body: &[u8]) -> Result<Request, ApiError> {
    let b: ChatBody = parse(body)?;
    let mut messages = Vec::new();
    if let Some(s) = b.system {
        messages.push(Message::system(&s));
    }
    for (i, m) in b.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => {
                return Err(ApiError::invalid(
                    format!(
                    "messages[{i}]: role {r:?} is not supported (use system, user or assistant)"
                ),
                    Some("messages"),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(x)) => t.push_str(&x),
                        (k, _) => {
                            return Err(ApiError::invalid(
                                format!(
                                "messages[{i}]: content of type {k:?} is not supported (text only)"
                            ),
                                Some("messages"),
                            ))
                        }
                    }
                }
                t
            }
        };
        messages.push(Message::new(role, &content));
    }
    let Some(last_user) = messages.iter().rev().find(|m| m.role == "user") else {
        return Err(ApiError::invalid(
            "messages must contain at least one user message",
            Some("messages"),
        ));
    };
    let record = last_user.content.clone();
    checked(b.common, Input::Chat(messages), record)
}

/// Parses and checks a `/v1/completions` body.
pub fn completion_request(body: &[u8]) -> Result<Request, ApiError> {
    let b: CompletionBody = parse(body)?;
    let text = match b.prompt {
        Prompt::One(s) => s,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => {
            return Err(ApiError::invalid(
                format!("prompt must be one string, not {} of them", v.len()),
                Some("prompt"),
            ))
        }
    };
    if text.is_empty() {
        return Err(ApiError::invalid("prompt is empty", Some("prompt")));
    }
    checked(b.common, Input::Text(text.clone()), text)
}

/// Holds back the text that could be the start of a stop sequence, and cuts the answer where
/// one appears (the stop sequence itself is not part of the answer, as with OpenAI).
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    hold: usize,
    hit: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        let hold = stops
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
            .saturating_sub(1);
        // An empty stop would match everywhere; requests never carry one (see `checked`).
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            pending: String::new(),
            hold,
            hit: false,
        }
    }

    /// Adds a piece; returns the text that may be shown now, and whether a stop sequence
    /// appeared (then nothing more is accepted).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.hit {
            return (String::new(), true);
        }
        self.pending.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.hit = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let mut cut = self.pending.len().saturating_sub(self.hold);
        while !self.pending.is_char_boundary(cut) {
            cut -= 1;
        }
        (self.pending.drain(..cut).collect(), false)
    }

    /// The text still held at the end of the answer.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// OpenAI's finish reason for how generation stopped.
pub fn finish_reason(stop: crate::engine::StopReason, stop_sequence: bool) -> &'static str {
    use crate::engine::StopReason as S;
    match stop {
        _ if stop_sequence => "stop",
        S::Eos | S::Cancelled => "stop",
        S::MaxTokens | S::ContextFull => "length",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_cut_the_answer_even_across_pieces() {
        let mut f = StopFilter::new(vec!["\n\nUser:".into(), "END".into()]);
        let mut out = String::new();
        let mut hit = false;
        for p in ["Hello", " wor", "ld\n", "\nUs", "er: more"] {
            let (o, h) = f.push(p);
            out.push_str(&o);
            hit |= h;
        }
        assert!(hit);
        assert_eq!(out, "Hello world");
        // Text that only looked like a stop's start comes out at the end.
        let mut f = StopFilter::new(vec!["ENDING".into()]);
        let (o, h) = f.push("héllo EN");
        assert!(!h);
        let rest = f.finish();
        assert_eq!(format!("{o}{rest}"), "héllo EN");
        // No stops (or only an empty one): everything passes at once.
        for stops in [vec![], vec![String::new()]] {
            let mut f = StopFilter::new(stops);
            assert_eq!(f.push("ab"), ("ab".to_string(), false));
        }
    }

    #[test]
    fn bad_requests_are_refused_with_the_parameter_named() {
        let e = chat_request(b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = chat_request(br#"{"messages": 3}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let cases: [(&str, &str); 7] = [
            (r#""temperature": 3"#, "temperature"),
            (r#""top_p": 0"#, "top_p"),
            (r#""max_tokens": 0"#, "max_tokens"),
            (r#""n": 2"#, "n"),
            (r#""stop": ["a","b","c","d","e"]"#, "stop"),
            (r#""stop": [""]"#, "stop"),
            (r#""top_k": -1"#, "top_k"),
        ];
        for (extra, param) in cases {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"hi"}}], {extra}}}"#);
            let e = chat_request(body.as_bytes()).unwrap_err();
            assert_eq!(e.param, Some(param), "{extra}: {e}");
        }
        let e = chat_request(br#"{"messages":[{"role":"system","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param, Some("messages"));
        let e = chat_request(br#"{"messages":[{"role":"tool","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param, Some("messages"));
        let e = completion_request(br#"{"prompt":["a","b"]}"#).unwrap_err();
        assert_eq!(e.param, Some("prompt"));
    }

    #[test]
    fn a_chat_request_becomes_messages_and_settings() {
        let r = chat_request(
            br#"{"model":"x","system":"Be brief.","messages":[
                {"role":"developer","content":"Rules."},
                {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]},
                {"role":"assistant","content":"Hello"},
                {"role":"user","content":"Where?"}],
              "temperature":0,"max_tokens":12,"stop":"\n","seed":-1,"stream":true,"frequency_penalty":0}"#,
        )
        .unwrap();
        let Input::Chat(m) = &r.input else {
            panic!("not a chat")
        };
        assert_eq!(m.len(), 5);
        assert_eq!(m[0], Message::system("Be brief."));
        assert_eq!(m[1], Message::system("Rules."));
        assert_eq!(m[2], Message::user("Hi there"));
        assert_eq!(r.prompt_record, "Where?");
        assert_eq!(r.temperature, Some(0.0));
        assert_eq!(r.max_tokens, Some(12));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert_eq!(r.seed, Some(u64::MAX));
        assert!(r.stream);
    }
}
