//! Fused dequantise-and-multiply kernels for GGUF-quantised weight matrices.
//!
//! Job: compute `out = x · Wᵀ` where `W` is an `n × k` matrix stored as ggml
//! blocks (rows one after another) and `x` holds `m` rows of `k` f32
//! activations. The weights are dequantised on the fly inside the dot product
//! and the activations stay in f32, so the result equals "dequantise W, then
//! multiply in f32" up to the order of the f32 summation. This file owns the
//! public API, argument validation, the rayon work split and the cache
//! tiling; the per-row kernels live in `scalar` (the reference), `avx2`
//! (x86_64 with AVX2+FMA+F16C, chosen at run time) and `neon` (aarch64).
//!
//! Must not: quantise the activations, allocate per block or per row, panic
//! on bad sizes (every public function validates and returns `Err`), assume
//! any alignment of the weight bytes, or use candle at run time (candle only
//! appears in `QType::from_ggml` and as the test oracle).

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod amx_pack;
mod scalar;
mod tiled;

#[cfg(target_arch = "x86_64")]
mod avx512bf16;

pub(crate) use tiled::{f32_gemm, SendPtr};
pub use tiled::{
    gemm_w, gemm_w_mixed, gemm_w_mixed_vec, gemm_wt, gemm_wt_mixed, gemm_wt_mixed_vec,
};

/// The kernels of the training products (`gemm_*_mixed`): bf16 inputs with f32 sums on AMX
/// tiles or with AVX512_BF16 dot products, both packed straight from the quantised blocks, or
/// dequantised f32 tiles through the `gemm` crate (AVX-512, AVX2+FMA or NEON, picked by it).
/// `Avx2` is the f32 path held to the `gemm` crate's AVX2+FMA micro-kernels: what a CPU
/// without AVX-512 runs, never picked by itself (on such a CPU `F32` is the same thing), only
/// asked for, to measure that path on a machine that has a faster one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainKernels {
    Amx,
    Avx512Bf16,
    Avx2,
    F32,
}

impl TrainKernels {
    /// The name `HONE_TRAIN_KERNELS` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            TrainKernels::Amx => "amx",
            TrainKernels::Avx512Bf16 => "avx512bf16",
            TrainKernels::Avx2 => "avx2",
            TrainKernels::F32 => "f32",
        }
    }

    /// Whether this CPU can run them (and, for AMX, `HONE_AMX` does not forbid it).
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            TrainKernels::Amx => amx::available() && amx_pack::available(),
            #[cfg(target_arch = "x86_64")]
            TrainKernels::Avx512Bf16 => avx512bf16::available(),
            #[cfg(target_arch = "x86_64")]
            TrainKernels::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            TrainKernels::F32 => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The training products' kernels on this machine: the fastest available, unless
/// `HONE_TRAIN_KERNELS=amx|avx512bf16|avx2|f32` picks one (a path the CPU lacks falls back to
/// the next slower one, with a warning) or `HONE_AMX=0` rules out AMX. Read once.
pub fn train_kernels() -> TrainKernels {
    static PATH: std::sync::OnceLock<TrainKernels> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        let order = [
            TrainKernels::Amx,
            TrainKernels::Avx512Bf16,
            TrainKernels::Avx2,
            TrainKernels::F32,
        ];
        let asked = std::env::var("HONE_TRAIN_KERNELS").ok();
        let from = match asked.as_deref() {
            None | Some("") | Some("auto") => 0,
            Some(v) => match order.iter().position(|k| k.name() == v) {
                Some(i) => i,
                None => {
                    tracing::warn!(
                        "HONE_TRAIN_KERNELS={v} is not one of amx, avx512bf16, avx2, f32; using the fastest available"
                    );
                    0
                }
            },
        };
        // Left to itself, AVX512_BF16 is picked only where `vdpbf16ps` runs at full rate
        // (AMD Zen 4/5: one 512-bit dot product of 32 pairs per cycle, twice the f32 FMA rate).
        // On Intel without AMX it runs at half rate, slower than f32 FMA on both ports
        // (measured on a Sapphire Rapids with AMX off: see BENCHMARKS.md).
        // AVX2 alone is taken only when asked for: `F32` is the same kernels or faster ones.
        let pick = order[from..]
            .iter()
            .copied()
            .filter(|k| from > 0 || *k != TrainKernels::Avx512Bf16 || full_rate_bf16())
            .filter(|k| *k != TrainKernels::Avx2 || order[from] == TrainKernels::Avx2)
            .find(|k| k.available())
            .unwrap_or(TrainKernels::F32);
        // Only a path the user asked for is worth a warning: left to itself, hone takes the
        // fastest path this CPU has, and most CPUs have no AMX.
        if from > 0 && pick != order[from] {
            tracing::warn!(
                "training kernels {} are not available on this CPU; using {}",
                order[from].name(),
                pick.name()
            );
        } else {
            tracing::debug!("training kernels: {}", pick.name());
        }
        pick
    })
}

