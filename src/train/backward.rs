//! One transformer layer's forward pass that keeps exactly what its backward needs, and that
//! backward written out by hand: the gradient with respect to the layer's input and to every
//! LoRA A and B of the layer.
//!
//! candle's autograd gives the same numbers (`train::forward::layer_forward` + `backward` is
//! the reference, and the gradient check compares both with finite differences), but it keeps
//! every intermediate of the graph, and for each of them allocates a zero tensor and adds the
//! incoming gradient to it. Written out, a layer keeps 9 tensors (and the small x·Aᵀ) and the backward is a fixed
//! sequence of products, so a step is faster and a layer's saved state is a third of the graph.
//!
//! It must not update weights or keep state between calls; the quantised weights stay frozen
//! and get no gradient.

use super::forward::Aux;
use super::ops::{RmsNorm, Rope, SwiGlu};
use super::qmatmul::{qmatmul, QMatMulGrad};
use crate::lora::{LoraWeights, Target};
use crate::model::{Model, QLinear};
use candle_core::{CustomOp1, CustomOp2, Result, Tensor};

/// What the backward of one layer needs from its forward.
/// The normed inputs and SwiGLU's product are recomputed in the backward (one cheap pass
/// each) instead of kept: that is a quarter of the floats a layer would hold.
pub struct Saved {
    x: Tensor,
    x2: Tensor,
    /// `x·Aᵀ` of each adapted projection (m, r), in `Target::ALL` order.
    ax: [Option<Tensor>; 7],
    /// After the rotary embedding: q (b, kv heads, rep·s, hd), k (b, kv heads, s, hd).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention probabilities (b, kv heads, rep·s, s).
    p: Tensor,
    /// Attention output, the input of the o projection (m, heads·hd).
    y: Tensor,
    g: Tensor,
    u: Tensor,
}

impl Saved {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let ts = [
            &self.x, &self.x2, &self.q, &self.k, &self.v, &self.p, &self.y, &self.g, &self.u,
        ];
        let n: usize = ts.iter().map(|t| t.elem_count()).sum::<usize>()
            + self
                .ax
                .iter()
                .flatten()
                .map(|t| t.elem_count())
                .sum::<usize>();
        n as u64 * 4
    }
}

fn slot(t: Target) -> usize {
    Target::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

/// The LoRA pair of (layer, target) as plain tensors (no autograd tracking), and its scale.
fn pair(lora: Option<&LoraWeights>, li: usize, t: Target) -> Result<Option<(Tensor, Tensor)>> {
    Ok(lora
        .and_then(|l| l.pairs.get(&(li, t)))
        .map(|p| (p.a.detach(), p.b.detach())))
}

fn scale(lora: Option<&LoraWeights>) -> f64 {
    lora.map_or(1.0, |l| l.cfg.scale())
}

fn norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<(RmsNorm, Tensor)> {
    let op = RmsNorm {
        w: w.flatten_all()?.to_vec1::<f32>()?,
        eps,
    };
    let y = x.apply_op1_no_bwd(&op)?;
    Ok((op, y))
}

/// `x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ` for `x` (m, k); returns the output and `x·Aᵀ`.
fn proj_fwd(
    w: &QLinear,
    bias: Option<&Tensor>,
    lp: Option<&(Tensor, Tensor)>,
    s: f64,
    x: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut y = qmatmul(x, &w.q)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    match lp {
        None => Ok((y, None)),
        Some((a, b)) => {
            let ax = x.matmul(&a.t()?)?;
            let d = (ax.matmul(&b.t()?)? * s)?;
            Ok(((y + d)?, Some(ax)))
        }
    }
}

/// Gradients of [`proj_fwd`]: adds dA and dB into `ga`/`gb` and returns dx.
fn proj_bwd(
    w: &QLinear,
    lp: Option<&(Tensor, Tensor)>,
    s: f64,
    x: &Tensor,
    ax: Option<&Tensor>,
    dy: &Tensor,
    acc: Option<(&mut [f32], &mut [f32])>,
) -> Result<Tensor> {
    let op = QMatMulGrad { w: w.q.clone() };
    let dx = op
        .bwd(x, dy, dy)?
        .ok_or_else(|| candle_core::Error::Msg("no input gradient".into()))?;
    let (Some((a, b)), Some(ax)) = (lp, ax) else {
        return Ok(dx);
    };
    // dB = s·dyᵀ·(x·Aᵀ), d(x·Aᵀ) = s·dy·B, dA = d(x·Aᵀ)ᵀ·x, dx += d(x·Aᵀ)·A.
    let gb = (dy.t()?.matmul(ax)? * s)?;
    let dax = (dy.matmul(b)? * s)?;
    let ga = dax.t()?.matmul(x)?;
    if let Some((acc_a, acc_b)) = acc {
        add_into(acc_a, &ga)?;
        add_into(acc_b, &gb)?;
    }
    dx + dax.matmul(a)?
}

fn add_into(acc: &mut [f32], t: &Tensor) -> Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    if v.len() != acc.len() {
        candle_core::bail!(
            "gradient of {} values for a parameter of {}",
            v.len(),
            acc.len()
        );
    }
    acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
    Ok(())
}

