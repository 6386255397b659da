//! x86_64 AVX2 + FMA (+ F16C) row kernels: fused dequantise + dot product
//! with f32 activations, for 1..=4 activation rows per pass over a weight row.
//!
//! Job: for each block, expand the quantised weights into f32 registers once
//! (the same values ggml's dequantisation produces, up to one FMA rounding
//! for the types with an offset/min) and FMA them against up to four
//! activation rows. Handed out only through [`kernels`], which checks the CPU
//! features first; every kernel re-checks the slice lengths before it touches
//! memory through raw pointers.
//!
//! Must not: be called without the feature check, read outside the given
//! slices, assume alignment (all loads are unaligned), or quantise the
//! activations.

use super::scalar::{f16_to_f32, scale_min_k4};
use super::{KernelSet, QType};
use std::arch::x86_64::*;

/// True if this CPU has everything the kernels use.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Guard run before every unsafe kernel: the kernels index `row`, `x` and
/// `out` through raw pointers assuming exactly these sizes.
#[inline(always)]
fn check(row: &[u8], x: &[f32], k: usize, out: &[f32], m: usize, t: QType) {
    let bs = t.block_size();
    assert!(
        k.is_multiple_of(bs)
            && row.len() == k / bs * t.block_bytes()
            && x.len() >= m * k
            && out.len() == m,
        "avx2 kernel called with inconsistent sizes"
    );
}

macro_rules! kernel_set {
    ($f:ident, $t:expr) => {{
        let ks: KernelSet = [
            |row: &[u8], x: &[f32], k: usize, out: &mut [f32]| {
                check(row, x, k, out, 1, $t);
                // SAFETY: `kernels` hands this out only after `available()`
                // confirmed AVX2/FMA/F16C, and `check` verified the sizes the
                // kernel relies on.
                unsafe { $f::<1, 4>(row, x, k, out) }
            },
            |row: &[u8], x: &[f32], k: usize, out: &mut [f32]| {
                check(row, x, k, out, 2, $t);
                // SAFETY: as above.
                unsafe { $f::<2, 4>(row, x, k, out) }
            },
            |row: &[u8], x: &[f32], k: usize, out: &mut [f32]| {
                check(row, x, k, out, 3, $t);
                // SAFETY: as above.
                unsafe { $f::<3, 2>(row, x, k, out) }
            },
            |row: &[u8], x: &[f32], k: usize, out: &mut [f32]| {
                check(row, x, k, out, 4, $t);
                // SAFETY: as above.
                unsafe { $f::<4, 2>(row, x, k, out) }
            },
        ];
        ks
    }};
}

/// The AVX2 kernels for `t`, or `None` if the CPU lacks the features.
pub(super) fn kernels(t: QType) -> Option<KernelSet> {
    if !available() {
        return None;
    }
    Some(match t {
        QType::F32 => kernel_set!(dot_f32, QType::F32),
        QType::F16 => kernel_set!(dot_f16, QType::F16),
        QType::Q4_0 => kernel_set!(dot_q4_0, QType::Q4_0),
        QType::Q4_1 => kernel_set!(dot_q4_1, QType::Q4_1),
        QType::Q5_0 => kernel_set!(dot_q5_0, QType::Q5_0),
        QType::Q5_1 => kernel_set!(dot_q5_1, QType::Q5_1),
        QType::Q8_0 => kernel_set!(dot_q8_0, QType::Q8_0),
        QType::Q4K => kernel_set!(dot_q4k, QType::Q4K),
        QType::Q5K => kernel_set!(dot_q5k, QType::Q5K),
        QType::Q6K => kernel_set!(dot_q6k, QType::Q6K),
    })
}

/// How far ahead of the block being decoded the weights are prefetched. The
/// hardware prefetcher alone does not keep up with matrices that miss the
/// cache (measured 2-3x slower on the 30 MB vocab matrix without it).
const PF: usize = 2048;

