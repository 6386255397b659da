//! LoRA training on the CPU over the frozen quantised model: the trainer (micro-batches,
//! gradient accumulation, clipping, AdamW, the learning-rate schedule, a deterministic data
//! order from a seed), checkpoints that resume a run exactly, and the memory planner.
//!
//! The backward pass runs layer by layer: each adapted layer's input is kept (or its whole graph,
//! without activation checkpointing), and the gradient flows from the loss down to the lowest
//! adapted layer and stops there. Layers below it are frozen and see the same input every epoch,
//! so their output is computed once per sequence and cached.
//!
//! The trainer must not touch the database or the terminal (callers get progress through a
//! callback), and it never changes the base model's weights; [`job`] is the one place that
//! turns a run into a saved adapter version.

pub mod backward;
pub mod data;
pub mod forward;
pub mod from_file;
pub mod job;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod qmatmul;

use crate::lora::{LoraConfig, LoraError, LoraWeights, Target};
use crate::model::Model;
use candle_core::{Tensor, Var};
use data::Dataset;
use forward::{Aux, Batch};
use optim::{AdamW, AdamWParams, Decay};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training compute: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("{0}")]
    Checkpoint(String),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// A NaN or infinite loss, gradient or weight: the run stops, nothing is saved from it.
    #[error("{0}; the run stopped without saving an adapter and the previous adapter stays active (try a smaller --lr)")]
    NonFinite(String),
}

type Result<T> = std::result::Result<T, TrainError>;

/// Everything that decides what a run computes (saved in checkpoints: a resume must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup: usize,
    pub decay: Decay,
    pub adamw: AdamWParamsCfg,
    /// Global gradient-norm clip (0 = none).
    pub clip: f64,
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per optimiser step.
    pub accum: usize,
    /// Optimiser steps in the run.
    pub steps: usize,
    pub seed: u64,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub checkpointing: bool,
    /// Spend less on what is learned: a sequence whose loss, the last time it was trained, was
    /// below this (nats per target position) is skipped when it next comes up, at most
    /// [`MAX_SKIPS`] times in a row, then trained (and measured) again. A sequence whose every
    /// target is a distribution (the base model's own answers that anchor general behaviour)
    /// cannot go below that distribution's entropy: it counts as learned while its loss stays
    /// within this of the loss it had the first time it was trained in the run (it is holding;
    /// what it guards against is a rise). 0 = train everything.
    #[serde(default)]
    pub skip_learned: f32,
}

/// How many times in a row a learned sequence may be skipped before it is trained again, so an
/// item the later updates make it forget is seen (and measured) at least every third pass.
pub const MAX_SKIPS: u8 = 2;

/// AdamW hyper-parameters, comparable (for the resume check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWParamsCfg {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParamsCfg {
    fn default() -> Self {
        let d = AdamWParams::default();
        Self {
            beta1: d.beta1,
            beta2: d.beta2,
            eps: d.eps,
            weight_decay: d.weight_decay,
        }
    }
}

impl TrainConfig {
    /// Sequences consumed per optimiser step.
    pub fn seqs_per_step(&self) -> usize {
        self.micro_batch.max(1) * self.accum.max(1)
    }

    /// Steps for `epochs` passes over `n_seqs` sequences.
    pub fn steps_for_epochs(&self, n_seqs: usize, epochs: usize) -> usize {
        (n_seqs * epochs).div_ceil(self.seqs_per_step()).max(1)
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    /// Token positions processed in this step (forward and backward).
    pub tokens: usize,
    pub seconds: f64,
    pub peak_rss: u64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped by the cancel flag; the state is that of the last complete step.
    Interrupted,
}

/// The saved state of a run (checkpoint metadata).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub config: TrainConfig,
    pub step: usize,
    pub adam_t: u64,
    pub losses: Vec<f32>,
    pub tokens_done: u64,
    pub seconds: f64,
    pub data_sha256: String,
    pub model_sha256: String,
    /// Per sequence: its loss the last time it was trained (negative: not yet), the first time,
    /// and how many times in a row it has been skipped since ([`TrainConfig::skip_learned`]).
    #[serde(default)]
    pub seq_loss: Vec<f32>,
    #[serde(default)]
    pub seq_first: Vec<f32>,
    #[serde(default)]
    pub seq_skips: Vec<u8>,
    /// Sequences skipped as learned so far.
    #[serde(default)]
    pub skipped: u64,
}

