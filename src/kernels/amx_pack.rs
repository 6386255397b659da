//! Operands of the AMX tile products (`kernels::amx`), packed straight from the quantised
//! weights with AVX-512: a ggml block of 32 values is decoded in two vector registers, rounded
//! to bf16 and written in the VNNI layout the tile product wants, without a dequantised f32
//! copy in between. Q4_0, Q4_1 and Q8_0 are decoded in registers; other types are dequantised
//! row by row into a scratch buffer first (`scalar::dequantize_row`), then packed the same way.
//!
//! The layout is `amx::packed_len`'s: value (r, c) (reduction index r, column c) goes to column
//! group `c / 16`, step `r / 32`, tile row `(r % 32) / 2`, position `2 (c % 16) + r % 2`, so one
//! tile row holds 16 dwords, each a pair of bf16 along the reduction.
//!
//! Must not: differ from the scalar packers (`amx::pack_transposed`, `amx::pack_rows` after
//! `scalar::dequantize_row`) in a single bit (tests compare them), read outside the matrix, or
//! be called unless `available()` said yes.

use super::amx::{BLOCK, CHUNK, TILE_VALUES};
use super::{scalar, QMatrix, QType};
use std::arch::x86_64::*;

/// Whether the AVX-512 packers may run (every CPU with AMX has AVX-512 F/BW and F16C).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("f16c")
}

/// Sizes `out` for a `red × cols` operand and returns the number of reduction steps. Only the
/// padding (columns past `cols`, reduction past `red`) needs zeros; everything else is written
/// by the packers, so the buffer is cleared only when there is padding.
fn size(red: usize, cols: usize, out: &mut Vec<u16>) -> usize {
    let chunks = red.div_ceil(CHUNK);
    let groups = cols.div_ceil(BLOCK) * 2;
    let len = groups * chunks * TILE_VALUES;
    if !red.is_multiple_of(CHUNK) || !cols.is_multiple_of(BLOCK) {
        out.clear();
    }
    out.resize(len, 0);
    chunks
}

/// Where a panel's values come from: the quantised rows themselves, or (for types without a
/// register decoder) f32 rows dequantised into `rows`.
struct Source<'a> {
    w: &'a QMatrix<'a>,
    rb: usize,
    /// Dequantised rows `r0..` of width `width` starting at column `c0` (generic types only).
    rows: &'a [f32],
    r0: usize,
    c0: usize,
    width: usize,
}

/// Whether `t` has a register decoder (32-value blocks).
fn fused(t: QType) -> bool {
    matches!(t, QType::Q4_0 | QType::Q4_1 | QType::Q8_0)
}

impl<'a> Source<'a> {
    /// A source for rows `r0..r1`, columns `c0..c1` of `w`; `c0` and `c1` (or `w.k`) must be
    /// whole blocks. Generic types are dequantised into `scratch` here.
    fn new(
        w: &'a QMatrix<'a>,
        rb: usize,
        (r0, r1): (usize, usize),
        (c0, c1): (usize, usize),
        scratch: &'a mut Vec<f32>,
    ) -> Self {
        let width = c1 - c0;
        if fused(w.dtype) {
            return Source {
                w,
                rb,
                rows: &[],
                r0,
                c0,
                width,
            };
        }
        let bs = w.dtype.block_size();
        let bb = w.dtype.block_bytes();
        let (b0, b1) = (c0 / bs * bb, c1.div_ceil(bs) * bb);
        scratch.resize((r1 - r0) * width, 0.0);
        let mut row = vec![0f32; c1.div_ceil(bs) * bs - c0];
        for (r, o) in (r0..r1).zip(scratch.chunks_exact_mut(width)) {
            scalar::dequantize_row(w.dtype, &w.data[r * rb + b0..r * rb + b1], &mut row);
            o.copy_from_slice(&row[..width]);
        }
        Source {
            w,
            rb,
            rows: scratch,
            r0,
            c0,
            width,
        }
    }

