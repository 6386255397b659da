//! Tests for the kernels: scalar path against candle's dequantisation (the
//! oracle), SIMD path against the scalar path, size validation, and the
//! rayon work split.
//!
//! Must not: use candle's matmul or block structs as anything but an oracle,
//! or depend on a particular thread count of the global rayon pool.

use super::*;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::borrow::Cow;

const ALL: [QType; 10] = [
    QType::F32,
    QType::F16,
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q8_0,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
];

fn to_ggml(t: QType) -> GgmlDType {
    match t {
        QType::F32 => GgmlDType::F32,
        QType::F16 => GgmlDType::F16,
        QType::Q4_0 => GgmlDType::Q4_0,
        QType::Q4_1 => GgmlDType::Q4_1,
        QType::Q5_0 => GgmlDType::Q5_0,
        QType::Q5_1 => GgmlDType::Q5_1,
        QType::Q8_0 => GgmlDType::Q8_0,
        QType::Q4K => GgmlDType::Q4K,
        QType::Q5K => GgmlDType::Q5K,
        QType::Q6K => GgmlDType::Q6K,
    }
}

/// A random finite f16 (as little-endian bytes) with biased exponent at most
/// `max_exp` (so |v| < 2^(max_exp - 14)); subnormals included.
fn random_f16(rng: &mut StdRng, max_exp: u16) -> [u8; 2] {
    let sign: u16 = if rng.random::<bool>() { 0x8000 } else { 0 };
    let exp: u16 = rng.random_range(0..=max_exp);
    let man: u16 = rng.random_range(0..0x400);
    (sign | (exp << 10) | man).to_le_bytes()
}

/// Random but valid weights: random quant bytes, finite f16 scales of both
/// signs and small magnitude.
fn random_matrix(t: QType, n: usize, k: usize, rng: &mut StdRng) -> Vec<u8> {
    let (bs, bb) = (t.block_size(), t.block_bytes());
    let nb = n * k / bs;
    let mut data = vec![0u8; nb * bb];
    rng.fill(&mut data[..]);
    let put = |data: &mut [u8], at: usize, max_exp: u16, rng: &mut StdRng| {
        data[at..at + 2].copy_from_slice(&random_f16(rng, max_exp));
    };
    for blk in data.chunks_exact_mut(bb) {
        match t {
            QType::F32 => {
                let v: f32 = rng.random_range(-1.0..1.0);
                blk.copy_from_slice(&v.to_le_bytes());
            }
            QType::F16 => put(blk, 0, 15, rng),
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => put(blk, 0, 11, rng),
            QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => {
                put(blk, 0, 11, rng);
                put(blk, 2, 11, rng);
            }
            QType::Q6K => put(blk, 208, 8, rng),
        }
    }
    data
}

