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
use super::ops::{with_f32, RmsNorm, Rope, SwiGlu};
use super::qmatmul::{w_vec, wt_vec};
use crate::kernels::SendPtr;
use crate::lora::{LoraWeights, Target};
use crate::model::{Model, QLinear};
use candle_core::{CustomOp1, CustomOp2, Device, Result, Tensor};
use rayon::prelude::*;

/// What the backward of one layer needs from its forward.
/// The normed inputs and SwiGLU's product are recomputed in the backward (one cheap pass
/// each) instead of kept: that is a quarter of the floats a layer would hold.
pub struct Saved {
    x: Tensor,
    x2: Tensor,
    /// `x·[A…]ᵀ` of each group of adapted projections that share an input (m, Σr), in the
    /// order q/k/v, o, gate/up, down.
    ax: [Option<Tensor>; 4],
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

/// An f32 operand of [`product`]: values, and the strides of a row and of a column.
struct Op<'a>(&'a [f32], usize, usize);

/// `dst (rows × cols, row stride ld) = [dst +] beta · lhs (rows × inner) · rhs (inner × cols)` with
/// the `gemm` crate's f32 kernels (the small products of the LoRA factors; candle's matmul
/// added an allocation, a scaling pass and an addition pass around each).
fn product(
    (rows, cols, inner): (usize, usize, usize),
    (dst, ld): (&mut [f32], usize),
    accumulate: bool,
    lhs: Op,
    rhs: Op,
    beta: f32,
) -> Result<()> {
    let fits =
        |o: &Op, r: usize, c: usize| r == 0 || c == 0 || (r - 1) * o.1 + (c - 1) * o.2 < o.0.len();
    let dst_fits = rows == 0 || cols == 0 || (ld >= cols && (rows - 1) * ld + cols <= dst.len());
    if !dst_fits || !fits(&lhs, rows, inner) || !fits(&rhs, inner, cols) {
        candle_core::bail!("LoRA product {rows}x{inner}x{cols}: an operand is too short");
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // Blocks of a fixed number of rows, each a single-threaded product, spread over the threads:
    // for these skinny shapes the gemm crate's own threading costs more than it saves. The block
    // size must not depend on the thread count: gemm's blocking of the reduction depends on the
    // shape it is given, so blocks sized by the threads changed the bits with the machine's load
    // (and a resumed run differed from an uninterrupted one).
    const BLOCK_ROWS: usize = 64;
    let per = if rows * cols * inner >= 1 << 18 {
        BLOCK_ROWS
    } else {
        rows
    };
    let blocks = rows.div_ceil(per);
    let (dst_ptr, lhs_ptr) = (SendPtr(dst.as_mut_ptr()), lhs.0.as_ptr() as usize);
    let rhs_ptr = rhs.0.as_ptr() as usize;
    let avx2 = avx2_only();
    let run = |bi: usize| {
        let r0 = bi * per;
        let n = per.min(rows.saturating_sub(r0));
        if n == 0 {
            return;
        }
        // SAFETY: every index the product reads or writes is inside its slice (checked above);
        // blocks write disjoint rows of `dst`, which does not overlap the operands.
        unsafe {
            crate::kernels::f32_gemm(
                avx2,
                n,
                cols,
                inner,
                dst_ptr.at(r0 * ld),
                1,
                ld as isize,
                accumulate,
                (lhs_ptr as *const f32).add(r0 * lhs.1),
                lhs.2 as isize,
                lhs.1 as isize,
                rhs_ptr as *const f32,
                rhs.2 as isize,
                rhs.1 as isize,
                1.0,
                beta,
            );
        }
    };
    if blocks == 1 {
        run(0);
    } else {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(run);
    }
    Ok(())
}

/// Whether training's f32 products are held to AVX2+FMA (`HONE_TRAIN_KERNELS=avx2`).
fn avx2_only() -> bool {
    crate::kernels::train_kernels() == crate::kernels::TrainKernels::Avx2
}

/// `A·B` for every (batch, head) of contiguous 4-D tensors, `A` or `B` read transposed (`ta`,
/// `tb`): the attention products. Each (batch, head) is one single-threaded gemm, the heads in
/// parallel (candle's batched matmul threads inside each small product instead).
fn bmm(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let (b0, h, a1, a2) = a.dims4()?;
    let (c0, c1, b1, b2) = b.dims4()?;
    let (m, k) = if ta { (a2, a1) } else { (a1, a2) };
    let (k2, n) = if tb { (b2, b1) } else { (b1, b2) };
    if k != k2 || (b0, h) != (c0, c1) {
        candle_core::bail!("attention product of {:?} and {:?}", a.dims(), b.dims());
    }
    let heads = b0 * h;
    // Strides (row, column) of the operands as read.
    let (lrs, lcs) = if ta { (1, m) } else { (k, 1) };
    let (rrs, rcs) = if tb { (1, k) } else { (n, 1) };
    let avx2 = avx2_only();
    let out = with_f32(a, |av| {
        with_f32(b, |bv| {
            if av.len() != heads * m * k || bv.len() != heads * k * n {
                candle_core::bail!("attention product: operands are not contiguous");
            }
            let mut out = vec![0f32; heads * m * n];
            if m * n == 0 {
                return Ok(out);
            }
            out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| {
                let (ap, bp) = (
                    &av[i * m * k..(i + 1) * m * k],
                    &bv[i * k * n..(i + 1) * k * n],
                );
                // SAFETY: `ap` is m × k and `bp` k × n (as read through the strides above),
                // `o` is m × n; all three have exactly those sizes.
                unsafe {
                    crate::kernels::f32_gemm(
                        avx2,
                        m,
                        n,
                        k,
                        o.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        ap.as_ptr(),
                        lcs as isize,
                        lrs as isize,
                        bp.as_ptr(),
                        rcs as isize,
                        rrs as isize,
                        0.0,
                        1.0,
                    );
                }
            });
            Ok(out)
        })
    })?;
    Tensor::from_vec(out, (b0, h, m, n), &Device::Cpu)
}

