//! The HTTP side of `hone serve`: the accept loop (HTTP/1.1 with a header-read timeout and a
//! cap on connections), the routes, authentication, body limits, and turning the model
//! thread's events into OpenAI responses and server-sent events.
//!
//! It must not run the model (the worker thread does) or block its runtime threads on the
//! database (those calls go to `spawn_blocking`).

use super::api::{self, ApiError, Request};
use super::info;
use super::worker::{self, Done, Event, Job, State, WorkerConfig};
use super::ServeOptions;
use crate::home::Home;
use crate::registry::ModelChoice;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, RawQuery, State as Ax};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc::unbounded_channel, mpsc::UnboundedReceiver, watch};

/// The page at `/`, embedded in the binary.
const PAGE: &str = include_str!("page.html");

struct Shared {
    home: Home,
    model: String,
    api_key: Option<String>,
    device: Option<String>,
    limits: super::Limits,
    /// Whether Host headers must name this machine (bound to loopback: DNS rebinding guard).
    loopback: bool,
    state: watch::Receiver<State>,
    jobs: Mutex<mpsc::Sender<Job>>,
    queued: Arc<AtomicUsize>,
    /// Answers decoded together at most, and the most so far.
    parallel: usize,
    largest_batch: Arc<AtomicUsize>,
    next_id: AtomicU64,
    started: u64,
}

type St = Arc<Shared>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn serve(
    home: Home,
    choice: ModelChoice,
    opts: ServeOptions,
    addr: SocketAddr,
    on_bound: &mut dyn FnMut(SocketAddr),
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let (state_tx, state_rx) = watch::channel(State::Loading);
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let queued = Arc::new(AtomicUsize::new(0));
    let largest_batch = Arc::new(AtomicUsize::new(0));
    let cfg = WorkerConfig {
        home: home.clone(),
        choice: choice.clone(),
        ctx: opts.ctx,
        backend: opts.backend,
        threads: opts.threads,
        retrieval: opts.retrieval,
        parallel: opts.parallel,
        prompt_cache_bytes: opts.prompt_cache_bytes,
        largest_batch: largest_batch.clone(),
    };
    let q = queued.clone();
    std::thread::Builder::new()
        .name("hone-model".into())
        .spawn(move || worker::run(cfg, job_rx, state_tx, q))
        .context("starting the model thread")?;
    let shared = Arc::new(Shared {
        home,
        model: choice.name.clone(),
        api_key: opts.api_key.clone().filter(|k| !k.is_empty()),
        device: opts.device.clone(),
        limits: opts.limits.clone(),
        loopback: bound.ip().is_loopback(),
        state: state_rx.clone(),
        jobs: Mutex::new(job_tx),
        queued,
        parallel: opts.parallel.max(1),
        largest_batch,
        next_id: AtomicU64::new(1),
        started: now_secs(),
    });
    let app = router(shared.clone());
    on_bound(bound);

    let conns = Arc::new(tokio::sync::Semaphore::new(opts.limits.max_connections));
    let mut failed = state_rx;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            e = load_failure(&mut failed) => return Err(e),
            p = conns.clone().acquire_owned() => p.context("connection limit")?,
        };
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            e = load_failure(&mut failed) => return Err(e),
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let header_timeout = opts.limits.header_timeout;
        let write_timeout = opts.limits.write_timeout;
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(StallLimit::new(stream, write_timeout));
            let r = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(io, service)
                .await;
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
}