/// candle's dequantisation of the same bytes (copied to an aligned buffer,
/// which candle's block casts need).
fn candle_dequant(t: QType, n: usize, k: usize, data: &[u8]) -> Vec<f32> {
    let mut buf = vec![0u8; data.len() + 64];
    let off = buf.as_ptr().align_offset(32);
    assert!(off < 32);
    buf[off..off + data.len()].copy_from_slice(data);
    let storage = QStorage::from_data(
        Cow::Borrowed(&buf[off..off + data.len()]),
        &Device::Cpu,
        to_ggml(t),
    )
    .unwrap();
    let qt = QTensor::new(storage, (n, k)).unwrap();
    qt.dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn random_x(len: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// f64 reference product and the per-element scale Σ|x_j w_j|.
fn reference(wf: &[f32], x: &[f32], n: usize, k: usize, m: usize) -> (Vec<f64>, Vec<f64>) {
    let mut r = vec![0f64; m * n];
    let mut s = vec![0f64; m * n];
    for i in 0..m {
        for row in 0..n {
            let (mut acc, mut sc) = (0f64, 0f64);
            for j in 0..k {
                let p = x[i * k + j] as f64 * wf[row * k + j] as f64;
                acc += p;
                sc += p.abs();
            }
            r[i * n + row] = acc;
            s[i * n + row] = sc;
        }
    }
    (r, s)
}

/// One random product case for the tiled GEMM: W (n × k) of type `dtype`, x (m × k) and
/// g (m × n), with the f64 references of `x·Wᵀ` and `g·W` and their scales.
struct GemmCase {
    dtype: QType,
    n: usize,
    k: usize,
    data: Vec<u8>,
    x: Vec<f32>,
    want: Vec<f64>,
    scale: Vec<f64>,
    g: Vec<f32>,
    want_g: Vec<f64>,
    scale_g: Vec<f64>,
}

impl GemmCase {
    fn new(dtype: QType, n: usize, k: usize, m: usize, rng: &mut StdRng) -> Self {
        let data = random_matrix(dtype, n, k, rng);
        let wf = candle_dequant(dtype, n, k, &data);
        let x = random_x(m * k, rng);
        let (want, scale) = reference(&wf, &x, n, k, m);
        let g = random_x(m * n, rng);
        let (want_g, scale_g) = reference_g_w(&wf, &g, n, k, m);
        Self {
            dtype,
            n,
            k,
            data,
            x,
            want,
            scale,
            g,
            want_g,
            scale_g,
        }
    }

    fn matrix(&self) -> QMatrix<'_> {
        QMatrix {
            dtype: self.dtype,
            n: self.n,
            k: self.k,
            data: &self.data,
        }
    }

    /// Checks `out` (x·Wᵀ) and `out_g` (g·W) against the f64 references within `tol`.
    fn check(&self, what: &str, out: &[f32], out_g: &[f32], tol: f64) {
        let (t, n, k, m) = (self.dtype, self.n, self.k, self.x.len() / self.k);
        let at = format!("n={n} k={k} m={m}");
        assert_close(
            &format!("{t:?} {what}x·Wᵀ {at}"),
            out,
            &self.want,
            &self.scale,
            tol,
        );
        assert_close(
            &format!("{t:?} {what}g·W {at}"),
            out_g,
            &self.want_g,
            &self.scale_g,
            tol,
        );
    }
}

/// The f64 reference of `g (m × n) · W` for `W` (n × k): [`reference`] with Wᵀ as the weight.
fn reference_g_w(wf: &[f32], g: &[f32], n: usize, k: usize, m: usize) -> (Vec<f64>, Vec<f64>) {
    let mut wt = vec![0f32; n * k];
    for r in 0..n {
        for c in 0..k {
            wt[c * n + r] = wf[r * k + c];
        }
    }
    reference(&wt, g, k, n, m)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], scale: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (idx, ((&a, &b), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (a as f64 - b).abs();
        assert!(
            err <= tol * (b.abs() + s) + 1e-30,
            "{what}: element {idx}: got {a}, want {b} (scale {s}, err {err})"
        );
    }
}

/// Every f16 bit pattern, through our conversion and candle's (NaNs only
/// need to stay NaN).
#[test]
fn f16_conversion_matches_candle_for_all_inputs() {
    let data: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let k = 1 << 16;
    let oracle = candle_dequant(QType::F16, 1, k, &data);
    let w = QMatrix {
        dtype: QType::F16,
        n: 1,
        k,
        data: &data,
    };
    let mut ours = vec![0f32; k];
    dequantize_rows(&w, 0, 1, &mut ours).unwrap();
    for (h, (a, b)) in ours.iter().zip(&oracle).enumerate() {
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "f16 {h:#06x}: {a} vs {b}"
        );
    }
}

#[test]
fn qtype_tables_match_candle() {
    for t in ALL {
        let g = to_ggml(t);
        assert_eq!(t.block_size(), g.block_size(), "{t:?} block size");
        assert_eq!(t.block_bytes(), g.type_size(), "{t:?} block bytes");
        assert_eq!(QType::from_ggml(g), Some(t));
    }
    for g in [
        GgmlDType::BF16,
        GgmlDType::Q8_1,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q8K,
    ] {
        assert_eq!(QType::from_ggml(g), None);
    }
}