    /// Values `c .. c + 32` of row `r` (absolute indices; `c` a multiple of 32), zero past
    /// `end` (exclusive, absolute), as two registers of 16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn load32(&self, r: usize, c: usize, end: usize) -> (__m512, __m512) {
        let row = self.w.data.as_ptr().add(r * self.rb);
        match self.w.dtype {
            QType::Q4_1 => {
                let b = row.add(c / 32 * 20);
                let dm = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    (b as *const i32).read_unaligned(),
                )));
                let d = _mm512_permutexvar_ps(_mm512_set1_epi32(0), dm);
                let m = _mm512_permutexvar_ps(_mm512_set1_epi32(1), dm);
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(4) as *const __m128i));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
                (
                    _mm512_add_ps(_mm512_mul_ps(lo, d), m),
                    _mm512_add_ps(_mm512_mul_ps(hi, d), m),
                )
            }
            QType::Q4_0 => {
                let b = row.add(c / 32 * 18);
                let d = scale(b);
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(2) as *const __m128i));
                let eight = _mm512_set1_epi32(8);
                let lo = _mm512_sub_epi32(_mm512_and_si512(q, _mm512_set1_epi32(15)), eight);
                let hi = _mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight);
                (
                    _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
                )
            }
            QType::Q8_0 => {
                let b = row.add(c / 32 * 34);
                let d = scale(b);
                let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2) as *const __m128i));
                let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(18) as *const __m128i));
                (
                    _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
                )
            }
            _ => {
                let p = self
                    .rows
                    .as_ptr()
                    .add((r - self.r0) * self.width + (c - self.c0));
                let n = end.saturating_sub(c).min(32);
                let m0 = mask(n.min(16));
                let m1 = mask(n.saturating_sub(16));
                (
                    _mm512_maskz_loadu_ps(m0, p),
                    _mm512_maskz_loadu_ps(m1, p.add(16)),
                )
            }
        }
    }
}

/// The f16 at `p` (unaligned) in every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn scale(p: *const u8) -> __m512 {
    let h = (p as *const u16).read_unaligned() as i32;
    _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
}

/// A mask of the first `n` (≤ 16) lanes.
fn mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// f32 lanes rounded to bf16 (nearest even, NaN kept quiet), as u32 lanes whose high half is
/// the bf16 value: the arithmetic of `amx::bf16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn round_hi(v: __m512) -> __m512i {
    let b = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
    let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000)))
}

/// 32 values (two registers) as 16 dwords of consecutive bf16 pairs (value 2t low, 2t + 1 high).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn pairs(lo: __m512, hi: __m512) -> __m512i {
    // The high halves of the 32 dwords, in order: words 1, 3, .. of `lo`, then of `hi`.
    let idx = _mm512_set_epi16(
        63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19,
        17, 15, 13, 11, 9, 7, 5, 3, 1,
    );
    _mm512_permutex2var_epi16(round_hi(lo), idx, round_hi(hi))
}

/// Two rows' values as dwords of bf16 pairs along the rows (`a` low, `b` high).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn join(a: __m512, b: __m512, hi_mask: __m512i) -> __m512i {
    _mm512_or_si512(
        _mm512_srli_epi32(round_hi(a), 16),
        _mm512_and_si512(round_hi(b), hi_mask),
    )
}

/// Transposes 16 × 16 dwords in place (`r[i]` lane `j` ↔ `r[j]` lane `i`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + q], 128-bit lane L: rows 4i .. 4i + 3 at column 4L + q.
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for q in 0..4 {
        let c0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x44);
        let c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xee);
        let c2 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x44);
        let c3 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xee);
        r[q] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        r[4 + q] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
        r[8 + q] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        r[12 + q] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
    }
}

/// The right operand `Wᵀ[k0..k1, c0..c1]` of `x · Wᵀ` (reduction over W's columns, output
/// columns over W's rows `c0..c1`), packed into `out`; returns the number of reduction steps.
/// `k0` must be a multiple of the block size (and of 32); `rb` is W's bytes per row.
pub fn pack_wt(
    w: &QMatrix,
    rb: usize,
    (c0, c1): (usize, usize),
    (k0, k1): (usize, usize),
    scratch: &mut Vec<f32>,
    out: &mut Vec<u16>,
) -> usize {
    let (red, cols) = (k1 - k0, c1 - c0);
    let chunks = size(red, cols, out);
    let (s0, s1) = if fused(w.dtype) {
        (k0, k1)
    } else {
        let bs = w.dtype.block_size();
        (k0 / bs * bs, k1.div_ceil(bs).min(w.k.div_ceil(bs)) * bs)
    };
    let src = Source::new(w, rb, (c0, c1), (s0, s1.min(w.k)), scratch);
    // SAFETY: `available()` (the caller's contract); rows c0..c1 and columns k0..k1 are inside
    // W (checked by the tiled driver), every store is inside `out` (sized above).
    unsafe { wt_panel(&src, (c0, c1), (k0, k1), chunks, out) };
    chunks
}

