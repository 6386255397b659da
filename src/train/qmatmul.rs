//! Differentiable products with frozen quantised weights: `y = x·Wᵀ` whose backward returns
//! `grad_x = grad_y·W`, and the fused output head + cross-entropy used by the trainer.
//!
//! candle's `QMatMul` has no backward (it runs with `apply_op1_no_bwd`), so gradients would stop
//! at the first quantised layer. These ops dequantise W in row tiles, use each tile and drop it:
//! the weights stay quantised in memory and W itself gets no gradient (it is frozen).
//!
//! It must not keep a dequantised copy of any weight alive between calls, nor change a weight.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::kernels::{self, QMatrix, QType};

/// Dequantised tiles are at most this many bytes (the whole matrix when it is smaller).
pub const TILE_BYTES: usize = 16 << 20;

fn deq_blocks<T: GgmlType>(bytes: &[u8], cols: usize, out: &mut [f32]) -> bool {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return false;
    }
    // SAFETY: the bytes are the block storage of a QTensor of this block type (checked by the
    // caller through the dtype), length and alignment are checked above.
    let blocks: &[T] =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) };
    let bpr = cols / T::BLCK_SIZE;
    let rows = out.len() / cols.max(1);
    let threads = rayon::current_num_threads().max(1);
    let chunk = rows.div_ceil(threads * 4).max(1);
    out.par_chunks_mut(chunk * cols)
        .zip(blocks.par_chunks(chunk * bpr))
        .for_each(|(o, b)| T::to_float(b, o));
    true
}

/// Rows `r0..r1` of a 2-D quantised matrix as an f32 tensor `(r1 - r0, cols)`.
pub fn dequantize_rows(q: &QTensor, r0: usize, r1: usize) -> Result<Tensor> {
    let (rows, cols) = q.shape().dims2()?;
    if r0 > r1 || r1 > rows {
        candle_core::bail!("rows {r0}..{r1} of a matrix with {rows} rows");
    }
    let dt = q.dtype();
    let bs = dt.block_size();
    if cols % bs != 0 {
        candle_core::bail!("{cols} columns are not a multiple of the block size {bs}");
    }
    let row_bytes = cols / bs * dt.type_size();
    let data = q.data()?;
    let bytes = &data[r0 * row_bytes..r1 * row_bytes];
    let n = (r1 - r0) * cols;
    let mut out = vec![0f32; n];
    let done = match dt {
        GgmlDType::F32 => deq_blocks::<f32>(bytes, cols, &mut out),
        GgmlDType::Q4_0 => deq_blocks::<BlockQ4_0>(bytes, cols, &mut out),
        GgmlDType::Q4_1 => deq_blocks::<BlockQ4_1>(bytes, cols, &mut out),
        GgmlDType::Q5_0 => deq_blocks::<BlockQ5_0>(bytes, cols, &mut out),
        GgmlDType::Q5_1 => deq_blocks::<BlockQ5_1>(bytes, cols, &mut out),
        GgmlDType::Q8_0 => deq_blocks::<BlockQ8_0>(bytes, cols, &mut out),
        GgmlDType::Q8_1 => deq_blocks::<BlockQ8_1>(bytes, cols, &mut out),
        GgmlDType::Q2K => deq_blocks::<BlockQ2K>(bytes, cols, &mut out),
        GgmlDType::Q3K => deq_blocks::<BlockQ3K>(bytes, cols, &mut out),
        GgmlDType::Q4K => deq_blocks::<BlockQ4K>(bytes, cols, &mut out),
        GgmlDType::Q5K => deq_blocks::<BlockQ5K>(bytes, cols, &mut out),
        GgmlDType::Q6K => deq_blocks::<BlockQ6K>(bytes, cols, &mut out),
        GgmlDType::Q8K => deq_blocks::<BlockQ8K>(bytes, cols, &mut out),
        _ => false,
    };
    if done {
        return Tensor::from_vec(out, (r1 - r0, cols), &Device::Cpu);
    }
    // Other types (f16, bf16): through a small quantised copy of the rows.
    drop(out);
    let st = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dt)?;
    QTensor::new(st, (r1 - r0, cols))?.dequantize(&Device::Cpu)
}

