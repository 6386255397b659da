//! Intel AMX tile products in bf16 with f32 accumulation, for the tiled GEMM's training path
//! (`kernels::gemm_wt_mixed`, `kernels::gemm_w_mixed`) on CPUs that have AMX-BF16 (Sapphire
//! Rapids and later) and an OS that grants the tile state (Linux `arch_prctl`).
//!
//! One block computes a 32 × 32 f32 result in four tile registers: two 16-row tiles of the left
//! operand (bf16, row-major) times two 16-column tiles of the right operand, which is packed in
//! the "VNNI" layout the instruction wants (pairs along the reduction dimension interleaved).
//! Inputs are rounded to bf16 (8-bit mantissa); sums are f32. `HONE_AMX=0` turns it off.
//! The operands are packed by `kernels::amx_pack` (AVX-512); the scalar packers here are the
//! tests' reference.
//!
//! Must not: be used where results must match the f32 reference exactly (inference), run
//! without `available()` having returned true on this process, or leave tiles configured
//! (every block sequence ends with `tilerelease`).

use std::arch::asm;
use std::sync::OnceLock;

/// Rows and columns of a result block.
pub const BLOCK: usize = 32;
/// Reduction elements per tile step (16 pairs of bf16).
pub const CHUNK: usize = 32;
/// bf16 values in one packed right-hand tile (16 rows of 32).
pub const TILE_VALUES: usize = 16 * 32;

/// Whether the AMX path may run: CPU support (CPUID), OS support (XCR0), and the process's
/// permission for tile data (requested once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| !std::env::var("HONE_AMX").is_ok_and(|v| v == "0") && detect())
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let (max, l1, l7) = (
        __cpuid_count(0, 0).eax,
        __cpuid_count(1, 0),
        __cpuid_count(7, 0),
    );
    if max < 7 {
        return false;
    }
    let amx_bf16 = (l7.edx >> 22) & 1 == 1;
    let amx_tile = (l7.edx >> 24) & 1 == 1;
    let osxsave = (l1.ecx >> 27) & 1 == 1;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: xgetbv is allowed when CPUID reports OSXSAVE (checked above).
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack));
    }
    // XCR0 bits 17 (tile config) and 18 (tile data): the OS saves the tile state.
    if (lo >> 17) & 3 != 3 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

/// f32 to bf16, rounding to nearest even (NaN stays NaN).
#[cfg(test)]
#[inline]
pub fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet = ((b >> 16) | 0x40) as u16;
    if v.is_nan() {
        quiet
    } else {
        rounded
    }
}

/// Configures the eight tiles of this thread as 16 rows × 64 bytes.
///
/// # Safety
/// `available()` must have returned true.
pub unsafe fn configure() {
    #[repr(C, align(64))]
    struct Cfg([u8; 64]);
    let mut c = Cfg([0; 64]);
    c.0[0] = 1; // palette 1
    for t in 0..8 {
        c.0[16 + 2 * t] = 64; // bytes per row
        c.0[48 + t] = 16; // rows
    }
    asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly));
}

/// Releases this thread's tile state.
///
/// # Safety
/// `configure` must have run on this thread.
pub unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// `C (32 × 32 f32) = [C +] Σ_ch A_ch · B_ch` over `chunks` steps. `C` is at `c`, row-major
/// with `c_stride` bytes per row; with `accumulate` it is loaded first, otherwise it starts at
/// zero. The left operand is two 16-row bf16 tiles at `a` and `a + 16 rows` (`a_stride` bytes
/// per row), step `ch` at byte offset `ch * 64`; the right operand's two 16-column tiles are
/// packed at `b0` and `b1`, step `ch` at `ch * TILE_VALUES` values.
///
/// # Safety
/// `configure` must have run on this thread; every tile read or written must be inside its
/// buffer.
#[allow(clippy::too_many_arguments)]
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
    let c1 = (c as *mut u8).add(64);
    let c2 = (c as *mut u8).add(16 * c_stride);
    let c3 = c2.add(64);
    if accumulate {
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c1} + {s}*1]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c3} + {s}*1]",
            c0 = in(reg) c,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            s = in(reg) c_stride,
            options(nostack, readonly)
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    let a1 = (a as *const u8).add(16 * a_stride);
    for ch in 0..chunks {
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) (a as *const u8).add(ch * 64),
            a1 = in(reg) a1.add(ch * 64),
            b0 = in(reg) b0.add(ch * TILE_VALUES),
            b1 = in(reg) b1.add(ch * TILE_VALUES),
            sa = in(reg) a_stride,
            sb = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c1,
        c2 = in(reg) c2,
        c3 = in(reg) c3,
        s = in(reg) c_stride,
        options(nostack)
    );
}

/// Packs a right operand in the VNNI layout the tile product wants: value (r, c) (reduction
/// index r, column c) goes to column group `c / 16`, step `r / 32`, tile row `(r % 32) / 2`,
/// position `2 (c % 16) + r % 2`. Groups come in pairs (columns padded to 32), steps cover
/// `red` padded to 32; padding is zero. Returns the number of steps.
#[cfg(test)]
fn packed_len(red: usize, cols: usize, out: &mut Vec<u16>) -> usize {
    let chunks = red.div_ceil(CHUNK);
    let groups = cols.div_ceil(BLOCK) * 2;
    out.clear();
    out.resize(groups * chunks * TILE_VALUES, 0);
    chunks
}

/// The right operand `Wᵀ` of `x · Wᵀ` from `w`: `cols` rows of `red` values (row-major), so
/// value (r, c) = `w[c * red + r]`.
#[cfg(test)]
pub fn pack_transposed(w: &[f32], red: usize, cols: usize, out: &mut Vec<u16>) -> usize {
    let chunks = packed_len(red, cols, out);
    for (c, row) in w.chunks_exact(red).take(cols).enumerate() {
        let (g, j) = (c / 16, c % 16);
        for ch in 0..chunks {
            let tile = &mut out[(g * chunks + ch) * TILE_VALUES..][..TILE_VALUES];
            let src = &row[ch * CHUNK..red.min((ch + 1) * CHUNK)];
            for (i, v) in src.iter().enumerate() {
                tile[(i / 2) * 32 + 2 * j + (i & 1)] = bf16(*v);
            }
        }
    }
    chunks
}

/// The right operand `W` of `g · W` from `w`: `red` rows of `cols` values (row-major), so
/// value (r, c) = `w[r * cols + c]`.
#[cfg(test)]
pub fn pack_rows(w: &[f32], red: usize, cols: usize, out: &mut Vec<u16>) -> usize {
    let chunks = packed_len(red, cols, out);
    for (r, row) in w.chunks_exact(cols).take(red).enumerate() {
        let (ch, kk, e) = (r / CHUNK, (r % CHUNK) / 2, r & 1);
        for (g, part) in row.chunks(16).enumerate() {
            let t = &mut out[(g * chunks + ch) * TILE_VALUES + kk * 32..][..32];
            for (j, v) in part.iter().enumerate() {
                t[2 * j + e] = bf16(*v);
            }
        }
    }
    chunks
}

/// Rounds `x` (`m` rows of `k`) to bf16 in a zero-padded `m_pad × k_pad` buffer.
#[cfg(test)]
pub fn pack_left(x: &[f32], m: usize, k: usize, m_pad: usize, k_pad: usize) -> Vec<u16> {
    let mut out = vec![0u16; m_pad * k_pad];
    for (o, r) in out.chunks_exact_mut(k_pad).zip(x.chunks_exact(k)).take(m) {
        for (d, s) in o.iter_mut().zip(r) {
            *d = bf16(*s);
        }
    }
    out
}
