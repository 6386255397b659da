//! Fused differentiable ops for the training forward pass, each with an explicit backward:
//! RMSNorm with a frozen weight, rotary embeddings (interleaved for llama, halves for qwen2) at
//! given positions, the scaled, masked softmax of attention, and SwiGLU's `silu(g) · u`. candle's composed versions
//! (`rms_norm_slow`, `rope_slow`, `softmax`) are correct but run a dozen elementwise kernels each;
//! these run one pass per row, in parallel.
//!
//! They must not hold trainable state: the weight of RMSNorm is frozen (no gradient).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let v = match storage {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{what} needs f32"),
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} needs a contiguous input")))?;
    Ok(&v[a..b])
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on the f32 values of `t` in row-major order: borrowed when `t` is a contiguous f32
/// CPU tensor (every tensor of the training path is), copied otherwise.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (st, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*st, layout.contiguous_offsets())
        {
            return f(&v[a..b]);
        }
    }
    f(&to_vec(t)?)
}

/// A vector of `n` floats whose chunks of `chunk` values are written in parallel by `fill`,
/// without zeroing it first (zeroing outputs that were then overwritten was a tenth of a step).
/// `fill(i, out)` gets chunk `i` (the last may be shorter) and must write every element of
/// `out`: each caller does it with one loop over `out` zipped with inputs of the same length.
fn fresh(n: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: `fill` wrote all n elements (its contract, above), inside the capacity.
    unsafe { v.set_len(n) };
    v
}

/// `Σ f(i)` for i in 0..n, in eight interleaved partial sums (so the loop vectorises; the
/// order is fixed, so the result does not depend on the thread count).
#[inline(always)]
fn sum8(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(i + l);
        }
        i += 8;
    }
    let mut tail = 0f32;
    for j in full..n {
        tail += f(j);
    }
    lanes.iter().sum::<f32>() + tail
}