/// Rows per dequantised tile of a matrix with `cols` columns.
fn tile_rows(rows: usize, cols: usize) -> usize {
    (TILE_BYTES / (cols.max(1) * 4)).clamp(1, rows.max(1))
}

/// Runs `f` on rows `r0..r1` of `w` seen as a `kernels::QMatrix`, or returns `None` when the
/// kernels do not know its type (then the caller dequantises through candle).
fn with_rows<R>(
    w: &QTensor,
    r0: usize,
    r1: usize,
    f: impl FnOnce(&QMatrix) -> std::result::Result<R, crate::kernels::KernelError>,
) -> Result<Option<R>> {
    let Some(dtype) = QType::from_ggml(w.dtype()) else {
        return Ok(None);
    };
    let (n, k) = w.shape().dims2()?;
    if r0 > r1 || r1 > n {
        candle_core::bail!("rows {r0}..{r1} of a matrix with {n} rows");
    }
    let data = w.data()?;
    let full = QMatrix {
        dtype,
        n,
        k,
        data: &data,
    };
    let rb = full
        .row_bytes()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let part = QMatrix {
        dtype,
        n: r1 - r0,
        k,
        data: data.get(r0 * rb..r1 * rb).ok_or_else(|| {
            candle_core::Error::Msg("weight data is shorter than its shape".into())
        })?,
    };
    f(&part)
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// `x (m, k) · W[r0..r1]ᵀ` as a flat row-major `m × (r1 - r0)` vector, through the tiled GEMM
/// (bf16 AMX tiles where the CPU has them: `kernels::gemm_wt_mixed`).
fn rows_wt(x: &[f32], m: usize, w: &QTensor, r0: usize, r1: usize) -> Result<Option<Vec<f32>>> {
    with_rows(w, r0, r1, |q| kernels::gemm_wt_mixed_vec(q, x, m))
}

/// `g (m, r1 - r0) · W[r0..r1]` as a flat row-major `m × k` vector, through the tiled GEMM.
fn rows_w(g: &[f32], m: usize, w: &QTensor, r0: usize, r1: usize) -> Result<Option<Vec<f32>>> {
    with_rows(w, r0, r1, |q| kernels::gemm_w_mixed_vec(q, g, m))
}

/// `x (m, k) · Wᵀ` as a flat row-major `m × n` vector, through the tiled GEMM where the kernels
/// know W's type and through candle otherwise (the layer-by-layer backward's forward product).
pub(crate) fn wt_vec(x: &[f32], m: usize, w: &QTensor) -> Result<Vec<f32>> {
    let (n, k) = w.shape().dims2()?;
    if let Some(out) = rows_wt(x, m, w, 0, n)? {
        return Ok(out);
    }
    let xt = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
    matmul_wt(&xt, w)?.flatten_all()?.to_vec1::<f32>()
}

/// `g (m, n) · W` as a flat row-major `m × k` vector: the input gradient of [`wt_vec`].
pub(crate) fn w_vec(g: &[f32], m: usize, w: &QTensor) -> Result<Vec<f32>> {
    let (n, _) = w.shape().dims2()?;
    if let Some(out) = rows_w(g, m, w, 0, n)? {
        return Ok(out);
    }
    let gt = Tensor::from_slice(g, (m, n), &Device::Cpu)?;
    matmul_w(&gt, w)?.flatten_all()?.to_vec1::<f32>()
}

/// `x·Wᵀ` for `x` (m, k) and quantised `W` (n, k), without gradient tracking.
pub fn matmul_wt(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    let t = tile_rows(n, k);
    if t >= n {
        let wd = dequantize_rows(w, 0, n)?;
        return x.matmul(&wd.t()?);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(t));
    let mut r = 0;
    while r < n {
        let e = (r + t).min(n);
        let wd = dequantize_rows(w, r, e)?;
        parts.push(x.matmul(&wd.t()?)?);
        r = e;
    }
    Tensor::cat(&parts, 1)
}

/// `g·W` for `g` (m, n) and quantised `W` (n, k): the gradient of `x·Wᵀ` with respect to x.
pub fn matmul_w(g: &Tensor, w: &QTensor) -> Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    let t = tile_rows(n, k);
    let mut acc: Option<Tensor> = None;
    let mut r = 0;
    while r < n {
        let e = (r + t).min(n);
        let wd = dequantize_rows(w, r, e)?;
        let gt = if r == 0 && e == n {
            g.clone()
        } else {
            g.narrow(1, r, e - r)?
        };
        let part = gt.matmul(&wd)?;
        acc = Some(match acc {
            None => part,
            Some(a) => (a + part)?,
        });
        r = e;
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty weight".into()))
}

/// The contiguous f32 input of a custom op as a slice of `m` rows of `k_expected`, and `m`.
fn input_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    k_expected: usize,
) -> Result<(&'a [f32], usize)> {
    let v = match storage {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("quantised matmul needs f32 activations"),
    };
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("quantised matmul needs a contiguous input".into())
    })?;
    let k = layout.dims().last().copied().unwrap_or(0);
    if k != k_expected {
        candle_core::bail!("input has {k} features, the weight expects {k_expected}");
    }
    Ok((&v[a..b], (b - a) / k.max(1)))
}

