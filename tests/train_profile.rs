//! Timing breakdown of one training micro-batch on the real default model (ignored by default;
//! run with `cargo test --release --test train_profile -- --ignored --nocapture`).

mod common;

use candle_core::{Device, Tensor, Var};
use hone::engine::{Engine, LoadOptions};
use hone::lora::{LoraConfig, LoraWeights, Target};
use hone::train::forward::{self, Aux};
use std::time::Instant;

#[test]
#[ignore]
fn profile_one_micro_batch() {
    let path = common::default_model();
    let engine = Engine::load("smol", &path, &LoadOptions::default()).unwrap();
    let m = &engine.model;
    let b: usize = std::env::var("B")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let ds = hone::train::data::synthetic(&engine.tokenizer, b, 128, 1);
    let seqs: Vec<_> = ds.seqs.iter().collect();
    let batch = hone::train::data::stack(&seqs);
    let cfg = LoraConfig::top_layers(8, 16.0, Target::ALL.to_vec(), 30, 30).unwrap();
    let w = LoraWeights::init(&cfg, &m.cfg, 1).unwrap();
    let mut vars = Vec::new();
    let mut lw = w.clone();
    for p in lw.pairs.values_mut() {
        let a = Var::from_tensor(&p.a).unwrap();
        let bb = Var::from_tensor(&p.b).unwrap();
        p.a = a.as_tensor().clone();
        p.b = bb.as_tensor().clone();
        vars.push((a, bb));
    }
    let aux = Aux::new(m, &batch).unwrap();
    let x = forward::embed(m, &batch).unwrap();
    // One layer, repeated.
    let t = Instant::now();
    let n = 5;
    let mut ys = Vec::new();
    for _ in 0..n {
        let xv = Var::from_tensor(&x).unwrap();
        let y = forward::layer_forward(m, 5, xv.as_tensor(), Some(&lw), &aux).unwrap();
        ys.push((xv, y));
    }
    let fwd = t.elapsed().as_secs_f64() / n as f64;
    let g = Tensor::randn(0f32, 1., x.shape(), &Device::Cpu).unwrap();
    let t = Instant::now();
    for (_, y) in &ys {
        let s = (y * &g).unwrap().sum_all().unwrap();
        let _ = s.backward().unwrap();
    }
    let bwd = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        let y = forward::layer_forward(m, 5, &x, None, &aux).unwrap();
        drop(y);
    }
    let fwd_plain = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    let xv = Var::from_tensor(&x).unwrap();
    let l = forward::head_loss(m, xv.as_tensor(), &batch, 1.0).unwrap();
    let head_f = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let _ = l.backward().unwrap();
    let head_b = t.elapsed().as_secs_f64();
    {
        let hq = &std::sync::Arc::new(
            candle_core::quantized::QTensor::quantize(
                &Tensor::randn(0f32, 1., (49152, 576), &Device::Cpu).unwrap(),
                candle_core::quantized::GgmlDType::Q8_0,
            )
            .unwrap(),
        );
        let xs = Tensor::randn(0f32, 1., (128, 576), &Device::Cpu).unwrap();
        let t = Instant::now();
        let wd = hone::train::qmatmul::dequantize_rows(hq, 0, 8192).unwrap();
        let d1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let p = xs.matmul(&wd.t().unwrap()).unwrap();
        let d2 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let q = p.matmul(&wd).unwrap();
        let d3 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d4 = t.elapsed().as_secs_f64();
        let xv = Var::from_tensor(&xs).unwrap();
        let idx = Tensor::arange(0u32, 128, &Device::Cpu).unwrap();
        let t = Instant::now();
        let sel = xv.as_tensor().index_select(&idx, 0).unwrap();
        let _ = sel.sum_all().unwrap().backward().unwrap();
        let d5 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let nrm = Tensor::ones(576, candle_core::DType::F32, &Device::Cpu).unwrap();
        let r = candle_nn::ops::rms_norm_slow(xv.as_tensor(), &nrm, 1e-5).unwrap();
        let _ = r.sum_all().unwrap().backward().unwrap();
        let d6 = t.elapsed().as_secs_f64();
        eprintln!(
            "index_select+bwd {:.1} ms, rms_norm_slow+bwd {:.1} ms",
            d5 * 1e3,
            d6 * 1e3
        );
        eprintln!(
            "tile: dequant {:.1} ms, x·Wt {:.1} ms, g·W {:.1} ms, to_vec {:.1} ms {:?}",
            d1 * 1e3,
            d2 * 1e3,
            d3 * 1e3,
            d4 * 1e3,
            q.dims()
        );
    }
    // Raw matmul speed on the gate shape.
    let h = Tensor::randn(0f32, 1., (128 * b, 576), &Device::Cpu).unwrap();
    let wt = Tensor::randn(0f32, 1., (1536, 576), &Device::Cpu).unwrap();
    let wq = &std::sync::Arc::new(
        candle_core::quantized::QTensor::quantize(&wt, candle_core::quantized::GgmlDType::Q4_1)
            .unwrap(),
    );
    let t = Instant::now();
    for _ in 0..n {
        let _ = hone::train::qmatmul::matmul_wt(&h, wq).unwrap();
    }
    let mm = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        let _ = hone::train::qmatmul::dequantize_rows(wq, 0, 1536).unwrap();
    }
    let dq = t.elapsed().as_secs_f64() / n as f64;
    let flops = 2.0 * (128 * b) as f64 * 576.0 * 1536.0;
    eprintln!(
        "b={b}: layer fwd {:.1} ms (no lora {:.1}), layer bwd {:.1} ms, head fwd {:.1} ms, head bwd {:.1} ms; gate matmul {:.2} ms = {:.1} GFLOP/s, dequant {:.2} ms",
        fwd * 1e3, fwd_plain * 1e3, bwd * 1e3, head_f * 1e3, head_b * 1e3, mm * 1e3, flops / mm / 1e9, dq * 1e3
    );
}