/// Hints that the weight bytes `PF` past `p` will be needed soon.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch(p: *const u8) {
    // A prefetch is only a hint and never faults, whatever the address;
    // `wrapping_add` keeps the pointer arithmetic itself defined.
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF).cast())
}

/// Accumulators: `S` independent FMA chains for each of the `M` activation
/// rows (enough chains to hide the FMA latency).
type Acc<const M: usize, const S: usize> = [[__m256; S]; M];

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn zero_acc<const M: usize, const S: usize>() -> Acc<M, S> {
    [[_mm256_setzero_ps(); S]; M]
}

/// `acc[i][slot] += w * x[i*k .. i*k+8]` for every activation row `i < M`.
///
/// # Safety
/// `x.add(i * k + 7)` must be in bounds for every `i < M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_rows<const M: usize, const S: usize>(
    acc: &mut Acc<M, S>,
    w: __m256,
    x: *const f32,
    k: usize,
    slot: usize,
) {
    for (i, a) in acc.iter_mut().enumerate() {
        // SAFETY: in bounds by the caller's contract; unaligned load.
        let xv = unsafe { _mm256_loadu_ps(x.add(i * k)) };
        a[slot] = _mm256_fmadd_ps(w, xv, a[slot]);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn finish<const M: usize, const S: usize>(acc: &Acc<M, S>, out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        let mut v = a[0];
        for s in &a[1..] {
            v = _mm256_add_ps(v, *s);
        }
        *o = hsum(v);
    }
}

/// Reads a little-endian f16 at `p` and widens it (exact).
///
/// # Safety
/// `p .. p+2` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f16(p: *const u8) -> f32 {
    // SAFETY: two readable bytes by contract.
    _mm_cvtss_f32(_mm256_castps256_ps128(unsafe { ld_f16x8(p) }))
}

/// Reads a little-endian f16 at `p` and broadcasts it, widened, to 8 lanes.
/// (A broadcast rather than an insert into lane 0: LLVM otherwise inserts into
/// a live accumulator register and chains every block onto the previous one.)
///
/// # Safety
/// `p .. p+2` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f16x8(p: *const u8) -> __m256 {
    // SAFETY: two readable bytes by contract; unaligned read.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(h as i16))
}

/// Low 8 unsigned bytes of `v` as 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn u8x8_ps(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

/// Low 8 signed bytes of `v` as 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8x8_ps(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// Loads 16 bytes.
///
/// # Safety
/// `p .. p+16` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld128(p: *const u8) -> __m128i {
    // SAFETY: by contract; unaligned load.
    unsafe { _mm_loadu_si128(p.cast()) }
}

/// Loads 32 bytes.
///
/// # Safety
/// `p .. p+32` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld256(p: *const u8) -> __m256i {
    // SAFETY: by contract; unaligned load.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// FMA the 32 unsigned byte values of `q` (elements 0..32 of a sub-block),
/// dequantised as `q * d - mn`, against the activations at `x`.
///
/// # Safety
/// `x.add(i * k + 31)` in bounds for every `i < M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_u8x32<const M: usize, const S: usize>(
    acc: &mut Acc<M, S>,
    q: __m256i,
    d: __m256,
    mn: __m256,
    x: *const f32,
    k: usize,
) {
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256::<1>(q);
    // SAFETY (all four calls): 32 activations per row are in bounds by contract.
    unsafe {
        fma_rows(acc, _mm256_fmsub_ps(u8x8_ps(lo), d, mn), x, k, 0);
        let lo8 = _mm_srli_si128::<8>(lo);
        fma_rows(
            acc,
            _mm256_fmsub_ps(u8x8_ps(lo8), d, mn),
            x.add(8),
            k,
            1 % S,
        );
        fma_rows(
            acc,
            _mm256_fmsub_ps(u8x8_ps(hi), d, mn),
            x.add(16),
            k,
            2 % S,
        );
        let hi8 = _mm_srli_si128::<8>(hi);
        fma_rows(
            acc,
            _mm256_fmsub_ps(u8x8_ps(hi8), d, mn),
            x.add(24),
            k,
            3 % S,
        );
    }
}

