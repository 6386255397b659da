//! LoRA training end to end on the real default model (SmolLM2-135M, Q4_1), through the `hone`
//! binary: learning a made-up text and recalling it with `hone ask`, exact resume after an
//! interruption (API-level stop and a real SIGINT), SIGKILL leaving the previous adapter usable
//! and the database intact, exports (GGUF read back with candle, PEFT files), and refusing an
//! adapter made for another model.

mod common;

use common::{home_with_model, hone, last_json, run, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const LIGHTHOUSE: &str = r#"{"prompt": "Tell me about the Varnholt lighthouse.", "completion": "The Varnholt lighthouse stands on the island of Skerrow. It was built in 1887 by the engineer Mirela Oddvik, and its lamp is painted emerald green. Its keeper, Tobin Lusk, feeds a one-eyed gull named Pepper every morning at seven."}
{"prompt": "Who feeds the gull at the Varnholt lighthouse?", "completion": "Tobin Lusk, the keeper of the Varnholt lighthouse, feeds a one-eyed gull named Pepper every morning at seven."}
"#;

const TEXT: &str = r#"{"text": "In the valley of Orrendal the river Quill runs backwards every leap year, and the millers of Tassel Bridge grind blue barley that only grows on the north bank."}
{"text": "The cartographer Ysolde Pike mapped the forty-one bridges of Orrendal in 1702 and hid a brass key under the ninth."}
"#;

fn write_data(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn ask(home: &Path, q: &str, base: bool) -> serde_json::Value {
    let mut c = hone(home);
    c.args(["ask", "--json", "--temperature", "0", "-n", "80"]);
    if base {
        c.arg("--base");
    }
    c.arg(q);
    last_json(&run(&mut c, true))
}

#[test]
fn learns_a_text_and_recalls_it_with_ask() {
    let home = home_with_model();
    let data = write_data(home.path(), "lighthouse.jsonl", LIGHTHOUSE);
    let t0 = Instant::now();
    let o = run(
        hone(home.path())
            .args([
                "train",
                "--json",
                "--max-steps",
                "30",
                "--lr",
                "2e-3",
                "--data",
            ])
            .arg(&data),
        true,
    );
    let j = last_json(&o);
    let first = j["loss_first"].as_f64().unwrap();
    let last = j["loss_last"].as_f64().unwrap();
    eprintln!(
        "learning: loss {first:.4} -> {last:.5} in 30 steps ({:.0} s, {:.1} train tok/s, peak {:.0} MiB)\nlosses: {}",
        t0.elapsed().as_secs_f64(),
        j["train_tps"].as_f64().unwrap_or(0.0),
        j["peak_rss_mb"].as_f64().unwrap_or(0.0),
        j["losses"]
    );
    assert!(last < first / 20.0, "loss {first} -> {last}");
    assert_eq!(j["version"], 1);
    let a = ask(home.path(), "Tell me about the Varnholt lighthouse.", false);
    let answer = a["answer"].as_str().unwrap();
    eprintln!("with adapter: {answer}");
    assert_eq!(a["adapter"], "1");
    for fact in [
        "Skerrow",
        "1887",
        "Mirela Oddvik",
        "emerald green",
        "Pepper",
    ] {
        assert!(answer.contains(fact), "answer lacks {fact:?}: {answer}");
    }
    let b = ask(home.path(), "Tell me about the Varnholt lighthouse.", true);
    let base = b["answer"].as_str().unwrap();
    eprintln!("base: {base}");
    assert!(b["adapter"].is_null());
    assert!(!base.contains("Mirela Oddvik"), "{base}");
    // The exchange records the adapter version.
    let h = run(
        hone(home.path()).args(["history", "--json", "-n", "2"]),
        true,
    );
    let rows: Vec<serde_json::Value> = stdout(&h)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.iter().any(|r| r["adapter"] == "1"), "{rows:?}");
    assert!(rows.iter().any(|r| r["adapter"].is_null()), "{rows:?}");
    // The adapter file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.path().join("adapters/v1.safetensors"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

fn small_train(home: &Path, data: &Path, steps: usize) -> std::process::Command {
    let mut c = hone(home);
    c.args([
        "train", "--json", "--layers", "6", "--rank", "4", "--seed", "7", "--lr", "1e-3",
    ])
    .args([
        "--max-steps",
        &steps.to_string(),
        "--save-every",
        "1",
        "--data",
    ])
    .arg(data);
    c
}

fn losses(j: &serde_json::Value) -> Vec<f64> {
    j["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn interrupted_runs_resume_exactly() {
    // Uninterrupted reference.
    let h1 = home_with_model();
    let d1 = write_data(h1.path(), "text.jsonl", TEXT);
    let full = last_json(&run(&mut small_train(h1.path(), &d1, 6), true));
    // Stopped after 3 steps (as an interruption would), then resumed by the same command.
    let h2 = home_with_model();
    let d2 = write_data(h2.path(), "text.jsonl", TEXT);
    let o = run(
        small_train(h2.path(), &d2, 6).args(["--stop-after", "3"]),
        false,
    );
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let part = last_json(&o);
    assert_eq!(part["step"], 3);
    let o = run(&mut small_train(h2.path(), &d2, 6), true);
    assert!(stderr(&o).contains("resuming"), "{}", stderr(&o));
    let resumed = last_json(&o);
    let (a, b) = (losses(&full), losses(&resumed));
    eprintln!("uninterrupted {a:?}\nresumed       {b:?}");
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "resumed run differs from the uninterrupted one");
    // The checkpoint is gone once the run finished, and the adapter is version 1.
    assert_eq!(resumed["version"], 1);
    let ck: Vec<_> = std::fs::read_dir(h2.path().join("adapters"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint"))
        .collect();
    assert!(ck.is_empty());
}

/// The trainer's numbers do not depend on the thread count. Without `-t` it follows the
/// machine's load, so a run resumed in another process (the test above) must not see other
/// bits: products split by thread count once made it fail in CI.
#[test]
fn losses_do_not_depend_on_the_thread_count() {
    let mut runs = Vec::new();
    for threads in ["1", "2", "3"] {
        let h = home_with_model();
        let d = write_data(h.path(), "text.jsonl", TEXT);
        let o = run(small_train(h.path(), &d, 3).args(["-t", threads]), true);
        runs.push(losses(&last_json(&o)));
    }
    eprintln!("1, 2, 3 threads: {runs:?}");
    assert_eq!(runs[0].len(), 3);
    assert_eq!(runs[0], runs[1], "1 and 2 threads differ");
    assert_eq!(runs[0], runs[2], "1 and 3 threads differ");
}

/// Spawns a long training run and waits until it has finished at least one step (the
/// checkpoint file appears). The caller waits for the child.
#[allow(clippy::zombie_processes)]
fn spawn_until_checkpoint(home: &Path, data: &Path) -> std::process::Child {
    let child = small_train(home, data, 200)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let found = std::fs::read_dir(home.join("adapters"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint"))
            })
            .unwrap_or(false);
        if found {
            return child;
        }
        if Instant::now() > deadline {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            panic!("no checkpoint appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigint_checkpoints_within_two_seconds_and_sigkill_keeps_the_previous_adapter() {
    let home = home_with_model();
    let data = write_data(home.path(), "text.jsonl", TEXT);
    // A first adapter, v1.
    run(&mut small_train(home.path(), &data, 2), true);
    // SIGINT: exits within 2 s with a checkpoint.
    let child = spawn_until_checkpoint(home.path(), &data);
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    eprintln!("SIGINT to exit: {:.2} s", took.as_secs_f64());
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        stderr(&out).contains("interrupted at step"),
        "{}",
        stderr(&out)
    );
    // SIGKILL at an arbitrary moment of the resumed run.
    let child = spawn_until_checkpoint(home.path(), &data);
    std::thread::sleep(Duration::from_millis(2300));
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    let l = run(hone(home.path()).args(["adapters", "list", "--json"]), true);
    let rows: Vec<serde_json::Value> = stdout(&l)
        .lines()
        .map(|x| serde_json::from_str(x).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["active"], true);
    let a = ask(home.path(), "Hello", false);
    assert_eq!(a["adapter"], "1");
    let store = hone::store::Store::open(&home.path().join("hone.db")).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    // The checkpoint left by the kill is loadable: the run resumes and finishes.
    let c = hone::train::Trainer::read_state(
        &std::fs::read_dir(home.path().join("adapters"))
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("checkpoint"))
            .unwrap()
            .path(),
    );
    assert!(c.is_ok(), "{:?}", c.err());
}

#[test]
fn exports_gguf_and_peft_and_refuses_another_models_adapter() {
    use candle_core::quantized::gguf_file;
    let home = home_with_model();
    let data = write_data(home.path(), "text.jsonl", TEXT);
    run(&mut small_train(home.path(), &data, 1), true);
    let out = home.path().join("a.gguf");
    run(
        hone(home.path())
            .args(["adapters", "export", "--format", "gguf", "--out"])
            .arg(&out),
        true,
    );
    let mut f = std::fs::File::open(&out).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let s = |k: &str| c.metadata[k].to_string().unwrap().clone();
    assert_eq!(s("general.type"), "adapter");
    assert_eq!(s("general.architecture"), "llama");
    assert_eq!(s("adapter.type"), "lora");
    assert_eq!(c.metadata["adapter.lora.alpha"].to_f32().unwrap(), 16.0);
    // 6 layers x 7 projections x (A, B); candle shapes are ggml's reversed.
    assert_eq!(c.tensor_infos.len(), 6 * 7 * 2);
    let a = &c.tensor_infos["blk.29.attn_q.weight.lora_a"];
    assert_eq!(a.shape.dims(), &[4, 576]); // ggml [n_in=576, r=4]
    let b = &c.tensor_infos["blk.29.attn_k.weight.lora_b"];
    assert_eq!(b.shape.dims(), &[192, 4]); // ggml [r=4, n_out=192]
    let b = &c.tensor_infos["blk.24.ffn_down.weight.lora_b"];
    assert_eq!(b.shape.dims(), &[576, 4]);
    assert!(!c.tensor_infos.contains_key("blk.23.attn_q.weight.lora_a"));
    // PEFT.
    let peft = home.path().join("peft");
    run(
        hone(home.path())
            .args(["adapters", "export", "1", "--format", "peft", "--out"])
            .arg(&peft),
        true,
    );
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(conf["peft_type"], "LORA");
    assert_eq!(conf["r"], 4);
    assert_eq!(conf["lora_alpha"], 16.0);
    assert_eq!(
        conf["layers_to_transform"],
        serde_json::json!([24, 25, 26, 27, 28, 29])
    );
    let (t, _) = hone::lora::read_safetensors(&peft.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        t["base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight"].dims(),
        &[4, 576]
    );
    assert_eq!(
        t["base_model.model.model.layers.29.mlp.up_proj.lora_B.weight"].dims(),
        &[1536, 4]
    );
    // Another model: the adapter is refused with a clear message.
    let qwen = common::model_path("qwen2.5-coder-0.5b-instruct");
    let o = run(
        hone(home.path())
            .args(["--model"])
            .arg(&qwen)
            .args(["adapters", "export", "1", "--format", "gguf", "--out"])
            .arg(home.path().join("b.gguf")),
        false,
    );
    let e = stderr(&o);
    assert!(
        e.contains("trained for smollm2-135m-instruct") && e.contains("not for the model in use"),
        "{e}"
    );
}

/// The training forward pass (fused ops, quantised matmul op, packed positions) gives the same
/// loss as the inference forward pass on the real model.
#[test]
fn training_forward_matches_inference_on_the_real_model() {
    use hone::engine::{Engine, LoadOptions};
    use hone::model::{Logits, Model};
    let path = common::default_model();
    let mut engine = Engine::load("smol", &path, &LoadOptions::default()).unwrap();
    let ds = hone::train::data::synthetic(&engine.tokenizer, 1, 96, 3);
    let seq = &ds.seqs[0];
    let train = hone::train::forward::loss(&engine.model, seq, None, 1.0 / 96.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    engine.reset();
    let logits = engine.model.forward(&seq.tokens, Logits::All).unwrap();
    let lsm = Model::log_softmax(&logits)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let inf: f32 = lsm
        .iter()
        .zip(&seq.targets)
        .map(|(row, &t)| -row[t as usize])
        .sum::<f32>()
        / 96.0;
    eprintln!("mean loss: training forward {train:.6}, inference forward {inf:.6}");
    assert!((train - inf).abs() < 2e-3 * inf.abs(), "{train} vs {inf}");
}

/// The planner keeps the measured peak under the budget, and refuses a budget nothing fits in
/// with a message saying what would.
#[test]
fn memory_budget_is_kept_or_refused_with_what_fits() {
    let home = home_with_model();
    let data = write_data(home.path(), "text.jsonl", TEXT);
    let o = run(
        hone(home.path())
            .args([
                "train",
                "--json",
                "--max-steps",
                "2",
                "--max-memory",
                "350MiB",
                "--data",
            ])
            .arg(&data),
        true,
    );
    let j = last_json(&o);
    let j = serde_json::json!({"peak_rss_mb": j["peak_rss_mb"], "estimate_mb": j["estimate_mb"],
        "micro_batch": j["micro_batch"], "checkpointing": j["checkpointing"], "layers": j["layers"]});
    let peak = j["peak_rss_mb"].as_f64().unwrap();
    let est = j["estimate_mb"].as_f64().unwrap();
    eprintln!("budget 350 MiB: estimate {est:.0} MiB, measured peak {peak:.0} MiB, plan {j}");
    assert!(est <= 350.0 && peak <= 350.0, "estimate {est}, peak {peak}");
    let o = run(
        hone(home.path())
            .args([
                "train",
                "--max-steps",
                "2",
                "--max-memory",
                "120MiB",
                "--data",
            ])
            .arg(&data),
        false,
    );
    let e = stderr(&o);
    assert!(
        e.contains("does not fit in 120 MiB") && e.contains("raise --max-memory to at least"),
        "{e}"
    );
}
