//! Sharing the opening that packed examples have in common (`train::data::pack`) changes where
//! the tokens sit, not what is learned: on a tiny random model with a random adapter, the loss
//! and every LoRA parameter's gradient over the whole data are those of the unshared packing,
//! on fewer positions.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use hone::gguf::GgufFile;
use hone::lora::{LoraConfig, Target};
use hone::model::Model;
use hone::tiny::{write_tiny_model, TinySpec};
use hone::train::data::{self, Dataset, Example, SHARED_SEGMENT};
use hone::train::optim::Decay;
use hone::train::{AdamWParamsCfg, TrainConfig, Trainer};

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

/// Chat-like examples: a common opening of 7 tokens, then a question (not learned) and an
/// answer (learned, one position with a soft target), plus one plain text (all learned) that
/// shares nothing.
fn examples(vocab: usize) -> Vec<Example> {
    let mut st = 5u64;
    let mut tok = || (lcg(&mut st) % vocab as u64) as u32;
    let opening: Vec<u32> = (0..7).map(|_| tok()).collect();
    let mut out = Vec::new();
    for k in 0..5 {
        let q = 3 + k % 3;
        let a = 4 + k % 4;
        let mut tokens = opening.clone();
        tokens.extend((0..q + a).map(|_| tok()));
        let learn: Vec<bool> = (0..tokens.len()).map(|i| i >= 7 + q).collect();
        let soft_at = 7 + q + 1;
        let alt = (tokens[soft_at] + 1) % vocab as u32;
        out.push(Example {
            soft: vec![(soft_at, vec![(tokens[soft_at], 0.7), (alt, 0.3)])],
            weights: (0..tokens.len()).map(|i| 1.0 + (i % 3) as f32).collect(),
            tokens,
            learn,
        });
    }
    let text: Vec<u32> = (0..9).map(|_| tok()).collect();
    out.insert(
        2,
        Example {
            learn: vec![true; text.len()],
            tokens: text,
            soft: Vec::new(),
            weights: Vec::new(),
        },
    );
    out
}

fn loss_and_grads(model: &Model, seqs: Vec<hone::train::forward::Batch>) -> (f32, Vec<Vec<f32>>) {
    let n = seqs.len();
    let data = Dataset {
        seqs,
        examples: n,
        target_tokens: 0,
        sha256: "test".into(),
        description: "shared".into(),
    };
    let cfg = TrainConfig {
        lora: LoraConfig::top_layers(2, 4.0, Target::ALL.to_vec(), 2, 2).unwrap(),
        lr: 1e-3,
        min_lr_ratio: 0.1,
        warmup: 0,
        decay: Decay::Cosine,
        adamw: AdamWParamsCfg::default(),
        clip: 0.0,
        seq_len: 24,
        micro_batch: n,
        accum: 1,
        steps: 1,
        seed: 11,
        checkpointing: false,
        skip_learned: 0.0,
    };
    let mut tr = Trainer::new(model, cfg, data, "sha").unwrap();
    let mut st = 7u64;
    for (i, v) in tr.params().into_iter().enumerate() {
        if i % 2 == 1 {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| (lcg(&mut st) % 2000) as f32 / 2000.0 - 0.5)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let ids: Vec<usize> = (0..n).collect();
    tr.gradients(&ids, 1.0).unwrap()
}

#[test]
fn a_shared_prefix_gives_the_same_loss_and_gradients_on_fewer_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        arch: "llama".into(),
        dim: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 96,
        dtype: GgmlDType::Q8_0,
        seed: 3,
    };
    write_tiny_model(&path, &spec).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let model = Model::load(&f, &Device::Cpu, 64).unwrap();
    let ex = examples(model.cfg.vocab);
    let plain = data::pack_sharing(&ex, 24, 0, false);
    let shared = data::pack_sharing(&ex, 24, 0, true);
    assert!(
        shared.len() < plain.len(),
        "{} sequences shared vs {} plain",
        shared.len(),
        plain.len()
    );
    // Each sequence with shared examples opens with the prefix, which nothing learns.
    for q in &shared {
        if q.segments.contains(&SHARED_SEGMENT) {
            assert!(q.segments[..7].iter().all(|&s| s == SHARED_SEGMENT));
            assert!(q.weights[..7].iter().all(|&w| w == 0.0));
        }
    }
    let targets = |qs: &[hone::train::forward::Batch]| -> usize {
        qs.iter()
            .map(|q| q.weights.iter().filter(|w| **w > 0.0).count() + q.soft.len())
            .sum()
    };
    assert_eq!(targets(&plain), targets(&shared));
    let (l0, g0) = loss_and_grads(&model, plain);
    let (l1, g1) = loss_and_grads(&model, shared);
    assert!(
        (l0 - l1).abs() <= 1e-4 * l0.abs().max(1.0),
        "loss {l0} vs {l1}"
    );
    // Each parameter's gradient agrees to a small share of its largest entry: 1e-4 with f32
    // products, 2e-3 with bf16 ones (the two packings round the same sums in another order).
    let tol = match hone::kernels::train_kernels() {
        hone::kernels::TrainKernels::F32 => 1e-4,
        _ => 2e-3,
    };
    for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
        let largest = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= tol * largest.max(1e-3),
            "parameter {i}: gradients differ by {diff:.3e} (largest entry {largest:.3e})"
        );
    }
}
