//! Scalar reference implementation: block parsing, dequantisation and dot
//! products, for every `QType`.
//!
//! Job: decode ggml blocks from raw little-endian bytes with exactly the
//! arithmetic of ggml's `dequantize_row_*` (as in candle's `to_float`), and
//! provide the portable row kernels that `matmul_scalar` and machines without
//! SIMD use. The SIMD backends are tested against this file.
//!
//! Must not: use `unsafe`, cast byte slices to block structs (the data may sit
//! at any address), or reorder the dequantisation arithmetic (that would
//! break bit-exact agreement with candle).

use super::{KernelSet, QType, RowKernel};

/// Exact IEEE half → single conversion (all 65536 inputs, NaN payloads kept).
#[inline]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else if exp != 0 {
        sign | ((exp + 112) << 23) | (man << 13)
    } else if man == 0 {
        sign
    } else {
        // Subnormal half: man * 2^-24, exact in f32.
        let v = man as f32 * (1.0 / 16_777_216.0);
        v.to_bits() | sign
    };
    f32::from_bits(bits)
}

#[inline]
pub(crate) fn rd_f16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline]
fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8)
/// from the 12 packed scale bytes of a Q4_K / Q5_K super-block.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantises one block (`t.block_bytes()` bytes) into `y` (`t.block_size()`
/// values), with ggml's arithmetic.
pub(crate) fn dequantize_block(t: QType, b: &[u8], y: &mut [f32]) {
    match t {
        QType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        QType::F16 => y[0] = rd_f16(b, 0),
        QType::Q4_0 => {
            let d = rd_f16(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                let x0 = (qs[j] & 0x0F) as i16 - 8;
                let x1 = (qs[j] >> 4) as i16 - 8;
                y[j] = x0 as f32 * d;
                y[j + 16] = x1 as f32 * d;
            }
        }
        QType::Q4_1 => {
            let d = rd_f16(b, 0);
            let m = rd_f16(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0F) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        QType::Q5_0 => {
            let d = rd_f16(b, 0);
            let qh = rd_u32(b, 2);
            let qs = &b[6..22];
            for j in 0..16 {
                let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                let x0 = ((qs[j] & 0x0F) | xh0) as i32 - 16;
                let x1 = ((qs[j] >> 4) | xh1) as i32 - 16;
                y[j] = x0 as f32 * d;
                y[j + 16] = x1 as f32 * d;
            }
        }
        QType::Q5_1 => {
            let d = rd_f16(b, 0);
            let m = rd_f16(b, 2);
            let qh = rd_u32(b, 4);
            let qs = &b[8..24];
            for j in 0..16 {
                let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                let x0 = (qs[j] & 0x0F) | xh0;
                let x1 = (qs[j] >> 4) | xh1;
                y[j] = x0 as f32 * d + m;
                y[j + 16] = x1 as f32 * d + m;
            }
        }
        QType::Q8_0 => {
            let d = rd_f16(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        QType::Q4K => {
            let d = rd_f16(b, 0);
            let min = rd_f16(b, 2);
            let scales = &b[4..16];
            let qs = &b[16..144];
            for c in 0..4 {
                let q = &qs[32 * c..32 * c + 32];
                let (sc, m) = scale_min_k4(2 * c, scales);
                let (d1, m1) = (d * sc as f32, min * m as f32);
                let (sc, m) = scale_min_k4(2 * c + 1, scales);
                let (d2, m2) = (d * sc as f32, min * m as f32);
                let yc = &mut y[64 * c..64 * c + 64];
                for l in 0..32 {
                    yc[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    yc[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        QType::Q5K => {
            let d = rd_f16(b, 0);
            let min = rd_f16(b, 2);
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for c in 0..4 {
                let ql = &qs[32 * c..32 * c + 32];
                let (sc, m) = scale_min_k4(2 * c, scales);
                let (d1, m1) = (d * sc as f32, min * m as f32);
                let (sc, m) = scale_min_k4(2 * c + 1, scales);
                let (d2, m2) = (d * sc as f32, min * m as f32);
                let (u1, u2) = (1u8 << (2 * c), 1u8 << (2 * c + 1));
                let yc = &mut y[64 * c..64 * c + 64];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16f32 } else { 0f32 };
                    let h2 = if qh[l] & u2 != 0 { 16f32 } else { 0f32 };
                    yc[l] = d1 * ((ql[l] & 0xF) as f32 + h1) - m1;
                    yc[l + 32] = d2 * ((ql[l] >> 4) as f32 + h2) - m2;
                }
            }
        }
        QType::Q6K => {
            let d = rd_f16(b, 208);
            for h in 0..2 {
                let ql = &b[64 * h..64 * h + 64];
                let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                let yh = &mut y[128 * h..128 * h + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    yh[l] = d * sc[is] as i8 as f32 * q1 as f32;
                    yh[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                    yh[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                    yh[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantises one whole row (`y.len()` = k values, `row` = its bytes).
pub(crate) fn dequantize_row(t: QType, row: &[u8], y: &mut [f32]) {
    match t {
        QType::F32 => {
            for (v, b) in y.iter_mut().zip(row.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        QType::F16 => {
            for (v, b) in y.iter_mut().zip(row.chunks_exact(2)) {
                *v = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        _ => {
            let (bs, bb) = (t.block_size(), t.block_bytes());
            for (blk, yb) in row.chunks_exact(bb).zip(y.chunks_exact_mut(bs)) {
                dequantize_block(t, blk, yb);
            }
        }
    }
}

/// Scalar row kernel: dequantise a block into a stack buffer, then dot it with
/// every activation row. f32 accumulation, one partial sum per block.
fn dot_generic<const T: u8>(row: &[u8], x: &[f32], k: usize, out: &mut [f32]) {
    let t = qtype_of(T);
    out.fill(0.0);
    let (bs, bb) = match t {
        // Treat float rows as blocks of 32 values (the tail is handled below).
        QType::F32 | QType::F16 => (32, 32 * t.block_bytes()),
        _ => (t.block_size(), t.block_bytes()),
    };
    let mut buf = [0f32; 256];
    let full = k / bs;
    for blk in 0..full {
        let y = &mut buf[..bs];
        dequantize_row(t, &row[blk * bb..(blk + 1) * bb], y);
        for (i, o) in out.iter_mut().enumerate() {
            let xb = &x[i * k + blk * bs..i * k + (blk + 1) * bs];
            let mut s = 0f32;
            for (a, b) in y.iter().zip(xb) {
                s += a * b;
            }
            *o += s;
        }
    }
    let done = full * bs;
    if done < k {
        // Only float rows have a tail (k is a multiple of the block size otherwise).
        let tail = k - done;
        let ew = t.block_bytes();
        let y = &mut buf[..tail];
        dequantize_row(t, &row[done * ew..k * ew], y);
        for (i, o) in out.iter_mut().enumerate() {
            let xb = &x[i * k + done..i * k + k];
            let mut s = 0f32;
            for (a, b) in y.iter().zip(xb) {
                s += a * b;
            }
            *o += s;
        }
    }
}

const fn qtype_code(t: QType) -> u8 {
    match t {
        QType::F32 => 0,
        QType::F16 => 1,
        QType::Q4_0 => 2,
        QType::Q4_1 => 3,
        QType::Q5_0 => 4,
        QType::Q5_1 => 5,
        QType::Q8_0 => 6,
        QType::Q4K => 7,
        QType::Q5K => 8,
        QType::Q6K => 9,
    }
}

const fn qtype_of(c: u8) -> QType {
    match c {
        0 => QType::F32,
        1 => QType::F16,
        2 => QType::Q4_0,
        3 => QType::Q4_1,
        4 => QType::Q5_0,
        5 => QType::Q5_1,
        6 => QType::Q8_0,
        7 => QType::Q4K,
        8 => QType::Q5K,
        _ => QType::Q6K,
    }
}

/// The scalar kernels for `t` (the same function serves 1..=4 rows).
pub(crate) fn kernels(t: QType) -> KernelSet {
    const fn pick(t: QType) -> RowKernel {
        match qtype_code(t) {
            0 => dot_generic::<0>,
            1 => dot_generic::<1>,
            2 => dot_generic::<2>,
            3 => dot_generic::<3>,
            4 => dot_generic::<4>,
            5 => dot_generic::<5>,
            6 => dot_generic::<6>,
            7 => dot_generic::<7>,
            8 => dot_generic::<8>,
            _ => dot_generic::<9>,
        }
    }
    [pick(t); 4]
}