/// One frozen projection of a layer: its weight, bias and LoRA target.
#[derive(Clone, Copy)]
struct Proj<'a> {
    t: Target,
    w: &'a QLinear,
    bias: Option<&'a Tensor>,
}

/// The LoRA factors of projections that read the same input (q, k, v, or gate and up): their A
/// factors stacked into one `(Σr) × k` matrix, so the input is read once for all of them (and
/// the input gradient written once), and per projection its rows in the stack and its B.
struct Stack {
    a: Vec<f32>,
    rows: usize,
    parts: Vec<Option<(usize, usize, Tensor)>>,
}

impl Stack {
    fn new(lora: Option<&LoraWeights>, li: usize, projs: &[Proj], k: usize) -> Result<Self> {
        let mut st = Stack {
            a: Vec::new(),
            rows: 0,
            parts: Vec::with_capacity(projs.len()),
        };
        for p in projs {
            match pair(lora, li, p.t)? {
                Some((a, b)) => {
                    let r = a.dim(0)?;
                    with_f32(&a, |av| {
                        if av.len() != r * k {
                            candle_core::bail!("LoRA A of {:?} is not {r} x {k}", p.t);
                        }
                        st.a.extend_from_slice(av);
                        Ok(())
                    })?;
                    st.parts.push(Some((st.rows, r, b)));
                    st.rows += r;
                }
                None => st.parts.push(None),
            }
        }
        Ok(st)
    }
}

/// `x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ` of each projection in `projs`, all reading `x` (m, k); returns
/// the outputs and the stacked `x·[A…]ᵀ` (m, Σr) for the backward.
fn group_fwd(
    projs: &[Proj],
    lora: Option<&LoraWeights>,
    li: usize,
    s: f64,
    x: &Tensor,
) -> Result<(Vec<Tensor>, Option<Tensor>)> {
    let (m, k) = x.dims2()?;
    let st = Stack::new(lora, li, projs, k)?;
    let rt = st.rows;
    let (ys, ax) = with_f32(x, |xs| {
        // x·[A…]ᵀ: the stack's transpose (k × Σr) read from the stack.
        let mut ax = vec![0f32; m * rt];
        if rt > 0 {
            product(
                (m, rt, k),
                (&mut ax, rt),
                false,
                Op(xs, k, 1),
                Op(&st.a, 1, k),
                1.0,
            )?;
        }
        let mut ys = Vec::with_capacity(projs.len());
        for (p, part) in projs.iter().zip(&st.parts) {
            let n = p.w.q.shape().dims2()?.0;
            let mut y = wt_vec(xs, m, &p.w.q)?;
            // y += s·(x·Aᵀ)·Bᵀ: Bᵀ (r × n) read from B (n × r).
            if let Some((off, r, b)) = part {
                with_f32(b, |bv| {
                    product(
                        (m, n, *r),
                        (&mut y, n),
                        true,
                        Op(&ax[*off..], rt, 1),
                        Op(bv, 1, *r),
                        s as f32,
                    )
                })?;
            }
            if let Some(b) = p.bias {
                with_f32(b, |bv| {
                    if bv.len() != n {
                        candle_core::bail!("bias of {} values for {n} outputs", bv.len());
                    }
                    y.par_chunks_exact_mut(n)
                        .for_each(|row| row.iter_mut().zip(bv).for_each(|(o, b)| *o += b));
                    Ok(())
                })?;
            }
            ys.push(Tensor::from_vec(y, (m, n), &Device::Cpu)?);
        }
        Ok((ys, ax))
    })?;
    let ax = if rt > 0 {
        Some(Tensor::from_vec(ax, (m, rt), &Device::Cpu)?)
    } else {
        None
    };
    Ok((ys, ax))
}