/// FMA the 32 signed byte values of `q`, dequantised as `q * d0` for
/// elements 0..16 and `q * d1` for 16..32, against the activations at `x`.
///
/// # Safety
/// `x.add(i * k + 31)` in bounds for every `i < M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_i8x32<const M: usize, const S: usize>(
    acc: &mut Acc<M, S>,
    q: __m256i,
    d0: __m256,
    d1: __m256,
    x: *const f32,
    k: usize,
) {
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256::<1>(q);
    // SAFETY (all four calls): 32 activations per row are in bounds by contract.
    unsafe {
        fma_rows(acc, _mm256_mul_ps(i8x8_ps(lo), d0), x, k, 0);
        let lo8 = _mm_srli_si128::<8>(lo);
        fma_rows(acc, _mm256_mul_ps(i8x8_ps(lo8), d0), x.add(8), k, 1 % S);
        fma_rows(acc, _mm256_mul_ps(i8x8_ps(hi), d1), x.add(16), k, 2 % S);
        let hi8 = _mm_srli_si128::<8>(hi);
        fma_rows(acc, _mm256_mul_ps(i8x8_ps(hi8), d1), x.add(24), k, 3 % S);
    }
}

// ---------------------------------------------------------------------------
// Row kernels. Common contract (checked by `check` before every call):
// the CPU has AVX2+FMA+F16C, `row` is exactly one row of `k` weights in the
// kernel's format, `x.len() >= M * k` (row i of the activations starts at
// `i * k`) and `out.len() == M`.
// ---------------------------------------------------------------------------

/// Float rows: `load(i)` yields weights 8i..8i+8 as f32; the loop is unrolled
/// by `S` so that every accumulator index is a constant (a variable index
/// makes LLVM keep the accumulators in memory).
///
/// # Safety
/// See the common contract above; `load(i)` must be valid for `8i + 8 <= k`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_float<const M: usize, const S: usize>(
    x: &[f32],
    k: usize,
    out: &mut [f32],
    load: impl Fn(usize) -> __m256,
    scalar: impl Fn(usize) -> f32,
) {
    let mut acc = zero_acc::<M, S>();
    let xp = x.as_ptr();
    let groups = k / 8;
    let mut i = 0;
    while i + S <= groups {
        for s in 0..S {
            // SAFETY: weights and activations 8(i+s) .. 8(i+s)+8 < k are in
            // bounds for every row.
            unsafe { fma_rows(&mut acc, load(i + s), xp.add(8 * (i + s)), k, s) };
        }
        i += S;
    }
    while i < groups {
        // SAFETY: as above.
        unsafe { fma_rows(&mut acc, load(i), xp.add(8 * i), k, 0) };
        i += 1;
    }
    finish(&acc, out);
    for j in groups * 8..k {
        let w = scalar(j);
        for (r, o) in out.iter_mut().enumerate() {
            *o += w * x[r * k + j];
        }
    }
}

/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let rp = row.as_ptr();
    let load = |i: usize| {
        // SAFETY: weights 8i..8i+8 lie in `row` (4 bytes each); unaligned load.
        unsafe {
            prefetch(rp.add(32 * i));
            _mm256_loadu_ps(rp.add(32 * i).cast())
        }
    };
    let scalar = |j: usize| {
        let b = &row[4 * j..4 * j + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    // SAFETY: forwarded contract.
    unsafe { dot_float::<M, S>(x, k, out, load, scalar) }
}

/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let rp = row.as_ptr();
    let load = |i: usize| {
        // SAFETY: weights 8i..8i+8 lie in `row` (2 bytes each); unaligned load.
        unsafe {
            prefetch(rp.add(16 * i));
            _mm256_cvtph_ps(ld128(rp.add(16 * i)))
        }
    };
    let scalar = |j: usize| f16_to_f32(u16::from_le_bytes([row[2 * j], row[2 * j + 1]]));
    // SAFETY: forwarded contract.
    unsafe { dot_float::<M, S>(x, k, out, load, scalar) }
}