fn input_2d(storage: &CpuStorage, layout: &Layout, k_expected: usize) -> Result<Tensor> {
    let (v, m) = input_slice(storage, layout, k_expected)?;
    Tensor::from_slice(v, (m, k_expected), &Device::Cpu)
}

/// `y = x·Wᵀ` with a frozen quantised `W` (n_out, n_in); backward gives `grad_x = grad_y·W`.
#[derive(Clone)]
pub struct QMatMulGrad {
    pub w: Arc<QTensor>,
}

impl CustomOp1 for QMatMulGrad {
    fn name(&self) -> &'static str {
        "qmatmul-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.w.shape().dims2()?;
        let (xs, m) = input_slice(storage, layout, k)?;
        let out = match rows_wt(xs, m, &self.w, 0, n)? {
            Some(out) => out,
            None => {
                let x = Tensor::from_slice(xs, (m, k), &Device::Cpu)?;
                matmul_wt(&x, &self.w)?.flatten_all()?.to_vec1::<f32>()?
            }
        };
        let mut dims = layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = self.w.shape().dims2()?;
        let g = grad_res.reshape(((), n))?.contiguous()?;
        let m = g.dim(0)?;
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let gx = match rows_w(&gv, m, &self.w, 0, n)? {
            Some(out) => Tensor::from_vec(out, (m, k), &Device::Cpu)?,
            None => matmul_w(&g, &self.w)?,
        };
        Ok(Some(gx.reshape(arg.shape())?))
    }
}

/// `x·Wᵀ` for any leading shape of `x`, differentiable with respect to `x`.
pub fn qmatmul(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QMatMulGrad { w: w.clone() })
}

/// The output head and the cross-entropy, fused: input `h` (m, d) after the final norm, output
/// one loss `-log softmax(h_r·Wᵀ)[t]` per entry `(r, t)` (n entries, grouped by row in
/// increasing `r`; a row may have several, as a distilled position has one per candidate
/// token, and then its logits are computed once, not once per candidate). The logits are
/// computed tile by tile of the vocabulary and never stored whole. The same pass also
/// accumulates each row's `softmax·W` with an online softmax (the flash-attention rescaling: a
/// row's sum is kept relative to its running maximum and rescaled when the maximum grows), so
/// the backward only combines it with the targets' rows: two products with W in all, where
/// computing the logits again in the backward took three. That state is m × d floats, the size
/// of the input.
pub struct HeadCrossEntropy {
    pub w: Arc<QTensor>,
    /// Per entry: its row of the input.
    pub rows: Vec<u32>,
    /// Per entry: its target token.
    pub targets: Vec<u32>,
    softmax_w: Mutex<Option<Vec<f32>>>,
}