/// Layer `li` on `x` (b, s, dim): the output and what [`layer_bwd`] needs.
pub fn layer_fwd(
    model: &Model,
    li: usize,
    x: &Tensor,
    lora: Option<&LoraWeights>,
    aux: &Aux,
) -> Result<(Tensor, Saved)> {
    let cfg = &model.cfg;
    let layer = &model.layers[li];
    let (b, s, d) = x.dims3()?;
    let m = b * s;
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let rep = nh / nkv;
    let eps = cfg.eps as f32;
    let sc = scale(lora);
    let x = x.detach().contiguous()?.reshape((m, d))?;
    // Each projection's output; its x·Aᵀ goes into `ax` for the backward.
    let mut ax: [Option<Tensor>; 7] = Default::default();
    let mut proj = |t: Target, w: &QLinear, bias: Option<&Tensor>, input: &Tensor| {
        let (y, a) = proj_fwd(w, bias, pair(lora, li, t)?.as_ref(), sc, input)?;
        ax[slot(t)] = a;
        Ok::<_, candle_core::Error>(y)
    };

    let (_, h1) = norm(&x, &layer.attn_norm, eps)?;
    let q = proj(Target::Q, &layer.q.w, layer.q.b.as_ref(), &h1)?;
    let k = proj(Target::K, &layer.k.w, layer.k.b.as_ref(), &h1)?;
    let v = proj(Target::V, &layer.v.w, layer.v.b.as_ref(), &h1)?;
    let rope = aux.rope();
    let q = q.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let q = q.apply_op1_no_bwd(rope)?.reshape((b, nkv, rep * s, hd))?;
    let k = k.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let k = k.apply_op1_no_bwd(rope)?;
    let v = v.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let sm = aux.softmax(s, hd);
    let p = q.matmul(&k.t()?)?.apply_op1_no_bwd(&sm)?;
    let y = p
        .matmul(&v)?
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((m, nh * hd))?;
    let o = proj(Target::O, &layer.o.w, layer.o.b.as_ref(), &y)?;
    let x2 = (&x + o)?;
    let (_, h2) = norm(&x2, &layer.ffn_norm, eps)?;
    let g = proj(Target::Gate, &layer.gate, None, &h2)?;
    let u = proj(Target::Up, &layer.up, None, &h2)?;
    let gu = g.apply_op2_no_bwd(&u, &SwiGlu)?;
    let dn = proj(Target::Down, &layer.down, None, &gu)?;
    let out = (&x2 + dn)?.reshape((b, s, d))?;
    drop((h1, h2, gu));
    let saved = Saved {
        x,
        x2,
        ax,
        q,
        k,
        v,
        p,
        y,
        g,
        u,
    };
    Ok((out, saved))
}

/// Where the gradients of one layer's adapters go: `grads[2i]`/`grads[2i + 1]` are A/B of
/// parameter pair `i`, whose (layer, target) is `keys[i]`.
pub struct GradSink<'a> {
    pub keys: &'a [(usize, Target)],
    pub grads: &'a mut [Vec<f32>],
}

impl GradSink<'_> {
    fn pair_mut(&mut self, li: usize, t: Target) -> Option<(&mut [f32], &mut [f32])> {
        let i = self.keys.iter().position(|k| *k == (li, t))?;
        let (lo, hi) = self.grads.split_at_mut(2 * i + 1);
        Some((lo[2 * i].as_mut_slice(), hi[0].as_mut_slice()))
    }
}