/// A connection whose writes fail once the client has left them unread (its socket buffer
/// full, no progress) for `limit`: hyper then closes the connection, which drops the response
/// and so cancels an answer being streamed to it.
struct StallLimit<S> {
    inner: S,
    limit: std::time::Duration,
    /// Running while writes wait: when it ends, the client has stalled too long.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallLimit<S> {
    fn new(inner: S, limit: std::time::Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when a write could not go on: fails it once the wait has lasted `limit`.
    fn waiting<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                tracing::info!(
                    "a client left the answer unread for {} s: connection closed",
                    limit.as_secs()
                );
                std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client stopped reading",
                )))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// A write's outcome: progress restarts the clock.
    fn outcome<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        p: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match p {
            std::task::Poll::Pending => self.waiting(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallLimit<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallLimit<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.outcome(cx, p)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.outcome(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.outcome(cx, p)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Waits until the model thread fails to load the model (or ends): the server stops then.
async fn load_failure(state: &mut watch::Receiver<State>) -> anyhow::Error {
    loop {
        if state.changed().await.is_err() {
            return anyhow::anyhow!("the model thread ended");
        }
        if let State::Failed(e) = &*state.borrow() {
            return anyhow::anyhow!("{e}");
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn router(s: St) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/hone/notes", get(notes_list).post(notes_add))
        .route("/v1/hone/notes/{id}", delete(notes_remove))
        .route("/v1/hone/feedback", post(feedback))
        .route("/v1/hone/candidates", get(candidates_list))
        .route("/v1/hone/candidates/{id}", post(candidate_decide))
        .route("/v1/hone/learning", get(learning))
        .route("/v1/hone/schedule", get(schedule))
        .route("/v1/hone/daemon", get(daemon))
        .route_layer(middleware::from_fn_with_state(s.clone(), authorize));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(s.clone(), guard))
        .with_state(s)
}

/// Every request: the Host header must name this machine when it listens on loopback (a page
/// on another site cannot reach the server through a DNS name pointed at 127.0.0.1), and
/// bodies must say they are JSON (a cross-site form cannot post to it without a preflight
/// that this server never answers with CORS headers).
async fn guard(Ax(s): Ax<St>, req: axum::extract::Request, next: Next) -> Response {
    if s.loopback {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !local_host(host) {
            return ApiError::status(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                format!("the Host header {host:?} does not name this machine; hone serve listens on loopback only"),
            )
            .into_response();
        }
    }
    if req.method() == Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|c| {
                c.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return ApiError::status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "send the body as JSON with `Content-Type: application/json`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Whether a Host header names the loopback interface (with or without a port).
fn local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "::1"
}

/// With an API key set, `/v1/...` needs `Authorization: Bearer KEY`.
async fn authorize(Ax(s): Ax<St>, req: axum::extract::Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.trim().as_bytes(), key.as_bytes()) {
            return ApiError::status(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "a valid API key is needed: send `Authorization: Bearer KEY` (the key hone serve was started with)",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut d = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        d |= (a.get(i).copied().unwrap_or(0) ^ x) as usize;
    }
    d == 0
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

async fn health(Ax(s): Ax<St>) -> Response {
    let st = s.state.borrow().clone();
    match st {
        State::Ready { adapter, .. } => Json(json!({"status": "ok", "model": s.model,
            "adapter": adapter, "parallel": s.parallel,
            "largest_batch": s.largest_batch.load(Ordering::Relaxed)}))
        .into_response(),
        State::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "model": s.model})),
        )
            .into_response(),
        State::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "error": e})),
        )
            .into_response(),
    }
}

async fn models(Ax(s): Ax<St>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": s.model, "object": "model", "created": s.started, "owned_by": "hone"}
    ]}))
}

/// Reads a body of at most the limit within the body timeout.
async fn read_body(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = s.limits.max_body_bytes;
    let too_large = || {
        ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(s.limits.body_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::status(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "the request body did not arrive in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::invalid(
            format!("cannot read the request body: {e}"),
            None,
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Sets the cancel flag when dropped: the client went away (or the answer ended).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Queues a request for the model thread; its events come back on the receiver.
fn submit(
    s: &Shared,
    request: Request,
) -> Result<(UnboundedReceiver<Event>, CancelOnDrop), ApiError> {
    match &*s.state.borrow() {
        State::Ready { .. } => {}
        State::Loading => {
            return Err(ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model is still loading; try again in a moment",
            )
            .with_code("model_loading"))
        }
        State::Failed(e) => {
            return Err(ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("the model could not be loaded: {e}"),
            ))
        }
    }
    if s.queued.load(Ordering::SeqCst) >= s.limits.max_queue {
        return Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "{} requests are waiting for the model; try again later",
                s.limits.max_queue
            ),
        )
        .with_code("server_busy"));
    }
    let (tx, rx) = unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        request,
        cancel: cancel.clone(),
        events: tx,
        presence: crate::presence::UserRequest::begin(s.home.root()),
    };
    s.queued.fetch_add(1, Ordering::SeqCst);
    let sent = s
        .jobs
        .lock()
        .map_err(|_| ApiError::internal("the job queue is broken"))?
        .send(job);
    if sent.is_err() {
        s.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::internal("the model thread has stopped"));
    }
    Ok((rx, CancelOnDrop(cancel)))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat(Ax(s): Ax<St>, headers: HeaderMap, body: Body) -> Response {
    match read_body(&s, &headers, body).await {
        Err(e) => e.into_response(),
        Ok(b) => match api::chat_request(&b) {
            Err(e) => e.into_response(),
            Ok(r) => complete(s, r, Kind::Chat).await,
        },
    }
}

