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
use hone::bench::train::{Round, TrainRequest};
use hone::bench::Spread;
use hone::units::mib;
use serde_json::json;

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
    let reps = r.reps;
    let peak = r.peak_rss_mb;
    let (pp, tg) = (r.prompt_tps, r.decode_tps);
    let sz = hone::sys::human_bytes(r.model_bytes);
    let peer = r.llama_bench.is_some();
    let ll = r.llama_bench.unwrap_or_default();
    let (ppp, ptg, peer_peak) = (ll.prompt_tps, ll.decode_tps, ll.peak_rss_mb);
    let load = if a.neighbour { ", busy neighbour" } else { "" };
    if peer {
        println!("| model | size | threads | test | hone t/s (median, min-max) | llama.cpp t/s (median) | ratio |");
        println!("|---|---|---|---|---|---|---|");
    } else {
        println!("| model | size | threads | test | t/s (median) | min | max |");
        println!("|---|---|---|---|---|---|---|");
    }
    let row = |test: String, s: Spread, theirs: f64| {
        let (med, min, max) = (s.median, s.min, s.max);
        if peer {
            println!(
                "| {} | {sz} | {threads}{load} | {test} | {med:.2} ({min:.2}-{max:.2}) | {theirs:.2} | {:.2}x |",
                choice.name,
                if theirs > 0.0 { med / theirs } else { 0.0 }
            );
        } else {
            println!(
                "| {} | {sz} | {threads}{load} | {test} | {med:.2} | {min:.2} | {max:.2} |",
                choice.name
            );
        }
    };
    if a.prompt > 0 {
        row(format!("pp{}", a.prompt), pp, ppp);
    }
    if a.gen > 0 {
        row(format!("tg{}", a.gen), tg, ptg);
    }
    println!(
        "load {:.0} ms, peak RSS {peak:.1} MiB{}, {reps} reps",
        engine.load_time.as_secs_f64() * 1000.0,
        if peer {
            format!(
                " (llama-bench {peer_peak:.1} MiB, ratio {:.2}x)",
                peak / peer_peak.max(1e-9)
            )
        } else {
            String::new()
        }
    );
    if a.json {
        println!(
            "{}",
            json!({"model": choice.name, "threads": threads, "prompt_tokens": a.prompt,
                   "gen_tokens": a.gen, "reps": reps,
                   "prompt_tps": pp.median, "prompt_tps_min": pp.min, "prompt_tps_max": pp.max,
                   "decode_tps": tg.median, "decode_tps_min": tg.min, "decode_tps_max": tg.max,
                   "load_ms": engine.load_time.as_secs_f64() * 1000.0, "peak_rss_mb": peak,
                   "neighbour": a.neighbour,
                   "llama_cpp": if peer { json!({"prompt_tps": ppp, "decode_tps": ptg,
                       "peak_rss_mb": peer_peak, "prompt_ratio": pp.median / ppp.max(1e-9),
                       "decode_ratio": tg.median / ptg.max(1e-9)}) } else { serde_json::Value::Null }})
        );
    }
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
    let (b, s, med, peak, sps) = (
        r.batch,
        r.seq_len,
        r.train_tps,
        r.peak_rss_mb,
        r.seconds_per_step,
    );
    let losses = &r.losses;
    println!("| model | threads | test | train tok/s | peak RSS MiB | s/step |\n|---|---|---|---|---|---|");
    println!(
        "| {} | {threads} | lora r8 qkvo+mlp x{} layers, {b}x{s} | {med:.1} | {peak:.0} | {sps:.2} |",
        choice.name, r.n_layers,
    );
    println!(
        "micro-batch {} x accum {}, {}checkpointing, training kernels {}, planner estimate {:.0} MiB, loss {:.4} -> {:.4}",
        r.micro_batch,
        r.accum,
        if r.checkpointing { "" } else { "no " },
        r.train_kernels,
        mib(r.estimate),
        losses[0],
        losses[losses.len() - 1]
    );
    let mut peer_json = serde_json::Value::Null;
    if let Some(p) = &r.peft {
        println!("\n| round | hone tok/s | PEFT tok/s | hone / PEFT | PEFT peak RSS MiB |\n|---|---|---|---|---|");
        for (i, ((h, t), q)) in r
            .rounds_tps
            .iter()
            .zip(&p.rounds_tps)
            .zip(&p.ratios)
            .enumerate()
        {
            println!(
                "| {} | {h:.1} | {t:.1} | {q:.2}x | {:.0} |",
                i + 1,
                p.rounds_rss_mb[i]
            );
        }
        let (pm, pr) = (p.train_tps, p.peak_rss_mb);
        println!(
            "| median | {med:.1} | {pm:.1} | {:.2}x (ratio of medians {:.2}x) | {pr:.0} |",
            p.speed_ratio_median, p.ratio_of_medians
        );
        println!(
            "peak RSS: hone {peak:.0} MiB = {:.2}x PEFT's; losses: hone {}, PEFT {}",
            p.rss_ratio,
            json!(losses),
            p.losses
        );
        peer_json = json!({"peer": "pytorch+peft", "train_tps": pm, "peak_rss_mb": pr,
                           "rounds_tps": p.rounds_tps, "rounds_rss_mb": p.rounds_rss_mb,
                           "speed_ratio_median": p.speed_ratio_median,
                           "ratio_of_medians": p.ratio_of_medians, "rss_ratio": p.rss_ratio,
                           "torch": p.torch});
    }
    if a.json {
        println!(
            "{}",
            json!({"model": choice.name, "threads": threads, "train_tps": med, "peak_rss_mb": peak,
                   "steps": r.steps, "rounds": r.rounds, "rounds_tps": r.rounds_tps, "batch": b,
                   "seq_len": s, "rank": 8, "alpha": 16.0, "train_kernels": r.train_kernels,
                   "micro_batch": r.micro_batch, "checkpointing": r.checkpointing,
                   "estimate_mb": mib(r.estimate), "seconds_per_step": sps,
                   "losses": losses, "vs": peer_json})
        );
    }
    Ok(())
}
