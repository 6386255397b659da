//! Products of many activation rows with a quantised matrix: dequantise a cache-sized tile of
//! `W` (`kernels::dequantize_row`: AVX2 or NEON for Q4_0, Q4_1 and Q8_0, the same bits as the
//! scalar path, which took 4% of an AVX2 training step), multiply it with the `gemm` crate's f32 micro-kernels, reuse the buffer for the next
//! tile. Used where `m` is large (prompts, training), where the fused dot kernels of
//! `kernels::matmul` lose to a real GEMM.
//!
//! The work is split so that every weight is dequantised exactly once per call: `x·Wᵀ` splits
//! the rows of `W` between threads, `g·W` splits the columns of `W` (in whole blocks), and
//! each thread owns a disjoint part of the output, so nothing is reduced across threads and
//! the result does not depend on the thread count.
//!
//! On CPUs with AMX (training only, `gemm_*_mixed`) the right operand is packed to bf16 straight
//! from the quantised blocks (`amx_pack`) in panels of 96 output columns × 256 reduction values,
//! and each 32-row block of the left operand is reused across a panel while it sits in L1.
//!
//! Must not: allocate per tile (one buffer per task), keep a dequantised copy after the call,
//! or run candle; sizes are validated and reported as `Err`, never by panicking.

use super::{KernelError, QMatrix, TrainKernels};
use ::gemm::Parallelism;
use rayon::prelude::*;

/// Bytes of one dequantised tile: small enough to stay in L2 next to a slice of activations.
const TILE_BYTES: usize = 512 * 1024;

/// Rows of W per tile are a multiple of this: the GEMM micro-kernel's width on AVX-512 (4 × 16).
const ROW_STEP: usize = 64;

/// A pointer that may cross threads; each task writes a disjoint part of the output (also used
/// by `train::backward` for its row blocks).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint elements (see the callers), and the buffer outlives the scope.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `i` elements further (a method, so closures capture the whole `SendPtr`).
    ///
    /// # Safety
    /// `i` must be inside the buffer.
    pub(crate) unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// `dst = alpha·dst + beta·lhs·rhs` in f32 (`m × n` from `m × k` and `k × n`, strides in
/// elements), single-threaded: the `gemm` crate's product, whose micro-kernels it picks for this
/// CPU (AVX-512, AVX2+FMA, NEON), or its AVX2+FMA micro-kernels alone when `avx2`
/// (`HONE_TRAIN_KERNELS=avx2`, on an x86_64 CPU that has them). `read_dst: false` ignores
/// `dst`'s contents (alpha unused).
///
/// # Safety
/// As `gemm::gemm`: every element the sizes and strides reach lies inside its buffer, and `dst`
/// overlaps neither operand. Strides must not be negative.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn f32_gemm(
    avx2: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
) {
    debug_assert!([dst_cs, dst_rs, lhs_cs, lhs_rs, rhs_cs, rhs_rs]
        .iter()
        .all(|s| *s >= 0));
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        if let Some(simd) = gemm_common::simd::V3::try_new() {
            use gemm_f32::microkernel::fma::f32 as uk;
            // As `gemm::gemm` does: its micro-kernels want a column-oriented output, so a
            // row-major product is computed as its transpose (dstᵀ = rhsᵀ·lhsᵀ).
            let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) =
                if dst_cs.abs() < dst_rs.abs() {
                    (
                        n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs,
                    )
                } else {
                    (
                        m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
                    )
                };
            // The same instantiation as the gemm crate's own AVX2 entry point (8 floats a
            // register, its f32 micro-kernel table).
            gemm_common::gemm::gemm_basic_generic::<
                _,
                f32,
                8,
                { uk::MR_DIV_N * 8 },
                { uk::NR },
                { uk::MR_DIV_N },
                { uk::H_M },
                { uk::H_N },
            >(
                simd,
                m,
                n,
                k,
                dst,
                dst_cs,
                dst_rs,
                read_dst,
                lhs,
                lhs_cs,
                lhs_rs,
                rhs,
                rhs_cs,
                rhs_rs,
                alpha,
                beta,
                false,
                false,
                false,
                |a, b, c| a * b + c,
                &uk::UKR,
                &uk::H_UKR,
                false,
                Parallelism::None,
            );
            return;
        }
    }
    let _ = avx2;
    ::gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        alpha,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// Number of tasks for `units` independent pieces of work on the current pool.
