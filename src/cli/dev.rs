//! `hone dev ...`: hidden commands for the project's own checks, not for users.
//!
//! `hone dev write-tiny-model` writes the tiny random GGUF model of `hone::tiny` to a file, so a
//! script can run the real binary (for example a cross-compiled one under qemu, in
//! `.ci/cross-check`) on a model that takes a fraction of a second to load and train, without a
//! Rust test harness. The model answers nonsense: it is for checking that two builds compute the
//! same thing, never for anything a user sees.

use anyhow::Result;
use clap::{Args, Subcommand};
use hone::tiny::{self, TinySpec};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Write a tiny random model (a real GGUF file with random weights) for checks and tests
    WriteTinyModel(TinyModelArgs),
}

#[derive(Args, Debug)]
pub struct TinyModelArgs {
    /// The .gguf file to write (refused if it exists, unless --force)
    pub path: PathBuf,
    /// Architecture written into the file
    #[arg(long, value_parser = ["llama", "qwen2"], default_value = "llama")]
    pub arch: String,
    /// Seed of the random weights (the same seed writes the same file)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Quantisation of the layers' weight matrices (the embedding is always q8_0)
    #[arg(long, value_parser = ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"], default_value = "q8_0")]
    pub dtype: String,
    /// Replace the file if it exists
    #[arg(long)]
    pub force: bool,
    /// The smallest shape the checks accept (1 layer, width 32, about 20 KB): the fuzz seed
    #[arg(long)]
    pub smallest: bool,
}

pub fn run(c: &DevCommand) -> Result<()> {
    match c {
        DevCommand::WriteTinyModel(a) => write_tiny(a),
    }
}

fn write_tiny(a: &TinyModelArgs) -> Result<()> {
    let base = if a.smallest {
        TinySpec::smallest()
    } else {
        TinySpec::default()
    };
    let spec = TinySpec {
        arch: a.arch.clone(),
        dtype: tiny::dtype(&a.dtype)?,
        seed: a.seed,
        ..base
    };
    let bytes = tiny::write_new(&a.path, &spec, a.force)?;
    println!(
        "wrote a tiny random {} model ({} weights, seed {}, {} bytes) to {}",
        spec.arch,
        a.dtype,
        spec.seed,
        bytes,
        a.path.display()
    );
    Ok(())
}
