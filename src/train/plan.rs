//! The memory planner: estimates the peak resident memory of a training run from the model's
//! shapes and the run's settings, and picks sequence length, micro-batch, activation
//! checkpointing and the number of adapted top layers so that the estimate stays under a budget,
//! or says what would fit.
//!
//! It must not allocate or run anything; it is arithmetic over shapes, with constants calibrated
//! against peaks measured with `sys::peak_rss_bytes` (see `tests/train_memory.rs`).

use crate::hparams::Config;
use crate::lora::Target;

/// What the caller fixed (None: the planner chooses).
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub budget: Option<u64>,
    pub seq_len: Option<usize>,
    pub micro_batch: Option<usize>,
    pub layers: Option<usize>,
    pub checkpointing: Option<bool>,
    pub rank: usize,
    pub targets: Vec<Target>,
    /// Size of the model file (its weights stay quantised in memory).
    pub model_bytes: u64,
    /// Packed sequences whose frozen-layer outputs may be cached (0: decided later).
    pub cache_seqs: usize,
    /// No micro-batch larger than this is considered (e.g. the number of sequences there are).
    pub max_micro_batch: Option<usize>,
}

/// A chosen configuration and its estimated peak.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub seq_len: usize,
    pub micro_batch: usize,
    pub layers: usize,
    pub checkpointing: bool,
    pub estimate: u64,
}

/// Fixed cost of the process besides the weights: tokenizer, template, runtime, allocator.
pub const OVERHEAD: u64 = 60 << 20;

/// Budget assumed when none is given: the fastest plan under it is used.
pub const DEFAULT_BUDGET: u64 = 1 << 30;

/// Floats kept per token by one layer for its backward (`train::backward::Saved`): the input
/// and the residual midpoint (2·dim), q and the attention output (2·heads·hd), k and v, the
/// attention probabilities (heads·s), gate and up (2·ffn).
fn layer_floats_per_token(c: &Config, s: usize) -> u64 {
    let d = c.dim as u64;
    let q = (c.n_heads * c.head_dim) as u64;
    let kv = (c.n_kv_heads * c.head_dim) as u64;
    let f = c.ffn_dim as u64;
    // Scaled by 19/20, still above the measured peaks: SmolLM2, 30 layers, 4x128 tokens,
    // 632 MiB measured without checkpointing, 259 MiB with.
    (2 * d + 2 * q + 2 * kv + c.n_heads as u64 * s as u64 + 2 * f) * 19 / 20
}

/// Estimated peak resident bytes of a run.
pub fn estimate(
    c: &Config,
    r: &PlanRequest,
    seq_len: usize,
    mb: usize,
    layers: usize,
    ckpt: bool,
) -> u64 {
    let n = (seq_len * mb) as u64;
    let params: u64 = r
        .targets
        .iter()
        .map(|t| {
            let (i, o) = t.dims(c);
            (r.rank * (i + o)) as u64
        })
        .sum::<u64>()
        * layers as u64;
    // Parameters, gradient accumulators, AdamW moments and the copies made around a step.
    let adapter = params * 4 * 6;
    // One dequantised weight (or tile) and its product.
    let biggest = (c.ffn_dim * c.dim * 4) as u64;
    let dequant = 2 * biggest.min(super::qmatmul::TILE_BYTES as u64);
    let layer_graph = n * layer_floats_per_token(c, seq_len) * 4;
    let inputs = layers as u64 * n * c.dim as u64 * 4;
    let acts = if ckpt {
        // Stored layer inputs, one layer's graph and its gradients.
        inputs + 2 * layer_graph
    } else {
        layers as u64 * layer_graph + layer_graph + inputs
    };
    // The head works in vocabulary tiles: a dequantised tile and two logits tiles.
    let head_rows = (super::qmatmul::TILE_BYTES / (c.dim * 4))
        .min(c.vocab)
        .min(8192) as u64;
    let head = 2 * n * head_rows * 4 + super::qmatmul::TILE_BYTES as u64;
    r.model_bytes + OVERHEAD + adapter + dequant + acts + head
}

/// Whole MiB (rounded down), for messages.
fn mib(b: u64) -> u64 {
    crate::units::mib(b) as u64
}