#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn wt_panel(
    src: &Source,
    (c0, c1): (usize, usize),
    (k0, k1): (usize, usize),
    chunks: usize,
    out: &mut [u16],
) {
    let groups = (c1 - c0).div_ceil(16);
    {
        for g in 0..groups {
            for ch in 0..chunks {
                let kk = k0 + ch * CHUNK;
                let mut r = [_mm512_setzero_si512(); 16];
                for (j, v) in r.iter_mut().enumerate() {
                    let c = c0 + g * 16 + j;
                    if c < c1 {
                        let (lo, hi) = src.load32(c, kk, k1);
                        *v = pairs(lo, hi);
                    }
                }
                transpose16(&mut r);
                let tile = out.as_mut_ptr().add((g * chunks + ch) * TILE_VALUES);
                let rows = (k1 - kk).min(CHUNK).div_ceil(2);
                for (t, v) in r.iter().enumerate().take(rows) {
                    _mm512_storeu_si512(tile.add(t * 32) as *mut _, *v);
                }
            }
        }
    }
}

/// The right operand `W[r0..r1, c0..c1]` of `g · W` (reduction over W's rows), packed into
/// `out`; returns the number of reduction steps. `c0` must be a multiple of the block size, and
/// `c1` too unless it is `w.k`.
pub fn pack_w(
    w: &QMatrix,
    rb: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    scratch: &mut Vec<f32>,
    out: &mut Vec<u16>,
) -> usize {
    let (red, cols) = (r1 - r0, c1 - c0);
    let chunks = size(red, cols, out);
    let src = Source::new(w, rb, (r0, r1), (c0, c1), scratch);
    // SAFETY: as in `pack_wt`.
    unsafe { w_panel(&src, (r0, r1), (c0, c1), chunks, out) };
    chunks
}

#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn w_panel(
    src: &Source,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    chunks: usize,
    out: &mut [u16],
) {
    let blocks = (c1 - c0).div_ceil(BLOCK);
    {
        let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
        for ch in 0..chunks {
            for t in 0..16 {
                let ra = r0 + ch * CHUNK + 2 * t;
                if ra >= r1 {
                    break;
                }
                let rb_ = ra + 1;
                for cb in 0..blocks {
                    let c = c0 + cb * BLOCK;
                    let (alo, ahi) = src.load32(ra, c, c1);
                    let (blo, bhi) = if rb_ < r1 {
                        src.load32(rb_, c, c1)
                    } else {
                        (_mm512_setzero_ps(), _mm512_setzero_ps())
                    };
                    let base = out.as_mut_ptr().add(t * 32);
                    let g0 = base.add((2 * cb * chunks + ch) * TILE_VALUES);
                    let g1 = base.add(((2 * cb + 1) * chunks + ch) * TILE_VALUES);
                    _mm512_storeu_si512(g0 as *mut _, join(alo, blo, hi_mask));
                    _mm512_storeu_si512(g1 as *mut _, join(ahi, bhi, hi_mask));
                }
            }
        }
    }
}

/// Rounds `x` (`m` rows of `k`) to bf16 into `out` (`m_pad` rows of `stride`, zero-padded).
/// Every value is stored exactly once (the rows, then their padding, then the padding rows),
/// so the buffer is not zeroed first.
pub fn pack_left(x: &[f32], m: usize, k: usize, m_pad: usize, stride: usize) -> Vec<u16> {
    use rayon::prelude::*;
    let (m, k) = (m.min(m_pad), k.min(stride));
    let len = m_pad * stride;
    let mut out: Vec<u16> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(stride.max(1))
        .enumerate()
        .for_each(|(i, o)| {
            let (row, pad) = o.split_at_mut(if i < m { k } else { 0 });
            if i < m {
                // SAFETY: `available()` (the caller's contract); `row` has k values and
                // `x` row i has k values (x holds m rows of k).
                unsafe { left_row(&x[i * k..(i + 1) * k], row.as_mut_ptr() as *mut u16) }
            }
            pad.fill(std::mem::MaybeUninit::new(0));
        });
    // SAFETY: every chunk of `stride` values was written: `k` by `left_row`, the rest by `fill`.
    unsafe { out.set_len(len) };
    out
}

#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn left_row(r: &[f32], o: *mut u16) {
    let k = r.len();
    let mut j = 0;
    while j < k {
        let n = (k - j).min(32);
        let m0 = mask(n.min(16));
        let m1 = mask(n.saturating_sub(16));
        let lo = _mm512_maskz_loadu_ps(m0, r.as_ptr().add(j));
        let hi = _mm512_maskz_loadu_ps(m1, r.as_ptr().add(j + 16));
        let v = pairs(lo, hi);
        let words = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
        _mm512_mask_storeu_epi16(o.add(j) as *mut _, words, v);
        j += 32;
    }
}