/// Whether this CPU's `vdpbf16ps` is known to run at full rate (AMD's).
fn full_rate_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let v = std::arch::x86_64::__cpuid(0);
        // "AuthenticAMD" in EBX, EDX, ECX.
        (v.ebx, v.edx, v.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the mixed-precision products (`gemm_wt_mixed`, `gemm_w_mixed`) use AMX bf16 tiles
/// on this machine (x86_64 with AMX-BF16, not disabled by `HONE_AMX=0`).
pub fn amx_in_use() -> bool {
    train_kernels() == TrainKernels::Amx
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
mod neon;

#[cfg(test)]
mod tests;

use rayon::prelude::*;

/// Operands a kernel cannot multiply: the sizes disagree with the matrix, or a size overflows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Overflow(String),
}

/// Weight storage formats understood by the kernels (ggml block layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QType {
    /// Number of weights per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            QType::F32 | QType::F16 => 1,
            QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::Q8_0 => 32,
            QType::Q4K | QType::Q5K | QType::Q6K => 256,
        }
    }

    /// Number of bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 => 2,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    /// Maps candle's ggml dtype; `None` for formats these kernels do not handle.
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::F32 => QType::F32,
            G::F16 => QType::F16,
            G::Q4_0 => QType::Q4_0,
            G::Q4_1 => QType::Q4_1,
            G::Q5_0 => QType::Q5_0,
            G::Q5_1 => QType::Q5_1,
            G::Q8_0 => QType::Q8_0,
            G::Q4K => QType::Q4K,
            G::Q5K => QType::Q5K,
            G::Q6K => QType::Q6K,
            G::BF16 | G::Q8_1 | G::Q2K | G::Q3K | G::Q8K => return None,
        })
    }
}

/// A quantised weight matrix of `n` rows (outputs) and `k` columns (inputs),
/// rows stored one after another as GGUF blocks (ggml layout: row r occupies
/// blocks r*k/B .. (r+1)*k/B). `data` must be exactly `n * k / B * block_bytes`
/// bytes long and may start at any address.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub dtype: QType,
    pub n: usize,
    pub k: usize,
    pub data: &'a [u8],
}

impl QMatrix<'_> {
    /// Bytes taken by one row, or an error if `k` is not a whole number of
    /// blocks or the size overflows.
    pub fn row_bytes(&self) -> Result<usize, KernelError> {
        let bs = self.dtype.block_size();
        if !self.k.is_multiple_of(bs) {
            return Err(KernelError::Shape(format!(
                "{:?}: k = {} is not a multiple of the block size {}",
                self.dtype, self.k, bs
            )));
        }
        (self.k / bs)
            .checked_mul(self.dtype.block_bytes())
            .ok_or_else(|| {
                KernelError::Overflow(format!(
                    "{:?}: row size overflows (k = {})",
                    self.dtype, self.k
                ))
            })
    }

    /// Checks that `data` holds exactly `n` rows; returns the row size in bytes.
    pub fn validate(&self) -> Result<usize, KernelError> {
        let rb = self.row_bytes()?;
        let want = rb.checked_mul(self.n).ok_or_else(|| {
            KernelError::Overflow(format!("{:?}: matrix size overflows", self.dtype))
        })?;
        if self.data.len() != want {
            return Err(KernelError::Shape(format!(
                "{:?} matrix {}x{}: expected {} bytes of data, got {}",
                self.dtype,
                self.n,
                self.k,
                want,
                self.data.len()
            )));
        }
        Ok(rb)
    }
}

