//! Single-threaded cross-check of `matmul` (the SIMD path) against
//! `matmul_scalar` and candle's dequantisation, for every type and the test
//! shapes, without libtest or rayon worker threads.
//!
//! Job: let the NEON kernels be verified under qemu-user, where spawning a
//! thread hangs on some hosts (seen with qemu 7.2 on a 6.x kernel), so
//! `cargo test` cannot run there. The real tests live in `src/kernels/tests.rs`.
//!
//! Must not: spawn threads (the rayon pool is built with `use_current_thread`
//! and one thread), or replace the unit tests.
//!
//! Run (aarch64, from an x86_64 host with an aarch64 std, linker and qemu):
//! `cargo build --release --example neon_check --target aarch64-unknown-linux-gnu`
//! then `qemu-aarch64-static -L /usr/aarch64-linux-gnu target/.../examples/neon_check`.
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use hone::kernels::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::borrow::Cow;

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
fn rf16(rng: &mut StdRng, max_exp: u16) -> [u8; 2] {
    let sign: u16 = if rng.random::<bool>() { 0x8000 } else { 0 };
    (sign | (rng.random_range(0..=max_exp) << 10) | rng.random_range(0..0x400u16)).to_le_bytes()
}
fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
        .unwrap();
    pool.install(|| {
        println!("simd_path = {}", simd_path());
        let mut rng = StdRng::seed_from_u64(3);
        let all = [
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
        let mut checked = 0;
        for t in all {
            for k in [256usize, 512, 576, 896, 1536, 13] {
                if k % t.block_size() != 0 {
                    continue;
                }
                for n in [1usize, 3, 64, 100] {
                    let (bs, bb) = (t.block_size(), t.block_bytes());
                    let mut data = vec![0u8; n * k / bs * bb];
                    rng.fill(&mut data[..]);
                    for blk in data.chunks_exact_mut(bb) {
                        match t {
                            QType::F32 => {
                                let v: f32 = rng.random_range(-1.0..1.0);
                                blk.copy_from_slice(&v.to_le_bytes());
                            }
                            QType::F16 => blk.copy_from_slice(&rf16(&mut rng, 15)),
                            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => {
                                blk[0..2].copy_from_slice(&rf16(&mut rng, 11))
                            }
                            QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => {
                                blk[0..2].copy_from_slice(&rf16(&mut rng, 11));
                                blk[2..4].copy_from_slice(&rf16(&mut rng, 11));
                            }
                            QType::Q6K => blk[208..210].copy_from_slice(&rf16(&mut rng, 8)),
                        }
                    }
                    let mut buf = vec![0u8; data.len() + 64];
                    let off = buf.as_ptr().align_offset(32);
                    buf[off..off + data.len()].copy_from_slice(&data);
                    let st = QStorage::from_data(
                        Cow::Borrowed(&buf[off..off + data.len()]),
                        &Device::Cpu,
                        to_ggml(t),
                    )
                    .unwrap();
                    let oracle = QTensor::new(st, (n, k))
                        .unwrap()
                        .dequantize(&Device::Cpu)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let mut store = vec![0u8; data.len() + 1];
                    store[1..].copy_from_slice(&data);
                    let w = QMatrix {
                        dtype: t,
                        n,
                        k,
                        data: &store[1..],
                    };
                    let mut deq = vec![0f32; n * k];
                    dequantize_rows(&w, 0, n, &mut deq).unwrap();
                    for (a, b) in deq.iter().zip(&oracle) {
                        assert!((a - b).abs() <= 1e-6 * b.abs(), "{t:?} deq {a} {b}");
                    }
                    for m in [1usize, 2, 3, 5, 8] {
                        let x: Vec<f32> =
                            (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                        let mut fast = vec![f32::NAN; m * n];
                        let mut sc = vec![f32::NAN; m * n];
                        matmul(&w, &x, m, &mut fast).unwrap();
                        matmul_scalar(&w, &x, m, &mut sc).unwrap();
                        for i in 0..m {
                            for r in 0..n {
                                let (mut want, mut scale) = (0f64, 0f64);
                                for j in 0..k {
                                    let p = x[i * k + j] as f64 * oracle[r * k + j] as f64;
                                    want += p;
                                    scale += p.abs();
                                }
                                let tol = 1e-4 * (want.abs() + scale) + 1e-30;
                                let (a, b) = (fast[i * n + r] as f64, sc[i * n + r] as f64);
                                assert!(
                                    (b - want).abs() <= tol,
                                    "{t:?} n={n} k={k} m={m} scalar {b} vs {want}"
                                );
                                assert!(
                                    (a - b).abs() <= tol,
                                    "{t:?} n={n} k={k} m={m} simd {a} vs scalar {b}"
                                );
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
        println!("neon_check: {checked} (type, k, n, m) cases passed");
    });
}