fn split(units: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    units.min(threads * 2).max(1)
}

/// `out (m × n) = x (m × k) · Wᵀ` for `W` (n × k), in f32.
pub fn gemm_wt(w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
    wt_impl(w, x, m, out, None)
}

/// Like [`gemm_wt`], but on CPUs with AMX the products may round their inputs to bf16 (sums
/// stay f32): for training, where that precision is the norm (QLoRA computes in bf16).
pub fn gemm_wt_mixed(w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
    wt_impl(w, x, m, out, Some(super::train_kernels()))
}

/// Like [`gemm_w`], with the precision of [`gemm_wt_mixed`].
pub fn gemm_w_mixed(w: &QMatrix, g: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
    w_impl(w, g, m, out, Some(super::train_kernels()))
}

/// Whether a product of `m` rows with reduction length `k` goes to packed bf16 operands (AMX
/// tiles or AVX512_BF16), and which.
fn packed_path(kernels: Option<TrainKernels>, m: usize, k: usize) -> Option<TrainKernels> {
    #[cfg(target_arch = "x86_64")]
    {
        match kernels {
            Some(p @ (TrainKernels::Amx | TrainKernels::Avx512Bf16))
                if m >= super::amx::BLOCK && k >= 64 =>
            {
                Some(p)
            }
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernels, m, k);
        None
    }
}

