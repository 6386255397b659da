//! Products of many activation rows with a quantised matrix: dequantise a cache-sized tile of
//! `W`, multiply it with the `gemm` crate's f32 micro-kernels, reuse the buffer for the next
//! tile. Used where `m` is large (prompts, training), where the fused dot kernels of
//! `kernels::matmul` lose to a real GEMM.
//!
//! The work is split so that every weight is dequantised exactly once per call: `x·Wᵀ` splits
//! the rows of `W` between threads, `g·W` splits the columns of `W` (in whole blocks), and
//! each thread owns a disjoint part of the output, so nothing is reduced across threads and
//! the result does not depend on the thread count.
//!
//! Must not: allocate per tile (one buffer per task), keep a dequantised copy after the call,
//! or run candle; sizes are validated and reported as `Err`, never by panicking.

use super::{scalar, QMatrix};
use ::gemm::Parallelism;
use rayon::prelude::*;

/// Bytes of one dequantised tile: small enough to stay in L2 next to a slice of activations.
const TILE_BYTES: usize = 512 * 1024;

/// Rows of W per tile are a multiple of this: the GEMM micro-kernel's width on AVX-512 (4 × 16).
const ROW_STEP: usize = 64;

/// A pointer that may cross threads; each task writes a disjoint part of the output.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see the callers), and the buffer outlives the scope.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `i` elements further (a method, so closures capture the whole `SendPtr`).
    ///
    /// # Safety
    /// `i` must be inside the buffer.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

fn check(
    w: &QMatrix,
    a: &[f32],
    a_cols: usize,
    m: usize,
    out: &[f32],
    out_cols: usize,
) -> Result<usize, String> {
    let rb = w.validate()?;
    let want_a = m
        .checked_mul(a_cols)
        .ok_or_else(|| "gemm: input size overflows".to_string())?;
    if a.len() != want_a {
        return Err(format!(
            "gemm: input has {} values, expected {m} x {a_cols}",
            a.len()
        ));
    }
    let want_o = m
        .checked_mul(out_cols)
        .ok_or_else(|| "gemm: output size overflows".to_string())?;
    if out.len() != want_o {
        return Err(format!(
            "gemm: output has {} values, expected {m} x {out_cols}",
            out.len()
        ));
    }
    Ok(rb)
}

/// Number of tasks for `units` independent pieces of work on the current pool.
fn split(units: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    units.min(threads * 2).max(1)
}

/// `out (m × n) = x (m × k) · Wᵀ` for `W` (n × k).
pub fn gemm_wt(w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), String> {
    let rb = check(w, x, w.k, m, out, w.n)?;
    let (n, k) = (w.n, w.k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let tile = (TILE_BYTES / (k * 4) / ROW_STEP * ROW_STEP)
        .max(ROW_STEP)
        .min(n);
    let tiles = n.div_ceil(tile);
    let tasks = split(tiles);
    let per = tiles.div_ceil(tasks);
    let dst = SendPtr(out.as_mut_ptr());
    let work = |t: usize| {
        let mut buf = vec![0f32; tile * k];
        for ti in t * per..((t + 1) * per).min(tiles) {
            let r0 = ti * tile;
            let r1 = (r0 + tile).min(n);
            let rows = r1 - r0;
            for (r, o) in (r0..r1).zip(buf.chunks_exact_mut(k)) {
                scalar::dequantize_row(w.dtype, &w.data[r * rb..(r + 1) * rb], o);
            }
            // SAFETY: x is m × k row-major; buf holds `rows` rows of k (read as its transpose:
            // rhs[j][c] = buf[c * k + j]); dst columns r0..r1 of the m × n row-major output
            // belong to this tile alone.
            unsafe {
                ::gemm::gemm(
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
                    false,
                    false,
                    false,
                    Parallelism::None,
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

/// `out (m × k) = g (m × n) · W` for `W` (n × k): the gradient of `x·Wᵀ` with respect to `x`.
pub fn gemm_w(w: &QMatrix, g: &[f32], m: usize, out: &mut [f32]) -> Result<(), String> {
    let rb = check(w, g, w.n, m, out, w.k)?;
    let (n, k) = (w.n, w.k);
    if m == 0 || k == 0 {
        return Ok(());
    }
    if n == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // Column ranges of a fixed width (whole blocks, at least 64 values), and row tiles sized
    // from that width only, so the summation order never depends on the thread count.
    let (ub, ubytes) = (w.dtype.block_size(), w.dtype.block_bytes());
    let width = ub.max(64).next_multiple_of(ub);
    let chunks = k.div_ceil(width);
    let tile = (TILE_BYTES / (width * 4)).clamp(16, n.max(16)).min(n);
    let dst = SendPtr(out.as_mut_ptr());
    let work = |t: usize| {
        let c0 = t * width;
        let c1 = (c0 + width).min(k);
        let cols = c1 - c0;
        let (b0, b1) = (c0 / ub * ubytes, c1 / ub * ubytes);
        let mut buf = vec![0f32; tile * cols];
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + tile).min(n);
            let rows = r1 - r0;
            for (r, o) in (r0..r1).zip(buf.chunks_exact_mut(cols)) {
                let row = &w.data[r * rb..(r + 1) * rb];
                scalar::dequantize_row(w.dtype, &row[b0..b1], o);
            }
            // SAFETY: g is m × n row-major (columns r0..r1 read); buf is rows × cols row-major;
            // dst columns c0..c1 of the m × k output belong to this task alone.
            unsafe {
                ::gemm::gemm(
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
                    false,
                    false,
                    false,
                    Parallelism::None,
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
