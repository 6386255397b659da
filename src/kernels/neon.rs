//! aarch64 NEON row kernels: fused dequantise + dot product with f32
//! activations, for 1..=4 activation rows per pass over a weight row.
//!
//! Job: the same contract and arithmetic as the AVX2 backend (expand each
//! block into f32 registers once, with ggml's values up to one FMA rounding
//! for the types with an offset/min, and FMA it against up to four activation
//! rows), using 128-bit NEON, which is baseline on aarch64 (no run-time
//! detection needed). F16 weights are left to the scalar path because the
//! half-precision NEON types are not stable in Rust.
//!
//! Must not: read outside the given slices (every kernel re-checks the sizes
//! before using raw pointers), assume alignment (weights are loaded as bytes),
//! or quantise the activations.

use super::scalar::{f16_to_f32, scale_min_k4};
use super::{KernelSet, QType};
use std::arch::aarch64::*;

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
        "neon kernel called with inconsistent sizes"
    );
}

macro_rules! kernel_set {
    ($f:ident, $t:expr) => {{
        let ks: KernelSet = [
            |row: &[u8], x: &[f32], k: usize, out: &mut [f32]| {
                check(row, x, k, out, 1, $t);
                // SAFETY: NEON is part of the aarch64 baseline, and `check`
                // verified the sizes the kernel relies on.
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
                unsafe { $f::<3, 4>(row, x, k, out) }
            },
            |row: &[u8], x: &[f32], k: usize, out: &mut [f32]| {
                check(row, x, k, out, 4, $t);
                // SAFETY: as above.
                unsafe { $f::<4, 4>(row, x, k, out) }
            },
        ];
        ks
    }};
}

/// The NEON kernels for `t`, or `None` where the scalar path is used (F16).
pub(super) fn kernels(t: QType) -> Option<KernelSet> {
    Some(match t {
        QType::F32 => kernel_set!(dot_f32, QType::F32),
        QType::F16 => return None,
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

/// Accumulators: `S` independent FMA chains for each of the `M` activation
/// rows (NEON has 32 registers, so four chains fit even for four rows).
type Acc<const M: usize, const S: usize> = [[float32x4_t; S]; M];

#[inline]
#[target_feature(enable = "neon")]
fn zero_acc<const M: usize, const S: usize>() -> Acc<M, S> {
    [[vdupq_n_f32(0.0); S]; M]
}

/// `acc[i][slot] += w * x[i*k .. i*k+4]` for every activation row `i < M`.
///
/// # Safety
/// `x.add(i * k + 3)` must be in bounds for every `i < M`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma_rows<const M: usize, const S: usize>(
    acc: &mut Acc<M, S>,
    w: float32x4_t,
    x: *const f32,
    k: usize,
    slot: usize,
) {
    for (i, a) in acc.iter_mut().enumerate() {
        // SAFETY: in bounds by the caller's contract; `x` points into an f32
        // slice, so it is suitably aligned.
        let xv = unsafe { vld1q_f32(x.add(i * k)) };
        a[slot] = vfmaq_f32(a[slot], w, xv);
    }
}

#[inline]
#[target_feature(enable = "neon")]
fn finish<const M: usize, const S: usize>(acc: &Acc<M, S>, out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        let mut v = a[0];
        for s in &a[1..] {
            v = vaddq_f32(v, *s);
        }
        *o = vaddvq_f32(v);
    }
}

/// Little-endian f16 at `p`, widened exactly.
///
/// # Safety
/// `p .. p+2` must be readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn ld_f16(p: *const u8) -> f32 {
    // SAFETY: two readable bytes by contract; unaligned read.
    f16_to_f32(u16::from_le(unsafe { p.cast::<u16>().read_unaligned() }))
}

/// Loads 16 bytes.
///
/// # Safety
/// `p .. p+16` must be readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn ld_u8(p: *const u8) -> uint8x16_t {
    // SAFETY: by contract; byte loads have no alignment requirement.
    unsafe { vld1q_u8(p) }
}

/// 16 unsigned bytes as four vectors of 4 f32 (element order kept).
#[inline]
#[target_feature(enable = "neon")]
fn u8x16_f32(v: uint8x16_t) -> [float32x4_t; 4] {
    let lo = vmovl_u8(vget_low_u8(v));
    let hi = vmovl_high_u8(v);
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
        vcvtq_f32_u32(vmovl_high_u16(lo)),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
        vcvtq_f32_u32(vmovl_high_u16(hi)),
    ]
}