impl HeadCrossEntropy {
    pub fn new(w: Arc<QTensor>, rows: Vec<u32>, targets: Vec<u32>) -> Self {
        Self {
            w,
            rows,
            targets,
            softmax_w: Mutex::new(None),
        }
    }

    /// Where each row's entries start in `rows`/`targets` (`m + 1` offsets), or an error when
    /// the entries are not grouped by increasing row or name a row past `m`.
    fn groups(&self, m: usize) -> Result<Vec<usize>> {
        if self.rows.len() != self.targets.len() {
            candle_core::bail!(
                "{} entry rows but {} targets",
                self.rows.len(),
                self.targets.len()
            );
        }
        let mut starts = Vec::with_capacity(m + 1);
        let mut next = 0usize;
        for (e, &r) in self.rows.iter().enumerate() {
            let r = r as usize;
            if r >= m || r + 1 < next {
                candle_core::bail!("head entries must name rows below {m} in increasing order");
            }
            while next <= r {
                starts.push(e);
                next += 1;
            }
        }
        while next <= m {
            starts.push(self.rows.len());
            next += 1;
        }
        Ok(starts)
    }
}

thread_local! {
    /// The cancel flag of the training step running on this thread, if any (see [`with_cancel`]).
    static HEAD_CANCEL: std::cell::Cell<*const AtomicBool> =
        const { std::cell::Cell::new(std::ptr::null()) };
}

/// What the head's forward fails with when [`with_cancel`]'s flag was set during it.
pub const HEAD_CANCELLED: &str = "the output head was cancelled";