/// The backward of [`layer_fwd`]: adds the adapters' gradients into `sink` and returns the
/// gradient with respect to the layer's input (b, s, dim).
pub fn layer_bwd(
    model: &Model,
    li: usize,
    lora: Option<&LoraWeights>,
    aux: &Aux,
    sv: &Saved,
    dout: &Tensor,
    sink: &mut GradSink,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let layer = &model.layers[li];
    let (b, s, d) = dout.dims3()?;
    let m = b * s;
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let rep = nh / nkv;
    let eps = cfg.eps as f32;
    let sc = scale(lora);
    let dy = dout.contiguous()?.reshape((m, d))?;
    let (n1, h1) = norm(&sv.x, &layer.attn_norm, eps)?;
    let (n2, h2) = norm(&sv.x2, &layer.ffn_norm, eps)?;
    let gu = sv.g.apply_op2_no_bwd(&sv.u, &SwiGlu)?;
    // dx of projection `t` (input `input`, output gradient `dy`); its dA, dB go to the sink.
    let mut proj = |t: Target, w: &QLinear, input: &Tensor, dy: &Tensor| {
        let lp = pair(lora, li, t)?;
        let ax = sv.ax[slot(t)].as_ref();
        proj_bwd(w, lp.as_ref(), sc, input, ax, dy, sink.pair_mut(li, t))
    };

    // MLP: out = x2 + down(swiglu(gate(h2), up(h2))), h2 = norm(x2).
    let dgu = proj(Target::Down, &layer.down, &gu, &dy)?;
    let (dg, du) = SwiGlu.bwd(&sv.g, &sv.u, &gu, &dgu)?;
    let (dg, du) = match (dg, du) {
        (Some(a), Some(b)) => (a, b),
        _ => candle_core::bail!("swiglu gave no gradient"),
    };
    let dh2 =
        (proj(Target::Gate, &layer.gate, &h2, &dg)? + proj(Target::Up, &layer.up, &h2, &du)?)?;
    let dx2 = (&dy
        + n2.bwd(&sv.x2, &h2, &dh2)?
            .ok_or_else(|| candle_core::Error::Msg("rms norm gave no gradient".into()))?)?;

    // Attention: x2 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x).
    let dyatt = proj(Target::O, &layer.o.w, &sv.y, &dx2)?;
    let dyatt = dyatt
        .reshape((b, s, nh, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, nkv, rep * s, hd))?;
    let dp = dyatt.matmul(&sv.v.t()?)?;
    let dv = sv.p.t()?.matmul(&dyatt)?;
    let sm = aux.softmax(s, hd);
    let dscores = sm
        .bwd(&dp, &sv.p, &dp)?
        .ok_or_else(|| candle_core::Error::Msg("softmax gave no gradient".into()))?;
    let dq = dscores.matmul(&sv.k)?;
    let dk = dscores.t()?.matmul(&sv.q)?;
    let rope: &Rope = aux.rope();
    let dq = dq.reshape((b, nh, s, hd))?;
    let dq = rope
        .bwd(&dq, &dq, &dq)?
        .ok_or_else(|| candle_core::Error::Msg("rope gave no gradient".into()))?;
    let dk = rope
        .bwd(&dk, &dk, &dk)?
        .ok_or_else(|| candle_core::Error::Msg("rope gave no gradient".into()))?;
    let back = |t: Tensor, heads: usize| -> Result<Tensor> {
        t.transpose(1, 2)?.contiguous()?.reshape((m, heads * hd))
    };
    let (dq, dk, dv) = (back(dq, nh)?, back(dk, nkv)?, back(dv, nkv)?);
    let dh1 = ((proj(Target::Q, &layer.q.w, &h1, &dq)? + proj(Target::K, &layer.k.w, &h1, &dk)?)?
        + proj(Target::V, &layer.v.w, &h1, &dv)?)?;
    let dx = (dx2
        + n1.bwd(&sv.x, &h1, &dh1)?
            .ok_or_else(|| candle_core::Error::Msg("rms norm gave no gradient".into()))?)?;
    dx.reshape((b, s, d))
}
