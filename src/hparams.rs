//! The model's hyper-parameters as its GGUF file states them (architecture, sizes, heads,
//! rotary base, trained context), checked against every tensor the forward pass will read
//! before anything is allocated from them.
//!
//! It sits below both `model` (which runs the forward pass) and `lora` (which sizes adapters
//! from the same numbers), so neither has to reach into the other. It must not load weights
//! or compute anything; it only reads and checks metadata.

use crate::gguf::{GgufError, GgufFile};

/// Why a GGUF file's hyper-parameters cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HparamsError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

type Result<T> = std::result::Result<T, HparamsError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub arch_name: String,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub eps: f64,
    pub rope_base: f32,
    pub trained_ctx: usize,
    pub vocab: usize,
}

impl Config {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = file.require_supported()?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            _ => Arch::Qwen2,
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let dim = file.get_u64(&k("embedding_length"))? as usize;
        let n_heads = file.get_u64(&k("attention.head_count"))? as usize;
        let n_kv_heads = file
            .get_opt_u64(&k("attention.head_count_kv"))
            .unwrap_or(n_heads as u64) as usize;
        let bad = |message: String| HparamsError::Invalid {
            path: file.path().display().to_string(),
            message,
        };
        if n_heads == 0
            || n_kv_heads == 0
            || !dim.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(bad(format!(
                "inconsistent attention shape: {dim} dims, {n_heads} heads, {n_kv_heads} kv heads"
            )));
        }
        let head_dim = dim / n_heads;
        let (vocab_rows, _) = file.tensor_info("token_embd.weight")?;
        let cfg = Self {
            arch,
            arch_name: arch_name.clone(),
            dim,
            n_layers: file.get_u64(&k("block_count"))? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: file.get_u64(&k("feed_forward_length"))? as usize,
            eps: file.get_f32(&k("attention.layer_norm_rms_epsilon"))? as f64,
            rope_base: file.get_opt_f32(&k("rope.freq_base")).unwrap_or(10_000.0),
            trained_ctx: file.get_opt_u64(&k("context_length")).unwrap_or(2048) as usize,
            vocab: vocab_rows.first().copied().unwrap_or(0),
        };
        cfg.check_ranges().map_err(bad)?;
        cfg.check_tensors(file).map_err(bad)?;
        Ok(cfg)
    }

    /// Hyper-parameters inside what any model hone can run has, so that every size computed
    /// from them later fits in memory arithmetic.
    fn check_ranges(&self) -> std::result::Result<(), String> {
        let limits = [
            ("embedding_length", self.dim, 1 << 16),
            ("block_count", self.n_layers, 1 << 10),
            ("attention.head_count", self.n_heads, 1 << 10),
            ("feed_forward_length", self.ffn_dim, 1 << 18),
            ("context_length", self.trained_ctx, 1 << 24),
            (
                "vocabulary (rows of token_embd.weight)",
                self.vocab,
                1 << 22,
            ),
        ];
        for (what, v, max) in limits {
            if v == 0 || v > max {
                return Err(format!(
                    "{}.{what} is {v}, outside 1..={max}; the file's metadata is damaged (download the model again)",
                    self.arch_name
                ));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head dimension {} is odd; rotary embeddings need an even one (the metadata is damaged)",
                self.head_dim
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0 && self.eps < 1.0) {
            return Err(format!(
                "{}.attention.layer_norm_rms_epsilon is {}; it must be a small positive number (the metadata is damaged)",
                self.arch_name, self.eps
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return Err(format!(
                "{}.rope.freq_base is {}; it must be a finite number above 1 (the metadata is damaged)",
                self.arch_name, self.rope_base
            ));
        }
        Ok(())
    }

    /// Every tensor the forward pass reads, with the shape and kind of type the
    /// hyper-parameters say it must have (candle order: rows first). Optional tensors (the
    /// output head when tied to the embedding, qwen2's biases) are checked when present.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>, bool, bool)> {
        // (name, shape, is a matrix, required)
        let kv = self.n_kv_heads * self.head_dim;
        let mut v = vec![
            (
                "token_embd.weight".to_string(),
                vec![self.vocab, self.dim],
                true,
                true,
            ),
            (
                "output.weight".to_string(),
                vec![self.vocab, self.dim],
                true,
                false,
            ),
            (
                "output_norm.weight".to_string(),
                vec![self.dim],
                false,
                true,
            ),
        ];
        for i in 0..self.n_layers {
            let p = format!("blk.{i}");
            let mut add = |n: &str, shape: Vec<usize>, matrix: bool, required: bool| {
                v.push((format!("{p}.{n}"), shape, matrix, required))
            };
            add("attn_norm.weight", vec![self.dim], false, true);
            add("attn_q.weight", vec![self.dim, self.dim], true, true);
            add("attn_k.weight", vec![kv, self.dim], true, true);
            add("attn_v.weight", vec![kv, self.dim], true, true);
            add("attn_output.weight", vec![self.dim, self.dim], true, true);
            add("ffn_norm.weight", vec![self.dim], false, true);
            add("ffn_gate.weight", vec![self.ffn_dim, self.dim], true, true);
            add("ffn_up.weight", vec![self.ffn_dim, self.dim], true, true);
            add("ffn_down.weight", vec![self.dim, self.ffn_dim], true, true);
            if self.arch == Arch::Qwen2 {
                add("attn_q.bias", vec![self.dim], false, false);
                add("attn_k.bias", vec![kv], false, false);
                add("attn_v.bias", vec![kv], false, false);
            }
        }
        v
    }

    /// Checks every tensor's shape and type against the hyper-parameters, before anything is
    /// allocated from them: a damaged dimension, rank or type is named, not computed with.
    fn check_tensors(&self, file: &GgufFile) -> std::result::Result<(), String> {
        use candle_core::quantized::GgmlDType as G;
        for (name, want, matrix, required) in self.expected_tensors() {
            if !file.has_tensor(&name) {
                if required {
                    return Err(format!(
                        "has no tensor {name}; the file is incomplete or for another architecture"
                    ));
                }
                continue;
            }
            let (dims, dtype) = file.tensor_info(&name).map_err(|e| e.to_string())?;
            if dims != want {
                return Err(format!(
                    "tensor {name} has shape {dims:?}, but the model's hyper-parameters say {want:?}; the file is damaged (download it again)"
                ));
            }
            let ok = if matrix {
                !matches!(dtype, G::Q8_1 | G::Q8K)
            } else {
                matches!(dtype, G::F32 | G::F16 | G::BF16)
            };
            if !ok {
                return Err(format!(
                    "tensor {name} has type {dtype:?}, which a {} tensor never has; the file is damaged (download it again)",
                    if matrix { "weight matrix" } else { "norm or bias" }
                ));
            }
        }
        Ok(())
    }
}
