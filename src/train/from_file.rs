//! `hone train`'s run: a JSONL file of examples becomes a planned, packed [`TrainJob`] on the
//! chosen model, resumed from its checkpoint when an unfinished run of the same model is found.
//!
//! It must not print or handle signals (the CLI does), and it does not gate: the version a
//! finished run saves is activated, as the user asked for it by hand.

use super::data;
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
use anyhow::{Context, Result};
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
