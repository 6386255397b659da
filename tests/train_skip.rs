//! Spending less on what is learned (`TrainConfig::skip_learned`), on a tiny random model that
//! the test writes as a real GGUF file: a sequence whose last training loss was under the
//! threshold is skipped (no forward, no backward, no update), at most twice in a row; the state
//! behind that decision survives a checkpoint; and a threshold of 0 trains everything.

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use hone::gguf::GgufFile;
use hone::lora::{LoraConfig, LoraWeights, Target};
use hone::model::Model;
use hone::tiny::{write_tiny_model, TinySpec};
use hone::train::data::Dataset;
use hone::train::forward::Batch;
use hone::train::optim::Decay;
use hone::train::{AdamWParamsCfg, TrainConfig, Trainer, MAX_SKIPS};
use std::sync::atomic::AtomicBool;

const SEQS: usize = 3;
const EPOCHS: usize = 5;

fn model(dir: &std::path::Path) -> Model {
    let path = dir.join("tiny.gguf");
    let spec = TinySpec {
        arch: "llama".into(),
        dim: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 96,
        dtype: GgmlDType::Q8_0,
        seed: 5,
    };
    write_tiny_model(&path, &spec).unwrap();
    Model::load(&GgufFile::open(&path).unwrap(), &Device::Cpu, 64).unwrap()
}

fn dataset(vocab: usize) -> Dataset {
    let s = 12;
    let seqs = (0..SEQS)
        .map(|k| Batch {
            b: 1,
            s,
            tokens: (0..s).map(|p| ((p * 7 + k * 13) % vocab) as u32).collect(),
            targets: (0..s)
                .map(|p| ((p * 5 + k * 3 + 1) % vocab) as u32)
                .collect(),
            weights: vec![1.0; s],
            positions: (0..s as u32).collect(),
            segments: vec![0; s],
            soft: Vec::new(),
        })
        .collect();
    Dataset {
        seqs,
        examples: SEQS,
        target_tokens: SEQS * s,
        sha256: "skip-test".into(),
        description: "fixed".into(),
    }
}

fn config(skip_learned: f32) -> TrainConfig {
    TrainConfig {
        lora: LoraConfig::top_layers(2, 4.0, Target::ALL.to_vec(), 2, 2).unwrap(),
        lr: 1e-2,
        min_lr_ratio: 0.1,
        warmup: 0,
        decay: Decay::Cosine,
        adamw: AdamWParamsCfg::default(),
        clip: 1.0,
        seq_len: 12,
        micro_batch: 1,
        accum: 1,
        steps: SEQS * EPOCHS,
        seed: 3,
        checkpointing: false,
        skip_learned,
    }
}

