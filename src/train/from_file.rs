//! `hone train`'s run: a JSONL file of examples becomes a planned, packed [`TrainJob`] on the
//! chosen model, resumed from its checkpoint when an unfinished run of the same model is found.
//!
//! It also renders what `hone train` says about the run (the plan before, the interruption,
//! the result), for the command line to print.
//!
//! It must not print or handle signals (the CLI does), and it does not gate: the version a
//! finished run saves is activated, as the user asked for it by hand.

use super::data;
use super::job::Finished;
use super::job::{self, BadCheckpoint, JobSpec, TrainJob};
use super::optim::Decay;
use super::plan::{Plan, PlanRequest};
use super::{AdamWParamsCfg, TrainConfig};
use crate::adapters::{self, ModelId};
use crate::engine::Engine;
use crate::home::Home;
use crate::lora::{LoraConfig, Target};
use crate::registry::ModelChoice;
use crate::store::Store;
use crate::units::mib;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// What `hone train` was asked for.
#[derive(Debug, Clone)]
pub struct FileOptions {
    pub data: PathBuf,
    pub max_steps: Option<usize>,
    pub epochs: Option<usize>,
    pub rank: usize,
    pub alpha: f32,
    pub lr: f64,
    pub warmup: Option<usize>,
    pub decay: Decay,
    pub layers: Option<usize>,
    pub targets: Vec<Target>,
    pub budget: Option<u64>,
    pub seq_len: Option<usize>,
    pub batch: Option<usize>,
    pub accum: usize,
    pub checkpointing: Option<bool>,
    pub clip: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Checkpoint every N steps (and every two minutes).
    pub save_every: usize,
    /// Drop an unfinished run's checkpoint and start again.
    pub fresh: bool,
}

/// A prepared run: the job and what it was planned as.
pub struct FileRun<'m> {
    pub job: TrainJob<'m>,
    pub plan: Plan,
    pub model: ModelId,
}

/// The context length to load the model with: the examples decide the sequence length later
/// (no longer than needed, at most 512 unless asked).
pub fn load_ctx(o: &FileOptions) -> usize {
    o.seq_len.unwrap_or(512).max(64)
}

/// Loads the model `choice` on `backend` for the run `o` (with the context [`load_ctx`] gives,
/// no adapter).
pub fn load_engine(
    choice: &ModelChoice,
    o: &FileOptions,
    backend: crate::engine::Backend,
) -> Result<Engine> {
    let opts = crate::engine::LoadOptions {
        ctx: load_ctx(o),
        backend,
        ..crate::engine::LoadOptions::default()
    };
    Engine::load(&choice.name, &choice.path, &opts)
        .with_context(|| format!("loading model {}", choice.name))
}

/// Reads, plans and packs `o.data` for `engine`'s model (loaded without an adapter), and
/// resumes or starts the run.
pub fn prepare<'m>(
    home: &Home,
    store: &Store,
    choice: &ModelChoice,
    engine: &'m Engine,
    o: &FileOptions,
) -> Result<FileRun<'m>> {
    let mcfg = engine.model.cfg.clone();
    let model_bytes = std::fs::metadata(&choice.path)
        .map(|m| m.len())
        .unwrap_or(0);
    // The same system message `hone ask` uses, so training and asking see the same prompt.
    let system = choice.chat_defaults().system;
    let (examples, data_sha) = data::read_jsonl(&engine.codec(), &o.data, system.as_deref())?;
    let longest = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(16);
    let seq_len = o
        .seq_len
        .unwrap_or_else(|| longest.div_ceil(16).max(1) * 16)
        .min(o.seq_len.unwrap_or(512));
    let req = PlanRequest {
        budget: o.budget,
        seq_len: Some(seq_len),
        micro_batch: o.batch,
        layers: o.layers,
        checkpointing: o.checkpointing,
        rank: o.rank,
        targets: o.targets.clone(),
        model_bytes,
        cache_seqs: 0,
        // There are at most as many packed sequences as examples.
        max_micro_batch: Some(examples.len()),
    };
    let name = o
        .data
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| o.data.display().to_string());
    let packed = job::plan_and_pack(&mcfg, &req, &engine.codec(), &name, &examples, data_sha)?;
    let p = packed.plan;
    let model = adapters::model_id(store, choice, &mcfg.arch_name)?;
    let lora = LoraConfig::top_layers(o.rank, o.alpha, o.targets.clone(), mcfg.n_layers, p.layers)?;
    let mut cfg = TrainConfig {
        lora,
        lr: o.lr,
        min_lr_ratio: 0.1,
        warmup: 0,
        decay: o.decay,
        adamw: AdamWParamsCfg {
            weight_decay: o.weight_decay,
            ..AdamWParamsCfg::default()
        },
        clip: o.clip,
        seq_len: p.seq_len,
        micro_batch: p.micro_batch,
        accum: o.accum.max(1),
        steps: 1,
        seed: o.seed,
        checkpointing: p.checkpointing,
        skip_learned: 0.0,
    };
    cfg.steps = match (o.max_steps, o.epochs) {
        (Some(s), _) => s.max(1),
        (None, e) => cfg.steps_for_epochs(packed.data.seqs.len(), e.unwrap_or(3)),
    };
    cfg.warmup = o.warmup.unwrap_or((cfg.steps / 10).min(20));
    let checkpoint = adapters::adapters_dir(home).join(format!(
        "checkpoint-{}.safetensors",
        &model.sha256[..12.min(model.sha256.len())]
    ));
    if o.fresh && checkpoint.exists() {
        std::fs::remove_file(&checkpoint)
            .with_context(|| format!("removing {}", checkpoint.display()))?;
    }
    let job = TrainJob::start(
        &engine.model,
        &model.sha256,
        JobSpec {
            cfg,
            data: packed.data,
            cache_limit: packed.cache_limit,
            checkpoint,
            init: None,
            bad_checkpoint: BadCheckpoint::Fail,
            save_every_steps: Some(o.save_every.max(1)),
            save_every: Duration::from_secs(120),
        },
    )?;
    Ok(FileRun {
        job,
        plan: p,
        model,
    })
}

