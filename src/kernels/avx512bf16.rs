//! bf16 products with AVX512_BF16 (`vdpbf16ps`) for the tiled GEMM's training path on CPUs that
//! have it but no AMX (AMD Zen 4/5, Intel Cooper Lake; Sapphire Rapids too, when `HONE_AMX=0`).
//!
//! It computes the same 32 × 32 blocks as `amx::block`, from the same packed operands
//! (`amx_pack`): the right operand's VNNI layout puts a pair of bf16 along the reduction in each
//! dword, 16 columns to a 64-byte row, which is exactly what one `vdpbf16ps` multiplies with a
//! broadcast pair of the left operand. A block is computed eight rows at a time: 16 f32
//! accumulators (8 rows × 2 registers of 16 columns) stay in registers over the whole
//! reduction, the two right-hand rows are loaded once per pair and reused by the eight rows.
//! Inputs are bf16 (8-bit mantissa), sums f32, as on the AMX path; the order of the sums differs
//! from AMX's, so the two paths agree to bf16 precision, not to the bit.
//!
//! Must not: run unless `available()` said yes, or be used where results must match the f32
//! reference exactly (inference).

use super::amx::{BLOCK, TILE_VALUES};
use std::arch::x86_64::*;

/// Whether the CPU has AVX512_BF16 (with the AVX-512 F/BW the packers need).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512bf16") && super::amx_pack::available()
}

/// Rows of the block computed together (16 accumulators).
const ROWS: usize = 8;

/// `C (32 × 32 f32) = [C +] Σ_ch A_ch · B_ch` over `chunks` steps of 32 reduction values, with
/// the operands and strides of `amx::block`: `a` bf16 row-major (`a_stride` bytes per row,
/// step `ch` at byte offset `ch * 64`), `b0`/`b1` the two packed 16-column groups (step `ch` at
/// `ch * TILE_VALUES` values), `c` row-major with `c_stride` bytes per row.
///
/// # Safety
/// `available()` must have returned true; every value read or written must be inside its
/// buffer (32 rows of `a` covering `32 · chunks` values, `chunks` tiles in `b0` and `b1`, 32
/// rows of 32 floats at `c`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn block(
    a: *const u16,
    a_stride: usize,
    b0: *const u16,
    b1: *const u16,
    chunks: usize,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    // One packed tile holds 16 pair-rows of 32 values, and the tiles of a group follow each
    // other, so the group is one stream of `16 · chunks` pair-rows.
    let pairs = chunks * (TILE_VALUES / 32);
    for r0 in (0..BLOCK).step_by(ROWS) {
        let mut lo = [_mm512_setzero_ps(); ROWS];
        let mut hi = [_mm512_setzero_ps(); ROWS];
        let row_c = |i: usize| (c as *mut u8).add((r0 + i) * c_stride) as *mut f32;
        if accumulate {
            for i in 0..ROWS {
                lo[i] = _mm512_loadu_ps(row_c(i));
                hi[i] = _mm512_loadu_ps(row_c(i).add(16));
            }
        }
        let rows: [*const u8; ROWS] =
            std::array::from_fn(|i| (a as *const u8).add((r0 + i) * a_stride));
        for p in 0..pairs {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(p * 32) as *const _));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(p * 32) as *const _));
            for i in 0..ROWS {
                let pair = (rows[i].add(p * 4) as *const i32).read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                lo[i] = _mm512_dpbf16_ps(lo[i], x, w0);
                hi[i] = _mm512_dpbf16_ps(hi[i], x, w1);
            }
        }
        for i in 0..ROWS {
            _mm512_storeu_ps(row_c(i), lo[i]);
            _mm512_storeu_ps(row_c(i).add(16), hi[i]);
        }
    }
}