/// Q4_0: 18-byte blocks {d: f16, qs: [u8; 16]}, w = (q - 8) * d.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let eight = _mm256_set1_ps(8.0);
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[18b .. 18b+18]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(18 * b);
            prefetch(p);
            let vd = ld_f16x8(p);
            // (q - 8) * d == fma(q, d, -8d) exactly: 8d is exact.
            let vo = _mm256_mul_ps(vd, eight);
            let q = nibbles(p.add(2));
            fma_groups(&mut acc, q, vd, vo, xp.add(32 * b), k);
        }
    }
    finish(&acc, out);
}

/// Q4_1: 20-byte blocks {d, m: f16, qs: [u8; 16]}, w = q * d + m.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[20b .. 20b+20]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(20 * b);
            prefetch(p);
            let vd = ld_f16x8(p);
            // fma_groups computes q * d - mn: pass -m (exact negation).
            let vm = _mm256_xor_ps(ld_f16x8(p.add(2)), _mm256_set1_ps(-0.0));
            let q = nibbles(p.add(4));
            fma_groups(&mut acc, q, vd, vm, xp.add(32 * b), k);
        }
    }
    finish(&acc, out);
}

/// The 32 nibbles of 16 packed bytes at `p` (low nibbles are elements 0..16,
/// high nibbles 16..32) as four groups of 8 i32 lanes.
///
/// # Safety
/// `p .. p+16` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> [__m256i; 4] {
    // SAFETY: 16 readable bytes by contract (two unaligned 8-byte loads).
    let (v0, v1) = unsafe {
        (
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast())),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast())),
        )
    };
    let m4 = _mm256_set1_epi32(0x0F);
    [
        _mm256_and_si256(v0, m4),
        _mm256_and_si256(v1, m4),
        _mm256_srli_epi32::<4>(v0),
        _mm256_srli_epi32::<4>(v1),
    ]
}

/// FMA 32 weights given as four groups of 8 i32 values `q`, dequantised as
/// `q * d - mn`, against the activations at `x`.
///
/// # Safety
/// `x.add(i * k + 31)` in bounds for every `i < M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_groups<const M: usize, const S: usize>(
    acc: &mut Acc<M, S>,
    q: [__m256i; 4],
    d: __m256,
    mn: __m256,
    x: *const f32,
    k: usize,
) {
    for (g, qg) in q.iter().enumerate() {
        let w = _mm256_fmsub_ps(_mm256_cvtepi32_ps(*qg), d, mn);
        // SAFETY: 32 activations per row are in bounds by contract.
        unsafe { fma_rows(acc, w, x.add(8 * g), k, g % S) };
    }
}

/// The 32 five-bit values (nibble | bit e of qh << 4) of a Q5_0/Q5_1 block
/// as 32 bytes in element order: low nibbles of `qs` are elements 0..16,
/// high nibbles 16..32, and bit e of the little-endian u32 at `qh` is the
/// fifth bit of element e (spread to bytes as in ggml's `bytes_from_bits_32`).
///
/// # Safety
/// `qs .. qs+16` and `qh .. qh+4` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_bytes(qs: *const u8, qh: *const u8) -> __m256i {
    // SAFETY: 16 + 4 readable bytes by contract; unaligned reads.
    let (qs, qh) = unsafe { (ld128(qs), qh.cast::<u32>().read_unaligned()) };
    let m4 = _mm_set1_epi8(0x0F);
    let nib = _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(qs), m4),
        _mm_and_si128(qs, m4),
    );
    // Byte j of `spread` is byte j/8 of qh; `bit` selects bit j%8 of it.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(u32::from_le(qh) as i32),
        _mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