#[test]
fn simd_path_is_reported() {
    let p = simd_path();
    assert!(["avx2+fma", "neon", "scalar"].contains(&p));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert_eq!(p, "avx2+fma");
    }
    #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
    assert_eq!(p, "neon");
}

/// The full sweep: every type, k, n and m of the spec. Weight bytes sit at an
/// odd address to catch alignment assumptions.
#[test]
fn sweep_against_candle_and_scalar() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for t in ALL {
        for k in [256usize, 512, 576, 896, 1536] {
            if k % t.block_size() != 0 {
                continue;
            }
            for n in [1usize, 3, 64, 100] {
                let data = random_matrix(t, n, k, &mut rng);
                let mut store = vec![0u8; data.len() + 1];
                store[1..].copy_from_slice(&data);
                let w = QMatrix {
                    dtype: t,
                    n,
                    k,
                    data: &store[1..],
                };
                let oracle = candle_dequant(t, n, k, &data);

                let mut deq = vec![0f32; n * k];
                dequantize_rows(&w, 0, n, &mut deq).unwrap();
                for (idx, (&a, &b)) in deq.iter().zip(&oracle).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs(),
                        "{t:?} n={n} k={k}: dequantised element {idx}: {a} vs candle {b}"
                    );
                }
                if n > 2 {
                    let mut part = vec![0f32; (n - 2) * k];
                    dequantize_rows(&w, 1, n - 1, &mut part).unwrap();
                    assert_eq!(&part[..], &deq[k..(n - 1) * k], "{t:?} partial rows");
                }

                for m in [1usize, 2, 3, 5, 8] {
                    let x = random_x(m * k, &mut rng);
                    let (want, scale) = reference(&oracle, &x, n, k, m);
                    let what = format!("{t:?} n={n} k={k} m={m}");

                    let mut sc = vec![f32::NAN; m * n];
                    matmul_scalar(&w, &x, m, &mut sc).unwrap();
                    assert_close(&format!("scalar {what}"), &sc, &want, &scale, 1e-4);

                    let mut fast = vec![f32::NAN; m * n];
                    matmul(&w, &x, m, &mut fast).unwrap();
                    let sc64: Vec<f64> = sc.iter().map(|&v| v as f64).collect();
                    assert_close(&format!("simd {what}"), &fast, &sc64, &scale, 1e-4);
                }
            }
        }
    }
}

/// Float weights have no blocks, so k need not be a multiple of 8.
#[test]
fn float_types_with_ragged_k() {
    let mut rng = StdRng::seed_from_u64(7);
    for t in [QType::F32, QType::F16] {
        for k in [1usize, 7, 13, 100] {
            let n = 5;
            let data = random_matrix(t, n, k, &mut rng);
            let w = QMatrix {
                dtype: t,
                n,
                k,
                data: &data,
            };
            let oracle = candle_dequant(t, n, k, &data);
            for m in [1usize, 4, 6] {
                let x = random_x(m * k, &mut rng);
                let (want, scale) = reference(&oracle, &x, n, k, m);
                let mut fast = vec![0f32; m * n];
                matmul(&w, &x, m, &mut fast).unwrap();
                assert_close(&format!("{t:?} k={k} m={m}"), &fast, &want, &scale, 1e-4);
                let mut sc = vec![0f32; m * n];
                matmul_scalar(&w, &x, m, &mut sc).unwrap();
                assert_close(
                    &format!("{t:?} k={k} m={m} scalar"),
                    &sc,
                    &want,
                    &scale,
                    1e-4,
                );
            }
        }
    }
}

/// Large shapes through pools of several sizes: the split over weight rows
/// and over activation rows must cover every output exactly once.
#[test]
fn parallel_split_matches_serial() {
    let mut rng = StdRng::seed_from_u64(11);
    for t in [QType::Q4_1, QType::Q8_0, QType::Q6K] {
        for (n, m) in [(1000usize, 9usize), (64, 40), (5, 13), (300, 1)] {
            let k = 512;
            let data = random_matrix(t, n, k, &mut rng);
            let w = QMatrix {
                dtype: t,
                n,
                k,
                data: &data,
            };
            let x = random_x(m * k, &mut rng);
            let mut serial = vec![0f32; m * n];
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| matmul(&w, &x, m, &mut serial))
                .unwrap();
            for threads in [2usize, 3, 8] {
                let mut par = vec![f32::NAN; m * n];
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| matmul(&w, &x, m, &mut par))
                    .unwrap();
                // Same kernels and summation order per element: bit-identical.
                assert_eq!(serial, par, "{t:?} n={n} m={m} threads={threads}");
            }
        }
    }
}

