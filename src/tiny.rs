//! Writes tiny random models as real GGUF files, for tests that need a model but not its
//! knowledge: a byte-level BPE vocabulary (the 256 bytes, a few merges, ChatML special tokens),
//! a chat template, and random weights in a chosen quantisation.
//!
//! It must not be used for anything a user sees; behaviour that matters (answering, learning)
//! is tested on the real default model.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// "llama" or "qwen2" (or anything else, to test refusals).
    pub arch: String,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub dtype: GgmlDType,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            arch: "llama".into(),
            dim: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            dtype: GgmlDType::Q8_0,
            seed: 1,
        }
    }
}

/// GPT-2's byte-to-character table used by byte-level BPE vocabularies.
pub fn byte_chars() -> Vec<char> {
    let mut keep: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = keep.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            keep.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in keep.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

impl TinySpec {
    /// The smallest model the checks accept: one layer, width 32 (one quantisation block), two
    /// heads of 16 sharing one key/value head, a feed-forward of 32; about 20 KB as a file
    /// against the default's 100 KB. The fuzz target `gguf` starts from it, so each input is
    /// parsed, checked and loaded in a fraction of the time.
    pub fn smallest() -> Self {
        Self {
            dim: 32,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            ffn: 32,
            ..Self::default()
        }
    }

    /// Why this shape cannot be written, in words a person can act on; None when it can.
    pub fn problem(&self) -> Option<String> {
        if self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            return Some("layers, heads and kv_heads must be at least 1".into());
        }
        if self.dim == 0
            || !self.dim.is_multiple_of(32)
            || self.ffn == 0
            || !self.ffn.is_multiple_of(32)
        {
            return Some(format!(
                "dim ({}) and ffn ({}) must be positive multiples of 32 (a quantisation block)",
                self.dim, self.ffn
            ));
        }
        if !self.dim.is_multiple_of(self.heads) || !(self.dim / self.heads).is_multiple_of(2) {
            return Some(format!(
                "dim ({}) must split into {} heads of an even width",
                self.dim, self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Some(format!(
                "heads ({}) must be a multiple of kv_heads ({})",
                self.heads, self.kv_heads
            ));
        }
        None
    }
}

/// The quantisation `hone dev write-tiny-model --dtype` names.
pub fn dtype(name: &str) -> anyhow::Result<GgmlDType> {
    Ok(match name {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        other => anyhow::bail!(
            "unknown --dtype {other:?} (use f32, f16, q4_0, q4_1, q5_0, q5_1 or q8_0)"
        ),
    })
}

/// Writes a tiny random model to a new file `path` (`hone dev write-tiny-model`): an existing
/// file is refused unless `force`, and so is a folder that does not exist. Returns the file's
/// size in bytes.
pub fn write_new(path: &Path, spec: &TinySpec, force: bool) -> anyhow::Result<u64> {
    use anyhow::{bail, Context as _};
    if let Some(why) = spec.problem() {
        bail!("cannot write a tiny model of this shape: {why}");
    }
    if path.exists() && !force {
        bail!(
            "{} already exists; choose another path or add --force to replace it",
            path.display()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "the folder {} does not exist; create it first (mkdir -p {})",
                parent.display(),
                parent.display()
            );
        }
    }
    write_tiny_model(path, spec)
        .with_context(|| format!("writing the tiny model to {}", path.display()))?;
    Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

/// Writes a tiny random model to `path`.
pub fn write_tiny_model(path: &Path, spec: &TinySpec) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let bc = byte_chars();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types: Vec<i32> = vec![3, 3, 3];
    for c in &bc {
        tokens.push(c.to_string());
        types.push(1);
    }
    let g = bc[b' ' as usize];
    let merges = [
        (format!("{g}"), "t".to_string()),
        ("h".into(), "e".into()),
        (format!("{g}t"), "he".to_string()),
        ("i".into(), "n".into()),
    ];
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    let vocab = tokens.len();
    let merges: Vec<Value> = merges
        .iter()
        .map(|(a, b)| Value::String(format!("{a} {b}")))
        .collect();
    let a = &spec.arch;
    let s = |v: &str| Value::String(v.to_string());
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(a)),
        ("general.name".into(), s("tiny-random")),
        (format!("{a}.embedding_length"), Value::U32(spec.dim as u32)),
        (format!("{a}.block_count"), Value::U32(spec.layers as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(spec.ffn as u32)),
        (format!("{a}.attention.head_count"), Value::U32(spec.heads as u32)),
        (format!("{a}.attention.head_count_kv"), Value::U32(spec.kv_heads as u32)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
        (format!("{a}.context_length"), Value::U32(512)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            s("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
        ),
    ];
    // Deterministic weights: candle's CPU RNG is not seedable, so use a small LCG.
    let mut state = spec.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    };
    let hd = spec.dim / spec.heads;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut q = |name: String, rows: usize, cols: usize, dtype: GgmlDType, scale: f32| {
        let t = Tensor::from_vec(rand(rows * cols, scale), (rows, cols), &dev)?;
        tensors.push((name, QTensor::quantize(&t, dtype)?));
        candle_core::Result::Ok(())
    };
    q(
        "token_embd.weight".into(),
        vocab,
        spec.dim,
        GgmlDType::Q8_0,
        1.0,
    )?;
    let w = 1.0 / (spec.dim as f32).sqrt();
    for l in 0..spec.layers {
        let p = format!("blk.{l}");
        q(
            format!("{p}.attn_q.weight"),
            spec.dim,
            spec.dim,
            spec.dtype,
            w,
        )?;
        q(
            format!("{p}.attn_k.weight"),
            spec.kv_heads * hd,
            spec.dim,
            spec.dtype,
            w,
        )?;
        q(
            format!("{p}.attn_v.weight"),
            spec.kv_heads * hd,
            spec.dim,
            spec.dtype,
            w,
        )?;
        q(
            format!("{p}.attn_output.weight"),
            spec.dim,
            spec.dim,
            spec.dtype,
            w,
        )?;
        q(
            format!("{p}.ffn_gate.weight"),
            spec.ffn,
            spec.dim,
            spec.dtype,
            w,
        )?;
        q(
            format!("{p}.ffn_up.weight"),
            spec.ffn,
            spec.dim,
            spec.dtype,
            w,
        )?;
        q(
            format!("{p}.ffn_down.weight"),
            spec.dim,
            spec.ffn,
            spec.dtype,
            1.0 / (spec.ffn as f32).sqrt(),
        )?;
    }
    let mut f32s: Vec<(String, QTensor)> = Vec::new();
    let mut vecs = |name: String, n: usize, base: f32, scale: f32| {
        let v: Vec<f32> = rand(n, scale).into_iter().map(|x| base + x).collect();
        let t = Tensor::from_vec(v, n, &dev)?;
        f32s.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        candle_core::Result::Ok(())
    };
    for l in 0..spec.layers {
        let p = format!("blk.{l}");
        vecs(format!("{p}.attn_norm.weight"), spec.dim, 1.0, 0.1)?;
        vecs(format!("{p}.ffn_norm.weight"), spec.dim, 1.0, 0.1)?;
        if spec.arch == "qwen2" {
            vecs(format!("{p}.attn_q.bias"), spec.dim, 0.0, 0.1)?;
            vecs(format!("{p}.attn_k.bias"), spec.kv_heads * hd, 0.0, 0.1)?;
            vecs(format!("{p}.attn_v.bias"), spec.kv_heads * hd, 0.0, 0.1)?;
        }
    }
    vecs("output_norm.weight".into(), spec.dim, 1.0, 0.1)?;
    tensors.extend(f32s);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_model_is_small_and_loads_like_the_default() {
        let dir = tempfile::tempdir().unwrap();
        for arch in ["llama", "qwen2"] {
            let p = dir.path().join(format!("{arch}.gguf"));
            let spec = TinySpec {
                arch: arch.into(),
                ..TinySpec::smallest()
            };
            let bytes = write_new(&p, &spec, false).unwrap();
            assert!(bytes < 30_000, "{arch}: {bytes} bytes");
            let file = crate::gguf::GgufFile::open(&p).unwrap();
            let cfg = crate::hparams::Config::from_gguf(&file).unwrap();
            assert_eq!((cfg.dim, cfg.n_layers, cfg.ffn_dim), (32, 1, 32));
            crate::tokenizer::Tokenizer::from_gguf(&file).unwrap();
            crate::model::Model::load(&file, &Device::Cpu, 64).unwrap();
        }
    }

    #[test]
    fn a_shape_that_cannot_be_quantised_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        let spec = TinySpec {
            dim: 48,
            ..TinySpec::smallest()
        };
        let e = write_new(&p, &spec, false).unwrap_err().to_string();
        assert!(e.contains("multiples of 32"), "{e}");
        assert!(!p.exists());
        let spec = TinySpec {
            heads: 3,
            ..TinySpec::default()
        };
        assert!(spec.problem().is_some());
        assert!(TinySpec::default().problem().is_none());
    }
}