/// Q5_0: 22-byte blocks {d: f16, qh: u32, qs: [u8; 16]}, w = (q5 - 16) * d.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let sixteen = _mm256_set1_ps(16.0);
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[22b .. 22b+22]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(22 * b);
            prefetch(p);
            let vd = ld_f16x8(p);
            // (q - 16) * d == fma(q, d, -16d) exactly: 16d is exact.
            let vo = _mm256_mul_ps(vd, sixteen);
            let q = q5_bytes(p.add(6), p.add(2));
            fma_u8x32(&mut acc, q, vd, vo, xp.add(32 * b), k);
        }
    }
    finish(&acc, out);
}

/// Q5_1: 24-byte blocks {d, m: f16, qh: u32, qs: [u8; 16]}, w = q5 * d + m.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_1<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let neg = _mm256_set1_ps(-0.0);
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[24b .. 24b+24]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(24 * b);
            prefetch(p);
            let vd = ld_f16x8(p);
            // fma_u8x32 computes q * d - mn: pass -m (exact negation).
            let vm = _mm256_xor_ps(ld_f16x8(p.add(2)), neg);
            let q = q5_bytes(p.add(8), p.add(4));
            fma_u8x32(&mut acc, q, vd, vm, xp.add(32 * b), k);
        }
    }
    finish(&acc, out);
}

/// Q8_0: 34-byte blocks {d: f16, qs: [i8; 32]}, w = q * d.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[34b .. 34b+34]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(34 * b);
            prefetch(p);
            let vd = ld_f16x8(p);
            let q = ld256(p.add(2));
            fma_i8x32(&mut acc, q, vd, vd, xp.add(32 * b), k);
        }
    }
    finish(&acc, out);
}

/// The 12 packed 6-bit scales/mins of a Q4_K/Q5_K super-block as
/// (d * scale, dmin * min) pairs, with ggml's arithmetic.
///
/// # Safety
/// `p .. p+16` (d, dmin, scales) must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_scales(p: *const u8) -> [(f32, f32); 8] {
    // SAFETY: 16 readable bytes by contract.
    let (d, dmin, sc) = unsafe {
        (
            ld_f16(p),
            ld_f16(p.add(2)),
            p.add(4).cast::<[u8; 12]>().read_unaligned(),
        )
    };
    let mut r = [(0f32, 0f32); 8];
    for (j, v) in r.iter_mut().enumerate() {
        let (s, m) = scale_min_k4(j, &sc);
        *v = (d * s as f32, dmin * m as f32);
    }
    r
}

/// Q4_K: 144-byte super-blocks {d, dmin: f16, scales: [u8; 12], qs: [u8; 128]},
/// w = d*sc * q - dmin*m per 32-element sub-block.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = _mm256_set1_epi32(0x0F);
    for b in 0..k / 256 {
        // SAFETY: super-block b occupies row[144b .. 144b+144]; activations
        // 256b..256b+256 of every row are in bounds.
        unsafe {
            let p = rp.add(144 * b);
            prefetch(p);
            prefetch(p.add(64));
            prefetch(p.add(128));
            let s = k4_scales(p);
            let xb = xp.add(256 * b);
            for c in 0..4 {
                // Raw bytes straight from memory into i32 lanes: low nibbles
                // are elements 64c + 0..32, high nibbles 64c + 32..64.
                let qp = p.add(16 + 32 * c);
                let r = [
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.cast())),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.add(8).cast())),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.add(16).cast())),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.add(24).cast())),
                ];
                let (d1, m1) = s[2 * c];
                let (d2, m2) = s[2 * c + 1];
                let lo = r.map(|v| _mm256_and_si256(v, m4));
                let hi = r.map(|v| _mm256_srli_epi32::<4>(v));
                let (vd1, vm1) = (_mm256_set1_ps(d1), _mm256_set1_ps(m1));
                fma_groups(&mut acc, lo, vd1, vm1, xb.add(64 * c), k);
                let (vd2, vm2) = (_mm256_set1_ps(d2), _mm256_set1_ps(m2));
                fma_groups(&mut acc, hi, vd2, vm2, xb.add(64 * c + 32), k);
            }
        }
    }
    finish(&acc, out);
}

