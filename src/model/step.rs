//! One token of each of one or more sequences through the model on the CPU, in plain loops over
//! `f32` slices: the decode step of `hone ask`, `chat` and `serve`, and of a learning cycle's
//! base-model anchors decoded together. It is the same arithmetic as [`Model::layers_forward`]
//! (hone's quantised kernels for every product, the same RMSNorm, rotary embedding, attention
//! over the same [`KvCache`] and SwiGLU), minus candle's cost per operation: at one row, the
//! ~25 tensor operations of a layer (each an allocation, a dispatch and often a copy) took
//! about a third of a token's time, and at eight rows (each sequence's attention its own
//! operations) candle's path was slower than decoding them one at a time.
//!
//! It must not run prompts (candle does those), keep state of its own, or compute anything the
//! candle path does not: `HONE_DECODE=candle` turns it off, and the model tests check both
//! paths give the same logits.

use super::{Arch, KvCache, Layer, Model, QLinear, Result};
use crate::kernels::{self, QMatrix, QType};
use crate::lora::{LoraWeights, Target};
use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// What the step needs in plain vectors, made once per model (shared by its forks).
#[derive(Debug)]
pub(super) struct StepWeights {
    attn_norm: Vec<Vec<f32>>,
    ffn_norm: Vec<Vec<f32>>,
    /// qwen2's q/k/v biases per layer.
    bias: Vec<[Option<Vec<f32>>; 3]>,
    norm: Vec<f32>,
    /// (max_ctx, head_dim / 2), row-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
    embed: QType,
}

/// True unless `HONE_DECODE=candle` asks for the tensor path (read once).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HONE_DECODE").map_or(true, |v| v != "candle"))
}

fn vec1(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl StepWeights {
    /// None when some weight is of a type hone's kernels do not run (candle does it then).
    fn build(m: &Model) -> Result<Option<Self>> {
        let qt = |q: &QLinear| q.qtype;
        let all_kernel = m.layers.iter().all(|l| {
            [&l.q.w, &l.k.w, &l.v.w, &l.o.w, &l.gate, &l.up, &l.down]
                .iter()
                .all(|q| qt(q).is_some())
        }) && m.output.qtype.is_some();
        let Some(embed) = QType::from_ggml(m.embed.dtype()) else {
            return Ok(None);
        };
        if !all_kernel {
            return Ok(None);
        }
        let opt = |b: &Option<Tensor>| b.as_ref().map(vec1).transpose();
        let mut bias = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            bias.push([opt(&l.q.b)?, opt(&l.k.b)?, opt(&l.v.b)?]);
        }
        Ok(Some(Self {
            attn_norm: m
                .layers
                .iter()
                .map(|l| vec1(&l.attn_norm))
                .collect::<Result<_>>()?,
            ffn_norm: m
                .layers
                .iter()
                .map(|l| vec1(&l.ffn_norm))
                .collect::<Result<_>>()?,
            bias,
            norm: vec1(&m.norm)?,
            cos: vec1(&m.cos)?,
            sin: vec1(&m.sin)?,
            embed,
        }))
    }
}

/// `outs[j] = x W_jᵀ` for the `m` rows of `x`, on hone's kernels, all in one parallel pass
/// (each weight row read once for all `m`).
fn matmul(lins: &[&QLinear], x: &[f32], m: usize, outs: &mut [&mut [f32]]) -> Result<()> {
    let datas = lins
        .iter()
        .map(|l| l.q.data())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut ms = Vec::with_capacity(lins.len());
    for (l, data) in lins.iter().zip(&datas) {
        let (n, k) = l.q.shape().dims2()?;
        let Some(dtype) = l.qtype else {
            return Err(
                candle_core::Error::Msg("step: a weight the kernels cannot run".into()).into(),
            );
        };
        ms.push(QMatrix { dtype, n, k, data });
    }
    let refs: Vec<&QMatrix> = ms.iter().collect();
    kernels::matmul_many(&refs, x, m, outs)
        .map_err(|e| candle_core::Error::Msg(e.to_string()).into())
}

/// candle's `rms_norm`: `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * g;
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32], &[usize]) -> R) -> Result<R> {
    let (st, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        return Err(candle_core::Error::Msg("step: expected f32 data on the CPU".into()).into());
    };
    Ok(f(&v[layout.start_offset()..], layout.stride()))
}