/// Several matrices of different types and sizes in one pass give, bit for bit, what each
/// gives alone, on any number of threads; mismatched outputs are errors.
#[test]
fn matvec_many_matches_one_matrix_at_a_time() {
    let mut rng = StdRng::seed_from_u64(12);
    let k = 256;
    let shapes = [
        (QType::Q4_1, 576usize),
        (QType::Q8_0, 70),
        (QType::Q6K, 5),
        (QType::F32, 130),
    ];
    let datas: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(t, n)| random_matrix(t, n, k, &mut rng))
        .collect();
    let ws: Vec<QMatrix> = shapes
        .iter()
        .zip(&datas)
        .map(|(&(dtype, n), data)| QMatrix { dtype, n, k, data })
        .collect();
    let x = random_x(k, &mut rng);
    let want: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| {
            let mut o = vec![0f32; w.n];
            matmul(w, &x, 1, &mut o).unwrap();
            o
        })
        .collect();
    let refs: Vec<&QMatrix> = ws.iter().collect();
    for threads in [1usize, 2, 5] {
        let mut got: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; w.n]).collect();
        let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|o| &mut o[..]).collect();
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| matvec_many(&refs, &x, &mut outs))
            .unwrap();
        assert_eq!(got, want, "threads={threads}");
    }
    let mut short = [0f32; 3];
    assert!(matvec_many(&refs[..1], &x, &mut [&mut short[..]]).is_err());
    assert!(matvec_many(&refs[..2], &x, &mut [&mut short[..]]).is_err());
}

/// [`matmul_many`] over several rows gives, bit for bit, what [`matmul`] gives each matrix over
/// those rows, on any number of threads; and each row what it gives alone but for rounding
/// (the kernels for several rows sum in another order).
#[test]
fn matmul_many_matches_one_matrix_and_one_row_at_a_time() {
    let mut rng = StdRng::seed_from_u64(13);
    let k = 256;
    let shapes = [(QType::Q4_1, 576usize), (QType::Q8_0, 70), (QType::Q6K, 5)];
    let datas: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(t, n)| random_matrix(t, n, k, &mut rng))
        .collect();
    let ws: Vec<QMatrix> = shapes
        .iter()
        .zip(&datas)
        .map(|(&(dtype, n), data)| QMatrix { dtype, n, k, data })
        .collect();
    let refs: Vec<&QMatrix> = ws.iter().collect();
    for m in [1usize, 2, 3, 4, 5, 8] {
        let x: Vec<f32> = (0..m).flat_map(|_| random_x(k, &mut rng)).collect();
        let want: Vec<Vec<f32>> = ws
            .iter()
            .map(|w| {
                let mut o = vec![0f32; m * w.n];
                matmul(w, &x, m, &mut o).unwrap();
                o
            })
            .collect();
        for (w, o) in ws.iter().zip(&want) {
            for (i, row) in o.chunks_exact(w.n).enumerate() {
                let mut one = vec![0f32; w.n];
                matmul(w, &x[i * k..(i + 1) * k], 1, &mut one).unwrap();
                for (a, b) in row.iter().zip(&one) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "m={m} row {i}: {a} {b}"
                    );
                }
            }
        }
        for threads in [1usize, 2, 5] {
            let mut got: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.n]).collect();
            let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|o| &mut o[..]).collect();
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| matmul_many(&refs, &x, m, &mut outs))
                .unwrap();
            assert_eq!(got, want, "m={m} threads={threads}");
        }
    }
    let x = random_x(2 * k, &mut rng);
    let mut short = vec![0f32; 576];
    assert!(matmul_many(&refs[..1], &x, 2, &mut [&mut short[..]]).is_err());
}

