//! The differentiable forward pass used for training: the same transformer as `model`, over a
//! batch of packed sequences (positions restart and attention stays inside each packed example
//! and its shared prefix), built only from ops that have a backward in candle (basic ops,
//! `rms_norm_slow`, `softmax`, rotary embeddings written with basic ops) and the quantised ops of
//! `train::qmatmul`.
//!
//! It must not update weights or keep state between calls; it builds graphs and returns them.

use super::ops::{MaskedSoftmax, RmsNorm, Rope};
use super::qmatmul::{head_cross_entropy, qmatmul};
use crate::hparams::Arch;
use crate::lora::{LoraWeights, Target};
use crate::model::{Linear, Model};
use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

/// One micro-batch of `b` packed sequences of `s` tokens.
#[derive(Debug, Clone)]
pub struct Batch {
    pub b: usize,
    pub s: usize,
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    /// Loss weight of each position (0 where nothing is predicted).
    pub weights: Vec<f32>,
    pub positions: Vec<u32>,
    /// Packed example of each position; attention never crosses examples, except into a
    /// shared prefix ([`SHARED_SEGMENT`]), which every later position sees.
    pub segments: Vec<u32>,
    /// Positions whose loss is the cross-entropy against a distribution (token, probability)
    /// instead of `targets[p]` alone (distillation); their weight still comes from `weights`.
    pub soft: crate::codec::SoftTargets,
}

/// The segment of a sequence's shared prefix: every later position of the sequence may attend
/// to it (`train::data::pack` puts the opening its examples have in common there).
pub const SHARED_SEGMENT: u32 = u32::MAX;

/// Rotary tables and the attention mask for a batch: computed once, shared by all layers.
pub struct Aux {
    rope: Rope,
    allowed: Arc<Vec<bool>>,
}

impl Aux {
    pub fn new(model: &Model, batch: &Batch) -> Result<Self> {
        let cfg = &model.cfg;
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_base.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(batch.b * batch.s * half);
        let mut sin = Vec::with_capacity(cos.capacity());
        for &p in &batch.positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let (b, s) = (batch.b, batch.s);
        let mut allowed = vec![false; b * s * s];
        for bi in 0..b {
            let seg = &batch.segments[bi * s..(bi + 1) * s];
            for i in 0..s {
                for j in 0..=i {
                    allowed[bi * s * s + i * s + j] = seg[i] == seg[j] || seg[j] == SHARED_SEGMENT;
                }
            }
        }
        Ok(Self {
            rope: Rope {
                cos: Arc::new(cos),
                sin: Arc::new(sin),
                interleaved: cfg.arch == Arch::Llama,
            },
            allowed: Arc::new(allowed),
        })
    }
}

impl Aux {
    /// The rotary embedding op for this batch.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The masked, scaled softmax of attention scores over `s` positions, head size `hd`.
    pub fn softmax(&self, s: usize, hd: usize) -> MaskedSoftmax {
        MaskedSoftmax {
            allowed: self.allowed.clone(),
            s,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }
}

fn rope(x: &Tensor, aux: &Aux) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: aux.rope.cos.clone(),
        sin: aux.rope.sin.clone(),
        interleaved: aux.rope.interleaved,
    })
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let w = w.flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?.apply_op1(RmsNorm { w, eps })
}

fn proj(
    lin: &Linear,
    lora: Option<&LoraWeights>,
    layer: usize,
    t: Target,
    x: &Tensor,
) -> Result<Tensor> {
    let mut y = qmatmul(x, &lin.w.q)?;
    if let Some(b) = &lin.b {
        y = y.broadcast_add(b)?;
    }
    lora_add(lora, layer, t, x, y)
}

fn lora_add(
    lora: Option<&LoraWeights>,
    layer: usize,
    t: Target,
    x: &Tensor,
    y: Tensor,
) -> Result<Tensor> {
    match lora {
        None => Ok(y),
        Some(l) => l.apply(layer, t, x, y).map_err(|e| match e {
            crate::lora::LoraError::Candle(c) => c,
            e => candle_core::Error::Msg(e.to_string()),
        }),
    }
}

