//! Fused differentiable ops for the training forward pass, each with an explicit backward:
//! RMSNorm with a frozen weight, rotary embeddings (interleaved for llama, halves for qwen2) at
//! given positions, and the scaled, masked softmax of attention. candle's composed versions
//! (`rms_norm_slow`, `rope_slow`, `softmax`) are correct but run a dozen elementwise kernels each;
//! these run one pass per row, in parallel.
//!
//! They must not hold trainable state: the weight of RMSNorm is frozen (no gradient).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((o, &xi), &wi) in yr.iter_mut().zip(xr).zip(&self.w) {
                    *o = xi * r * wi;
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = to_vec(arg)?;
        let g = to_vec(grad)?;
        let d = self.w.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (xr, gr))| {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                // dot = Σ g·w·x̂ / d
                let dot = xr
                    .iter()
                    .zip(gr)
                    .zip(&self.w)
                    .map(|((xi, gi), wi)| gi * wi * xi * r)
                    .sum::<f32>()
                    / d as f32;
                for (((oi, &xi), &gi), &wi) in o.iter_mut().zip(xr).zip(gr).zip(&self.w) {
                    *oi = r * (gi * wi - xi * r * dot);
                }
            });
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
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let bi = row / (h * s);
                let si = row % s;
                let base = (bi * s + si) * half;
                let c = &self.cos[base..base + half];
                let sn = &self.sin[base..base + half];
                for i in 0..half {
                    let (ci, si_) = (c[i], sign * sn[i]);
                    let (a, bb) = if self.interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    yr[a] = xr[a] * ci - xr[bb] * si_;
                    yr[bb] = xr[a] * si_ + xr[bb] * ci;
                }
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
        let g = to_vec(grad)?;
        // A rotation's transpose is the rotation by the opposite angle.
        let dx = self.apply(&g, arg.dims(), true)?;
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
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let bi = row / rows_per_batch;
                let qi = row % s;
                let mask = &self.allowed[(bi * s + qi) * s..(bi * s + qi + 1) * s];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..s {
                    if mask[j] {
                        mx = mx.max(xr[j] * self.scale);
                    }
                }
                let mut sum = 0f32;
                for j in 0..s {
                    let v = if mask[j] {
                        (xr[j] * self.scale - mx).exp()
                    } else {
                        0.0
                    };
                    yr[j] = v;
                    sum += v;
                }
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                for v in yr.iter_mut() {
                    *v *= inv;
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let p = to_vec(res)?;
        let g = to_vec(grad)?;
        let s = self.s;
        let mut dx = vec![0f32; p.len()];
        dx.par_chunks_mut(s)
            .zip(p.par_chunks(s).zip(g.par_chunks(s)))
            .for_each(|(o, (pr, gr))| {
                let dot: f32 = pr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for j in 0..s {
                    o[j] = self.scale * pr[j] * (gr[j] - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