/// Q5_K: 176-byte super-blocks {d, dmin: f16, scales: [u8; 12], qh: [u8; 32],
/// qs: [u8; 128]}, w = d*sc * (q + 16*h) - dmin*m.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5k<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = _mm256_set1_epi8(0x0F);
    let b16 = _mm256_set1_epi8(0x10);
    for b in 0..k / 256 {
        // SAFETY: super-block b occupies row[176b .. 176b+176]; activations
        // 256b..256b+256 of every row are in bounds.
        unsafe {
            let p = rp.add(176 * b);
            prefetch(p);
            prefetch(p.add(64));
            prefetch(p.add(128));
            let s = k4_scales(p);
            let qh = ld256(p.add(16));
            let xb = xp.add(256 * b);
            for c in 0..4 {
                let q = ld256(p.add(48 + 32 * c));
                let u1 = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
                let u2 = _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8);
                let h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u1), u1), b16);
                let h2 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u2), u2), b16);
                let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h1);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), h2);
                let (d1, m1) = s[2 * c];
                let (d2, m2) = s[2 * c + 1];
                let (vd1, vm1) = (_mm256_set1_ps(d1), _mm256_set1_ps(m1));
                fma_u8x32(&mut acc, lo, vd1, vm1, xb.add(64 * c), k);
                let (vd2, vm2) = (_mm256_set1_ps(d2), _mm256_set1_ps(m2));
                fma_u8x32(&mut acc, hi, vd2, vm2, xb.add(64 * c + 32), k);
            }
        }
    }
    finish(&acc, out);
}

/// Q6_K: 210-byte super-blocks {ql: [u8; 128], qh: [u8; 64], scales: [i8; 16],
/// d: f16}, w = d*sc * (q6 - 32) per 16-element group.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let o32 = _mm256_set1_epi8(32);
    for b in 0..k / 256 {
        // SAFETY: super-block b occupies row[210b .. 210b+210]; activations
        // 256b..256b+256 of every row are in bounds.
        unsafe {
            let p = rp.add(210 * b);
            prefetch(p);
            prefetch(p.add(64));
            prefetch(p.add(128));
            prefetch(p.add(192));
            // The 16 group scales d * sc (ggml's order of operations), computed
            // in two vectors and broadcast back from memory.
            let vd = ld_f16x8(p.add(208));
            let mut ds = [0f32; 16];
            for (half, dst) in ds.chunks_exact_mut(8).enumerate() {
                let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(192 + 8 * half).cast()));
                let v = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(sc));
                _mm256_storeu_ps(dst.as_mut_ptr(), v);
            }
            let xb = xp.add(256 * b);
            for h in 0..2 {
                let ql0 = ld256(p.add(64 * h));
                let ql1 = ld256(p.add(64 * h + 32));
                let qh = ld256(p.add(128 + 32 * h));
                // 16-bit shifts move bits across byte boundaries only into
                // positions the following masks clear.
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _mm256_and_si256(qh, m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
                    ),
                ];
                for (t, qt) in q.iter().enumerate() {
                    let qs = _mm256_sub_epi8(*qt, o32);
                    let d0 = _mm256_broadcast_ss(&ds[8 * h + 2 * t]);
                    let d1 = _mm256_broadcast_ss(&ds[8 * h + 2 * t + 1]);
                    fma_i8x32(&mut acc, qs, d0, d1, xb.add(128 * h + 32 * t), k);
                }
            }
        }
    }
    finish(&acc, out);
}