/// A per-row kernel: `out[i] = Σ_j x[i*k + j] * W_row[j]` for `i < out.len()`
/// (1..=4 activation rows, `x.len() >= out.len() * k`). `row` is exactly one
/// weight row. Backends return these as plain fn pointers; the SIMD ones may
/// only be obtained after the CPU features were checked, which keeps the
/// pointer safe to call.
pub(crate) type RowKernel = fn(row: &[u8], x: &[f32], k: usize, out: &mut [f32]);

/// The kernels for 1, 2, 3 and 4 activation rows per pass (index = rows - 1).
type KernelSet = [RowKernel; 4];

/// Maximum number of activation rows one pass over a weight row serves.
const MAX_ROWS_PER_PASS: usize = 4;
/// Minimum weight rows per rayon task.
const MIN_ROWS_PER_TASK: usize = 64;
/// Target size of the weight tile revisited for each group of activation rows
/// when `m > 4` (kept well inside L2).
const TILE_BYTES: usize = 96 * 1024;

/// Which SIMD path `matmul` uses on this machine: "avx2+fma", "neon" or "scalar".
pub fn simd_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    let path = if avx2::available() {
        "avx2+fma"
    } else {
        "scalar"
    };
    #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
    let path = "neon";
    #[cfg(not(any(
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_endian = "little")
    )))]
    let path = "scalar";
    path
}

/// The fastest kernels for `t` on this machine (scalar where no SIMD kernel
/// exists for the type or the CPU lacks the features).
fn simd_kernels(t: QType) -> KernelSet {
    #[cfg(target_arch = "x86_64")]
    let simd = avx2::kernels(t);
    #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
    let simd = neon::kernels(t);
    #[cfg(not(any(
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_endian = "little")
    )))]
    let simd: Option<KernelSet> = None;
    simd.unwrap_or_else(|| scalar::kernels(t))
}

/// True when `HONE_KERNELS=scalar` asks for the scalar reference path everywhere (to check
/// that the fast paths give the same answers; read once).
pub fn forced_scalar() -> bool {
    static SCALAR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SCALAR.get_or_init(|| std::env::var("HONE_KERNELS").is_ok_and(|v| v == "scalar"))
}

/// `out[i*n + r] = Σ_j x[i*k + j] * W[r][j]` for `i < m`, using the fastest
/// path for this CPU. Runs in parallel on the current rayon pool.
pub fn matmul(w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
    run(w, x, m, out, simd_kernels(w.dtype))
}

/// Same as [`matmul`], forcing the scalar reference path.
pub fn matmul_scalar(w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
    run(w, x, m, out, scalar::kernels(w.dtype))
}

/// Dequantises one row (or a run of whole blocks of one) into `y` on the fastest path: AVX2 or
/// NEON for the block types the training products read (the same bits as the scalar path, which tests
/// check), the scalar path otherwise and under `HONE_KERNELS=scalar`.
pub(crate) fn dequantize_row(t: QType, row: &[u8], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if !forced_scalar() && avx2::dequantize_row(t, row, y) {
        return;
    }
    #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
    if !forced_scalar() && neon::dequantize_row(t, row, y) {
        return;
    }
    scalar::dequantize_row(t, row, y)
}

/// Dequantise rows `[r0, r1)` into `out` (`(r1 - r0) * k` f32 values), with
/// the same arithmetic as ggml / candle.
pub fn dequantize_rows(
    w: &QMatrix,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let rb = w.validate()?;
    if r0 > r1 || r1 > w.n {
        return Err(KernelError::Shape(format!(
            "dequantize_rows: bad row range {r0}..{r1} for {} rows",
            w.n
        )));
    }
    let want = (r1 - r0)
        .checked_mul(w.k)
        .ok_or_else(|| KernelError::Overflow("dequantize_rows: size overflows".to_string()))?;
    if out.len() != want {
        return Err(KernelError::Shape(format!(
            "dequantize_rows: out has {} values, expected {want}",
            out.len()
        )));
    }
    if w.k == 0 {
        return Ok(());
    }
    let rows = &w.data[r0 * rb..r1 * rb];
    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(w.k)) {
        dequantize_row(w.dtype, row, o);
    }
    Ok(())
}