/// Gradients of [`group_fwd`] given each output's gradient `dys`: adds every dA and dB into
/// the sink and returns dx, the sum over the projections.
#[allow(clippy::too_many_arguments)]
fn group_bwd(
    projs: &[Proj],
    lora: Option<&LoraWeights>,
    li: usize,
    s: f64,
    x: &Tensor,
    ax: Option<&Tensor>,
    dys: &[&Tensor],
    sink: &mut GradSink,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let st = Stack::new(lora, li, projs, k)?;
    let rt = st.rows;
    let s = s as f32;
    if dys.len() != projs.len() || (rt > 0 && ax.is_none()) {
        candle_core::bail!("projection group backward without its forward state");
    }
    let dx = with_f32(x, |xs| {
        let mut dx: Option<Vec<f32>> = None;
        // d(x·[A…]ᵀ): s·dy·B of each projection, side by side (m × Σr).
        let mut dax = vec![0f32; m * rt];
        for ((p, part), dy) in projs.iter().zip(&st.parts).zip(dys) {
            let n = p.w.q.shape().dims2()?.0;
            with_f32(dy, |dys| {
                if dys.len() != m * n {
                    candle_core::bail!("output gradient of {:?} is not {m} x {n}", p.t);
                }
                let g = w_vec(dys, m, &p.w.q)?;
                match dx.as_mut() {
                    None => dx = Some(g),
                    Some(d) => d
                        .par_chunks_mut(k)
                        .zip(g.par_chunks(k))
                        .for_each(|(d, g)| d.iter_mut().zip(g).for_each(|(d, g)| *d += g)),
                }
                let (Some((off, r, b)), Some(ax)) = (part, ax) else {
                    return Ok(());
                };
                with_f32(b, |bv| {
                    product(
                        (m, *r, n),
                        (&mut dax[*off..], rt),
                        false,
                        Op(dys, n, 1),
                        Op(bv, *r, 1),
                        s,
                    )
                })?;
                // dB += s·dyᵀ·(x·Aᵀ).
                if let Some((_, acc_b)) = sink.pair_mut(li, p.t) {
                    with_f32(ax, |axv| {
                        product(
                            (n, *r, m),
                            (acc_b, *r),
                            true,
                            Op(dys, 1, n),
                            Op(&axv[*off..], rt, 1),
                            s,
                        )
                    })?;
                }
                Ok(())
            })?;
        }
        let mut dx = dx.ok_or_else(|| candle_core::Error::Msg("empty projection group".into()))?;
        if rt > 0 {
            // dA of the stack = d(x·[A…]ᵀ)ᵀ·x (Σr × k), split into each projection's gradient.
            let mut da = vec![0f32; rt * k];
            product(
                (rt, k, m),
                (&mut da, k),
                false,
                Op(&dax, 1, rt),
                Op(xs, k, 1),
                1.0,
            )?;
            for (p, part) in projs.iter().zip(&st.parts) {
                if let (Some((off, r, _)), Some((acc_a, _))) = (part, sink.pair_mut(li, p.t)) {
                    let src = &da[off * k..(off + r) * k];
                    if acc_a.len() != src.len() {
                        candle_core::bail!("gradient of LoRA A of {:?} has the wrong size", p.t);
                    }
                    acc_a.iter_mut().zip(src).for_each(|(a, g)| *a += g);
                }
            }
            // dx += d(x·[A…]ᵀ)·[A…].
            product(
                (m, k, rt),
                (&mut dx, k),
                true,
                Op(&dax, rt, 1),
                Op(&st.a, k, 1),
                1.0,
            )?;
        }
        Ok(dx)
    })?;
    Tensor::from_vec(dx, (m, k), &Device::Cpu)
}

/// The projection groups of a layer (by input): q/k/v, o, gate/up, down.
const QKV: usize = 0;
const O: usize = 1;
const GATE_UP: usize = 2;
const DOWN: usize = 3;

