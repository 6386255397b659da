//! `hone bench`: prompt-processing and decode speed and peak memory, measured the way
//! `llama-bench` does (pp: a batch of prompt tokens from an empty context; tg: tokens decoded
//! one at a time from an empty context), as medians over repetitions; with `--train`, LoRA
//! training speed.
//!
//! Parsing and printing only; the measuring is `hone::bench`.

use super::Ctx;
use crate::Cli;
use anyhow::Result;
use clap::Args;
use hone::bench::infer::InferRequest;
use hone::bench::report;
use hone::bench::train::{Round, TrainRequest};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Prompt tokens (pp test)
    #[arg(short = 'p', long, default_value_t = 128)]
    pub prompt: usize,
    /// Generated tokens (tg test)
    #[arg(short = 'n', long = "gen", default_value_t = 64)]
    pub gen: usize,
    /// Repetitions (the median is reported)
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object as the last line
    #[arg(long)]
    pub json: bool,
    /// Also run llama.cpp's llama-bench (this path) on the same file, alternating with hone
    /// rep by rep, and print the ratios
    #[arg(long, value_name = "PATH")]
    pub vs_llama_bench: Option<std::path::PathBuf>,
    /// Keep one core busy with another process during the runs (a busy neighbour)
    #[arg(long)]
    pub neighbour: bool,
    /// Measure LoRA training instead (r=8 on every projection of every layer, 4x128 tokens)
    #[arg(long)]
    pub train: bool,
    /// With --train: the memory budget the planner must keep (e.g. 600MiB)
    #[arg(long)]
    pub max_memory: Option<String>,
    /// With --train: write the benchmark's token ids to this JSON file (for bench/peft_train.py)
    #[arg(long)]
    pub data_out: Option<std::path::PathBuf>,
    /// With --train: also train with PyTorch + PEFT (this Python, which must have torch,
    /// transformers, peft and gguf installed) on the same data and LoRA config, alternating
    /// with hone round by round, and print the ratios
    #[arg(long, value_name = "PYTHON")]
    pub vs_peft: Option<std::path::PathBuf>,
    /// With --train: measured rounds (the median is reported; default 5 with --vs-peft, else 1)
    #[arg(long)]
    pub rounds: Option<usize>,
}

pub fn run(cli: &Cli, a: &BenchArgs) -> Result<()> {
    if a.train {
        return train(cli, a);
    }
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let mut engine = ctx.load(&choice)?;
    let threads = cli
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let req = InferRequest {
        prompt: a.prompt,
        gen: a.gen,
        reps: a.reps,
        neighbour: a.neighbour,
        llama_bench: a.vs_llama_bench.clone(),
        threads,
    };
    let r = hone::bench::infer::run(&mut engine, &choice.path, &req)?;
    let load_ms = engine.load_time.as_secs_f64() * 1000.0;
    print!(
        "{}",
        report::infer_text(&choice.name, &req, &r, load_ms, a.json)
    );
    Ok(())
}

/// `hone bench --train`: the training bench (see `hone::bench::train`), its table and JSON.
fn train(cli: &Cli, a: &BenchArgs) -> Result<()> {
    hone::sys::quiet_candle_pool();
    let ctx = Ctx::open(cli)?;
    let choice = ctx.choose_model()?;
    let engine = ctx.load(&choice)?;
    let threads = cli
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let req = TrainRequest {
        budget: a
            .max_memory
            .as_deref()
            .map(hone::units::parse_bytes)
            .transpose()?,
        steps: a.reps,
        rounds: a.rounds,
        vs_peft: a.vs_peft.clone(),
        data_out: a.data_out.clone(),
        threads,
    };
    let r = hone::bench::train::run(&engine, &choice.path, &req, &mut |round| match round {
        Round::Hone(i, n) if n > 1 => eprintln!("round {i}/{n}: hone"),
        Round::Hone(..) => {}
        Round::Peft(i, n) => eprintln!("round {i}/{n}: PyTorch + PEFT"),
    })?;
    print!("{}", report::train_text(&choice.name, threads, &r, a.json));
    Ok(())
}
