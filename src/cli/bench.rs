//! `hone bench`: prompt-processing and decode speed and peak memory, measured the way
//! `llama-bench` does (pp: a batch of prompt tokens from an empty context; tg: tokens decoded
//! one at a time from an empty context), as medians over repetitions; with `--train`, LoRA
//! training speed.
//!
//! Parsing and printing only; the measuring is `hone::bench`.

use super::Ctx;
use crate::{BenchArgs, Cli};
use anyhow::Result;
use hone::bench::infer::InferRequest;
use hone::bench::report;
use hone::bench::train::{Round, TrainRequest};

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
        budget: hone::units::parse_budget(a.max_memory.as_deref())?,
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
