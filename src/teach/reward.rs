//! The reward of one self-edit: a small inner update from the base model on the note plus the
//! self-edit's items (a fresh LoRA on the top layers, a few steps), then how well the updated
//! model answers the note's held-out questions with no note in the prompt: accuracy of its
//! greedy answer and the log-likelihood of an accepted answer, each after the opening
//! "Your notes say:" that answers about notes start with.
//!
//! It must NOT keep any adapter: the inner LoRA lives in memory and is dropped.

use crate::codec::Codec;
use crate::engine::Engine;
use crate::eval::Question;
use crate::learn::{self, NOTES_PREFIX};
use crate::lora::{LoraConfig, Target};
use crate::sample::SamplingParams;
use crate::template::Message;
use crate::train::data::{self, Example};
use crate::train::optim::Decay;
use crate::train::{AdamWParamsCfg, Outcome, TrainConfig, Trainer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The inner update's size: small enough that a round over 40 notes with 4 samples each fits
/// in 45 minutes on 2 cores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inner {
    pub steps: usize,
    pub rank: usize,
    /// Adapt only the top this many layers.
    pub layers: usize,
    pub lr: f64,
    /// Weight of the answer log-likelihood gain (nats per token) beside the accuracy gain.
    pub loglik_weight: f64,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            steps: 24,
            rank: 8,
            layers: 12,
            lr: 2e-3,
            loglik_weight: 0.5,
        }
    }
}

/// How the updated model did on a note's questions.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Score {
    /// Share of questions answered correctly.
    pub accuracy: f64,
    /// Mean log-likelihood per token of the first accepted answer (nats, ≤ 0).
    pub loglik: f64,
}

impl Score {
    /// This score's reward against the passage-only `base`.
    pub fn reward(&self, base: &Score, inner: &Inner) -> f64 {
        (self.accuracy - base.accuracy)
            + inner.loglik_weight * (self.loglik - base.loglik).clamp(-2.0, 2.0)
    }
}

/// One item to learn: a user turn and its answer, or plain text.
pub type Item = (Option<String>, String);

/// Trains a fresh inner LoRA on `note` plus `items` from the base model of `engine` (whose own
/// adapter is put back afterwards) and scores the result on `questions` and on `probes` (the
/// note's rule-made probes, the only questions a user's own note has). `seed` fixes the
/// LoRA's start, the same for every sample of a note.
#[allow(clippy::too_many_arguments)]
pub fn score_update(
    engine: &mut Engine,
    system: Option<&str>,
    note: &str,
    items: &[Item],
    questions: &[Question],
    probes: &[Question],
    inner: &Inner,
    seed: u64,
    model_sha256: &str,
    cancel: &AtomicBool,
) -> Result<Option<(Score, Score)>> {
    let codec = engine.codec();
    let mut examples = vec![data::text_example(&codec, note, false).map_err(anyhow::Error::msg)?];
    for (p, c) in items {
        examples.push(example(&codec, system, p.as_deref(), c)?);
    }
    let weights = {
        let model = &engine.model;
        let mcfg = model.cfg.clone();
        let layers = inner.layers.clamp(1, mcfg.n_layers);
        let lora = LoraConfig::top_layers(
            inner.rank,
            2.0 * inner.rank as f32,
            Target::ALL.to_vec(),
            mcfg.n_layers,
            layers,
        )?;
        let longest = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(16);
        let seq_len = (longest.div_ceil(16) * 16).clamp(128, 512);
        let ds = data::pack_examples(&codec, "self-edit", &examples, String::new(), seq_len)?;
        let cfg = TrainConfig {
            lora,
            lr: inner.lr,
            min_lr_ratio: 0.1,
            warmup: 2,
            decay: Decay::Cosine,
            adamw: AdamWParamsCfg::default(),
            clip: 1.0,
            seq_len,
            micro_batch: 1,
            accum: 1,
            steps: inner.steps.max(1),
            seed,
            checkpointing: false,
            skip_learned: 0.0,
        };
        let mut tr = Trainer::new(model, cfg, ds, model_sha256)?;
        tr.cache_limit = 64 << 20;
        if tr.run(cancel, &mut |_, _| Ok(()))? == Outcome::Interrupted {
            return Ok(None);
        }
        tr.weights()?.prepare()?
    };
    let before = engine.model.adapter().cloned();
    engine.model.set_adapter(Some(Arc::new(weights)));
    engine.reset();
    let score = score_questions(engine, system, questions, cancel).and_then(|q| {
        let p = score_questions(engine, system, probes, cancel)?;
        Ok((q, p))
    });
    engine.model.set_adapter(before);
    engine.reset();
    score.map(Some)
}

fn example(codec: &Codec, system: Option<&str>, prompt: Option<&str>, c: &str) -> Result<Example> {
    match prompt {
        Some(p) => data::chat_pair(codec, system, p, c),
        None => data::text_example(codec, c, false),
    }
    .map_err(anyhow::Error::msg)
}

/// Spearman's rank correlation of two equally long series (None under three pairs or when one
/// is constant).
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let ranks = |v: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for k in &idx[i..=j] {
                r[*k] = avg;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

/// Scores the model as it is (adapter included) on `questions`, asked with no note (a perfect
/// score of nothing when there are none).
pub fn score_questions(
    engine: &mut Engine,
    system: Option<&str>,
    questions: &[Question],
    cancel: &AtomicBool,
) -> Result<Score> {
    let opening = engine.text_tokens(NOTES_PREFIX, false)?;
    let (mut correct, mut ll) = (0usize, 0.0f64);
    for q in questions {
        let mut msgs: Vec<Message> = system.map(Message::system).into_iter().collect();
        msgs.push(Message::user(&q.q));
        let mut prompt = engine.chat_tokens(&msgs)?;
        prompt.extend_from_slice(&opening);
        let g = engine.generate(&prompt, &SamplingParams::default(), 24, cancel, &mut |_| {})?;
        if q.a.iter().any(|a| learn::contains_answer(&g.text, a)) {
            correct += 1;
        }
        let first =
            q.a.first()
                .context("a question without an accepted answer")?;
        let answer = engine.text_tokens(&format!(" {}", first.trim()), false)?;
        let mut toks = prompt.clone();
        toks.extend_from_slice(&answer);
        let mut scored = vec![false; prompt.len()];
        scored.resize(toks.len(), true);
        ll -= engine.scored_nll(&toks, &scored)?;
    }
    if questions.is_empty() {
        return Ok(Score::default());
    }
    let n = questions.len() as f64;
    Ok(Score {
        accuracy: correct as f64 / n,
        loglik: ll / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_ranks_with_ties() {
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]).unwrap();
        assert!((r - 1.0).abs() < 1e-12);
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]).unwrap();
        assert!((r + 1.0).abs() < 1e-12);
        let r = spearman(&[1.0, 1.0, 2.0], &[5.0, 6.0, 7.0]).unwrap();
        assert!(r > 0.8 && r < 1.0, "{r}");
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_none());
        assert!(spearman(&[1.0, 2.0], &[1.0, 2.0]).is_none());
    }
}