/// 16 signed bytes as four vectors of 4 f32 (element order kept).
#[inline]
#[target_feature(enable = "neon")]
fn i8x16_f32(v: int8x16_t) -> [float32x4_t; 4] {
    let lo = vmovl_s8(vget_low_s8(v));
    let hi = vmovl_high_s8(v);
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
        vcvtq_f32_s32(vmovl_high_s16(lo)),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
        vcvtq_f32_s32(vmovl_high_s16(hi)),
    ]
}

/// FMA 16 weights `q * d + c` (one fused rounding) against the activations at
/// `x`, using chains `slot0 .. slot0+4` (mod S).
///
/// # Safety
/// `x.add(i * k + 15)` in bounds for every `i < M`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma_u8x16<const M: usize, const S: usize>(
    acc: &mut Acc<M, S>,
    q: uint8x16_t,
    d: float32x4_t,
    c: float32x4_t,
    x: *const f32,
    k: usize,
) {
    for (j, qf) in u8x16_f32(q).into_iter().enumerate() {
        let w = vfmaq_f32(c, qf, d);
        // SAFETY: 16 activations per row are in bounds by contract.
        unsafe { fma_rows(acc, w, x.add(4 * j), k, j % S) };
    }
}

/// FMA 16 weights `q * d` against the activations at `x`.
///
/// # Safety
/// `x.add(i * k + 15)` in bounds for every `i < M`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma_i8x16<const M: usize, const S: usize>(
    acc: &mut Acc<M, S>,
    q: int8x16_t,
    d: float32x4_t,
    x: *const f32,
    k: usize,
) {
    for (j, qf) in i8x16_f32(q).into_iter().enumerate() {
        let w = vmulq_f32(qf, d);
        // SAFETY: 16 activations per row are in bounds by contract.
        unsafe { fma_rows(acc, w, x.add(4 * j), k, j % S) };
    }
}

// ---------------------------------------------------------------------------
// Row kernels. Common contract (checked by `check` before every call):
// `row` is exactly one row of `k` weights in the kernel's format,
// `x.len() >= M * k` (row i of the activations starts at `i * k`) and
// `out.len() == M`.
// ---------------------------------------------------------------------------

/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
unsafe fn dot_f32<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let groups = k / 4;
    let mut i = 0;
    while i + S <= groups {
        for s in 0..S {
            // SAFETY: weights and activations 4(i+s) .. 4(i+s)+4 <= k are in
            // bounds; the weights are loaded as bytes (no alignment needed).
            unsafe {
                let w = vreinterpretq_f32_u8(ld_u8(rp.add(16 * (i + s))));
                fma_rows(&mut acc, w, xp.add(4 * (i + s)), k, s);
            }
        }
        i += S;
    }
    while i < groups {
        // SAFETY: as above.
        unsafe {
            let w = vreinterpretq_f32_u8(ld_u8(rp.add(16 * i)));
            fma_rows(&mut acc, w, xp.add(4 * i), k, 0);
        }
        i += 1;
    }
    finish(&acc, out);
    for j in groups * 4..k {
        let b = &row[4 * j..4 * j + 4];
        let w = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (r, o) in out.iter_mut().enumerate() {
            *o += w * x[r * k + j];
        }
    }
}

/// Q4_0: 18-byte blocks {d: f16, qs: [u8; 16]}, w = (q - 8) * d.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
unsafe fn dot_q4_0<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = vdupq_n_u8(0x0F);
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[18b .. 18b+18]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(18 * b);
            let d = ld_f16(p);
            // (q - 8) * d == fma(q, d, -8d) exactly: 8d is exact.
            let (vd, vc) = (vdupq_n_f32(d), vdupq_n_f32(-8.0 * d));
            let qs = ld_u8(p.add(2));
            let xb = xp.add(32 * b);
            fma_u8x16(&mut acc, vandq_u8(qs, m4), vd, vc, xb, k);
            fma_u8x16(&mut acc, vshrq_n_u8::<4>(qs), vd, vc, xb.add(16), k);
        }
    }
    finish(&acc, out);
}