/// Picks the fastest configuration under the budget (1 GiB when none is given): the most
/// adapted layers asked for, then the biggest micro-batch (measured: 4x128 tokens with
/// checkpointing trains faster than 1x128 without), then no checkpointing, then longer
/// sequences; or explains what would fit.
pub fn choose(c: &Config, r: &PlanRequest) -> Result<Plan, PlanError> {
    let layer_opts: Vec<usize> = match r.layers {
        Some(k) => vec![k.clamp(1, c.n_layers)],
        None => (1..=c.n_layers).rev().collect(),
    };
    let ckpt_opts: Vec<bool> = match r.checkpointing {
        Some(v) => vec![v],
        None => vec![false, true],
    };
    let mb_opts: Vec<usize> = match r.micro_batch {
        Some(b) => vec![b.max(1)],
        None => {
            let cap = r.max_micro_batch.unwrap_or(4).max(1);
            [4, 2, 1].into_iter().filter(|b| *b <= cap).collect()
        }
    };
    let seq_opts: Vec<usize> = match r.seq_len {
        Some(s) => vec![s.max(8)],
        None => vec![512, 256, 128],
    };
    let budget = r.budget.unwrap_or(DEFAULT_BUDGET);
    let mut smallest: Option<Plan> = None;
    for &k in &layer_opts {
        for &mb in &mb_opts {
            for &ck in &ckpt_opts {
                for &s in &seq_opts {
                    let e = estimate(c, r, s, mb, k, ck);
                    let p = Plan {
                        seq_len: s,
                        micro_batch: mb,
                        layers: k,
                        checkpointing: ck,
                        estimate: e,
                    };
                    if e <= budget {
                        return Ok(p);
                    }
                    if smallest.as_ref().is_none_or(|q| e < q.estimate) {
                        smallest = Some(p);
                    }
                }
            }
        }
    }
    let s = smallest.ok_or(PlanError::NothingToConsider)?;
    Err(PlanError::DoesNotFit {
        budget,
        smallest: s,
        model_floor: r.model_bytes + OVERHEAD,
    })
}

/// Why no training configuration was chosen.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no configuration to consider")]
    NothingToConsider,
    #[error(
        "training does not fit in {} MiB: the smallest configuration allowed by your settings \
         ({} layers with adapters, micro-batch {}, {} tokens per sequence, {}checkpointing) needs \
         about {} MiB (the model alone takes {} MiB); raise --max-memory to at least {} MiB, or \
         allow fewer --layers, a shorter --seq-len or a smaller --batch",
        mib(*budget),
        smallest.layers,
        smallest.micro_batch,
        smallest.seq_len,
        if smallest.checkpointing { "" } else { "no " },
        mib(smallest.estimate),
        mib(*model_floor),
        mib(smallest.estimate) + 1
    )]
    DoesNotFit {
        budget: u64,
        smallest: Plan,
        model_floor: u64,
    },
}

/// Bytes the trainer may spend caching frozen-layer outputs: what the data needs, within the
/// room the budget leaves.
pub fn cache_bytes(c: &Config, p: &Plan, n_seqs: usize, budget: Option<u64>) -> u64 {
    if p.layers >= c.n_layers {
        return 0;
    }
    let need = (n_seqs * p.seq_len * c.dim * 4) as u64;
    let room = budget
        .map(|b| b.saturating_sub(p.estimate))
        .unwrap_or(512 << 20);
    need.min(room.saturating_mul(3) / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> Config {
        Config {
            arch: crate::hparams::Arch::Llama,
            arch_name: "llama".into(),
            dim: 576,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_dim: 1536,
            eps: 1e-5,
            rope_base: 1e5,
            trained_ctx: 8192,
            vocab: 49152,
        }
    }

    fn req(budget: Option<u64>) -> PlanRequest {
        PlanRequest {
            budget,
            seq_len: None,
            micro_batch: None,
            layers: None,
            checkpointing: None,
            rank: 8,
            targets: Target::ALL.to_vec(),
            model_bytes: 98_362_432,
            cache_seqs: 0,
            max_micro_batch: None,
        }
    }

    #[test]
    fn plans_fit_the_budget_or_explain() {
        let c = smol();
        let p = choose(&c, &req(Some(600 << 20))).unwrap();
        assert!(p.estimate <= 600 << 20, "{p:?}");
        let e = choose(&c, &req(Some(100 << 20))).unwrap_err();
        assert!(e.to_string().contains("raise --max-memory"), "{e}");
        let big = choose(&c, &req(Some(8 << 30))).unwrap();
        assert_eq!(big.layers, 30);
        assert_eq!(big.micro_batch, 4);
        assert!(!big.checkpointing);
        // The bench's shape under 600 MiB: all layers, 4x128, with checkpointing.
        let mut r = req(Some(600 << 20));
        r.seq_len = Some(128);
        r.layers = Some(30);
        let p = choose(&c, &r).unwrap();
        assert_eq!((p.micro_batch, p.checkpointing), (4, true), "{p:?}");
    }
}