pub struct Trainer<'m> {
    model: &'m Model,
    pub cfg: TrainConfig,
    vars: Vec<((usize, Target), Var, Var)>,
    lora: LoraWeights,
    opt: AdamW,
    data: Dataset,
    pub step: usize,
    pub losses: Vec<f32>,
    pub tokens_done: u64,
    pub seconds: f64,
    pub model_sha256: String,
    perm: Option<(usize, Vec<usize>)>,
    /// Per sequence: its loss when last trained and when first trained (negative: never), its
    /// skips in a row, and whether every one of its targets is a distribution (an anchor).
    seq_loss: Vec<f32>,
    seq_first: Vec<f32>,
    seq_skips: Vec<u8>,
    seq_soft: Vec<bool>,
    /// Sequences skipped as learned so far ([`TrainConfig::skip_learned`]).
    pub skipped: u64,
    cache: HashMap<usize, Tensor>,
    cache_bytes: u64,
    /// Bytes of frozen-layer outputs the trainer may keep (0 = recompute every time).
    pub cache_limit: u64,
}

impl<'m> Trainer<'m> {
    /// A fresh run: adapters initialised from the seed (B = 0).
    pub fn new(
        model: &'m Model,
        cfg: TrainConfig,
        data: Dataset,
        model_sha256: &str,
    ) -> Result<Self> {
        let init = LoraWeights::init(&cfg.lora, &model.cfg, cfg.seed)?;
        Self::from_weights(model, cfg, data, init, model_sha256)
    }