#[test]
fn bad_sizes_are_errors() {
    let (n, k) = (4usize, 64usize);
    let data = vec![0u8; n * 2 * 18];
    let x = vec![0f32; 2 * k];
    let mut out = vec![0f32; 2 * n];
    let good = QMatrix {
        dtype: QType::Q4_0,
        n,
        k,
        data: &data,
    };
    assert!(matmul(&good, &x, 2, &mut out).is_ok());

    let short = QMatrix {
        data: &data[..data.len() - 1],
        ..good
    };
    let long_data = vec![0u8; data.len() + 1];
    let long = QMatrix {
        data: &long_data,
        ..good
    };
    let ragged = QMatrix { k: 48, ..good };
    let huge = QMatrix {
        n: usize::MAX / 2,
        ..good
    };
    let huge_k = QMatrix {
        k: usize::MAX - 31,
        ..good
    };
    for w in [short, long, ragged, huge, huge_k] {
        assert!(matmul(&w, &x, 2, &mut out).is_err(), "{w:?}");
        assert!(matmul_scalar(&w, &x, 2, &mut out).is_err(), "{w:?}");
        let mut d = vec![0f32; k];
        assert!(dequantize_rows(&w, 0, 1, &mut d).is_err(), "{w:?}");
    }

    assert!(matmul(&good, &x[1..], 2, &mut out).is_err());
    assert!(matmul(&good, &x, 3, &mut out).is_err());
    assert!(matmul(&good, &x, 2, &mut out[1..]).is_err());
    assert!(matmul(&good, &x, usize::MAX, &mut out).is_err());
    assert!(matmul_scalar(&good, &x, 2, &mut out[1..]).is_err());

    let mut d = vec![0f32; 2 * k];
    assert!(dequantize_rows(&good, 0, 2, &mut d).is_ok());
    assert!(dequantize_rows(&good, 3, 5, &mut d).is_err());
    assert!(dequantize_rows(&good, 2, 1, &mut d).is_err());
    assert!(dequantize_rows(&good, 0, 2, &mut d[1..]).is_err());
    assert!(dequantize_rows(&good, 0, 1, &mut d).is_err());
}

#[test]
fn empty_shapes() {
    let data: Vec<u8> = Vec::new();
    // k = 0: every output is an empty sum.
    let w = QMatrix {
        dtype: QType::Q6K,
        n: 3,
        k: 0,
        data: &data,
    };
    let mut out = vec![f32::NAN; 6];
    matmul(&w, &[], 2, &mut out).unwrap();
    assert_eq!(out, vec![0.0; 6]);
    // n = 0 and m = 0: nothing to do.
    let w0 = QMatrix {
        dtype: QType::Q8_0,
        n: 0,
        k: 32,
        data: &data,
    };
    matmul(&w0, &[0.0; 64], 2, &mut []).unwrap();
    let one = vec![0u8; 34];
    let w1 = QMatrix {
        dtype: QType::Q8_0,
        n: 1,
        k: 32,
        data: &one,
    };
    matmul(&w1, &[], 0, &mut []).unwrap();
    dequantize_rows(&w1, 1, 1, &mut []).unwrap();
}

/// The tiled GEMM paths against the f64 product with candle's dequantisation, for every type,
/// shapes that leave partial tiles and partial column ranges, and several pool sizes (the
/// result must not depend on the thread count: each output element has one owner).
#[test]
fn tiled_gemm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(41);
    for t in ALL {
        let bs = t.block_size().max(1);
        for (n, k, m) in [
            (37usize, 3 * 256usize, 19usize),
            (300, 2 * 256, 5),
            (8, 256, 64),
        ] {
            let k = k.next_multiple_of(bs);
            let c = GemmCase::new(t, n, k, m, &mut rng);
            let w = c.matrix();
            let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
            for threads in [1usize, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = vec![f32::NAN; m * n];
                pool.install(|| gemm_wt(&w, &c.x, m, &mut out)).unwrap();
                let mut out_g = vec![f32::NAN; m * k];
                pool.install(|| gemm_w(&w, &c.g, m, &mut out_g)).unwrap();
                c.check("", &out, &out_g, 1e-5);
                match &first {
                    None => first = Some((out, out_g)),
                    Some((a, b)) => {
                        assert_eq!(a, &out, "{t:?} x·Wᵀ differs with {threads} threads");
                        assert_eq!(b, &out_g, "{t:?} g·W differs with {threads} threads");
                    }
                }
            }
        }
    }
}

