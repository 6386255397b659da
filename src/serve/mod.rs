//! `hone serve`: an OpenAI-compatible HTTP server on this machine, and a page to talk to it.
//!
//! One model is loaded on one dedicated thread ([`worker`]) with the active adapter and its
//! route, and answers as `hone ask` does (`assistant`, the routing of
//! `engine::Engine::answer_routed`), up to `--parallel` answers at once decoded in one batch
//! (`model::Model::forward_batch`, `engine::Decoder`); HTTP handlers ([`http`]) check
//! requests ([`api`]) and queue them over a FIFO channel, and every exchange is recorded in
//! SQLite. hone's own data (notes, the learning log, the
//! schedule's decision, the daemon's status) is under `/v1/hone/...` ([`info`]).
//!
//! It must NOT listen beyond this machine unless asked, and never without an API key there;
//! it must not accept unbounded input (body size, `max_tokens`, header and body read times are
//! capped), let a client that stops reading hold its connection (the write timeout), send a
//! CORS wildcard, or load a second model. It does not learn: the daemon does,
//! and pauses while requests run (`presence`).

pub mod api;
mod http;
pub mod info;
mod worker;

use crate::engine::Backend;
use crate::home::Home;
use anyhow::{bail, Context as _, Result};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// How `hone serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on: an IP address or `localhost`.
    pub host: String,
    /// 0 picks a free port (the bound address is reported).
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY`. Required for a non-loopback host.
    pub api_key: Option<String>,
    /// `--model`: a known or registered name, or a path (default: the default model).
    pub model: Option<String>,
    pub ctx: Option<usize>,
    pub backend: Backend,
    /// Compute threads of the model thread's pool.
    pub threads: usize,
    /// Answers decoded together in one batch (llama-server's `-np`); more wait their turn.
    pub parallel: usize,
    /// Bytes of KV cache kept from finished answers beyond one per slot (`--prompt-cache`,
    /// as llama-server's `--cache-ram`): a repeated prompt or a continued conversation
    /// starts where it left off. 0 keeps one per slot only.
    pub prompt_cache_bytes: usize,
    /// `--device`: the device profile for the schedule's decision.
    pub device: Option<String>,
    pub limits: Limits,
    /// Put the notes a chat message is about into the prompt (`--no-retrieval` turns it off).
    pub retrieval: bool,
}

/// What one client may use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (413 above it).
    pub max_body_bytes: usize,
    /// Time a client has to send its request headers (then the connection is closed).
    pub header_timeout: Duration,
    /// Time a client has to send its request body (408 after it).
    pub body_timeout: Duration,
    /// Time a write to a client may wait for it to read (a full socket buffer) before the
    /// connection is closed: a client that stops reading cannot hold a connection, or an
    /// answer's slot, for longer.
    pub write_timeout: Duration,
    /// Requests waiting for the model beyond this are refused with 503.
    pub max_queue: usize,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_queue: 64,
            max_connections: 64,
        }
    }
}

/// The address to listen on, refusing a non-loopback one without an API key.
pub fn listen_addr(host: &str, port: u16, api_key: Option<&str>) -> Result<SocketAddr> {
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        h.parse().with_context(|| {
            format!("--host {host:?} is not an IP address (use 127.0.0.1, ::1, 0.0.0.0 or a LAN address)")
        })?
    };
    if !ip.is_loopback() && api_key.is_none_or(|k| k.is_empty()) {
        bail!(
            "refusing to listen on {ip} without --api-key: anyone who can reach this machine could \
             use the assistant and read and change your notes. Pass --api-key KEY (clients then \
             send `Authorization: Bearer KEY`), or keep the default --host 127.0.0.1"
        );
    }
    Ok(SocketAddr::new(ip, port))
}

/// Runs the server until SIGINT or SIGTERM. `on_bound` is told the address once it listens
/// (before the model has loaded: requests meanwhile get 503).
pub fn run(home: Home, opts: ServeOptions, on_bound: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    let addr = listen_addr(&opts.host, opts.port, opts.api_key.as_deref())?;
    let store = crate::store::Store::open(&home.db_path())?;
    let choice = crate::registry::resolve(&home, &store, opts.model.as_deref())?;
    drop(store);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hone-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(http::serve(home, choice, opts, addr, on_bound))
}