/// Q4_1: 20-byte blocks {d, m: f16, qs: [u8; 16]}, w = q * d + m.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
unsafe fn dot_q4_1<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = vdupq_n_u8(0x0F);
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[20b .. 20b+20]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(20 * b);
            let (vd, vm) = (vdupq_n_f32(ld_f16(p)), vdupq_n_f32(ld_f16(p.add(2))));
            let qs = ld_u8(p.add(4));
            let xb = xp.add(32 * b);
            fma_u8x16(&mut acc, vandq_u8(qs, m4), vd, vm, xb, k);
            fma_u8x16(&mut acc, vshrq_n_u8::<4>(qs), vd, vm, xb.add(16), k);
        }
    }
    finish(&acc, out);
}

/// Bit j % 8 of each byte lane j, for spreading qh bits to bytes.
const BIT_OF_LANE: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

/// The 32 five-bit values of a Q5_0/Q5_1 block as two byte vectors
/// (elements 0..16 and 16..32).
///
/// # Safety
/// `qs .. qs+16` and `qh .. qh+4` must be readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q5_bytes(qs: *const u8, qh: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: 16 + 4 readable bytes by contract; the table is a 16-byte array.
    let (qs, h, bits) = unsafe {
        (
            ld_u8(qs),
            qh.cast::<[u8; 4]>().read_unaligned(),
            ld_u8(BIT_OF_LANE.as_ptr()),
        )
    };
    let m4 = vdupq_n_u8(0x0F);
    let b16 = vdupq_n_u8(0x10);
    // Byte lane j of `spread` holds qh byte j/8; testing bit j%8 gives the
    // fifth bit of element j.
    let spread0 = vcombine_u8(vdup_n_u8(h[0]), vdup_n_u8(h[1]));
    let spread1 = vcombine_u8(vdup_n_u8(h[2]), vdup_n_u8(h[3]));
    let h0 = vandq_u8(vtstq_u8(spread0, bits), b16);
    let h1 = vandq_u8(vtstq_u8(spread1, bits), b16);
    (
        vorrq_u8(vandq_u8(qs, m4), h0),
        vorrq_u8(vshrq_n_u8::<4>(qs), h1),
    )
}

/// Q5_0: 22-byte blocks {d: f16, qh: u32, qs: [u8; 16]}, w = (q5 - 16) * d.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
unsafe fn dot_q5_0<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[22b .. 22b+22]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(22 * b);
            let d = ld_f16(p);
            // (q - 16) * d == fma(q, d, -16d) exactly: 16d is exact.
            let (vd, vc) = (vdupq_n_f32(d), vdupq_n_f32(-16.0 * d));
            let (q0, q1) = q5_bytes(p.add(6), p.add(2));
            let xb = xp.add(32 * b);
            fma_u8x16(&mut acc, q0, vd, vc, xb, k);
            fma_u8x16(&mut acc, q1, vd, vc, xb.add(16), k);
        }
    }
    finish(&acc, out);
}

/// Q5_1: 24-byte blocks {d, m: f16, qh: u32, qs: [u8; 16]}, w = q5 * d + m.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
unsafe fn dot_q5_1<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    for b in 0..k / 32 {
        // SAFETY: block b occupies row[24b .. 24b+24]; activations 32b..32b+32
        // of every row are in bounds.
        unsafe {
            let p = rp.add(24 * b);
            let (vd, vm) = (vdupq_n_f32(ld_f16(p)), vdupq_n_f32(ld_f16(p.add(2))));
            let (q0, q1) = q5_bytes(p.add(8), p.add(4));
            let xb = xp.add(32 * b);
            fma_u8x16(&mut acc, q0, vd, vm, xb, k);
            fma_u8x16(&mut acc, q1, vd, vm, xb.add(16), k);
        }
    }
    finish(&acc, out);
}

/// Q8_0: 34-byte blocks {d: f16, qs: [i8; 32]}, w = q * d.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
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
            let vd = vdupq_n_f32(ld_f16(p));
            let q0 = vreinterpretq_s8_u8(ld_u8(p.add(2)));
            let q1 = vreinterpretq_s8_u8(ld_u8(p.add(18)));
            let xb = xp.add(32 * b);
            fma_i8x16(&mut acc, q0, vd, xb, k);
            fma_i8x16(&mut acc, q1, vd, xb.add(16), k);
        }
    }
    finish(&acc, out);
}