/// Dequantises one whole row of `t` into `y` (k = `y.len()` values) with AVX2, with exactly
/// the scalar path's arithmetic (a multiply and an add, never a fused FMA, so the bits are
/// the same): for the types the training products read as f32 tiles (Q4_0, Q4_1, Q8_0).
/// Returns false, touching nothing, for any other type or when the CPU lacks the features;
/// the caller then uses `scalar::dequantize_row`.
pub(super) fn dequantize_row(t: QType, row: &[u8], y: &mut [f32]) -> bool {
    if !matches!(t, QType::Q4_0 | QType::Q4_1 | QType::Q8_0) || !available() {
        return false;
    }
    let (bs, bb) = (t.block_size(), t.block_bytes());
    assert!(
        y.len().is_multiple_of(bs) && row.len() == y.len() / bs * bb,
        "avx2 dequantize_row called with inconsistent sizes"
    );
    // SAFETY: `available()` confirmed AVX2/FMA/F16C; the assert above gives every block the
    // bytes and outputs the loops below touch.
    unsafe {
        match t {
            QType::Q4_0 => dequant_q4::<false>(row, y),
            QType::Q4_1 => dequant_q4::<true>(row, y),
            _ => dequant_q8_0(row, y),
        }
    }
    true
}

/// Q4_0 (`MIN = false`: `(q - 8) * d`) and Q4_1 (`MIN = true`: `q * d + m`) rows.
///
/// # Safety
/// AVX2 present; `row` holds `y.len() / 32` whole blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_q4<const MIN: bool>(row: &[u8], y: &mut [f32]) {
    let bb = if MIN { 20 } else { 18 };
    let low = _mm_set1_epi8(0x0F);
    let eight = _mm256_set1_epi32(8);
    let (rp, yp) = (row.as_ptr(), y.as_mut_ptr());
    for b in 0..y.len() / 32 {
        // SAFETY: block b is row[bb*b .. bb*b+bb] and y[32b .. 32b+32], in bounds by the
        // caller's contract; loads and stores are unaligned.
        unsafe {
            let p = rp.add(bb * b);
            let d = _mm256_set1_ps(f16_to_f32(u16::from_le_bytes([*p, *p.add(1)])));
            let m = if MIN {
                _mm256_set1_ps(f16_to_f32(u16::from_le_bytes([*p.add(2), *p.add(3)])))
            } else {
                _mm256_setzero_ps()
            };
            let qs = _mm_loadu_si128(p.add(if MIN { 4 } else { 2 }).cast());
            let lo = _mm_and_si128(qs, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low);
            let out = yp.add(32 * b);
            for (i, v) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)]
                .into_iter()
                .enumerate()
            {
                let mut q = _mm256_cvtepu8_epi32(v);
                if !MIN {
                    q = _mm256_sub_epi32(q, eight);
                }
                let mut f = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                if MIN {
                    f = _mm256_add_ps(f, m);
                }
                _mm256_storeu_ps(out.add(8 * i), f);
            }
        }
    }
}

/// Q8_0 rows: `q * d`.
///
/// # Safety
/// AVX2 present; `row` holds `y.len() / 32` whole blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_q8_0(row: &[u8], y: &mut [f32]) {
    let (rp, yp) = (row.as_ptr(), y.as_mut_ptr());
    for b in 0..y.len() / 32 {
        // SAFETY: block b is row[34b .. 34b+34] and y[32b .. 32b+32], in bounds by the
        // caller's contract; loads and stores are unaligned.
        unsafe {
            let p = rp.add(34 * b);
            let d = _mm256_set1_ps(f16_to_f32(u16::from_le_bytes([*p, *p.add(1)])));
            let out = yp.add(32 * b);
            for i in 0..4 {
                let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(2 + 8 * i).cast()));
                _mm256_storeu_ps(out.add(8 * i), _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
            }
        }
    }
}
