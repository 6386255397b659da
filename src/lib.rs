//! hone: a private assistant that keeps learning, on the user's own device.
//!
//! The library holds everything; `src/main.rs` is a thin command-line layer over it.
//! See `ARCHITECTURE.md` for the map of modules and how data flows between them.

pub mod adapters;
pub mod assistant;
pub mod bench;
pub mod candidates;
pub mod codec;
pub mod daemon;
pub mod daemon_lock;
pub mod demo;
pub mod device;
pub mod digest;
pub mod engine;
pub mod eval;
pub mod feedback;
pub mod gguf;
pub mod home;
pub mod hparams;
pub mod interrupt;
pub mod kernels;
pub mod learn;
pub mod logfile;
pub mod lora;
pub mod manifest;
pub mod model;
pub mod notes;
pub mod presence;
pub mod pull;
pub mod registry;
pub mod retrieve;
pub mod sample;
pub mod schedule;
pub mod serve;
pub mod signals;
pub mod status;
pub mod store;
pub mod sys;
pub mod teach;
pub mod template;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod units;

/// The version string printed by `hone --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