#[test]
fn tiled_gemm_rejects_bad_sizes() {
    let (n, k) = (4usize, 64usize);
    let data = vec![0u8; n * 2 * 18];
    let w = QMatrix {
        dtype: QType::Q4_0,
        n,
        k,
        data: &data,
    };
    let mut out = vec![0f32; 2 * n];
    assert!(gemm_wt(&w, &[0f32; 3], 2, &mut out).is_err());
    let mut out_g = vec![0f32; 2 * k];
    let g = vec![0f32; 2 * n];
    assert!(gemm_w(&w, &g, 2, &mut out_g[..5]).is_err());
    assert!(gemm_w(&w, &g, 2, &mut out_g).is_ok());
}

/// The mixed-precision products against the f64 reference: exact f32 where AMX is absent,
/// bf16 inputs with f32 sums where it is present (error at most about 2·2^-9·Σ|x·w|).
#[test]
fn mixed_gemm_matches_reference_within_bf16() {
    let mut rng = StdRng::seed_from_u64(43);
    // bf16 inputs (AMX or AVX512_BF16): 8-bit mantissas; f32: only the order of the sums.
    let bf16 = !matches!(train_kernels(), TrainKernels::F32 | TrainKernels::Avx2);
    let tol = if bf16 { 4e-3 } else { 1e-5 };
    for t in [
        QType::Q4_1,
        QType::Q4_0,
        QType::Q8_0,
        QType::Q4K,
        QType::Q6K,
        QType::F16,
        QType::F32,
    ] {
        let bs = t.block_size().max(1);
        for (n, k, m) in [
            (100usize, 576usize, 70usize),
            (64, 256, 32),
            (33, 512, 129),
            (1536, 576, 96),
            (576, 1536, 64),
            (40, 77, 33),
        ] {
            let k = k.next_multiple_of(bs);
            let c = GemmCase::new(t, n, k, m, &mut rng);
            let w = c.matrix();
            let mut out = vec![f32::NAN; m * n];
            gemm_wt_mixed(&w, &c.x, m, &mut out).unwrap();
            let mut out_g = vec![f32::NAN; m * k];
            gemm_w_mixed(&w, &c.g, m, &mut out_g).unwrap();
            c.check("mixed ", &out, &out_g, tol);
            // The allocating variants (not zeroed first on the AMX path) give the same bits.
            let v = gemm_wt_mixed_vec(&w, &c.x, m).unwrap();
            let v_g = gemm_w_mixed_vec(&w, &c.g, m).unwrap();
            let same = |a: &[f32], b: &[f32]| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            };
            assert!(
                same(&v, &out),
                "{t:?} {n}x{k} m={m}: gemm_wt_mixed_vec differs"
            );
            assert!(
                same(&v_g, &out_g),
                "{t:?} {n}x{k} m={m}: gemm_w_mixed_vec differs"
            );
        }
    }
    eprintln!("training kernels: {}", train_kernels().name());
}