fn check_sizes(w: &QMatrix, x: &[f32], m: usize, out: &[f32]) -> Result<usize, KernelError> {
    check_operands("matmul", w, x, w.k, m, out.len(), w.n)
}

/// Validates `w` and that `a` holds `m × a_cols` values and `out` `m × out_cols`; returns the
/// bytes per row of `w`. `what` names the operation in the messages.
fn check_operands(
    what: &str,
    w: &QMatrix,
    a: &[f32],
    a_cols: usize,
    m: usize,
    out_len: usize,
    out_cols: usize,
) -> Result<usize, KernelError> {
    let rb = w.validate()?;
    let want_a = m
        .checked_mul(a_cols)
        .ok_or_else(|| KernelError::Overflow(format!("{what}: input size overflows")))?;
    if a.len() != want_a {
        return Err(KernelError::Shape(format!(
            "{what}: input has {} values, expected {m} x {a_cols} = {want_a}",
            a.len()
        )));
    }
    let want_o = m
        .checked_mul(out_cols)
        .ok_or_else(|| KernelError::Overflow(format!("{what}: output size overflows")))?;
    if out_len != want_o {
        return Err(KernelError::Shape(format!(
            "{what}: output has {out_len} values, expected {m} x {out_cols} = {want_o}"
        )));
    }
    Ok(rb)
}

/// One unit of parallel work: weight rows `r0..r0 + rows`, activation rows
/// `i0..i0 + outs.len()`; `outs[ii]` is the slice of `out` for activation row
/// `i0 + ii` covering those weight rows.
struct Task<'o> {
    r0: usize,
    i0: usize,
    outs: Vec<&'o mut [f32]>,
}

fn run(
    w: &QMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ks: KernelSet,
) -> Result<(), KernelError> {
    let rb = check_sizes(w, x, m, out)?;
    let (n, k) = (w.n, w.k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }

    let threads = rayon::current_num_threads().max(1);
    // Weight-row chunks: at least MIN_ROWS_PER_TASK rows, and about four
    // chunks per thread for load balance.
    let row_chunk = n
        .div_ceil(threads * 4)
        .max(MIN_ROWS_PER_TASK)
        .min(n)
        .next_multiple_of(4)
        .min(n);
    let n_chunks = n.div_ceil(row_chunk);
    // When there are too few weight chunks to feed the pool (small n, large m),
    // split the activation rows too, in multiples of four.
    let m_chunk = if threads > 1 && n_chunks < threads * 2 && m > MAX_ROWS_PER_PASS {
        let want_splits = (threads * 2).div_ceil(n_chunks);
        m.div_ceil(want_splits)
            .next_multiple_of(MAX_ROWS_PER_PASS)
            .min(m)
    } else {
        m
    };
    let m_chunks = m.div_ceil(m_chunk);

    let mut tasks: Vec<Task> = (0..m_chunks * n_chunks)
        .map(|t| Task {
            r0: (t % n_chunks) * row_chunk,
            i0: (t / n_chunks) * m_chunk,
            outs: Vec::with_capacity(m_chunk),
        })
        .collect();
    for (i, orow) in out.chunks_exact_mut(n).enumerate() {
        for (c, piece) in orow.chunks_mut(row_chunk).enumerate() {
            tasks[(i / m_chunk) * n_chunks + c].outs.push(piece);
        }
    }

    let work = |t: Task| run_tile(w, rb, x, t, &ks);
    if tasks.len() == 1 || threads == 1 {
        tasks.into_iter().for_each(work);
    } else {
        tasks.into_par_iter().for_each(work);
    }
    Ok(())
}