    /// A run starting from given adapter weights (e.g. continuing the active adapter).
    pub fn from_weights(
        model: &'m Model,
        cfg: TrainConfig,
        data: Dataset,
        init: LoraWeights,
        model_sha256: &str,
    ) -> Result<Self> {
        if cfg.lora != init.cfg {
            return Err(TrainError::Checkpoint(
                "the starting adapter has another configuration".into(),
            ));
        }
        init.check_shapes(&model.cfg)?;
        let mut vars = Vec::new();
        let mut pairs = BTreeMap::new();
        for (k, p) in &init.pairs {
            let a = Var::from_tensor(&p.a.copy()?)?;
            let b = Var::from_tensor(&p.b.copy()?)?;
            pairs.insert(
                *k,
                crate::lora::LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                },
            );
            vars.push((*k, a, b));
        }
        let sizes: Vec<usize> = vars
            .iter()
            .flat_map(|(_, a, b)| [a.elem_count(), b.elem_count()])
            .collect();
        let a = &cfg.adamw;
        let opt = AdamW::new(
            AdamWParams {
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
                weight_decay: a.weight_decay,
            },
            &sizes,
        );
        let n_seqs = data.seqs.len();
        let seq_soft = data
            .seqs
            .iter()
            .map(|b| {
                let weighted = b.weights.iter().filter(|w| **w > 0.0).count();
                weighted > 0 && b.soft.len() >= weighted
            })
            .collect();
        Ok(Self {
            model,
            lora: LoraWeights {
                cfg: cfg.lora.clone(),
                pairs,
                prepared: BTreeMap::new(),
            },
            cfg,
            vars,
            opt,
            data,
            step: 0,
            losses: Vec::new(),
            tokens_done: 0,
            seconds: 0.0,
            model_sha256: model_sha256.to_string(),
            perm: None,
            seq_loss: vec![-1.0; n_seqs],
            seq_first: vec![-1.0; n_seqs],
            seq_skips: vec![0; n_seqs],
            seq_soft,
            skipped: 0,
            cache: HashMap::new(),
            cache_bytes: 0,
            cache_limit: 0,
        })
    }

    pub fn data(&self) -> &Dataset {
        &self.data
    }

    /// A detached copy of the current adapter weights.
    pub fn weights(&self) -> Result<LoraWeights> {
        let mut pairs = BTreeMap::new();
        for (k, a, b) in &self.vars {
            pairs.insert(
                *k,
                crate::lora::LoraPair {
                    a: a.as_tensor().detach().copy()?,
                    b: b.as_tensor().detach().copy()?,
                },
            );
        }
        Ok(LoraWeights {
            cfg: self.cfg.lora.clone(),
            pairs,
            prepared: BTreeMap::new(),
        })
    }

    /// The adapters being trained (sharing storage with the parameters).
    pub fn lora(&self) -> &LoraWeights {
        &self.lora
    }

    /// The trainable parameters in order (A then B of each adapted projection).
    pub fn params(&self) -> Vec<&Var> {
        self.vars.iter().flat_map(|(_, a, b)| [a, b]).collect()
    }

    /// Loss (weights normalised by `norm`) and gradients of every parameter for the given
    /// sequences, through the same layer-by-layer backward pass that training uses.
    pub fn gradients(&mut self, seq_ids: &[usize], norm: f32) -> Result<(f32, Vec<Vec<f32>>)> {
        let mut grads: Vec<Vec<f32>> = self
            .vars
            .iter()
            .flat_map(|(_, a, b)| [vec![0f32; a.elem_count()], vec![0f32; b.elem_count()]])
            .collect();
        let never = AtomicBool::new(false);
        let mut loss = 0f32;
        for mb in seq_ids.chunks(self.cfg.micro_batch.max(1)) {
            loss += self
                .fwd_bwd(mb, norm, &mut grads, &never)?
                .ok_or_else(|| TrainError::Checkpoint("cancelled".into()))?
                .0;
        }
        Ok((loss, grads))
    }

    /// The data set's sequence used at position `k` of the training stream.
    pub fn stream_seq(&mut self, k: usize) -> usize {
        self.seq_at(k)
    }

    /// The sequence at position `k` of the data stream (epochs shuffled from the seed).
    fn seq_at(&mut self, k: usize) -> usize {
        let n = self.data.seqs.len();
        let epoch = k / n;
        let fresh = !matches!(&self.perm, Some((e, _)) if *e == epoch);
        if fresh {
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            order.shuffle(&mut rng);
            self.perm = Some((epoch, order));
        }
        match &self.perm {
            Some((_, order)) => order[k % n],
            None => k % n,
        }
    }

    /// Runs steps until the configured total, calling `on_step` after each. Setting `cancel`
    /// abandons the current step (within one layer's work) and returns `Interrupted`.
    pub fn run(
        &mut self,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(&StepReport, &Trainer<'_>) -> Result<()>,
    ) -> Result<Outcome> {
        self.run_until(self.cfg.steps, cancel, on_step)
    }

    /// Like [`Trainer::run`], but stops after step `until` (at most the configured total), so a
    /// caller can look at the adapter between stretches of training; the learning-rate schedule
    /// stays that of the whole run.
    pub fn run_until(
        &mut self,
        until: usize,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(&StepReport, &Trainer<'_>) -> Result<()>,
    ) -> Result<Outcome> {
        while self.step < until.min(self.cfg.steps) {
            if cancel.load(Ordering::Relaxed) {
                return Ok(Outcome::Interrupted);
            }
            let t0 = Instant::now();
            let Some((loss, norm, lr, tokens)) = self.train_step(cancel)? else {
                return Ok(Outcome::Interrupted);
            };
            let dt = t0.elapsed().as_secs_f64();
            self.seconds += dt;
            let report = StepReport {
                step: self.step,
                steps: self.cfg.steps,
                loss,
                lr,
                grad_norm: norm,
                tokens,
                seconds: dt,
                peak_rss: crate::sys::peak_rss_bytes().unwrap_or(0),
            };
            on_step(&report, self)?;
        }
        Ok(Outcome::Finished)
    }

    /// One optimiser step; None when cancelled (nothing changed).
    #[allow(clippy::type_complexity)]
    pub fn train_step(&mut self, cancel: &AtomicBool) -> Result<Option<(f32, f64, f64, usize)>> {
        let per = self.cfg.seqs_per_step();
        let start = self.step * per;
        let all: Vec<usize> = (start..start + per).map(|k| self.seq_at(k)).collect();
        let weight = |tr: &Self, i: usize| tr.data.seqs[i].weights.iter().sum::<f32>();
        let total_w: f32 = all.iter().map(|&i| weight(self, i)).sum();
        // The step's normaliser counts the skipped sequences too, so a trained one weighs what
        // it would weigh in the full step: skipping drops only the (small) gradients of what is
        // already learned.
        let norm = 1.0 / total_w.max(1.0);
        let (skip, ids): (Vec<usize>, Vec<usize>) = all.iter().partition(|&&i| self.is_learned(i));
        // What the skipped sequences would add to the step's loss, at their last measured loss.
        let mut loss: f32 = skip
            .iter()
            .map(|&i| self.seq_loss[i] * weight(self, i) * norm)
            .sum();
        let mut grads: Vec<Vec<f32>> = self
            .vars
            .iter()
            .flat_map(|(_, a, b)| [vec![0f32; a.elem_count()], vec![0f32; b.elem_count()]])
            .collect();
        let mut tokens = 0usize;
        let mut measured = Vec::with_capacity(ids.len());
        for mb in ids.chunks(self.cfg.micro_batch.max(1)) {
            match self.fwd_bwd(mb, norm, &mut grads, cancel)? {
                Some((l, rows)) => {
                    loss += l;
                    measured.extend(mb.iter().copied().zip(rows));
                }
                None => return Ok(None),
            }
            tokens += mb.len() * self.cfg.seq_len;
        }
        // The step completes from here on (or fails): its bookkeeping can be applied.
        for &i in &skip {
            self.seq_skips[i] = self.seq_skips[i].saturating_add(1);
        }
        self.skipped += skip.len() as u64;
        for (i, l) in measured {
            self.seq_skips[i] = 0;
            // A sequence with no target positions has nothing to learn: it counts as learned.
            self.seq_loss[i] = l.unwrap_or(0.0);
            if self.seq_first[i] < 0.0 {
                self.seq_first[i] = self.seq_loss[i];
            }
        }
        let lr = optim::lr_at(
            self.cfg.lr,
            self.cfg.min_lr_ratio,
            self.cfg.warmup,
            self.cfg.steps,
            self.cfg.decay,
            self.step,
        );
        if ids.is_empty() {
            // Everything in this step was learned: no update, the schedule moves on.
            self.step += 1;
            self.losses.push(loss);
            return Ok(Some((loss, 0.0, lr, 0)));
        }
        let gnorm = optim::clip_global_norm(&mut grads, self.cfg.clip);
        if !loss.is_finite() || !gnorm.is_finite() {
            return Err(TrainError::NonFinite(format!(
                "training diverged at step {}: the loss is {loss} and the gradient norm {gnorm}",
                self.step + 1
            )));
        }
        let mut params: Vec<Vec<f32>> = Vec::with_capacity(grads.len());
        for (_, a, b) in &self.vars {
            params.push(a.flatten_all()?.to_vec1::<f32>()?);
            params.push(b.flatten_all()?.to_vec1::<f32>()?);
        }
        self.opt.step(&mut params, &grads, lr);
        if params.iter().flatten().any(|x| !x.is_finite()) {
            return Err(TrainError::NonFinite(format!(
                "training diverged at step {}: the update (learning rate {lr}) made a weight non-finite",
                self.step + 1
            )));
        }
        let mut it = params.into_iter();
        for (_, a, b) in &self.vars {
            for v in [a, b] {
                let p = it
                    .next()
                    .ok_or_else(|| TrainError::Checkpoint("parameter count changed".into()))?;
                v.set(&Tensor::from_vec(p, v.shape(), v.device())?)?;
            }
        }
        self.step += 1;
        self.losses.push(loss);
        self.tokens_done += tokens as u64;
        Ok(Some((loss, gnorm, lr, tokens)))
    }

    /// Whether sequence `i` is skipped when it next comes up ([`TrainConfig::skip_learned`]).
    fn is_learned(&self, i: usize) -> bool {
        let (l, t) = (self.seq_loss[i], self.cfg.skip_learned);
        let learned = if self.seq_soft[i] {
            // An anchor: holding where it started.
            l <= self.seq_first[i] + t
        } else {
            l < t
        };
        t > 0.0 && l >= 0.0 && learned && self.seq_skips[i] < MAX_SKIPS
    }

    /// The input of the lowest adapted layer for these sequences (frozen layers below it run
    /// once per sequence when the cache has room).
    fn frozen_input(&mut self, ids: &[usize], batch: &Batch, aux: &Aux) -> Result<Tensor> {
        let first = self.cfg.lora.first_layer();
        if ids.iter().all(|i| self.cache.contains_key(i)) {
            let parts: Vec<&Tensor> = ids.iter().filter_map(|i| self.cache.get(i)).collect();
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let mut x = forward::embed(self.model, batch)?;
        for li in 0..first {
            x = forward::layer_forward(self.model, li, &x, None, aux)?;
        }
        if first > 0 {
            let per = (x.elem_count() / ids.len().max(1) * 4) as u64;
            for (j, &i) in ids.iter().enumerate() {
                if self.cache_bytes + per <= self.cache_limit && !self.cache.contains_key(&i) {
                    self.cache.insert(i, x.narrow(0, j, 1)?.copy()?);
                    self.cache_bytes += per;
                }
            }
        }
        Ok(x)
    }

    /// Forward and backward of one micro-batch; adds its gradients (scaled by `norm`) to
    /// `grads` and returns its share of the loss and each sequence's mean loss (None: no target
    /// positions). None when cancelled.
    #[allow(clippy::type_complexity)]
    fn fwd_bwd(
        &mut self,
        ids: &[usize],
        norm: f32,
        grads: &mut [Vec<f32>],
        cancel: &AtomicBool,
    ) -> Result<Option<(f32, Vec<Option<f32>>)>> {
        let seqs: Vec<&Batch> = ids.iter().map(|&i| &self.data.seqs[i]).collect();
        let batch = data::stack(&seqs);
        let model = self.model;
        let aux = Aux::new(model, &batch)?;
        let first = self.cfg.lora.first_layer();
        let n_layers = model.cfg.n_layers;
        let mut x = self.frozen_input(ids, &batch, &aux)?;
        let lora = &self.lora;
        // Forward through the adapted layers, keeping each layer's input (checkpointing) or
        // what its backward needs (`train::backward`).
        let mut kept: Vec<(Tensor, Option<backward::Saved>)> = Vec::with_capacity(n_layers - first);
        for li in first..n_layers {
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let (y, saved) = backward::layer_fwd(model, li, &x, Some(lora), &aux)?;
            let input = std::mem::replace(&mut x, y);
            kept.push((input, (!self.cfg.checkpointing).then_some(saved)));
        }
        let xv = Var::from_tensor(&x)?;
        let (loss, rows) = match qmatmul::with_cancel(cancel, || {
            forward::head_loss_rows(model, xv.as_tensor(), &batch, norm)
        }) {
            Err(_) if cancel.load(Ordering::Relaxed) => return Ok(None),
            r => r?,
        };
        let loss_val = loss.to_scalar::<f32>()?;
        let store = loss.backward()?;
        let mut g = store
            .get(xv.as_tensor())
            .cloned()
            .ok_or_else(|| TrainError::Checkpoint("no gradient reached the head".into()))?;
        drop(store);
        drop(loss);
        let keys: Vec<(usize, Target)> = self.vars.iter().map(|(k, _, _)| *k).collect();
        let mut sink = backward::GradSink { keys: &keys, grads };
        // Backward, layer by layer from the top.
        for li in (first..n_layers).rev() {
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let (input, saved) = kept
                .pop()
                .ok_or_else(|| TrainError::Checkpoint("layer state missing".into()))?;
            let saved = match saved {
                Some(sv) => sv,
                None => backward::layer_fwd(model, li, &input, Some(lora), &aux)?.1,
            };
            g = backward::layer_bwd(model, li, Some(lora), &aux, &saved, &g, &mut sink)?;
        }
        Ok(Some((loss_val, rows)))
    }

    /// Saves the run (adapters, AdamW moments, step, losses) as one safetensors file,
    /// atomically (temp file, fsync, rename).
    pub fn save_checkpoint(&self, path: &Path) -> Result<u64> {
        let mut tensors = Vec::new();
        for (i, ((l, t), a, b)) in self.vars.iter().enumerate() {
            for (j, (v, w)) in [(a, 'a'), (b, 'b')].into_iter().enumerate() {
                let name = crate::lora::tensor_name(*l, *t, w);
                let shape = v.shape().clone();
                tensors.push((name.clone(), v.as_tensor().detach()));
                let m = &self.opt.m[2 * i + j];
                let vv = &self.opt.v[2 * i + j];
                tensors.push((
                    format!("adam_m.{name}"),
                    Tensor::from_slice(m, &shape, &candle_core::Device::Cpu)?,
                ));
                tensors.push((
                    format!("adam_v.{name}"),
                    Tensor::from_slice(vv, &shape, &candle_core::Device::Cpu)?,
                ));
            }
        }
        let state = RunState {
            config: self.cfg.clone(),
            step: self.step,
            adam_t: self.opt.t,
            losses: self.losses.clone(),
            tokens_done: self.tokens_done,
            seconds: self.seconds,
            data_sha256: self.data.sha256.clone(),
            model_sha256: self.model_sha256.clone(),
            seq_loss: self.seq_loss.clone(),
            seq_first: self.seq_first.clone(),
            seq_skips: self.seq_skips.clone(),
            skipped: self.skipped,
        };
        let mut meta = BTreeMap::new();
        meta.insert(
            "hone.checkpoint".to_string(),
            serde_json::to_string(&state).map_err(|e| TrainError::Checkpoint(e.to_string()))?,
        );
        Ok(crate::lora::write_safetensors(path, &tensors, &meta)?)
    }

    /// Reads a checkpoint's state without loading a model.
    pub fn read_state(path: &Path) -> Result<(RunState, BTreeMap<String, Tensor>)> {
        let (tensors, meta) = crate::lora::read_safetensors(path)?;
        let state: RunState = meta
            .get("hone.checkpoint")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                TrainError::Checkpoint(format!(
                    "{} is not a hone training checkpoint",
                    path.display()
                ))
            })?;
        Ok((state, tensors))
    }

    /// Resumes a run from a checkpoint; the configuration, data and model must be the same.
    pub fn resume(
        model: &'m Model,
        cfg: TrainConfig,
        data: Dataset,
        model_sha256: &str,
        path: &Path,
    ) -> Result<Self> {
        let (state, tensors) = Self::read_state(path)?;
        if state.config != cfg {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint {} was made with other settings; start a fresh run (--fresh) or use the same settings",
                path.display()
            )));
        }
        if state.data_sha256 != data.sha256 || state.model_sha256 != model_sha256 {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint {} was made on other data or another model; start a fresh run (--fresh)",
                path.display()
            )));
        }
        let w = LoraWeights::from_named(cfg.lora.clone(), &tensors)?;
        let mut tr = Self::from_weights(model, cfg, data, w, model_sha256)?;
        for (i, ((l, t), _, _)) in tr.vars.iter().enumerate() {
            for (j, w) in ['a', 'b'].into_iter().enumerate() {
                let name = crate::lora::tensor_name(*l, *t, w);
                for (pre, dst) in [("adam_m", &mut tr.opt.m), ("adam_v", &mut tr.opt.v)] {
                    let v = tensors
                        .get(&format!("{pre}.{name}"))
                        .ok_or_else(|| {
                            TrainError::Checkpoint(format!("checkpoint lacks {pre}.{name}"))
                        })?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    if v.len() != dst[2 * i + j].len() {
                        return Err(TrainError::Checkpoint(format!(
                            "{pre}.{name} has the wrong size"
                        )));
                    }
                    dst[2 * i + j] = v;
                }
            }
        }
        tr.opt.t = state.adam_t;
        tr.step = state.step;
        tr.losses = state.losses;
        tr.tokens_done = state.tokens_done;
        tr.seconds = state.seconds;
        // A checkpoint from before skipping was recorded has none: every sequence unmeasured.
        let n = tr.data.seqs.len();
        if [&state.seq_loss, &state.seq_first]
            .iter()
            .all(|v| v.len() == n)
            && state.seq_skips.len() == n
        {
            tr.seq_loss = state.seq_loss;
            tr.seq_first = state.seq_first;
            tr.seq_skips = state.seq_skips;
            tr.skipped = state.skipped;
        }
        Ok(tr)
    }
}
