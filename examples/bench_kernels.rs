//! Benchmark of the fused kernels against candle on the SmolLM2-135M shapes.
//!
//! Job: for Q4_1 1536x576 and 576x1536 and the Q8_0 49152x576 vocab matrix, at
//! m = 1 and m = 128, time (median of 20 runs) `kernels::matmul`, candle's
//! `QMatMul::forward`, and dequantise-to-f32 + candle matmul, with 1 and 2
//! threads, and print GFLOP/s and effective GB/s of quantised weight bytes; for the Q4_1
//! matrices also the training products (`gemm_wt_mixed`, `gemm_w_mixed`) at m = 512.
//! It re-runs itself once per thread count because candle sizes its thread
//! pools from CANDLE_NUM_THREADS / RAYON_NUM_THREADS at first use.
//!
//! Must not: be used as a correctness test (it only prints error figures),
//! or load anything from disk or network (weights are random).
//!
//! Run: `cargo run --release --example bench_kernels`

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hone::kernels::{
    gemm_w_mixed, gemm_wt_mixed, matmul, simd_path, train_kernels, QMatrix, QType,
};
use std::sync::Arc;
use std::time::Instant;

const RUNS: usize = 20;

/// (median, minimum) wall time in ms over `RUNS` runs after one warm-up.
fn median_ms(mut f: impl FnMut()) -> (f64, f64) {
    f(); // warm-up (also lets candle build any repacked cache)
    let mut t: Vec<f64> = (0..RUNS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    ((t[RUNS / 2 - 1] + t[RUNS / 2]) / 2.0, t[0])
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |s, v| s.max(v.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |s, (x, y)| s.max((*x as f64 - *y as f64).abs()));
    err / scale.max(1e-30)
}

fn child(threads: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon pool");
    let cases = [
        ("Q4_1 1536x576", GgmlDType::Q4_1, 1536usize, 576usize),
        ("Q4_1 576x1536", GgmlDType::Q4_1, 576, 1536),
        ("Q8_0 49152x576", GgmlDType::Q8_0, 49152, 576),
    ];
    for (name, gt, n, k) in cases {
        let wf = Tensor::randn(0f32, 1f32, (n, k), &dev)?;
        let qt = Arc::new(QTensor::quantize(&wf, gt)?);
        let bytes = qt.data()?.into_owned();
        let qm = QMatrix {
            dtype: QType::from_ggml(gt).expect("supported type"),
            n,
            k,
            data: &bytes,
        };
        let qmm = QMatMul::from_arc(Arc::clone(&qt))?;
        let wdeq = qt.dequantize(&dev)?;
        let gb = bytes.len() as f64 / 1e9;
        for m in [1usize, 128] {
            let x = Tensor::randn(0f32, 1f32, (m, k), &dev)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let flop = 2.0 * (m * n * k) as f64;
            let mut out = vec![0f32; m * n];
            let row = |what: &str, (ms, min): (f64, f64), err: Option<f64>| {
                let err = err.map_or(String::new(), |e| format!("{e:9.2e}"));
                println!(
                    "{name:<15} {m:>4} {threads:>3}  {what:<27} {ms:>9.3} {min:>9.3} {:>8.2} {:>8.2} {err:>9}",
                    flop / ms / 1e6,
                    gb / ms * 1e3,
                );
            };

            // Reference: f32 matmul of the dequantised weights.
            let reference = x.matmul(&wdeq.t()?)?.flatten_all()?.to_vec1::<f32>()?;

            let ms = pool.install(|| median_ms(|| matmul(&qm, &xv, m, &mut out).expect("matmul")));
            row("hone fused", ms, Some(max_rel_err(&out, &reference)));

            let ms = median_ms(|| {
                qmm.forward(&x).expect("qmatmul");
            });
            let got = qmm.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            row("candle QMatMul", ms, Some(max_rel_err(&got, &reference)));

            let ms = median_ms(|| {
                let w = qt.dequantize(&dev).expect("dequantize");
                x.matmul(&w.t().expect("t")).expect("matmul");
            });
            row("candle dequant+f32 matmul", ms, None);

            let ms = median_ms(|| {
                x.matmul(&wdeq.t().expect("t")).expect("matmul");
            });
            row("candle f32 matmul (pre-deq)", ms, None);
        }
        // The training shapes: 512 rows (4 x 128 tokens), forward x·Wᵀ and its input gradient
        // g·W, in the mixed precision of training (bf16 AMX tiles where the CPU has them).
        if gt == GgmlDType::Q4_1 {
            let m = 512;
            let flop = 2.0 * (m * n * k) as f64;
            let x = Tensor::randn(0f32, 1f32, (m, k), &dev)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let g = Tensor::randn(0f32, 1f32, (m, n), &dev)?;
            let gv = g.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; m * n];
            let mut out_g = vec![0f32; m * k];
            let reference = x.matmul(&wdeq.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let reference_g = g.matmul(&wdeq)?.flatten_all()?.to_vec1::<f32>()?;
            let what = train_kernels().name();
            for (label, grad) in [("x·Wᵀ", false), ("g·W", true)] {
                let (ms, min) = pool.install(|| {
                    median_ms(|| {
                        if grad {
                            gemm_w_mixed(&qm, &gv, m, &mut out_g).expect("gemm");
                        } else {
                            gemm_wt_mixed(&qm, &xv, m, &mut out).expect("gemm");
                        }
                    })
                });
                let err = if grad {
                    max_rel_err(&out_g, &reference_g)
                } else {
                    max_rel_err(&out, &reference)
                };
                println!(
                    "{name:<15} {m:>4} {threads:>3}  {:<27} {ms:>9.3} {min:>9.3} {:>8.2} {:>8} {err:9.2e}",
                    format!("train {label} ({what})"),
                    flop / ms / 1e6,
                    "",
                );
            }
        }
    }
    Ok(())
}

fn main() -> candle_core::Result<()> {
    if let Ok(t) = std::env::var("BENCH_KERNELS_THREADS") {
        return child(t.parse().expect("thread count"));
    }
    println!("SIMD path: {}; median of {RUNS} runs", simd_path());
    println!("GB/s counts the quantised weight bytes; err = max|out - f32 ref| / max|ref|");
    println!("GFLOP/s and GB/s are computed from the median");
    println!(
        "{:<15} {:>4} {:>3}  {:<27} {:>9} {:>9} {:>8} {:>8} {:>9}",
        "matrix", "m", "thr", "implementation", "median ms", "min ms", "GFLOP/s", "GB/s", "err"
    );
    let exe = std::env::current_exe().expect("own path");
    for threads in [1, 2] {
        let status = std::process::Command::new(&exe)
            .env("BENCH_KERNELS_THREADS", threads.to_string())
            .env("CANDLE_NUM_THREADS", threads.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string())
            .status()
            .expect("run benchmark child");
        assert!(status.success(), "benchmark child failed");
    }
    Ok(())
}