/// The adapter's delta for one row: `y += x·Aᵀ·(scale·B)ᵀ` from its prepared factors.
fn lora_add(l: &LoraWeights, layer: usize, t: Target, x: &[f32], y: &mut [f32]) -> Result<()> {
    let Some((at, sbt)) = l.prepared.get(&(layer, t)) else {
        return Ok(());
    };
    let (k, r) = at.dims2()?;
    let n = y.len();
    let mut ax = vec![0f32; r];
    with_f32(at, |a, _| {
        for (i, &xi) in x.iter().enumerate().take(k) {
            for (acc, &w) in ax.iter_mut().zip(&a[i * r..(i + 1) * r]) {
                *acc += xi * w;
            }
        }
    })?;
    with_f32(sbt, |b, _| {
        for (j, &aj) in ax.iter().enumerate() {
            for (o, &w) in y.iter_mut().zip(&b[j * n..(j + 1) * n]) {
                *o += aj * w;
            }
        }
    })?;
    Ok(())
}

/// Whether the adapter can be applied here: [`LoraWeights::prepare`] made its factors
/// (contiguous CPU f32, one pair each). An adapter in training has none.
fn lora_ready(l: &LoraWeights) -> bool {
    l.prepared.len() == l.pairs.len()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the compiler keeps them in vector registers.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Rotates one head in place at table row `pos` (llama: interleaved pairs; qwen2: halves).
fn rope(arch: Arch, x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    match arch {
        Arch::Llama => {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        Arch::Qwen2 => {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }
}

impl Model {
    /// The next-token logits after `token`, appended to `cache`, or None when this model
    /// or adapter needs the tensor path (not the CPU, weights of a type the kernels lack, an
    /// adapter being trained, or `HONE_DECODE=candle`).
    pub(super) fn step(
        &self,
        cache: &mut KvCache,
        token: u32,
        use_lora: bool,
    ) -> Result<Option<Vec<f32>>> {
        Ok(self
            .step_many(&mut [cache], &[token], &[use_lora])?
            .map(|mut rows| rows.swap_remove(0)))
    }

    /// [`Model::step`] for several sequences at once: `tokens[i]` is appended to `caches[i]` at
    /// its own position, with the adapter when `use_lora[i]`; the result's row i is sequence
    /// i's next-token logits. Every product reads its weights once for all the rows.
    pub(super) fn step_many(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[u32],
        use_lora: &[bool],
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let m = tokens.len();
        if !enabled() || !matches!(self.device, Device::Cpu) || m == 0 {
            return Ok(None);
        }
        if caches.len() != m || use_lora.len() != m {
            return Err(candle_core::Error::Msg(format!(
                "step: {m} tokens, {} caches, {} adapter flags",
                caches.len(),
                use_lora.len()
            ))
            .into());
        }
        let lora = match &self.lora {
            Some(l) if use_lora.iter().any(|&u| u) => {
                if !lora_ready(l) {
                    return Ok(None);
                }
                Some(l.as_ref())
            }
            _ => None,
        };
        let w = match self.step_weights.get() {
            Some(w) => w.clone(),
            None => {
                let built = StepWeights::build(self)?.map(Arc::new);
                self.step_weights.get_or_init(|| built).clone()
            }
        };
        let Some(w) = w else {
            return Ok(None);
        };
        for c in caches.iter() {
            self.check_cache(c, 1)?;
        }
        let cfg = &self.cfg;
        let (dim, nh, nkv, hd) = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n_rep = nh / nkv;
        let eps = cfg.eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let half = hd / 2;
        let pos: Vec<usize> = caches.iter().map(|c| c.len).collect();

        let mut x = vec![0f32; m * dim];
        {
            let (n, k) = self.embed.shape().dims2()?;
            let data = self.embed.data()?;
            let e = QMatrix {
                dtype: w.embed,
                n,
                k,
                data: &data,
            };
            for (&token, xr) in tokens.iter().zip(x.chunks_exact_mut(dim)) {
                if token as usize >= n || k != dim {
                    return Err(candle_core::Error::Msg(format!(
                        "token {token} is outside the vocabulary of {n}"
                    ))
                    .into());
                }
                kernels::dequantize_rows(&e, token as usize, token as usize + 1, xr)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
        }
        let ffn = self.layers.first().map_or(0, |l| l.up.q.shape().dims()[0]);
        let mut h = vec![0f32; m * dim];
        let mut q = vec![0f32; m * qd];
        let mut k = vec![0f32; m * kvd];
        let mut v = vec![0f32; m * kvd];
        let mut y = vec![0f32; m * qd];
        let mut o = vec![0f32; m * dim];
        let mut g = vec![0f32; m * ffn];
        let mut u = vec![0f32; m * ffn];
        // The adapter's delta on the rows that use it: `out` is (m, width), `input` (m, ·).
        let delta = |li: usize, t: Target, input: &[f32], out: &mut [f32]| -> Result<()> {
            let Some(l) = lora else { return Ok(()) };
            let (iw, ow) = (input.len() / m, out.len() / m);
            for (i, (xr, yr)) in input
                .chunks_exact(iw)
                .zip(out.chunks_exact_mut(ow))
                .enumerate()
            {
                if use_lora[i] {
                    lora_add(l, li, t, xr, yr)?;
                }
            }
            Ok(())
        };
        let norm_rows = |x: &[f32], wt: &[f32], h: &mut [f32]| {
            for (xr, hr) in x.chunks_exact(dim).zip(h.chunks_exact_mut(dim)) {
                rms_norm(xr, wt, eps, hr);
            }
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let Layer {
                q: lq,
                k: lk,
                v: lv,
                o: lo,
                gate,
                up,
                down,
                ..
            } = layer;
            norm_rows(&x, &w.attn_norm[li], &mut h);
            matmul(
                &[&lq.w, &lk.w, &lv.w],
                &h,
                m,
                &mut [&mut q[..], &mut k[..], &mut v[..]],
            )?;
            for (t, out, b) in [
                (Target::Q, &mut q, &w.bias[li][0]),
                (Target::K, &mut k, &w.bias[li][1]),
                (Target::V, &mut v, &w.bias[li][2]),
            ] {
                if let Some(b) = b {
                    for row in out.chunks_exact_mut(b.len()) {
                        for (o, b) in row.iter_mut().zip(b) {
                            *o += b;
                        }
                    }
                }
                delta(li, t, &h, out)?;
            }
            for (i, cache) in caches.iter_mut().enumerate() {
                let p = pos[i];
                let (cos, sin) = (
                    &w.cos[p * half..(p + 1) * half],
                    &w.sin[p * half..(p + 1) * half],
                );
                let (qi, ki, vi) = (
                    &mut q[i * qd..(i + 1) * qd],
                    &mut k[i * kvd..(i + 1) * kvd],
                    &v[i * kvd..(i + 1) * kvd],
                );
                for head in qi.chunks_exact_mut(hd).chain(ki.chunks_exact_mut(hd)) {
                    rope(cfg.arch, head, cos, sin);
                }
                let (kc, vc) = &mut cache.layers[li];
                let kt = kc.append(
                    &Tensor::from_slice(ki, (1, nkv, 1, hd), &self.device)?,
                    self.max_ctx,
                )?;
                let vt = vc.append(
                    &Tensor::from_slice(vi, (1, nkv, 1, hd), &self.device)?,
                    self.max_ctx,
                )?;
                let l = p + 1;
                let yi = &mut y[i * qd..(i + 1) * qd];
                let qi = &q[i * qd..(i + 1) * qd];
                with_f32(&kt, |kd, ks| {
                    with_f32(&vt, |vd, vs| {
                        let (kh, vh) = (ks[1], vs[1]);
                        yi.par_chunks_exact_mut(hd)
                            .zip(qi.par_chunks_exact(hd))
                            .enumerate()
                            .for_each(|(head, (yh, qh))| {
                                let g = head / n_rep;
                                let keys = &kd[g * kh..];
                                let vals = &vd[g * vh..];
                                let mut p: Vec<f32> = (0..l)
                                    .map(|j| dot(qh, &keys[j * hd..(j + 1) * hd]) * scale)
                                    .collect();
                                let max = p.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                                let mut sum = 0f32;
                                for s in p.iter_mut() {
                                    *s = (*s - max).exp();
                                    sum += *s;
                                }
                                yh.fill(0.0);
                                for (j, &pj) in p.iter().enumerate() {
                                    let pj = pj / sum;
                                    for (o, &vv) in yh.iter_mut().zip(&vals[j * hd..(j + 1) * hd]) {
                                        *o += pj * vv;
                                    }
                                }
                            })
                    })
                })??;
            }
            matmul(&[&lo.w], &y, m, &mut [&mut o[..]])?;
            delta(li, Target::O, &y, &mut o)?;
            if let Some(b) = &lo.b {
                with_f32(b, |bd, _| {
                    for row in o.chunks_exact_mut(dim) {
                        row.iter_mut().zip(bd).for_each(|(o, b)| *o += b);
                    }
                })?;
            }
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
            norm_rows(&x, &w.ffn_norm[li], &mut h);
            matmul(&[gate, up], &h, m, &mut [&mut g[..], &mut u[..]])?;
            delta(li, Target::Gate, &h, &mut g)?;
            delta(li, Target::Up, &h, &mut u)?;
            for (gi, ui) in g.iter_mut().zip(&u) {
                *gi = *gi / (1.0 + (-*gi).exp()) * ui;
            }
            matmul(&[down], &g, m, &mut [&mut o[..]])?;
            delta(li, Target::Down, &g, &mut o)?;
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
        }
        for (c, p) in caches.iter_mut().zip(&pos) {
            c.len = p + 1;
        }
        norm_rows(&x, &w.norm, &mut h);
        let vocab = self.output.q.shape().dims2()?.0;
        let mut logits = vec![0f32; m * vocab];
        matmul(&[&self.output], &h, m, &mut [&mut logits[..]])?;
        Ok(Some(
            logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect(),
        ))
    }
}
