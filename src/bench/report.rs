//! What `hone bench` prints: the llama-bench-like table of inference speed ([`infer_text`]) and
//! the training table with the PyTorch + PEFT comparison ([`train_text`]), each with its JSON
//! object for scripts as the last line.
//!
//! It must not measure or print: it renders the reports for the command line to print.

use super::infer::{InferReport, InferRequest};
use super::train::TrainReport;
use super::Spread;
use crate::units::mib;
use serde_json::json;
use std::fmt::Write as _;

/// `hone bench` on `model` as asked by `req`: the table, the load line (`load_ms`), and with
/// `json` the JSON object.
pub fn infer_text(
    model: &str,
    req: &InferRequest,
    r: &InferReport,
    load_ms: f64,
    json: bool,
) -> String {
    let mut out = String::new();
    let threads = req.threads;
    let reps = r.reps;
    let peak = r.peak_rss_mb;
    let (pp, tg) = (r.prompt_tps, r.decode_tps);
    let sz = crate::sys::human_bytes(r.model_bytes);
    let peer = r.llama_bench.is_some();
    let ll = r.llama_bench.unwrap_or_default();
    let (ppp, ptg, peer_peak) = (ll.prompt_tps, ll.decode_tps, ll.peak_rss_mb);
    let load = if req.neighbour {
        ", busy neighbour"
    } else {
        ""
    };
    if peer {
        let _ = writeln!(
            out,
            "| model | size | threads | test | hone t/s (median, min-max) | llama.cpp t/s (median) | ratio |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    } else {
        let _ = writeln!(
            out,
            "| model | size | threads | test | t/s (median) | min | max |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    }
    let mut row = |test: String, s: Spread, theirs: f64| {
        let (med, min, max) = (s.median, s.min, s.max);
        if peer {
            let _ = writeln!(
                out,
                "| {} | {sz} | {threads}{load} | {test} | {med:.2} ({min:.2}-{max:.2}) | {theirs:.2} | {:.2}x |",
                model,
                if theirs > 0.0 { med / theirs } else { 0.0 }
            );
        } else {
            let _ = writeln!(
                out,
                "| {} | {sz} | {threads}{load} | {test} | {med:.2} | {min:.2} | {max:.2} |",
                model
            );
        }
    };
    if req.prompt > 0 {
        row(format!("pp{}", req.prompt), pp, ppp);
    }
    if req.gen > 0 {
        row(format!("tg{}", req.gen), tg, ptg);
    }
    let _ = writeln!(
        out,
        "load {:.0} ms, peak RSS {peak:.1} MiB{}, {reps} reps",
        load_ms,
        if peer {
            format!(
                " (llama-bench {peer_peak:.1} MiB, ratio {:.2}x)",
                peak / peer_peak.max(1e-9)
            )
        } else {
            String::new()
        }
    );
    if json {
        let _ = writeln!(
            out,
            "{}",
            json!({"model": model, "threads": threads, "prompt_tokens": req.prompt,
                   "gen_tokens": req.gen, "reps": reps,
                   "prompt_tps": pp.median, "prompt_tps_min": pp.min, "prompt_tps_max": pp.max,
                   "decode_tps": tg.median, "decode_tps_min": tg.min, "decode_tps_max": tg.max,
                   "load_ms": load_ms, "peak_rss_mb": peak,
                   "neighbour": req.neighbour,
                   "llama_cpp": if peer { json!({"prompt_tps": ppp, "decode_tps": ptg,
                       "peak_rss_mb": peer_peak, "prompt_ratio": pp.median / ppp.max(1e-9),
                       "decode_ratio": tg.median / ptg.max(1e-9)}) } else { serde_json::Value::Null }})
        );
    }
    out
}

/// `hone bench --train` on `model` with `threads`: the table, the plan's line, the rounds
/// against PEFT when it ran, and with `json` the JSON object.
pub fn train_text(model: &str, threads: usize, r: &TrainReport, json: bool) -> String {
    let mut out = String::new();
    let (b, seq, med, peak, sps) = (
        r.batch,
        r.seq_len,
        r.train_tps,
        r.peak_rss_mb,
        r.seconds_per_step,
    );
    let losses = &r.losses;
    let _ = writeln!(
        out,
        "| model | threads | test | train tok/s | peak RSS MiB | s/step |\n|---|---|---|---|---|---|",
    );
    let _ = writeln!(
        out,
        "| {} | {threads} | lora r8 qkvo+mlp x{} layers, {b}x{seq} | {med:.1} | {peak:.0} | {sps:.2} |",
        model, r.n_layers,
    );
    let _ = writeln!(
        out,
        "micro-batch {} x accum {}, {}checkpointing, training kernels {}, planner estimate {:.0} MiB, loss {:.4} -> {:.4}",
        r.micro_batch,
        r.accum,
        if r.checkpointing { "" } else { "no " },
        r.train_kernels,
        mib(r.estimate),
        losses.first().copied().unwrap_or(f32::NAN),
        losses.last().copied().unwrap_or(f32::NAN)
    );
    let mut peer_json = serde_json::Value::Null;
    if let Some(p) = &r.peft {
        let _ = writeln!(
            out,
            "\n| round | hone tok/s | PEFT tok/s | hone / PEFT | PEFT peak RSS MiB |\n|---|---|---|---|---|"
        );
        for (i, ((h, t), q)) in r
            .rounds_tps
            .iter()
            .zip(&p.rounds_tps)
            .zip(&p.ratios)
            .enumerate()
        {
            let _ = writeln!(
                out,
                "| {} | {h:.1} | {t:.1} | {q:.2}x | {:.0} |",
                i + 1,
                p.rounds_rss_mb[i]
            );
        }
        let (pm, pr) = (p.train_tps, p.peak_rss_mb);
        let _ = writeln!(
            out,
            "| median | {med:.1} | {pm:.1} | {:.2}x (ratio of medians {:.2}x) | {pr:.0} |",
            p.speed_ratio_median, p.ratio_of_medians
        );
        let _ = writeln!(
            out,
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
    if json {
        let _ = writeln!(
            out,
            "{}",
            json!({"model": model, "threads": threads, "train_tps": med, "peak_rss_mb": peak,
                   "steps": r.steps, "rounds": r.rounds, "rounds_tps": r.rounds_tps, "batch": b,
                   "seq_len": seq, "rank": 8, "alpha": 16.0, "train_kernels": r.train_kernels,
                   "micro_batch": r.micro_batch, "checkpointing": r.checkpointing,
                   "estimate_mb": mib(r.estimate), "seconds_per_step": sps,
                   "losses": losses, "vs": peer_json})
        );
    }
    out
}