/// Runs `f` (a step's head and loss) with `cancel` looked at between the head's vocabulary
/// tiles on this thread: the head is the longest stretch of a step without a layer boundary
/// (a sixth of a step on the default model), and a request to pause must not wait for it.
pub fn with_cancel<T>(cancel: &AtomicBool, f: impl FnOnce() -> T) -> T {
    struct Restore(*const AtomicBool);
    impl Drop for Restore {
        fn drop(&mut self) {
            HEAD_CANCEL.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(HEAD_CANCEL.with(|c| c.replace(cancel as *const AtomicBool)));
    f()
}

/// Whether the flag set by [`with_cancel`] on this thread asks to stop.
fn head_cancelled() -> bool {
    HEAD_CANCEL.with(|c| {
        let p = c.get();
        // SAFETY: `with_cancel` sets the pointer from a live reference and restores the previous
        // one before that reference's borrow ends, so a non-null pointer points at a live flag.
        !p.is_null() && unsafe { (*p).load(Ordering::Relaxed) }
    })
}

/// Rows of the vocabulary per tile in the head (bounded so a logits tile stays small).
fn head_tile(vocab: usize, k: usize) -> usize {
    tile_rows(vocab, k).min(8192)
}

/// Probabilities below this are flushed to zero: they change nothing measurable, and as
/// subnormal floats they slow the products 50-fold.
const FLUSH: f32 = 1e-20;

/// One row's running state in the head: maximum logit, sum of `exp(logit − max)` (f64), and
/// the factor the row's gradient accumulator is rescaled by in this tile.
#[derive(Clone, Copy)]
struct RowState {
    max: f32,
    sum: f64,
    rescale: f32,
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (vocab, k) = self.w.shape().dims2()?;
        let x = input_2d(storage, layout, k)?;
        let m = x.dim(0)?;
        let starts = self.groups(m)?;
        if let Some(t) = self.targets.iter().find(|t| **t as usize >= vocab) {
            candle_core::bail!("target token {t} is outside the vocabulary of {vocab}");
        }
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let mut st = vec![
            RowState {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                rescale: 1.0,
            };
            m
        ];
        // Per row: its entries' targets and their logits, filled in by the tile holding each.
        let mut picks: Vec<Vec<(u32, f32)>> = (0..m)
            .map(|r| {
                self.targets[starts[r]..starts[r + 1]]
                    .iter()
                    .map(|&t| (t, 0.0))
                    .collect()
            })
            .collect();
        // Σ_v exp(logit_v − max)·W_v per row, in the units of the row's current maximum.
        let mut acc: Option<Vec<f32>> = None;
        let t = head_tile(vocab, k);
        let mut r = 0;
        while r < vocab {
            if head_cancelled() {
                candle_core::bail!("{HEAD_CANCELLED}");
            }
            let e = (r + t).min(vocab);
            let mut part = match rows_wt(&xv, m, &self.w, r, e)? {
                Some(p) => p,
                None => {
                    let wd = dequantize_rows(&self.w, r, e)?;
                    x.matmul(&wd.t()?)?.flatten_all()?.to_vec1::<f32>()?
                }
            };
            let w = e - r;
            part.par_chunks_mut(w)
                .zip(st.par_iter_mut())
                .zip(picks.par_iter_mut())
                .for_each(|((row, s), picks)| {
                    for (target, logit) in picks.iter_mut() {
                        let tu = *target as usize;
                        if tu >= r && tu < e {
                            *logit = row[tu - r];
                        }
                    }
                    let tm = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let nm = s.max.max(tm);
                    let (mut total, rescale) = if s.sum.is_finite() && s.sum > 0.0 {
                        let f = ((s.max - nm) as f64).exp();
                        (s.sum * f, f as f32)
                    } else {
                        (0.0, 0.0)
                    };
                    // The exponentials in place (vectorised), then summed in eight f64 lanes.
                    super::ops::wide(|| {
                        for v in row.iter_mut() {
                            *v = super::ops::exp_f32(*v - nm);
                        }
                    });
                    let mut lanes = [0f64; 8];
                    let mut chunks = row.chunks_exact(8);
                    for c in &mut chunks {
                        for (l, v) in lanes.iter_mut().zip(c) {
                            *l += *v as f64;
                        }
                    }
                    total += lanes.iter().sum::<f64>();
                    total += chunks.remainder().iter().map(|v| *v as f64).sum::<f64>();
                    super::ops::wide(|| {
                        for v in row.iter_mut() {
                            if *v < FLUSH {
                                *v = 0.0;
                            }
                        }
                    });
                    s.sum = total;
                    s.max = nm;
                    s.rescale = if rescale < FLUSH { 0.0 } else { rescale };
                });
            let p = match rows_w(&part, m, &self.w, r, e)? {
                Some(p) => p,
                None => {
                    let wd = dequantize_rows(&self.w, r, e)?;
                    let pl = Tensor::from_vec(part, (m, w), &Device::Cpu)?;
                    pl.matmul(&wd)?.flatten_all()?.to_vec1::<f32>()?
                }
            };
            match acc.as_mut() {
                None => acc = Some(p),
                Some(a) => a
                    .par_chunks_mut(k)
                    .zip(p.par_chunks(k))
                    .zip(st.par_iter())
                    .for_each(|((a, p), s)| {
                        if s.rescale == 1.0 {
                            a.iter_mut().zip(p).for_each(|(a, p)| *a += p);
                        } else {
                            a.iter_mut()
                                .zip(p)
                                .for_each(|(a, p)| *a = *a * s.rescale + p);
                        }
                    }),
            }
            r = e;
        }
        let mut softmax_w = acc.ok_or_else(|| candle_core::Error::Msg("empty head".into()))?;
        softmax_w
            .par_chunks_mut(k)
            .zip(st.par_iter())
            .for_each(|(g, s)| {
                let inv = (1.0 / s.sum) as f32;
                g.iter_mut().for_each(|g| *g *= inv);
            });
        let losses: Vec<f32> = st
            .iter()
            .zip(&picks)
            .flat_map(|(s, picks)| {
                let lse = s.max as f64 + s.sum.ln();
                picks
                    .iter()
                    .map(move |&(_, logit)| (lse - logit as f64) as f32)
            })
            .collect();
        if let Ok(mut g) = self.softmax_w.lock() {
            *g = Some(softmax_w);
        }
        let n = losses.len();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    /// `grad_h_r = (Σ_c g_c)·softmax_r·W − Σ_c g_c·W[t_c]` over row r's entries c.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, k) = self.w.shape().dims2()?;
        let mut grad = self
            .softmax_w
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned head state".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("head backward before forward".into()))?;
        let m = grad.len() / k.max(1);
        let starts = self.groups(m)?;
        let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
        if g.len() != self.targets.len() {
            candle_core::bail!(
                "head backward for {} entries, forward had {}",
                g.len(),
                self.targets.len()
            );
        }
        grad.par_chunks_mut(k)
            .enumerate()
            .try_for_each(|(r, row)| {
                let entries = starts[r]..starts[r + 1];
                let total: f32 = g[entries.clone()].iter().sum();
                row.iter_mut().for_each(|v| *v *= total);
                for e in entries {
                    let t = self.targets[e] as usize;
                    let wt = dequantize_rows(&self.w, t, t + 1)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let ge = g[e];
                    row.iter_mut().zip(&wt).for_each(|(v, w)| *v -= ge * w);
                }
                Ok::<_, candle_core::Error>(())
            })?;
        let gx = Tensor::from_vec(grad, (m, k), &Device::Cpu)?;
        Ok(Some(gx.reshape(arg.shape())?))
    }
}

/// Per-entry cross-entropy of `h·Wᵀ` (entry `e` scores row `rows[e]` against `targets[e]`,
/// entries grouped by increasing row), differentiable with respect to `h`.
pub fn head_cross_entropy(
    h: &Tensor,
    w: &Arc<QTensor>,
    rows: Vec<u32>,
    targets: Vec<u32>,
) -> Result<Tensor> {
    h.contiguous()?
        .apply_op1(HeadCrossEntropy::new(w.clone(), rows, targets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    fn rand_q(rows: usize, cols: usize, dt: GgmlDType, seed: u64) -> (Tensor, Arc<QTensor>) {
        let mut s = seed;
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dt).unwrap();
        let d = q.dequantize(&Device::Cpu).unwrap();
        (d, Arc::new(q))
    }

    #[test]
    fn tiles_match_whole_dequantisation() {
        for dt in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::F16,
        ] {
            let (d, q) = rand_q(40, 256, dt, 3);
            let part = dequantize_rows(&q, 7, 29).unwrap();
            let want = d.narrow(0, 7, 22).unwrap();
            let diff = (part - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{dt:?}");
        }
    }

    #[test]
    fn forward_and_backward_match_dense() {
        let (d, q) = rand_q(96, 64, GgmlDType::Q8_0, 5);
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 64), &Device::Cpu).unwrap()).unwrap();
        let y = qmatmul(x.as_tensor(), &q).unwrap();
        let want = x.as_tensor().broadcast_matmul(&d.t().unwrap()).unwrap();
        let diff = (&y - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        let gy = Tensor::randn(0f32, 1., (2, 3, 96), &Device::Cpu).unwrap();
        let g = (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(&x).unwrap();
        let want = gy.broadcast_matmul(&d).unwrap();
        let diff = (gx - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        assert_eq!(gx.dtype(), DType::F32);
    }

    #[test]
    fn head_loss_matches_log_softmax() {
        head_matches_dense(50, vec![3, 49, 0, 17], 1.0);
    }

    /// Across several vocabulary tiles, with logits large enough that a row's running maximum
    /// moves from tile to tile (the online softmax must rescale what it accumulated).
    #[test]
    fn head_gradient_across_tiles_matches_dense() {
        head_matches_dense(20_000, vec![3, 19_999, 8_200, 17_000], 4.0);
    }

    /// A step's head stops between vocabulary tiles once its cancel flag is set, and only
    /// inside `with_cancel`: the flag is restored afterwards.
    #[test]
    fn head_stops_when_its_step_is_cancelled() {
        let (_, q) = rand_q(100, 32, GgmlDType::Q8_0, 3);
        let x = Tensor::randn(0f32, 1., (2, 32), &Device::Cpu).unwrap();
        let set = AtomicBool::new(true);
        let e =
            with_cancel(&set, || head_cross_entropy(&x, &q, vec![0, 1], vec![1, 2])).unwrap_err();
        assert!(e.to_string().contains(HEAD_CANCELLED), "{e}");
        let clear = AtomicBool::new(false);
        assert!(with_cancel(&clear, || head_cross_entropy(
            &x,
            &q,
            vec![0, 1],
            vec![1, 2]
        ))
        .is_ok());
        // Outside `with_cancel` no flag is looked at.
        assert!(head_cross_entropy(&x, &q, vec![0, 1], vec![1, 2]).is_ok());
    }

    /// Entries that share a row (a distilled position's candidates) get the losses and the
    /// summed gradients of the same rows scored once per entry.
    #[test]
    fn head_entries_sharing_a_row_match_dense() {
        head_matches_dense_entries(
            20_000,
            vec![0, 0, 0, 1, 2, 2, 3],
            vec![3, 7, 19_999, 8_200, 17_000, 5, 11],
            4.0,
        );
    }

    #[test]
    fn head_refuses_entries_out_of_order() {
        let (_, q) = rand_q(100, 32, GgmlDType::Q8_0, 3);
        let x = Tensor::randn(0f32, 1., (2, 32), &Device::Cpu).unwrap();
        assert!(head_cross_entropy(&x, &q, vec![1, 0], vec![1, 2]).is_err());
        assert!(head_cross_entropy(&x, &q, vec![0, 2], vec![1, 2]).is_err());
        assert!(head_cross_entropy(&x, &q, vec![0], vec![1, 2]).is_err());
    }

    fn head_matches_dense(vocab: usize, targets: Vec<u32>, spread: f64) {
        head_matches_dense_entries(vocab, (0..targets.len() as u32).collect(), targets, spread)
    }

    fn head_matches_dense_entries(vocab: usize, rows: Vec<u32>, targets: Vec<u32>, spread: f64) {
        assert!(vocab <= 50 || vocab > 2 * head_tile(vocab, 32));
        let (d, q) = rand_q(vocab, 32, GgmlDType::Q8_0, 9);
        let x = Tensor::randn(0f32, 1., (4, 32), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&(x * spread).unwrap()).unwrap();
        let l = head_cross_entropy(x.as_tensor(), &q, rows.clone(), targets.clone()).unwrap();
        // The dense reference scores each entry's row, selected again for every entry.
        let ridx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let picked = x.as_tensor().index_select(&ridx, 0).unwrap();
        let logits = picked.matmul(&d.t().unwrap()).unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let idx = Tensor::new(targets.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let want = lsm
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let diff = (&l - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4 * spread as f32);
        let wv: Vec<f32> = (0..targets.len())
            .map(|i| [1f32, 0.5, 0., 2.][i % 4])
            .collect();
        let w = Tensor::new(wv.as_slice(), &Device::Cpu).unwrap();
        let g1 = (l * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let diff = (g1.get(&x).unwrap() - g2.get(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