/// Every training-product path this CPU has (AMX tiles, AVX512_BF16 dot products, f32 tiles on
/// AVX2+FMA alone or on the gemm crate's pick) against the f64 reference, whatever
/// `HONE_TRAIN_KERNELS` picked for the process: bf16 inputs with f32 sums for the packed paths,
/// exact f32 for the others; the allocating variants give the same bits as the in-place ones.
#[test]
fn every_training_path_matches_reference() {
    use super::tiled::{w_impl, w_vec, wt_impl, wt_vec};
    use super::TrainKernels;
    let mut rng = StdRng::seed_from_u64(47);
    let paths: Vec<TrainKernels> = [
        TrainKernels::Amx,
        TrainKernels::Avx512Bf16,
        TrainKernels::Avx2,
        TrainKernels::F32,
    ]
    .into_iter()
    .filter(|k| k.available())
    .collect();
    for &path in &paths {
        let tol = if matches!(path, TrainKernels::F32 | TrainKernels::Avx2) {
            1e-5
        } else {
            4e-3
        };
        for t in [QType::Q4_1, QType::Q8_0, QType::Q6K, QType::F16] {
            let bs = t.block_size().max(1);
            for (n, k, m) in [
                (100usize, 576usize, 70usize),
                (33, 512, 129),
                (576, 1536, 64),
            ] {
                let k = k.next_multiple_of(bs);
                let c = GemmCase::new(t, n, k, m, &mut rng);
                let w = c.matrix();
                let mut out = vec![f32::NAN; m * n];
                wt_impl(&w, &c.x, m, &mut out, Some(path)).unwrap();
                let mut out_g = vec![f32::NAN; m * k];
                w_impl(&w, &c.g, m, &mut out_g, Some(path)).unwrap();
                c.check(path.name(), &out, &out_g, tol);
                let v = wt_vec(&w, &c.x, m, Some(path)).unwrap();
                let v_g = w_vec(&w, &c.g, m, Some(path)).unwrap();
                let same = |a: &[f32], b: &[f32]| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                assert!(
                    same(&v, &out),
                    "{path:?} {t:?} {n}x{k} m={m}: wt_vec differs"
                );
                assert!(
                    same(&v_g, &out_g),
                    "{path:?} {t:?} {n}x{k} m={m}: w_vec differs"
                );
            }
        }
    }
    eprintln!("training paths checked: {paths:?}");
}

/// The AVX-512 packers (`amx_pack`) write exactly the bits of the scalar packers applied to
/// the dequantised matrix, for every type, panel position and ragged edge, and the left
/// operand's rounding matches `amx::bf16` on special values (NaN, infinities, subnormals, ties).
#[cfg(target_arch = "x86_64")]
#[test]
fn fused_packers_match_scalar_packers() {
    use super::{amx, amx_pack};
    if !amx_pack::available() {
        eprintln!("no AVX-512 here: nothing to compare");
        return;
    }
    let mut rng = StdRng::seed_from_u64(44);
    for t in ALL {
        let bs = t.block_size();
        let (n, k) = (
            50usize,
            if bs == 1 {
                77
            } else {
                (96usize).next_multiple_of(bs) * 2
            },
        );
        let data = random_matrix(t, n, k, &mut rng);
        let w = QMatrix {
            dtype: t,
            n,
            k,
            data: &data,
        };
        let rb = w.row_bytes().unwrap();
        let mut wf = vec![0f32; n * k];
        for (r, o) in wf.chunks_exact_mut(k).enumerate() {
            scalar::dequantize_row(t, &data[r * rb..(r + 1) * rb], o);
        }
        let sub = |r0: usize, r1: usize, c0: usize, c1: usize| -> Vec<f32> {
            (r0..r1)
                .flat_map(|r| wf[r * k + c0..r * k + c1].to_vec())
                .collect()
        };
        let (mut f, mut got, mut want) = (Vec::new(), Vec::new(), Vec::new());
        // x·Wᵀ: output columns over W's rows, reduction over W's columns.
        let k_mid = (k / 2).next_multiple_of(bs.max(32));
        for (c0, c1) in [(0, n), (16, 37), (3, 4)] {
            for (k0, k1) in [(0, k), (k_mid.min(k), k), (0, 32.min(k))] {
                let chunks = amx_pack::pack_wt(&w, rb, (c0, c1), (k0, k1), &mut f, &mut got);
                // The reference reads rows c of the sub-matrix as its columns.
                let s = sub(c0, c1, k0, k1);
                let want_chunks = amx::pack_transposed(&s, k1 - k0, c1 - c0, &mut want);
                assert_eq!(chunks, want_chunks, "{t:?} wt chunks");
                assert!(got == want, "{t:?} wt rows {c0}..{c1} cols {k0}..{k1}");
            }
        }
        // g·W: reduction over W's rows, output columns over W's columns (whole blocks).
        let c_mid = (k / 2) / bs * bs;
        for (r0, r1) in [(0, n), (5, 40), (7, 8)] {
            for (c0, c1) in [(0, k), (c_mid, k), (0, c_mid.max(bs))] {
                let chunks = amx_pack::pack_w(&w, rb, (r0, r1), (c0, c1), &mut f, &mut got);
                let s = sub(r0, r1, c0, c1);
                let want_chunks = amx::pack_rows(&s, r1 - r0, c1 - c0, &mut want);
                assert_eq!(chunks, want_chunks, "{t:?} w chunks");
                assert!(got == want, "{t:?} w rows {r0}..{r1} cols {c0}..{c1}");
            }
        }
    }
    // The left operand, with special values.
    let mut x = random_x(5 * 77, &mut rng);
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -1e-42,
        f32::from_bits(0x3f80_8000), // a tie, rounds to even
        f32::from_bits(0x3f81_8000), // a tie, rounds up
        f32::MAX,
        -0.0,
    ];
    for (i, v) in specials.iter().enumerate() {
        x[i * 13] = *v;
    }
    let got = amx_pack::pack_left(&x, 5, 77, 32, 160);
    let want = amx::pack_left(&x, 5, 77, 32, 160);
    assert!(got == want, "left operand rounding");
}