/// `x · Wᵀ`; `kernels`: the training products' kernels (`None`: exact f32).
pub(crate) fn wt_impl(
    w: &QMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    kernels: Option<TrainKernels>,
) -> Result<(), KernelError> {
    let rb = super::check_operands("gemm", w, x, w.k, m, out.len(), w.n)?;
    let (n, k) = (w.n, w.k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    if let Some(path) = packed_path(kernels, m, k) {
        // Right operand: Wᵀ (reduction over W's columns, output columns over W's rows).
        let dst = SendPtr(out.as_mut_ptr());
        amx_drive(
            path,
            &Left::new(x, m, k),
            k,
            n,
            1,
            dst,
            &|cols, red, f, p| amx_pack_wt(w, rb, cols, red, f, p),
        );
        return Ok(());
    }
    let avx2 = kernels == Some(TrainKernels::Avx2);
    let tile = (TILE_BYTES / (k * 4) / ROW_STEP * ROW_STEP)
        .max(ROW_STEP)
        .min(n);
    let tiles = n.div_ceil(tile);
    let tasks = split(tiles);
    let per = tiles.div_ceil(tasks);
    let dst = SendPtr(out.as_mut_ptr());
    let work = |t: usize| {
        let mut scratch = Scratch::take();
        let (buf, _) = scratch.get(tile * k);
        for ti in t * per..((t + 1) * per).min(tiles) {
            let r0 = ti * tile;
            let r1 = (r0 + tile).min(n);
            let rows = r1 - r0;
            for (r, o) in (r0..r1).zip(buf.chunks_exact_mut(k)) {
                super::dequantize_row(w.dtype, &w.data[r * rb..(r + 1) * rb], o);
            }
            // SAFETY: x is m × k row-major; buf holds `rows` rows of k (read as its transpose:
            // rhs[j][c] = buf[c * k + j]); dst columns r0..r1 of the m × n row-major output
            // belong to this tile alone.
            unsafe {
                f32_gemm(
                    avx2,
                    m,
                    rows,
                    k,
                    dst.at(r0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    buf.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                );
            }
        }
    };
    if tasks == 1 {
        work(0);
    } else {
        (0..tasks).into_par_iter().for_each(work);
    }
    Ok(())
}

/// [`gemm_wt_mixed`] into a new `m × n` vector. On the AMX path the vector is not zeroed
/// first: the first reduction span stores every element once (a tenth of a training step went
/// to zeroing outputs that were then overwritten).
pub fn gemm_wt_mixed_vec(w: &QMatrix, x: &[f32], m: usize) -> Result<Vec<f32>, KernelError> {
    wt_vec(w, x, m, Some(super::train_kernels()))
}

/// [`gemm_wt_mixed_vec`] with the given kernels.
pub(crate) fn wt_vec(
    w: &QMatrix,
    x: &[f32],
    m: usize,
    kernels: Option<TrainKernels>,
) -> Result<Vec<f32>, KernelError> {
    let len = m
        .checked_mul(w.n)
        .ok_or_else(|| KernelError::Overflow("gemm: output size overflows".to_string()))?;
    let path = match packed_path(kernels, m, w.k) {
        Some(p) if m > 0 && w.n > 0 => p,
        _ => {
            let mut out = vec![0f32; len];
            wt_impl(w, x, m, &mut out, kernels)?;
            return Ok(out);
        }
    };
    let rb = super::check_operands("gemm", w, x, w.k, m, len, w.n)?;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    amx_drive(
        path,
        &Left::new(x, m, w.k),
        w.k,
        w.n,
        1,
        SendPtr(out.as_mut_ptr()),
        &|cols, red, f, p| amx_pack_wt(w, rb, cols, red, f, p),
    );
    // SAFETY: amx_drive stored all m × n elements (every row block and column block of every
    // panel, in its first reduction span), within the capacity reserved above.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// [`gemm_w_mixed`] into a new `m × k` vector, not zeroed first on the AMX path (as
/// [`gemm_wt_mixed_vec`]).
pub fn gemm_w_mixed_vec(w: &QMatrix, g: &[f32], m: usize) -> Result<Vec<f32>, KernelError> {
    w_vec(w, g, m, Some(super::train_kernels()))
}

/// [`gemm_w_mixed_vec`] with the given kernels.
pub(crate) fn w_vec(
    w: &QMatrix,
    g: &[f32],
    m: usize,
    kernels: Option<TrainKernels>,
) -> Result<Vec<f32>, KernelError> {
    let len = m
        .checked_mul(w.k)
        .ok_or_else(|| KernelError::Overflow("gemm: output size overflows".to_string()))?;
    let path = match packed_path(kernels, m, w.n) {
        Some(p) if m > 0 && w.k > 0 => p,
        _ => {
            let mut out = vec![0f32; len];
            w_impl(w, g, m, &mut out, kernels)?;
            return Ok(out);
        }
    };
    let rb = super::check_operands("gemm", w, g, w.n, m, len, w.k)?;
    let ub = w.dtype.block_size();
    let mut out: Vec<f32> = Vec::with_capacity(len);
    amx_drive(
        path,
        &Left::new(g, m, w.n),
        w.n,
        w.k,
        ub,
        SendPtr(out.as_mut_ptr()),
        &|cols, red, f, p| amx_pack_w(w, rb, red, cols, f, p),
    );
    // SAFETY: as in `gemm_wt_mixed_vec`.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// `out (m × k) = g (m × n) · W` for `W` (n × k): the gradient of `x·Wᵀ` with respect to `x`.
pub fn gemm_w(w: &QMatrix, g: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
    w_impl(w, g, m, out, None)
}

/// `g · W`; `kernels` as in [`wt_impl`].
pub(crate) fn w_impl(
    w: &QMatrix,
    g: &[f32],
    m: usize,
    out: &mut [f32],
    kernels: Option<TrainKernels>,
) -> Result<(), KernelError> {
    let rb = super::check_operands("gemm", w, g, w.n, m, out.len(), w.k)?;
    let (n, k) = (w.n, w.k);
    if m == 0 || k == 0 {
        return Ok(());
    }
    if n == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let (ub, ubytes) = (w.dtype.block_size(), w.dtype.block_bytes());
    if let Some(path) = packed_path(kernels, m, n) {
        // Right operand: W (reduction over W's rows); panels of whole blocks of columns.
        let dst = SendPtr(out.as_mut_ptr());
        amx_drive(
            path,
            &Left::new(g, m, n),
            n,
            k,
            ub,
            dst,
            &|cols, red, f, p| amx_pack_w(w, rb, red, cols, f, p),
        );
        return Ok(());
    }
    // Column ranges of a fixed width (whole blocks, at least 64 values), and row tiles sized
    // from that width only, so the summation order never depends on the thread count.
    let avx2 = kernels == Some(TrainKernels::Avx2);
    let width = ub.max(64).next_multiple_of(ub);
    let chunks = k.div_ceil(width);
    let tile = (TILE_BYTES / (width * 4)).clamp(16, n.max(16)).min(n);
    let dst = SendPtr(out.as_mut_ptr());
    let work = |t: usize| {
        let c0 = t * width;
        let c1 = (c0 + width).min(k);
        let cols = c1 - c0;
        let (b0, b1) = (c0 / ub * ubytes, c1 / ub * ubytes);
        let mut scratch = Scratch::take();
        let (buf, _) = scratch.get(tile * cols);
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + tile).min(n);
            let rows = r1 - r0;
            for (r, o) in (r0..r1).zip(buf.chunks_exact_mut(cols)) {
                let row = &w.data[r * rb..(r + 1) * rb];
                super::dequantize_row(w.dtype, &row[b0..b1], o);
            }
            // SAFETY: g is m × n row-major (columns r0..r1 read); buf is rows × cols row-major;
            // dst columns c0..c1 of the m × k output belong to this task alone.
            unsafe {
                f32_gemm(
                    avx2,
                    m,
                    cols,
                    rows,
                    dst.at(c0),
                    1,
                    k as isize,
                    r0 > 0,
                    g.as_ptr().add(r0),
                    1,
                    n as isize,
                    buf.as_ptr(),
                    1,
                    cols as isize,
                    1.0,
                    1.0,
                );
            }
            r0 = r1;
        }
    };
    if chunks == 1 || rayon::current_num_threads() == 1 {
        (0..chunks).for_each(work);
    } else {
        (0..chunks).into_par_iter().for_each(work);
    }
    Ok(())
}

/// The left operand of an AMX product in bf16: `m` rows of `cols` values, zero-padded to
/// `m_pad` rows (multiple of 32) and `stride` values per row (multiple of 32, plus one step so
/// a tile step that starts inside the last 32 columns stays in the buffer).
#[derive(Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Left {
    data: Vec<u16>,
    m: usize,
    m_pad: usize,
    stride: usize,
}

impl Left {
    #[cfg(target_arch = "x86_64")]
    fn new(x: &[f32], m: usize, cols: usize) -> Self {
        use super::amx::{BLOCK, CHUNK};
        use super::amx_pack::pack_left;
        let m_pad = m.next_multiple_of(BLOCK);
        let stride = cols.next_multiple_of(CHUNK) + CHUNK;
        Self {
            data: pack_left(x, m, cols, m_pad, stride),
            m,
            m_pad,
            stride,
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn new(_x: &[f32], _m: usize, _cols: usize) -> Self {
        Self::default()
    }
}

/// This thread's AMX tiles, configured for as long as the value lives.
#[cfg(target_arch = "x86_64")]
struct AmxThread;

#[cfg(target_arch = "x86_64")]
impl AmxThread {
    fn start() -> Self {
        // SAFETY: only created when `use_amx` (hence `amx::available()`) said yes.
        unsafe {
            super::amx::configure();
        }
        AmxThread
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for AmxThread {
    fn drop(&mut self) {
        // SAFETY: `start` configured the tiles on this thread.
        unsafe {
            super::amx::release();
        }
    }
}

/// Reduction values per packed step of the AMX path: a 32-row block of the left operand over
/// this span (at most 16 KiB in bf16) stays in L1 while the panel's column blocks pass by.
#[cfg(target_arch = "x86_64")]
const AMX_SPAN: usize = 256;

/// Output columns per AMX task (a panel); its packed span (≤ 48 KiB) stays in L2.
#[cfg(target_arch = "x86_64")]
const AMX_PANEL: usize = 96;

/// Packs one panel's right operand: (output columns, reduction range, f32 scratch, packed
/// buffer) → reduction steps.
type PackFn<'a> =
    dyn Fn((usize, usize), (usize, usize), &mut Vec<f32>, &mut Vec<u16>) -> usize + Sync + 'a;

/// `out (m × ncols) = left (m × red) · R` on AMX tiles, `R` packed panel by panel by `pack`.
/// Each task owns a panel of output columns (a multiple of `align` wide) and walks the
/// reduction in spans, so the summation order (whole 32-steps, in order) never depends on the
/// thread count or the panel sizes.
#[cfg(target_arch = "x86_64")]
fn amx_drive(
    path: TrainKernels,
    left: &Left,
    red: usize,
    ncols: usize,
    align: usize,
    dst: SendPtr,
    pack: &PackFn,
) {
    use super::amx::CHUNK;
    let panel = AMX_PANEL.next_multiple_of(align.max(1));
    let panels = ncols.div_ceil(panel);
    let spans = red.div_ceil(AMX_SPAN);
    let span = red.div_ceil(spans).next_multiple_of(CHUNK);
    let work = |p: usize| {
        let mut scratch = Scratch::take();
        let (f, packed) = scratch.vecs();
        let _tiles = (path == TrainKernels::Amx).then(AmxThread::start);
        let (c0, c1) = (p * panel, ((p + 1) * panel).min(ncols));
        let mut k0 = 0;
        while k0 < red {
            let k1 = (k0 + span).min(red);
            let chunks = pack((c0, c1), (k0, k1), f, packed);
            // SAFETY: the tiles are configured on this thread (`_tiles`); the output columns
            // c0..c1 belong to this task; the left operand covers k0 + 32·chunks (its stride is
            // padded past `red`); see `amx_product`.
            unsafe {
                amx_product(
                    path,
                    left,
                    k0,
                    chunks,
                    packed,
                    c1 - c0,
                    dst,
                    ncols,
                    c0,
                    k0 > 0,
                );
            }
            k0 = k1;
        }
    };
    if panels == 1 || rayon::current_num_threads() == 1 {
        (0..panels).for_each(work);
    } else {
        (0..panels).into_par_iter().for_each(work);
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_drive(
    _k: TrainKernels,
    _l: &Left,
    _r: usize,
    _n: usize,
    _a: usize,
    _o: SendPtr,
    _p: &PackFn,
) {
    unreachable!("packed_path is None off x86_64")
}

#[cfg(target_arch = "x86_64")]
fn amx_pack_wt(
    w: &QMatrix,
    rb: usize,
    cols: (usize, usize),
    red: (usize, usize),
    f: &mut Vec<f32>,
    p: &mut Vec<u16>,
) -> usize {
    super::amx_pack::pack_wt(w, rb, cols, red, f, p)
}

#[cfg(target_arch = "x86_64")]
fn amx_pack_w(
    w: &QMatrix,
    rb: usize,
    red: (usize, usize),
    cols: (usize, usize),
    f: &mut Vec<f32>,
    p: &mut Vec<u16>,
) -> usize {
    super::amx_pack::pack_w(w, rb, red, cols, f, p)
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_pack_wt(
    _w: &QMatrix,
    _rb: usize,
    _c: (usize, usize),
    _r: (usize, usize),
    _f: &mut Vec<f32>,
    _p: &mut Vec<u16>,
) -> usize {
    unreachable!("packed_path is None off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_pack_w(
    _w: &QMatrix,
    _rb: usize,
    _r: (usize, usize),
    _c: (usize, usize),
    _f: &mut Vec<f32>,
    _p: &mut Vec<u16>,
) -> usize {
    unreachable!("packed_path is None off x86_64")
}

/// `out[:, col0 .. col0 + cols] (=|+=) left[:, off .. off + 32·chunks] · R`, with `R` packed
/// (`amx::pack_*`) and `out` row-major with `ldo` floats per row and `left.m` rows. Whole
/// 32 × 32 blocks are loaded and stored in place; edge blocks go through a scratch block.
///
/// # Safety
/// The AMX tiles must be configured on this thread; `off + 32·chunks` must not exceed the
/// columns `left` was built with; nothing else may write those output columns meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn amx_product(
    path: TrainKernels,
    left: &Left,
    off: usize,
    chunks: usize,
    packed: &[u16],
    cols: usize,
    out: SendPtr,
    ldo: usize,
    col0: usize,
    accumulate: bool,
) {
    use super::amx::{BLOCK, TILE_VALUES};
    let block = match path {
        TrainKernels::Amx => super::amx::block,
        _ => super::avx512bf16::block,
    };
    let mut c = [0f32; BLOCK * BLOCK];
    // Row blocks outside, column blocks inside: 32 rows of the left operand stay in L1 while
    // the packed right operand (a few hundred KiB) is read from L2 once per row block.
    for mb in 0..left.m_pad / BLOCK {
        let a = left.data.as_ptr().add(mb * BLOCK * left.stride + off);
        let rows = (left.m - mb * BLOCK).min(BLOCK);
        for cb in 0..cols.div_ceil(BLOCK) {
            let b0 = packed.as_ptr().add(2 * cb * chunks * TILE_VALUES);
            let b1 = packed.as_ptr().add((2 * cb + 1) * chunks * TILE_VALUES);
            let width = (cols - cb * BLOCK).min(BLOCK);
            let o = out.at(mb * BLOCK * ldo + col0 + cb * BLOCK);
            if rows == BLOCK && width == BLOCK {
                block(a, left.stride * 2, b0, b1, chunks, o, ldo * 4, accumulate);
                continue;
            }
            for i in 0..BLOCK {
                for j in 0..BLOCK {
                    c[i * BLOCK + j] = if accumulate && i < rows && j < width {
                        *o.add(i * ldo + j)
                    } else {
                        0.0
                    };
                }
            }
            block(
                a,
                left.stride * 2,
                b0,
                b1,
                chunks,
                c.as_mut_ptr(),
                BLOCK * 4,
                accumulate,
            );
            for i in 0..rows {
                for j in 0..width {
                    *o.add(i * ldo + j) = c[i * BLOCK + j];
                }
            }
        }
    }
}

/// A thread's dequantisation and packing buffers, kept between calls (a training step makes
/// hundreds of products; allocating and zeroing fresh buffers for each was a tenth of it).
#[derive(Default)]
struct Buffers {
    buf: Vec<f32>,
    packed: Vec<u16>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Buffers>> = const { std::cell::Cell::new(None) };
}

/// This thread's buffers, borrowed for one task and given back when dropped.
struct Scratch(Buffers);

impl Scratch {
    /// This thread's buffers (or new ones).
    fn take() -> Self {
        Scratch(
            SCRATCH
                .try_with(|c| c.take())
                .ok()
                .flatten()
                .unwrap_or_default(),
        )
    }

    /// A dequantisation buffer of at least `n` values (contents unspecified) and the packing
    /// buffer.
    fn get(&mut self, n: usize) -> (&mut [f32], &mut Vec<u16>) {
        if self.0.buf.len() < n {
            self.0.buf.resize(n, 0.0);
        }
        (&mut self.0.buf[..n], &mut self.0.packed)
    }

    /// Both buffers as vectors, for packers that size them themselves.
    #[cfg(target_arch = "x86_64")]
    fn vecs(&mut self) -> (&mut Vec<f32>, &mut Vec<u16>) {
        (&mut self.0.buf, &mut self.0.packed)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let b = std::mem::take(&mut self.0);
        // During thread exit the slot may be gone; then the buffers are simply freed.
        let _ = SCRATCH.try_with(|c| c.set(Some(b)));
    }
}