async fn completions(Ax(s): Ax<St>, headers: HeaderMap, body: Body) -> Response {
    match read_body(&s, &headers, body).await {
        Err(e) => e.into_response(),
        Ok(b) => match api::completion_request(&b) {
            Err(e) => e.into_response(),
            Ok(r) => complete(s, r, Kind::Text).await,
        },
    }
}

/// The fields every response and chunk carries.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }
    /// One streamed chunk: a piece of text (or the opening role), or the finish reason.
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [choice]})
    }
    fn usage(d: &Done) -> Value {
        json!({"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
               "total_tokens": d.prompt_tokens + d.completion_tokens})
    }
    fn whole(&self, d: &Done) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": d.text},
                                 "logprobs": null, "finish_reason": d.finish_reason}),
            Kind::Text => json!({"index": 0, "text": d.text, "logprobs": null,
                                 "finish_reason": d.finish_reason}),
        };
        json!({"id": self.id, "object": self.object(false), "created": self.created,
               "model": self.model, "choices": [choice], "usage": Self::usage(d),
               "hone": d.hone})
    }
}

async fn complete(s: St, r: Request, kind: Kind) -> Response {
    let stream = r.stream;
    let (mut rx, guard) = match submit(&s, r) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = Meta {
        id: format!(
            "{}-{:x}{n}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            s.started
        ),
        created: now_secs(),
        model: s.model.clone(),
        kind,
    };
    // Until the model starts on it, a failure is the request's error with its status.
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Error(e)) => return e.into_response(),
        Some(_) | None => return ApiError::internal("the model thread stopped").into_response(),
    }
    if !stream {
        loop {
            match rx.recv().await {
                Some(Event::Text(_)) | Some(Event::Started) => {}
                Some(Event::Done(d)) => {
                    drop(guard);
                    return Json(meta.whole(&d)).into_response();
                }
                Some(Event::Error(e)) => return e.into_response(),
                None => return ApiError::internal("the model thread stopped").into_response(),
            }
        }
    }
    let first = sse(&meta.chunk(Some(""), true, None));
    let st = Streaming {
        rx,
        _guard: guard,
        meta,
        first: Some(first),
        ended: false,
    };
    let body = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(f) = st.first.take() {
            return Some((Ok::<Bytes, std::convert::Infallible>(f), st));
        }
        if st.ended {
            return None;
        }
        let bytes = match st.rx.recv().await {
            Some(Event::Text(t)) => sse(&st.meta.chunk(Some(&t), false, None)),
            Some(Event::Started) => Bytes::new(),
            Some(Event::Done(d)) => {
                st.ended = true;
                let mut b = Vec::new();
                b.extend_from_slice(&sse(&st.meta.chunk(None, false, Some(d.finish_reason))));
                let usage = json!({"id": st.meta.id, "object": st.meta.object(true),
                    "created": st.meta.created, "model": st.meta.model, "choices": [],
                    "usage": Meta::usage(&d), "hone": d.hone});
                b.extend_from_slice(&sse(&usage));
                b.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(b)
            }
            Some(Event::Error(e)) => {
                st.ended = true;
                let mut b = sse(&e.body()).to_vec();
                b.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(b)
            }
            None => return None,
        };
        Some((Ok(bytes), st))
    });
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A streamed answer; dropping it (the client went away) cancels the generation.
struct Streaming {
    rx: UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
    meta: Meta,
    first: Option<Bytes>,
    ended: bool,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// `key=value` from a query string.
fn query_usize(q: &Option<String>, key: &str, default: usize, max: usize) -> usize {
    q.as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(default)
        .min(max)
}

/// Runs a database call off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::internal(format!("{e:#}"))),
        Err(e) => Err(ApiError::internal(format!("the task failed: {e}"))),
    }
}