/// `outs[j] = W_j x` for one activation row `x` and several matrices that read it (a layer's
/// q, k and v, or its gate and up), in one parallel pass: the pool's threads meet once
/// instead of once per matrix, which at one row is a good part of the time.
pub fn matvec_many(ws: &[&QMatrix], x: &[f32], outs: &mut [&mut [f32]]) -> Result<(), KernelError> {
    matmul_many(ws, x, 1, outs)
}

/// [`matvec_many`] for `m` activation rows (`x` is `m × k`, `outs[j]` is `m × n_j`): every
/// weight row is read once for all `m` (the decode step of several answers at once).
pub fn matmul_many(
    ws: &[&QMatrix],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    if ws.len() != outs.len() {
        return Err(KernelError::Shape(format!(
            "matmul_many: {} matrices, {} outputs",
            ws.len(),
            outs.len()
        )));
    }
    let mut rbs = Vec::with_capacity(ws.len());
    for (w, o) in ws.iter().zip(outs.iter()) {
        rbs.push(check_sizes(w, x, m, o)?);
    }
    if m == 0 {
        return Ok(());
    }
    let scalar = forced_scalar();
    let kernels: Vec<KernelSet> = ws
        .iter()
        .map(|w| {
            if scalar {
                scalar::kernels(w.dtype)
            } else {
                simd_kernels(w.dtype)
            }
        })
        .collect();
    let threads = rayon::current_num_threads().max(1);
    let total: usize = ws.iter().map(|w| w.n).sum();
    let chunk = total
        .div_ceil(threads * 4)
        .max(MIN_ROWS_PER_TASK)
        .next_multiple_of(4);
    let mut tasks: Vec<(usize, Task)> = Vec::new();
    for (j, o) in outs.iter_mut().enumerate() {
        let n = ws[j].n;
        if n == 0 {
            continue;
        }
        if ws[j].k == 0 {
            o.fill(0.0);
            continue;
        }
        let first = tasks.len();
        for c in 0..n.div_ceil(chunk) {
            tasks.push((
                j,
                Task {
                    r0: c * chunk,
                    i0: 0,
                    outs: Vec::with_capacity(m),
                },
            ));
        }
        for orow in o.chunks_exact_mut(n) {
            for (c, piece) in orow.chunks_mut(chunk).enumerate() {
                tasks[first + c].1.outs.push(piece);
            }
        }
    }
    let work = |(j, t): (usize, Task)| run_tile(ws[j], rbs[j], x, t, &kernels[j]);
    if tasks.len() == 1 || threads == 1 {
        tasks.into_iter().for_each(work);
    } else {
        tasks.into_par_iter().for_each(work);
    }
    Ok(())
}

/// Serial work on one task. For `m > 4` the weight rows are walked in tiles
/// of about `TILE_BYTES`, each tile serving every group of four activation
/// rows while it is still in cache.
fn run_tile(w: &QMatrix, rb: usize, x: &[f32], mut t: Task, ks: &KernelSet) {
    let k = w.k;
    let mi = t.outs.len();
    let rows = t.outs.first().map_or(0, |o| o.len());
    let tile = if mi > MAX_ROWS_PER_PASS {
        (TILE_BYTES / rb.max(1)).clamp(1, rows.max(1))
    } else {
        rows.max(1)
    };
    let mut acc = [0f32; MAX_ROWS_PER_PASS];
    let mut t0 = 0;
    while t0 < rows {
        let t1 = (t0 + tile).min(rows);
        let mut g = 0;
        while g < mi {
            let mm = (mi - g).min(MAX_ROWS_PER_PASS);
            let kern = ks[mm - 1];
            let xi = t.i0 + g;
            let xs = &x[xi * k..(xi + mm) * k];
            for r in t0..t1 {
                let wr = t.r0 + r;
                let row = &w.data[wr * rb..(wr + 1) * rb];
                kern(row, xs, k, &mut acc[..mm]);
                for (ii, &a) in acc[..mm].iter().enumerate() {
                    t.outs[g + ii][r] = a;
                }
            }
            g += mm;
        }
        t0 = t1;
    }
}