fn groups(layer: &crate::model::Layer) -> [Vec<Proj<'_>>; 4] {
    let p = |t, w, bias| Proj { t, w, bias };
    [
        vec![
            p(Target::Q, &layer.q.w, layer.q.b.as_ref()),
            p(Target::K, &layer.k.w, layer.k.b.as_ref()),
            p(Target::V, &layer.v.w, layer.v.b.as_ref()),
        ],
        vec![p(Target::O, &layer.o.w, layer.o.b.as_ref())],
        vec![
            p(Target::Gate, &layer.gate, None),
            p(Target::Up, &layer.up, None),
        ],
        vec![p(Target::Down, &layer.down, None)],
    ]
}

/// The only output of a one-projection group.
fn one(mut ys: Vec<Tensor>) -> Result<Tensor> {
    match (ys.pop(), ys.is_empty()) {
        (Some(y), true) => Ok(y),
        _ => candle_core::bail!("a one-projection group gave {} outputs", ys.len() + 1),
    }
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
    let groups = groups(layer);
    // Each group's outputs; its x·[A…]ᵀ goes into `ax` for the backward.
    let mut ax: [Option<Tensor>; 4] = Default::default();
    let mut run = |gi: usize, input: &Tensor| {
        let (ys, a) = group_fwd(&groups[gi], lora, li, sc, input)?;
        ax[gi] = a;
        Ok::<_, candle_core::Error>(ys)
    };

    let (_, h1) = norm(&x, &layer.attn_norm, eps)?;
    let [q, k, v]: [Tensor; 3] = run(QKV, &h1)?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("q/k/v group".into()))?;
    let rope = aux.rope();
    let q = q.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let q = q.apply_op1_no_bwd(rope)?.reshape((b, nkv, rep * s, hd))?;
    let k = k.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let k = k.apply_op1_no_bwd(rope)?;
    let v = v.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let sm = aux.softmax(s, hd);
    let p = bmm(&q, &k, false, true)?.apply_op1_no_bwd(&sm)?;
    let y = bmm(&p, &v, false, false)?
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((m, nh * hd))?;
    let o = one(run(O, &y)?)?;
    let x2 = (&x + o)?;
    let (_, h2) = norm(&x2, &layer.ffn_norm, eps)?;
    let [g, u]: [Tensor; 2] = run(GATE_UP, &h2)?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("gate/up group".into()))?;
    let gu = g.apply_op2_no_bwd(&u, &SwiGlu)?;
    let dn = one(run(DOWN, &gu)?)?;
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
    let groups = groups(layer);
    // dx of group `gi` (input `input`, output gradients `dys`); its dA, dB go to the sink.
    let mut run = |gi: usize, input: &Tensor, dys: &[&Tensor]| {
        let ax = sv.ax[gi].as_ref();
        group_bwd(&groups[gi], lora, li, sc, input, ax, dys, sink)
    };

    // MLP: out = x2 + down(swiglu(gate(h2), up(h2))), h2 = norm(x2).
    let dgu = run(DOWN, &gu, &[&dy])?;
    let (dg, du) = SwiGlu.bwd(&sv.g, &sv.u, &gu, &dgu)?;
    let (dg, du) = match (dg, du) {
        (Some(a), Some(b)) => (a, b),
        _ => candle_core::bail!("swiglu gave no gradient"),
    };
    let dh2 = run(GATE_UP, &h2, &[&dg, &du])?;
    let dx2 = (&dy
        + n2.bwd(&sv.x2, &h2, &dh2)?
            .ok_or_else(|| candle_core::Error::Msg("rms norm gave no gradient".into()))?)?;

    // Attention: x2 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x).
    let dyatt = run(O, &sv.y, &[&dx2])?;
    let dyatt = dyatt
        .reshape((b, s, nh, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, nkv, rep * s, hd))?;
    let dp = bmm(&dyatt, &sv.v, false, true)?;
    let dv = bmm(&sv.p, &dyatt, true, false)?;
    let sm = aux.softmax(s, hd);
    let dscores = sm
        .bwd(&dp, &sv.p, &dp)?
        .ok_or_else(|| candle_core::Error::Msg("softmax gave no gradient".into()))?;
    let dq = bmm(&dscores, &sv.k, false, false)?;
    let dk = bmm(&dscores, &sv.q, true, false)?;
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
    let dh1 = run(QKV, &h1, &[&dq, &dk, &dv])?;
    let dx = (dx2
        + n1.bwd(&sv.x, &h1, &dh1)?
            .ok_or_else(|| candle_core::Error::Msg("rms norm gave no gradient".into()))?)?;
    dx.reshape((b, s, d))
}