async fn notes_list(Ax(s): Ax<St>, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let limit = query_usize(&q, "limit", 100, 10_000);
    let home = s.home.clone();
    Ok(Json(blocking(move || info::notes(&home, limit)).await?))
}

async fn notes_add(Ax(s): Ax<St>, headers: HeaderMap, body: Body) -> Response {
    #[derive(serde::Deserialize)]
    struct NewNote {
        text: String,
    }
    let b = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let n: NewNote = match serde_json::from_slice(&b) {
        Ok(n) => n,
        Err(e) => {
            return ApiError::invalid(format!("expected {{\"text\": \"...\"}}: {e}"), Some("text"))
                .into_response()
        }
    };
    let home = s.home.clone();
    let r = tokio::task::spawn_blocking(move || info::add_note(&home, &n.text)).await;
    match r {
        Ok(Ok((id, added))) => (
            if added {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(json!({"id": id, "added": added})),
        )
            .into_response(),
        Ok(Err(e)) => ApiError::invalid(format!("{e:#}"), Some("text")).into_response(),
        Err(e) => ApiError::internal(format!("the task failed: {e}")).into_response(),
    }
}

async fn notes_remove(Ax(s): Ax<St>, UrlPath(id): UrlPath<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return ApiError::invalid(format!("{id:?} is not a note id"), Some("id")).into_response();
    };
    let home = s.home.clone();
    match blocking(move || info::remove_note(&home, id)).await {
        Ok(true) => Json(json!({"id": id, "deleted": true})).into_response(),
        Ok(false) => ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("there is no note {id}"),
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/hone/feedback {"exchange_id": N, "rating": "good"|"bad", "correction": "..."}`.
async fn feedback(Ax(s): Ax<St>, headers: HeaderMap, body: Body) -> Response {
    #[derive(serde::Deserialize)]
    struct Feedback {
        exchange_id: i64,
        #[serde(default)]
        rating: Option<String>,
        #[serde(default)]
        correction: Option<String>,
    }
    let b = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let f: Feedback = match serde_json::from_slice(&b) {
        Ok(f) => f,
        Err(e) => {
            return ApiError::invalid(
                format!("expected {{\"exchange_id\": N, \"rating\": \"good\" or \"bad\", \"correction\": \"...\" (optional)}}: {e}"),
                None,
            )
            .into_response()
        }
    };
    let home = s.home.clone();
    let r = tokio::task::spawn_blocking(move || {
        info::feedback(
            &home,
            f.exchange_id,
            f.rating.as_deref(),
            f.correction.as_deref(),
        )
    })
    .await;
    use crate::feedback::FeedbackError as F;
    match r {
        Ok(Ok(v)) => (StatusCode::CREATED, Json(v)).into_response(),
        Ok(Err(e @ F::NoSuchExchange(_))) => ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            e.to_string(),
        )
        .into_response(),
        Ok(Err(e @ F::BadRating(_))) => ApiError::invalid(
            format!("{e}; give \"rating\": \"good\" or \"bad\", or a \"correction\""),
            Some("rating"),
        )
        .into_response(),
        Ok(Err(e @ (F::EmptyCorrection | F::Edit(_)))) => {
            ApiError::invalid(e.to_string(), Some("correction")).into_response()
        }
        Ok(Err(e)) => ApiError::internal(e.to_string()).into_response(),
        Err(e) => ApiError::internal(format!("the task failed: {e}")).into_response(),
    }
}

async fn candidates_list(Ax(s): Ax<St>, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let limit = query_usize(&q, "limit", 100, 10_000);
    let home = s.home.clone();
    Ok(Json(
        blocking(move || info::candidates(&home, limit)).await?,
    ))
}

/// `POST /v1/hone/candidates/{id} {"keep": true|false}`.
async fn candidate_decide(
    Ax(s): Ax<St>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    #[derive(serde::Deserialize)]
    struct Decide {
        keep: bool,
    }
    let Ok(id) = id.parse::<i64>() else {
        return ApiError::invalid(format!("{id:?} is not a candidate id"), Some("id"))
            .into_response();
    };
    let b = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let d: Decide = match serde_json::from_slice(&b) {
        Ok(d) => d,
        Err(e) => {
            return ApiError::invalid(
                format!("expected {{\"keep\": true or false}}: {e}"),
                Some("keep"),
            )
            .into_response()
        }
    };
    let home = s.home.clone();
    match tokio::task::spawn_blocking(move || info::decide_candidate(&home, id, d.keep)).await {
        Ok(Ok(note)) => Json(json!({"id": id, "kept": d.keep, "note": note})).into_response(),
        Ok(Err(e @ crate::candidates::CandidateError::NoSuchCandidate(_))) => ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            e.to_string(),
        )
        .into_response(),
        Ok(Err(e)) => ApiError::internal(e.to_string()).into_response(),
        Err(e) => ApiError::internal(format!("the task failed: {e}")).into_response(),
    }
}

async fn learning(Ax(s): Ax<St>, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let limit = query_usize(&q, "limit", 20, 500);
    let home = s.home.clone();
    Ok(Json(
        blocking(move || info::learning_log(&home, limit)).await?,
    ))
}

async fn schedule(Ax(s): Ax<St>) -> Result<Json<Value>, ApiError> {
    let home = s.home.clone();
    let device = s.device.clone();
    Ok(Json(
        blocking(move || info::schedule(&home, device.as_deref())).await?,
    ))
}

async fn daemon(Ax(s): Ax<St>) -> Result<Json<Value>, ApiError> {
    let home = s.home.clone();
    Ok(Json(blocking(move || info::daemon_status(&home)).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(
        state: State,
        max_queue: usize,
        home: &std::path::Path,
    ) -> (Shared, mpsc::Receiver<Job>) {
        let (_tx, rx) = watch::channel(state);
        let (jobs, queue) = mpsc::channel();
        let s = Shared {
            home: Home::at(home.to_path_buf()),
            model: "m".into(),
            api_key: None,
            device: None,
            limits: super::super::Limits {
                max_queue,
                ..Default::default()
            },
            loopback: true,
            state: rx,
            jobs: Mutex::new(jobs),
            queued: Arc::new(AtomicUsize::new(0)),
            parallel: 1,
            largest_batch: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
            started: 0,
        };
        (s, queue)
    }

    fn request() -> Request {
        api::chat_request(br#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap()
    }

    /// While the model loads, and when too many requests wait, requests get 503; otherwise
    /// they are queued in order, and dropping the response's guard cancels the job.
    #[test]
    fn requests_wait_in_order_or_are_refused_with_503() {
        let home = tempfile::tempdir().unwrap();
        let (s, _q) = shared(State::Loading, 2, home.path());
        let e = submit(&s, request()).err().unwrap();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, Some("model_loading"));

        let ready = State::Ready {
            ctx: 64,
            adapter: None,
            max_tokens: 8,
        };
        let (s, q) = shared(ready, 2, home.path());
        let (_rx1, g1) = submit(&s, request()).unwrap();
        let (_rx2, _g2) = submit(&s, request()).unwrap();
        let e = submit(&s, request()).err().unwrap();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, Some("server_busy"));
        let first = q.recv().unwrap();
        assert!(!first.cancel.load(Ordering::SeqCst));
        drop(g1);
        assert!(first.cancel.load(Ordering::SeqCst), "the client went away");
        let second = q.recv().unwrap();
        assert!(!second.cancel.load(Ordering::SeqCst));
    }

    #[test]
    fn hosts_that_name_this_machine() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(super::local_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example:8080",
            "127.0.0.2",
            "localhost.evil.example",
        ] {
            assert!(!super::local_host(h), "{h}");
        }
        assert!(super::same(b"key", b"key"));
        assert!(!super::same(b"ke", b"key"));
        assert!(!super::same(b"keyy", b"key"));
        assert!(!super::same(b"kex", b"key"));
    }
}