/// Token embeddings (b, s, dim); no gradient (the embedding is frozen).
pub fn embed(model: &Model, batch: &Batch) -> Result<Tensor> {
    // Row by row from the quantised table (candle's quantised embedding would start its spinning
    // worker pool, which then competes with the matrix products for the cores).
    let (rows, d) = model.embed.shape().dims2()?;
    let mut out = Vec::with_capacity(batch.tokens.len() * d);
    for &t in &batch.tokens {
        let t = t as usize;
        if t >= rows {
            candle_core::bail!("token {t} is outside the vocabulary of {rows}");
        }
        out.extend(
            super::qmatmul::dequantize_rows(&model.embed, t, t + 1)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Tensor::from_vec(out, (batch.b, batch.s, d), &Device::Cpu)
}

/// Layer `li` of the model on `x` (b, s, dim), with the adapters of `lora` (if any).
pub fn layer_forward(
    model: &Model,
    li: usize,
    x: &Tensor,
    lora: Option<&LoraWeights>,
    aux: &Aux,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let layer = &model.layers[li];
    let (b, s, _) = x.dims3()?;
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let n_rep = nh / nkv;
    let eps = cfg.eps as f32;
    let h = rms_norm(x, &layer.attn_norm, eps)?;
    let q = proj(&layer.q, lora, li, Target::Q, &h)?;
    let k = proj(&layer.k, lora, li, Target::K, &h)?;
    let v = proj(&layer.v, lora, li, Target::V, &h)?;
    let q = q.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let k = k.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let v = v.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let q = rope(&q, aux)?;
    let k = rope(&k, aux)?;
    // Heads sharing a kv head are stacked as rows (head h uses kv head h / n_rep).
    let q = q.contiguous()?.reshape((b, nkv, n_rep * s, hd))?;
    let scale = 1.0 / (hd as f32).sqrt();
    let att = q.matmul(&k.t()?)?.apply_op1(MaskedSoftmax {
        allowed: aux.allowed.clone(),
        s,
        scale,
    })?;
    let y = att.matmul(&v)?;
    let y = y
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((b, s, nh * hd))?;
    let x = (x + proj(&layer.o, lora, li, Target::O, &y)?)?;
    let h = rms_norm(&x, &layer.ffn_norm, eps)?;
    let g = qmatmul(&h, &layer.gate.q)?;
    let g = lora_add(lora, li, Target::Gate, &h, g)?;
    let u = qmatmul(&h, &layer.up.q)?;
    let u = lora_add(lora, li, Target::Up, &h, u)?;
    let gu = super::ops::swiglu(&g, &u)?;
    let d = qmatmul(&gu, &layer.down.q)?;
    let d = lora_add(lora, li, Target::Down, &gu, d)?;
    x + d
}

/// The weighted loss `Σ w_i · CE_i` of the final hidden states `x` (b, s, dim); only positions
/// with a non-zero weight go through the output head.
pub fn head_loss(model: &Model, x: &Tensor, batch: &Batch, norm: f32) -> Result<Tensor> {
    Ok(head_loss_rows(model, x, batch, norm)?.0)
}

/// [`head_loss`], and for each of the batch's rows its mean loss per unit of weight (nats per
/// target position; `None` for a row with no weight), read from the same cross-entropies.
pub fn head_loss_rows(
    model: &Model,
    x: &Tensor,
    batch: &Batch,
    norm: f32,
) -> Result<(Tensor, Vec<Option<f32>>)> {
    let (b, s, d) = x.dims3()?;
    let x = x.reshape((b * s, d))?;
    // Each position with a weight goes through the head once; its entries (row, target,
    // weight) are one, or one per candidate of a position with soft targets (their gradients
    // add up in the head's backward).
    let soft: std::collections::HashMap<usize, &Vec<(u32, f32)>> =
        batch.soft.iter().map(|(p, dist)| (*p, dist)).collect();
    let mut idx = Vec::new();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut w = Vec::new();
    // Per entry: its batch row and its weight without `norm`.
    let mut raw = Vec::new();
    for i in 0..b * s {
        let wi = batch.weights[i];
        if wi <= 0.0 {
            continue;
        }
        let dist = soft.get(&i);
        if dist.is_some_and(|d| d.is_empty()) {
            continue;
        }
        let row = idx.len() as u32;
        idx.push(i as u32);
        match dist {
            Some(dist) => {
                for &(t, p) in dist.iter() {
                    rows.push(row);
                    targets.push(t);
                    w.push(wi * p * norm);
                    raw.push((i / s, wi * p));
                }
            }
            None => {
                rows.push(row);
                targets.push(batch.targets[i]);
                w.push(wi * norm);
                raw.push((i / s, wi));
            }
        }
    }
    if idx.is_empty() {
        return Ok(((x.sum_all()? * 0.0)?.affine(1.0, 0.0)?, vec![None; b]));
    }
    let n = targets.len();
    let picked = idx.len();
    let idx = Tensor::from_vec(idx, picked, &Device::Cpu)?;
    let h_rows = x.index_select(&idx, 0)?;
    let h = rms_norm(&h_rows, &model.norm, model.cfg.eps as f32)?;
    let losses = head_cross_entropy(&h, &model.output.q, rows, targets)?;
    let values = losses.flatten_all()?.to_vec1::<f32>()?;
    let mut sums = vec![(0f64, 0f64); b];
    for (&(row, wr), &l) in raw.iter().zip(&values) {
        sums[row].0 += (l * wr) as f64;
        sums[row].1 += wr as f64;
    }
    let per_row = sums
        .iter()
        .map(|&(l, w)| (w > 0.0).then(|| (l / w) as f32))
        .collect();
    let w = Tensor::from_vec(w, n, &Device::Cpu)?;
    Ok(((losses * w)?.sum_all()?, per_row))
}

/// The whole forward pass to the loss, with one graph (for gradient checks and small models).
pub fn loss(model: &Model, batch: &Batch, lora: Option<&LoraWeights>, norm: f32) -> Result<Tensor> {
    let aux = Aux::new(model, batch)?;
    let mut x = embed(model, batch)?;
    for li in 0..model.cfg.n_layers {
        x = layer_forward(model, li, &x, lora, &aux)?;
    }
    head_loss(model, &x, batch, norm)
}