/// Runs `f` inside a function compiled for AVX-512 (or AVX2 + FMA) when the CPU has it, so the
/// elementwise loops of `f`, inlined there, vectorise 16 or 8 wide (the portable x86_64 build
/// has SSE2 only). Elsewhere it is just `f()`.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        let level = *LEVEL.get_or_init(|| {
            // Training held to AVX2 (`HONE_TRAIN_KERNELS=avx2`) stands for a CPU without
            // AVX-512: its elementwise work stays in 256-bit registers too.
            let held = crate::kernels::train_kernels() == crate::kernels::TrainKernels::Avx2;
            if !held
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
            {
                2
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                1
            } else {
                0
            }
        });
        // SAFETY: the features each wrapper enables were detected on this CPU just above.
        match level {
            2 => return unsafe { wide512(f) },
            1 => return unsafe { wide256(f) },
            _ => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn wide512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wide256<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `y = x / sqrt(mean(x²) + eps) · w` over the last dimension; `w` is frozen.
pub struct RmsNorm {
    pub w: Vec<f32>,
    pub eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "rms norm")?;
        let d = self.w.len();
        if d == 0 || !x.len().is_multiple_of(d) {
            candle_core::bail!("rms norm: {} values are not rows of {d}", x.len());
        }
        let y = fresh(x.len(), d, |i, yr| {
            let xr = &x[i * d..(i + 1) * d];
            wide(|| {
                let ms = sum8(d, |i| xr[i] * xr[i]) / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((o, &xi), &wi) in yr.iter_mut().zip(xr).zip(&self.w) {
                    o.write(xi * r * wi);
                }
            })
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = self.w.len();
        if arg.elem_count() != grad.elem_count() || d == 0 || !arg.elem_count().is_multiple_of(d) {
            candle_core::bail!("rms norm backward: shapes do not match");
        }
        let dx = with_f32(arg, |x| {
            with_f32(grad, |g| {
                Ok(fresh(x.len(), d, |i, o| {
                    let (xr, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
                    wide(|| {
                        let w = &self.w[..d];
                        let ms = sum8(d, |i| xr[i] * xr[i]) / d as f32;
                        let r = 1.0 / (ms + self.eps).sqrt();
                        // dot = Σ g·w·x̂ / d
                        let dot = sum8(d, |i| gr[i] * w[i] * xr[i] * r) / d as f32;
                        for (((oi, &xi), &gi), &wi) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                            oi.write(r * (gi * wi - xi * r * dot));
                        }
                    })
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Rotary embedding of `x` (b, h, s, d) with per-(batch, position) angles: `cos`/`sin` are
/// (b·s, d/2). Interleaved pairs (llama) or halves (NeoX, qwen2).
pub struct Rope {
    pub cos: std::sync::Arc<Vec<f32>>,
    pub sin: std::sync::Arc<Vec<f32>>,
    pub interleaved: bool,
}

impl Rope {
    fn apply(&self, x: &[f32], dims: &[usize], inverse: bool) -> Result<Vec<f32>> {
        let [b, h, s, d] = dims else {
            candle_core::bail!("rope needs (b, h, s, d), got {dims:?}");
        };
        let (b, h, s, d) = (*b, *h, *s, *d);
        let half = d / 2;
        if self.cos.len() != b * s * half {
            candle_core::bail!("rope tables do not match the input");
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        if d == 0 || !x.len().is_multiple_of(d) || half * 2 != d {
            candle_core::bail!("rope: {} values are not rows of an even {d}", x.len());
        }
        let y = fresh(x.len(), d, |row, yr| {
            let xr = &x[row * d..(row + 1) * d];
            let bi = row / (h * s);
            let si = row % s;
            let base = (bi * s + si) * half;
            let c = &self.cos[base..base + half];
            let sn = &self.sin[base..base + half];
            wide(|| {
                if self.interleaved {
                    let pairs = yr.chunks_exact_mut(2).zip(xr.chunks_exact(2));
                    for ((yp, xp), (&ci, &si)) in pairs.zip(c.iter().zip(sn)) {
                        let si = sign * si;
                        yp[0].write(xp[0] * ci - xp[1] * si);
                        yp[1].write(xp[0] * si + xp[1] * ci);
                    }
                } else {
                    let (y0, y1) = yr.split_at_mut(half);
                    let (x0, x1) = xr.split_at(half);
                    let ys = y0.iter_mut().zip(y1.iter_mut());
                    let xs = x0.iter().zip(x1);
                    for ((ya, yb), ((&xa, &xb), (&ci, &si))) in ys.zip(xs.zip(c.iter().zip(sn))) {
                        let si = sign * si;
                        ya.write(xa * ci - xb * si);
                        yb.write(xa * si + xb * ci);
                    }
                }
            })
        });
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "rope")?;
        let y = self.apply(x, layout.dims(), false)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // A rotation's transpose is the rotation by the opposite angle.
        let dx = with_f32(grad, |g| self.apply(g, arg.dims(), true))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `softmax(scale·x + mask)` over the last dimension, for attention scores laid out as
/// (b, kv_heads, rep·s, s) where row r of a block is query position r % s. `allowed[b][i][j]`
/// (flattened) says whether position i may attend to j.
pub struct MaskedSoftmax {
    pub allowed: std::sync::Arc<Vec<bool>>,
    pub s: usize,
    pub scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "softmax")?;
        let dims = layout.dims();
        let s = self.s;
        let rows_per_batch = x.len() / s / dims[0].max(1);
        if s == 0 || !x.len().is_multiple_of(s) {
            candle_core::bail!("softmax: {} values are not rows of {s}", x.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let bi = row / rows_per_batch;
                let qi = row % s;
                let mask = &self.allowed[(bi * s + qi) * s..(bi * s + qi + 1) * s];
                wide(|| {
                    let mut lanes = [f32::NEG_INFINITY; 8];
                    for (j, (&xj, &mj)) in xr.iter().zip(mask).enumerate() {
                        let v = if mj {
                            xj * self.scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        lanes[j % 8] = lanes[j % 8].max(v);
                    }
                    let mx = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    for ((yj, &xj), &mj) in yr.iter_mut().zip(xr).zip(mask) {
                        *yj = if mj {
                            exp_f32(xj * self.scale - mx)
                        } else {
                            0.0
                        };
                    }
                    let sum = sum8(s, |j| yr[j]);
                    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                    for v in yr.iter_mut() {
                        *v *= inv;
                    }
                })
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let s = self.s;
        if res.elem_count() != grad.elem_count() || s == 0 || !res.elem_count().is_multiple_of(s) {
            candle_core::bail!("softmax backward: shapes do not match");
        }
        let dx = with_f32(res, |p| {
            with_f32(grad, |g| {
                Ok(fresh(p.len(), s, |i, o| {
                    let (pr, gr) = (&p[i * s..(i + 1) * s], &g[i * s..(i + 1) * s]);
                    wide(|| {
                        let dot = sum8(s, |j| pr[j] * gr[j]);
                        for ((oj, &pj), &gj) in o.iter_mut().zip(pr).zip(gr) {
                            oj.write(self.scale * pj * (gj - dot));
                        }
                    })
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// SwiGLU's gate: `y = silu(g) · u = g · σ(g) · u`, elementwise; backward
/// `dg = dy · u · σ(g) · (1 + g · (1 - σ(g)))`, `du = dy · silu(g)`. One pass each way instead
/// of candle's six elementwise kernels (and their temporaries) forward and eleven backward.
pub struct SwiGlu;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Elements per parallel chunk of the elementwise ops.
const CHUNK: usize = 16 * 1024;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous(s1, l1, "swiglu")?;
        let u = contiguous(s2, l2, "swiglu")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "swiglu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        if g.len() != u.len() {
            candle_core::bail!("swiglu: {} and {} values", g.len(), u.len());
        }
        let y = fresh(g.len(), CHUNK, |i, yc| {
            let (gc, uc) = (&g[i * CHUNK..][..yc.len()], &u[i * CHUNK..][..yc.len()]);
            wide(|| {
                for ((o, &gi), &ui) in yc.iter_mut().zip(gc).zip(uc) {
                    o.write(gi * sigmoid(gi) * ui);
                }
            })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        if u.elem_count() != n || grad.elem_count() != n {
            candle_core::bail!("swiglu backward: sizes differ");
        }
        let mut dg: Vec<f32> = Vec::with_capacity(n);
        let mut du: Vec<f32> = Vec::with_capacity(n);
        with_f32(g, |gv| {
            with_f32(u, |uv| {
                with_f32(grad, |dy| {
                    dg.spare_capacity_mut()[..n]
                        .par_chunks_mut(CHUNK)
                        .zip(du.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
                        .zip(
                            gv.par_chunks(CHUNK)
                                .zip(uv.par_chunks(CHUNK))
                                .zip(dy.par_chunks(CHUNK)),
                        )
                        .for_each(|((dgc, duc), ((gc, uc), dyc))| {
                            wide(|| {
                                let it = dgc.iter_mut().zip(duc.iter_mut());
                                for ((dgi, dui), ((&gi, &ui), &d)) in
                                    it.zip(gc.iter().zip(uc).zip(dyc))
                                {
                                    let sg = sigmoid(gi);
                                    dui.write(d * gi * sg);
                                    dgi.write(d * ui * sg * (1.0 + gi * (1.0 - sg)));
                                }
                            })
                        });
                    Ok(())
                })
            })
        })?;
        // SAFETY: the loop above wrote every element of both: chunks of n values zipped with
        // inputs of n values each (sizes checked at the top).
        unsafe {
            dg.set_len(n);
            du.set_len(n);
        }
        let dg = Tensor::from_vec(dg, g.shape(), &Device::Cpu)?;
        let du = Tensor::from_vec(du, u.shape(), &Device::Cpu)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `silu(g) · u`, differentiable with respect to both.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

/// `e^x` in f32 without a libm call, so loops over it vectorise: x = n·ln 2 + r with
/// |r| <= ln 2 / 2, e^r by its Taylor polynomial of degree 6 (truncation below 1.3e-7
/// relative), 2^n by building the exponent. Inputs are clamped to [-87.3, 88] (the normal
/// f32 range), NaN stays NaN. The softmax, SwiGLU and the head's log-sum-exp spend their time
/// here (libm's expf and exp were 8% of a training step).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // t's low mantissa bits hold n (t = 1.5·2^23 + n): integer ops only, so loops vectorise.
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4b40_0000).wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1000.0) < 1.3e-38 && exp_f32(-1000.0) >= 0.0);
        assert!(exp_f32(1000.0).is_finite());
    }
}