fn flat(w: &LoraWeights) -> Vec<f32> {
    w.pairs
        .values()
        .flat_map(|p| {
            let mut v = p.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.extend(p.b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            v
        })
        .collect()
}

/// Runs `tr` to step `until`; per step: (tokens trained, whether the weights changed).
fn run(tr: &mut Trainer, until: usize) -> Vec<(usize, bool)> {
    let never = AtomicBool::new(false);
    let mut before = flat(&tr.weights().unwrap());
    let mut out = Vec::new();
    tr.run_until(until, &never, &mut |r, t| {
        let now = flat(&t.weights().unwrap());
        out.push((r.tokens, now != before));
        before = now;
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn learned_sequences_are_skipped_at_most_twice_in_a_row_and_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    // Every loss counts as learned: each sequence is trained the first time it comes up, then
    // skipped twice, trained (measured) again, and so on.
    let mut tr = Trainer::new(&m, config(1e6), dataset(m.cfg.vocab), "sha").unwrap();
    let steps = run(&mut tr, SEQS * EPOCHS);
    assert_eq!(steps.len(), SEQS * EPOCHS);
    let per_seq_pattern = [true, false, false, true, false]; // epochs 0..5: trained?
    assert_eq!(MAX_SKIPS, 2);
    let want_skipped = SEQS * per_seq_pattern.iter().filter(|t| !**t).count();
    assert_eq!(tr.skipped as usize, want_skipped);
    for (e, trained) in per_seq_pattern.iter().enumerate() {
        for (k, &(tokens, changed)) in steps[e * SEQS..(e + 1) * SEQS].iter().enumerate() {
            if *trained {
                assert_eq!(tokens, 12, "epoch {e}, step {k} should train");
                assert!(changed, "epoch {e}, step {k} trained but changed nothing");
            } else {
                assert_eq!(tokens, 0, "epoch {e}, step {k} should be skipped");
                assert!(
                    !changed,
                    "a skipped step (epoch {e}, step {k}) moved the weights"
                );
            }
        }
    }
    // Every step has a loss, the skipped ones at their sequence's last measured loss.
    assert_eq!(tr.losses.len(), SEQS * EPOCHS);
    assert!(tr.losses.iter().all(|l| l.is_finite() && *l > 0.0));
}

#[test]
fn a_threshold_of_zero_trains_every_sequence_every_pass() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let mut tr = Trainer::new(&m, config(0.0), dataset(m.cfg.vocab), "sha").unwrap();
    let steps = run(&mut tr, SEQS * EPOCHS);
    assert_eq!(tr.skipped, 0);
    assert!(steps.iter().all(|&(t, changed)| t == 12 && changed));
}

#[test]
fn a_threshold_below_every_loss_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    // A random model's loss is near ln(vocab): far above 1e-3 nats.
    let mut tr = Trainer::new(&m, config(1e-3), dataset(m.cfg.vocab), "sha").unwrap();
    run(&mut tr, SEQS * EPOCHS);
    assert_eq!(tr.skipped, 0);
}

#[test]
fn what_was_skipped_survives_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let data = || dataset(m.cfg.vocab);
    let mut whole = Trainer::new(&m, config(1e6), data(), "sha").unwrap();
    let all = run(&mut whole, SEQS * EPOCHS);

    // Stop mid-epoch, between a sequence's first and second skip.
    let mut first = Trainer::new(&m, config(1e6), data(), "sha").unwrap();
    run(&mut first, SEQS + 1);
    let ck = dir.path().join("ck.safetensors");
    first.save_checkpoint(&ck).unwrap();
    let mut resumed = Trainer::resume(&m, config(1e6), data(), "sha", &ck).unwrap();
    let rest = run(&mut resumed, SEQS * EPOCHS);
    let tokens = |v: &[(usize, bool)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(tokens(&rest), tokens(&all[SEQS + 1..]));
    assert_eq!(resumed.skipped, whole.skipped);
    let (a, b) = (
        flat(&whole.weights().unwrap()),
        flat(&resumed.weights().unwrap()),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "resumed weights differ by {worst}");
}

#[test]
fn each_rows_loss_is_its_own_mean_loss_per_target_position() {
    use hone::train::forward::{self, Aux};
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let mut data = dataset(m.cfg.vocab);
    // Unequal weights and a soft target, so a mean over the wrong positions would show.
    data.seqs[0].weights[3] = 0.0;
    data.seqs[1].weights[4] = 2.5;
    data.seqs[1].soft = vec![(5, vec![(1, 0.7), (2, 0.3)])];
    data.seqs[2].weights = vec![0.0; 12];
    let hidden = |b: &Batch| {
        let aux = Aux::new(&m, b).unwrap();
        let mut x = forward::embed(&m, b).unwrap();
        for li in 0..m.cfg.n_layers {
            x = forward::layer_forward(&m, li, &x, None, &aux).unwrap();
        }
        x
    };
    let seqs: Vec<&Batch> = data.seqs.iter().collect();
    let batch = hone::train::data::stack(&seqs);
    let norm = 0.25;
    // The batch and a sequence alone may take different product paths; with bf16 products
    // (AMX, AVX512_BF16) they agree to bf16 precision, with f32 ones to the order of the sums.
    // A mean over the wrong positions is off by far more than either.
    let tol = match hone::kernels::train_kernels() {
        hone::kernels::TrainKernels::F32 => 1e-4,
        _ => 1e-3,
    };
    let (total, rows) = forward::head_loss_rows(&m, &hidden(&batch), &batch, norm).unwrap();
    assert_eq!(rows.len(), SEQS);
    assert_eq!(rows[2], None, "a row with no weight has no loss");
    let mut sum = 0f32;
    for (k, s) in data.seqs.iter().enumerate().take(2) {
        let alone = forward::head_loss(&m, &hidden(s), s, 1.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let w: f32 = s.weights.iter().sum();
        let row = rows[k].unwrap();
        assert!(
            (row - alone / w).abs() < tol * (1.0 + row.abs()),
            "row {k}: {row} against {}",
            alone / w
        );
        sum += alone * norm;
    }
    let total = total.to_scalar::<f32>().unwrap();
    assert!(
        (total - sum).abs() < tol * (1.0 + sum.abs()),
        "{total} against {sum}"
    );
}

#[test]
fn an_anchor_is_skipped_while_its_loss_holds_where_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let mut data = dataset(m.cfg.vocab);
    // Sequences 0 and 1 learn distributions at every weighted position (as the base model's
    // anchoring answers do): their loss has a floor far above the threshold. Sequence 2 learns
    // single tokens, and a random model is far from them.
    for s in data.seqs.iter_mut().take(2) {
        s.soft = (0..12)
            .map(|p| (p, vec![(s.targets[p], 0.6), ((s.targets[p] + 1) % 7, 0.4)]))
            .collect();
    }
    // With no learning rate nothing moves: every loss stays exactly where it started.
    let mut cfg = config(0.05);
    cfg.lr = 0.0;
    let mut tr = Trainer::new(&m, cfg, data, "sha").unwrap();
    let steps = run(&mut tr, SEQS * EPOCHS);
    // Each anchor: trained, skipped twice, trained, skipped (3 of 5 passes); the other never.
    assert_eq!(tr.skipped, 2 * 3);
    let trained_per_epoch: Vec<usize> = steps
        .chunks(SEQS)
        .map(|e| e.iter().filter(|s| s.0 > 0).count())
        .collect();
    assert_eq!(trained_per_epoch, [3, 1, 1, 3, 1]);
}