/// The 12 packed 6-bit scales/mins of a Q4_K/Q5_K super-block as
/// (d * scale, -(dmin * min)) pairs, with ggml's arithmetic.
///
/// # Safety
/// `p .. p+16` (d, dmin, scales) must be readable.
#[inline]
#[target_feature(enable = "neon")]
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
        *v = (d * s as f32, -(dmin * m as f32));
    }
    r
}

/// Q4_K: 144-byte super-blocks {d, dmin: f16, scales: [u8; 12], qs: [u8; 128]}.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
unsafe fn dot_q4k<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = vdupq_n_u8(0x0F);
    for b in 0..k / 256 {
        // SAFETY: super-block b occupies row[144b .. 144b+144]; activations
        // 256b..256b+256 of every row are in bounds.
        unsafe {
            let p = rp.add(144 * b);
            let s = k4_scales(p);
            let xb = xp.add(256 * b);
            for c in 0..4 {
                let (d1, m1) = s[2 * c];
                let (d2, m2) = s[2 * c + 1];
                let (vd1, vm1) = (vdupq_n_f32(d1), vdupq_n_f32(m1));
                let (vd2, vm2) = (vdupq_n_f32(d2), vdupq_n_f32(m2));
                for half in 0..2 {
                    let q = ld_u8(p.add(16 + 32 * c + 16 * half));
                    let xo = xb.add(64 * c + 16 * half);
                    fma_u8x16(&mut acc, vandq_u8(q, m4), vd1, vm1, xo, k);
                    fma_u8x16(&mut acc, vshrq_n_u8::<4>(q), vd2, vm2, xo.add(32), k);
                }
            }
        }
    }
    finish(&acc, out);
}

/// Q5_K: 176-byte super-blocks {d, dmin: f16, scales: [u8; 12], qh: [u8; 32],
/// qs: [u8; 128]}.
///
/// # Safety
/// See the common contract above.
#[target_feature(enable = "neon")]
unsafe fn dot_q5k<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = vdupq_n_u8(0x0F);
    let b16 = vdupq_n_u8(0x10);
    for b in 0..k / 256 {
        // SAFETY: super-block b occupies row[176b .. 176b+176]; activations
        // 256b..256b+256 of every row are in bounds.
        unsafe {
            let p = rp.add(176 * b);
            let s = k4_scales(p);
            let qh = [ld_u8(p.add(16)), ld_u8(p.add(32))];
            let xb = xp.add(256 * b);
            for c in 0..4 {
                let (d1, m1) = s[2 * c];
                let (d2, m2) = s[2 * c + 1];
                let (vd1, vm1) = (vdupq_n_f32(d1), vdupq_n_f32(m1));
                let (vd2, vm2) = (vdupq_n_f32(d2), vdupq_n_f32(m2));
                let u1 = vdupq_n_u8(1 << (2 * c));
                let u2 = vdupq_n_u8(1 << (2 * c + 1));
                for (half, h) in qh.iter().enumerate() {
                    let q = ld_u8(p.add(48 + 32 * c + 16 * half));
                    let lo = vorrq_u8(vandq_u8(q, m4), vandq_u8(vtstq_u8(*h, u1), b16));
                    let hi = vorrq_u8(vshrq_n_u8::<4>(q), vandq_u8(vtstq_u8(*h, u2), b16));
                    let xo = xb.add(64 * c + 16 * half);
                    fma_u8x16(&mut acc, lo, vd1, vm1, xo, k);
                    fma_u8x16(&mut acc, hi, vd2, vm2, xo.add(32), k);
                }
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
#[target_feature(enable = "neon")]
unsafe fn dot_q6k<const M: usize, const S: usize>(
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = zero_acc::<M, S>();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let m4 = vdupq_n_u8(0x0F);
    let m3 = vdupq_n_u8(0x03);
    let o32 = vdupq_n_s8(32);
    for b in 0..k / 256 {
        // SAFETY: super-block b occupies row[210b .. 210b+210]; activations
        // 256b..256b+256 of every row are in bounds.
        unsafe {
            let p = rp.add(210 * b);
            let d = ld_f16(p.add(208));
            let sc = p.add(192).cast::<[i8; 16]>().read_unaligned();
            let xb = xp.add(256 * b);
            for h in 0..2 {
                for is in 0..2 {
                    // Elements 128h + 32t + 16is + 0..16 for t = 0..4.
                    let l = 16 * is;
                    let ql0 = ld_u8(p.add(64 * h + l));
                    let ql1 = ld_u8(p.add(64 * h + 32 + l));
                    let qh = ld_u8(p.add(128 + 32 * h + l));
                    let q = [
                        vorrq_u8(vandq_u8(ql0, m4), vshlq_n_u8::<4>(vandq_u8(qh, m3))),
                        vorrq_u8(
                            vandq_u8(ql1, m4),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qh), m3)),
                        ),
                        vorrq_u8(
                            vshrq_n_u8::<4>(ql0),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qh), m3)),
                        ),
                        vorrq_u8(vshrq_n_u8::<4>(ql1), vshlq_n_u8::<4>(vshrq_n_u8::<6>(qh))),
                    ];
                    for (t, qt) in q.iter().enumerate() {
                        let qs = vsubq_s8(vreinterpretq_s8_u8(*qt), o32);
                        let ds = vdupq_n_f32(d * sc[8 * h + is + 2 * t] as f32);
                        fma_i8x16(&mut acc, qs, ds, xb.add(128 * h + 32 * t + l), k);
                    }
                }
            }
        }
    }
    finish(&acc, out);
}