/// The f32 product that training's own products (LoRA, attention, backward) go through, with
/// the gemm crate's pick and held to AVX2+FMA, against an f64 reference: row- and
/// column-oriented operands (the attention products read either one transposed), accumulating
/// into the output or not.
#[test]
fn f32_gemm_on_either_kernel_matches_reference() {
    use super::f32_gemm;
    let mut rng = StdRng::seed_from_u64(53);
    for (m, n, k) in [
        (64usize, 16usize, 576usize),
        (37, 129, 64),
        (128, 128, 64),
        (5, 3, 1),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let d0: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        for (ta, tb, acc) in [
            (false, false, false),
            (true, false, true),
            (false, true, false),
            (true, true, true),
        ] {
            // A is read as m × k: stored k × m when `ta`; B as k × n: stored n × k when `tb`.
            let (ars, acs) = if ta { (1, m) } else { (k, 1) };
            let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
            let want: Vec<f64> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    let s: f64 = (0..k)
                        .map(|l| a[i * ars + l * acs] as f64 * b[l * brs + j * bcs] as f64)
                        .sum();
                    s * 0.5 + if acc { d0[ij] as f64 } else { 0.0 }
                })
                .collect();
            for avx2 in [false, true] {
                let mut d = d0.clone();
                // SAFETY: a, b and d hold m × k, k × n and m × n values, as the strides read them.
                unsafe {
                    f32_gemm(
                        avx2,
                        m,
                        n,
                        k,
                        d.as_mut_ptr(),
                        1,
                        n as isize,
                        acc,
                        a.as_ptr(),
                        acs as isize,
                        ars as isize,
                        b.as_ptr(),
                        bcs as isize,
                        brs as isize,
                        1.0,
                        0.5,
                    );
                }
                for (ij, (g, w)) in d.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}x{n}x{k} ta={ta} tb={tb} acc={acc} avx2={avx2}: [{ij}] {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// The fast row dequantiser (AVX2 for Q4_0, Q4_1 and Q8_0, which the f32 training tiles read)
/// gives the scalar path's bits for every type, whole rows and runs of blocks within one.
#[test]
fn fast_dequantize_row_matches_scalar_bits() {
    let mut rng = StdRng::seed_from_u64(0x0dec);
    for t in ALL {
        let bs = t.block_size();
        for blocks in [1usize, 2, 7, 18] {
            let k = bs.max(32).next_multiple_of(bs) * blocks;
            let data = random_matrix(t, 1, k, &mut rng);
            let (mut fast, mut slow) = (vec![0f32; k], vec![1f32; k]);
            dequantize_row(t, &data, &mut fast);
            scalar::dequantize_row(t, &data, &mut slow);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "{t:?}, k = {k}");
        }
    }
}