impl FileRun<'_> {
    /// What `hone train` says on standard error before training `model_name` (a resumed run's
    /// step first, then the data, the LoRA, the steps and the plan's memory within `budget`).
    pub fn describe(&self, model_name: &str, budget: Option<u64>) -> String {
        let tr = &self.job.trainer;
        let cfg = &tr.cfg;
        let mut s = String::new();
        if let Some(step) = self.job.resumed_at {
            s += &format!(
                "resuming the unfinished run at step {step}/{} ({})\n",
                cfg.steps,
                self.job.checkpoint().display()
            );
        }
        s += &format!(
            "training {model_name} on {}: LoRA r={} alpha={} on {} of the top {} layers ({} parameters), {} steps of {}x{} tokens x{} accum, {}checkpointing; plan ~{:.0} MiB{}\n",
            tr.data().description,
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.lora.targets_string(),
            cfg.lora.layers.len(),
            tr.lora().param_count(),
            cfg.steps,
            cfg.micro_batch,
            cfg.seq_len,
            cfg.accum,
            if cfg.checkpointing { "" } else { "no " },
            mib(self.plan.estimate),
            budget.map(|b| format!(" (budget {:.0} MiB)", mib(b))).unwrap_or_default()
        );
        s
    }

    /// The line for standard error after an interruption (the checkpoint is saved).
    pub fn interrupted_text(&self) -> String {
        let tr = &self.job.trainer;
        format!(
            "interrupted at step {}/{}: saved {}; run the same command again to resume\n",
            tr.step,
            tr.cfg.steps,
            self.job.checkpoint().display()
        )
    }

    /// `hone train --json` after an interruption.
    pub fn interrupted_json(&self) -> Value {
        let tr = &self.job.trainer;
        json!({"interrupted": true, "step": tr.step, "steps": tr.cfg.steps,
               "losses": tr.losses, "checkpoint": self.job.checkpoint()})
    }

    /// Saves the finished run as the new active version (its parent the version active until
    /// now) and removes its checkpoint.
    pub fn finish(self, home: &Home, store: &mut Store) -> Result<FileDone> {
        let parent = store.active_adapter(&self.model.sha256)?.map(|r| r.version);
        let cfg = self.job.trainer.cfg.clone();
        let description = self.job.trainer.data().description.clone();
        let done = self
            .job
            .finish(home, store, &self.model, parent, description, true)?;
        done.clear_checkpoint();
        Ok(FileDone {
            parent,
            cfg,
            estimate: self.plan.estimate,
            peak_rss: crate::sys::peak_rss_bytes().unwrap_or(0),
            done,
        })
    }
}

/// A finished `hone train` run: the new active version and how it went.
pub struct FileDone {
    pub done: Finished,
    /// The version that was active before.
    pub parent: Option<i64>,
    pub cfg: TrainConfig,
    /// The plan's memory estimate, bytes.
    pub estimate: u64,
    /// The process's peak RSS, bytes.
    pub peak_rss: u64,
}

impl FileDone {
    fn first_last(&self) -> (f32, f32) {
        let l = &self.done.losses;
        (
            l.first().copied().unwrap_or(0.0),
            l.last().copied().unwrap_or(0.0),
        )
    }

    fn tokens_per_s(&self) -> f64 {
        self.done.tokens as f64 / self.done.seconds.max(1e-9)
    }

    /// `hone train --json`'s object.
    pub fn to_json(&self) -> Value {
        let (d, cfg) = (&self.done, &self.cfg);
        let (first, last) = self.first_last();
        json!({"version": d.version, "parent": self.parent, "steps": d.steps, "loss_first": first,
               "loss_last": last, "losses": d.losses, "train_tps": self.tokens_per_s(),
               "peak_rss_mb": mib(self.peak_rss), "seconds": d.seconds, "seq_len": cfg.seq_len,
               "micro_batch": cfg.micro_batch, "layers": cfg.lora.layers.len(),
               "checkpointing": cfg.checkpointing, "estimate_mb": mib(self.estimate)})
    }
}

impl std::fmt::Display for FileDone {
    /// `hone train`'s last line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (first, last) = self.first_last();
        write!(
            f,
            "adapter v{} is active: {} steps, loss {first:.4} -> {last:.4}, {:.0} tokens/s, peak RSS {:.0} MiB",
            self.done.version,
            self.done.steps,
            self.tokens_per_s(),
            mib(self.peak_rss)
        )
    }
}