/// Dequantises one whole row of `t` into `y` (k = `y.len()` values) with NEON, with exactly
/// the scalar path's arithmetic (a multiply and an add, never fused, so the bits are the same):
/// for the types the training products read as f32 tiles (Q4_0, Q4_1, Q8_0). Returns false,
/// touching nothing, for any other type; the caller then uses `scalar::dequantize_row`.
pub(super) fn dequantize_row(t: QType, row: &[u8], y: &mut [f32]) -> bool {
    if !matches!(t, QType::Q4_0 | QType::Q4_1 | QType::Q8_0) {
        return false;
    }
    let (bs, bb) = (t.block_size(), t.block_bytes());
    assert!(
        y.len().is_multiple_of(bs) && row.len() == y.len() / bs * bb,
        "neon dequantize_row called with inconsistent sizes"
    );
    let (rp, yp) = (row.as_ptr(), y.as_mut_ptr());
    for b in 0..y.len() / 32 {
        // SAFETY: NEON is baseline on aarch64; block b is row[bb*b .. bb*b+bb] and
        // y[32b .. 32b+32], in bounds by the assert above; loads and stores are unaligned.
        unsafe {
            let p = rp.add(bb * b);
            let d = vdupq_n_f32(f16_to_f32(u16::from_le_bytes([*p, *p.add(1)])));
            let out = yp.add(32 * b);
            let vals: [float32x4_t; 8] = match t {
                QType::Q8_0 => {
                    let a = i8x16_f32(vld1q_s8(p.add(2).cast()));
                    let c = i8x16_f32(vld1q_s8(p.add(18).cast()));
                    [a[0], a[1], a[2], a[3], c[0], c[1], c[2], c[3]]
                }
                _ => {
                    let qs = ld_u8(p.add(if t == QType::Q4_1 { 4 } else { 2 }));
                    let (lo, hi) = (vandq_u8(qs, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(qs));
                    if t == QType::Q4_1 {
                        let (a, c) = (u8x16_f32(lo), u8x16_f32(hi));
                        [a[0], a[1], a[2], a[3], c[0], c[1], c[2], c[3]]
                    } else {
                        let eight = vdupq_n_s8(8);
                        let a = i8x16_f32(vsubq_s8(vreinterpretq_s8_u8(lo), eight));
                        let c = i8x16_f32(vsubq_s8(vreinterpretq_s8_u8(hi), eight));
                        [a[0], a[1], a[2], a[3], c[0], c[1], c[2], c[3]]
                    }
                }
            };
            let m = (t == QType::Q4_1)
                .then(|| vdupq_n_f32(f16_to_f32(u16::from_le_bytes([*p.add(2), *p.add(3)]))));
            for (i, v) in vals.into_iter().enumerate() {
                let mut f = vmulq_f32(v, d);
                if let Some(m) = m {
                    f = vaddq_f32(f, m);
                }
                vst1q_f32(out.add(4 * i), f);
            }
        }
    }
    true
}
