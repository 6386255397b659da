//! The transformer forward pass for the GGUF architectures hone runs (`llama`, as in SmolLM2,
//! and `qwen2`), in one readable file in the manner of candle's examples: quantised weights
//! (`QMatMul`), RMSNorm, rotary embeddings, grouped-query attention over a preallocated KV cache
//! that is appended in place, and a SwiGLU MLP.
//!
//! It must not tokenize, sample or touch the database; it maps token ids to logits.

use crate::gguf::{GgufError, GgufFile};
use crate::hparams::HparamsError;
pub use crate::hparams::{Arch, Config};
use crate::kernels::{self, QMatrix, QType};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor, D};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Hparams(#[from] HparamsError),
    #[error("model compute: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("the context is full: {needed} tokens do not fit in {max} (start a new conversation, or raise --ctx up to the model's {trained})")]
    ContextFull {
        needed: usize,
        max: usize,
        trained: usize,
    },
}

type Result<T> = std::result::Result<T, ModelError>;

/// A quantised weight matrix used as `y = x W^T`. On the CPU it runs hone's own kernels
/// (`crate::kernels`): the weights are dequantised inside the dot products and the activations
/// stay f32, so the result is exact up to summation order. Elsewhere (Metal) it uses candle.
#[derive(Debug, Clone)]
pub(crate) struct QLinear {
    pub(crate) q: Arc<QTensor>,
    qtype: Option<QType>,
}

impl QLinear {
    fn new(q: Arc<QTensor>) -> Self {
        let qtype = QType::from_ggml(q.dtype());
        Self { q, qtype }
    }

    fn load(f: &GgufFile, name: &str, dev: &Device) -> Result<Self> {
        Ok(Self::new(Arc::new(f.qtensor(name, dev)?)))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.dim(D::Minus1)?;
        let m = x.elem_count() / k.max(1);
        if let (Device::Cpu, Some(qtype)) = (x.device(), self.qtype) {
            let op = KernelMatMul {
                q: self.q.clone(),
                qtype,
            };
            return Ok(x
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(&op)?);
        }
        if m == 1 && !matches!(x.device(), Device::Cpu) {
            return Ok(QMatMul::QTensor(self.q.clone()).forward(x)?);
        }
        let w = self.q.dequantize(x.device())?;
        Ok(x.broadcast_matmul(&w.t()?)?)
    }
}

/// Above this many rows, dequantising the weight tile by tile into an f32 GEMM
/// (`kernels::gemm_wt`) beats the fused kernels (measured with `hone bench`; `HONE_GEMM_M` overrides it for experiments).
fn gemm_threshold() -> usize {
    std::env::var("HONE_GEMM_M")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

/// `x W^T` on the CPU with `crate::kernels::matmul`.
struct KernelMatMul {
    q: Arc<QTensor>,
    qtype: QType,
}

impl CustomOp1 for KernelMatMul {
    fn name(&self) -> &'static str {
        "hone-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.q.shape().dims2()?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) || !layout.is_contiguous() {
            candle_core::bail!("hone-qmatmul: input {dims:?} does not fit weight ({n}, {k})");
        }
        let elems = layout.shape().elem_count();
        let x = &storage.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + elems];
        let m = elems / k;
        let data = self.q.data()?;
        let w = QMatrix {
            dtype: self.qtype,
            n,
            k,
            data: &data,
        };
        let mut out = vec![0f32; m * n];
        if kernels::forced_scalar() {
            kernels::matmul_scalar(&w, x, m, &mut out)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        } else if m <= gemm_threshold() {
            kernels::matmul(&w, x, m, &mut out)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        } else {
            kernels::gemm_wt(&w, x, m, &mut out)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// A projection: a quantised weight and, for qwen2's q/k/v, a bias.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) w: QLinear,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    fn load(f: &GgufFile, name: &str, dev: &Device, bias: bool) -> Result<Self> {
        let w = QLinear::load(f, &format!("{name}.weight"), dev)?;
        let b = if bias && f.has_tensor(&format!("{name}.bias")) {
            Some(f.tensor_f32(&format!("{name}.bias"), dev)?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Keys or values of one layer: a buffer allocated ahead and written in place.
#[derive(Debug, Default)]
struct KvBuffer {
    buf: Option<Tensor>,
    len: usize,
}

impl KvBuffer {
    /// Appends `x` (1, kv_heads, s, head_dim) and returns a view of everything so far.
    fn append(&mut self, x: &Tensor, max: usize) -> Result<Tensor> {
        let (b, h, s, d) = x.dims4()?;
        let needed = self.len + s;
        let cap = self
            .buf
            .as_ref()
            .map(|t| t.dim(2))
            .transpose()?
            .unwrap_or(0);
        if needed > cap {
            // Grow geometrically (rare), so appending stays amortised O(1) per token.
            let new_cap = needed.max(cap * 2).max(256).min(max.max(needed));
            let fresh = Tensor::zeros((b, h, new_cap, d), x.dtype(), x.device())?;
            if let (Some(old), true) = (&self.buf, self.len > 0) {
                fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buf = Some(fresh);
        }
        let buf = self
            .buf
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("kv buffer missing".into()))?;
        buf.slice_set(&x.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok(buf.narrow(2, 0, self.len)?)
    }
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: Tensor,
    pub(crate) gate: QLinear,
    pub(crate) up: QLinear,
    pub(crate) down: QLinear,
    k_cache: KvBuffer,
    v_cache: KvBuffer,
}

/// Which positions to return logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: generation.
    Last,
    /// Every position: scoring (perplexity) and training.
    All,
}

/// A loaded model with its KV cache.
pub struct Model {
    pub cfg: Config,
    pub(crate) embed: Arc<QTensor>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) output: QLinear,
    cos: Tensor,
    sin: Tensor,
    /// LoRA adapters applied next to the base projections (not merged), if any.
    lora: Option<Arc<crate::lora::LoraWeights>>,
    max_ctx: usize,
    /// Tokens held in the KV cache.
    cached: usize,
    device: Device,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("cfg", &self.cfg).finish()
    }
}

impl Model {
    /// Loads the weights of `file` onto `device`, with room for `ctx` tokens of context
    /// (capped at the context the model was trained for).
    pub fn load(file: &GgufFile, device: &Device, ctx: usize) -> Result<Self> {
        let cfg = Config::from_gguf(file)?;
        let dev = device;
        let embed = Arc::new(file.qtensor("token_embd.weight", dev)?);
        let output = if file.has_tensor("output.weight") {
            QLinear::new(Arc::new(file.qtensor("output.weight", dev)?))
        } else {
            QLinear::new(embed.clone())
        };
        let bias = cfg.arch == Arch::Qwen2;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: file.tensor_f32(&format!("{p}.attn_norm.weight"), dev)?,
                q: Linear::load(file, &format!("{p}.attn_q"), dev, bias)?,
                k: Linear::load(file, &format!("{p}.attn_k"), dev, bias)?,
                v: Linear::load(file, &format!("{p}.attn_v"), dev, bias)?,
                o: Linear::load(file, &format!("{p}.attn_output"), dev, false)?,
                ffn_norm: file.tensor_f32(&format!("{p}.ffn_norm.weight"), dev)?,
                gate: QLinear::load(file, &format!("{p}.ffn_gate.weight"), dev)?,
                up: QLinear::load(file, &format!("{p}.ffn_up.weight"), dev)?,
                down: QLinear::load(file, &format!("{p}.ffn_down.weight"), dev)?,
                k_cache: KvBuffer::default(),
                v_cache: KvBuffer::default(),
            });
        }
        let norm = file.tensor_f32("output_norm.weight", dev)?;
        let max_ctx = ctx.clamp(16, cfg.trained_ctx.max(16));
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_base.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let t = Tensor::arange(0u32, max_ctx as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_ctx, 1))?;
        let freqs = t.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed,
            layers,
            norm,
            output,
            max_ctx,
            cached: 0,
            device: dev.clone(),
            lora: None,
        })
    }

    /// The most tokens the KV cache holds.
    pub fn max_context(&self) -> usize {
        self.max_ctx
    }

    /// Tokens currently in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cached
    }

    /// Forgets cached positions from `len` on (keeping a common prefix of a conversation).
    pub fn truncate_cache(&mut self, len: usize) {
        self.cached = self.cached.min(len);
        for l in &mut self.layers {
            l.k_cache.len = self.cached;
            l.v_cache.len = self.cached;
        }
    }

    pub fn clear_cache(&mut self) {
        self.truncate_cache(0);
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A second model on the same weights (shared, not copied) with an empty KV cache and no
    /// adapter: a trainer can hold one while the other answers with the adapter being trained.
    pub fn fork(&self) -> Model {
        Model {
            cfg: self.cfg.clone(),
            embed: self.embed.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    attn_norm: l.attn_norm.clone(),
                    q: l.q.clone(),
                    k: l.k.clone(),
                    v: l.v.clone(),
                    o: l.o.clone(),
                    ffn_norm: l.ffn_norm.clone(),
                    gate: l.gate.clone(),
                    up: l.up.clone(),
                    down: l.down.clone(),
                    k_cache: KvBuffer::default(),
                    v_cache: KvBuffer::default(),
                })
                .collect(),
            norm: self.norm.clone(),
            output: self.output.clone(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            lora: None,
            max_ctx: self.max_ctx,
            cached: 0,
            device: self.device.clone(),
        }
    }

    /// Sets (or removes) the LoRA adapters used by `forward`; forgets the KV cache.
    pub fn set_adapter(&mut self, lora: Option<Arc<crate::lora::LoraWeights>>) {
        self.lora = lora;
        self.clear_cache();
    }

    pub fn adapter(&self) -> Option<&Arc<crate::lora::LoraWeights>> {
        self.lora.as_ref()
    }

    /// Runs `tokens` at positions `cached_len()..` and returns logits, shape (vocab) for
    /// `Logits::Last` or (tokens, vocab) for `Logits::All`.
    pub fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Tensor> {
        let s = tokens.len();
        let pos = self.cached;
        if s == 0 {
            return Err(candle_core::Error::Msg("forward on no tokens".into()).into());
        }
        if pos + s > self.max_ctx {
            return Err(ModelError::ContextFull {
                needed: pos + s,
                max: self.max_ctx,
                trained: self.cfg.trained_ctx,
            });
        }
        let cfg = &self.cfg;
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.embedding(&ids)?;
        let mask = if s > 1 {
            let l = pos + s;
            let m: Vec<f32> = (0..s)
                .flat_map(|i| {
                    (0..l).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (s, l), &self.device)?)
        } else {
            None
        };
        let cos = self.cos.narrow(0, pos, s)?;
        let sin = self.sin.narrow(0, pos, s)?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let n_rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        use crate::lora::Target as T;
        let lora = self.lora.clone();
        let ad = |i: usize, t: T, x: &Tensor, y: Tensor| -> Result<Tensor> {
            match &lora {
                Some(l) => l.apply(i, t, x, y).map_err(|e| match e {
                    crate::lora::LoraError::Candle(c) => ModelError::Candle(c),
                    e => ModelError::Candle(candle_core::Error::Msg(e.to_string())),
                }),
                None => Ok(y),
            }
        };
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps as f32)?;
            let q = ad(li, T::Q, &h, layer.q.forward(&h)?)?;
            let k = ad(li, T::K, &h, layer.k.forward(&h)?)?;
            let v = ad(li, T::V, &h, layer.v.forward(&h)?)?;
            let q = q.reshape((1, s, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((1, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((1, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let (q, k) = match cfg.arch {
                Arch::Llama => (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                ),
                Arch::Qwen2 => (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                ),
            };
            let k = layer.k_cache.append(&k, self.max_ctx)?;
            let v = layer.v_cache.append(&v, self.max_ctx)?;
            let l = pos + s;
            // Heads that share a kv head are stacked as rows: no copy of K or V per head.
            let q = q.reshape((1, nkv, n_rep * s, hd))?;
            let att = (q.matmul(&k.contiguous()?.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att
                    .reshape((1, nkv, n_rep, s, l))?
                    .broadcast_add(m)?
                    .reshape((1, nkv, n_rep * s, l))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v.contiguous()?)?;
            let y = y
                .reshape((1, nh, s, hd))?
                .transpose(1, 2)?
                .reshape((1, s, nh * hd))?;
            x = (x + ad(li, T::O, &y, layer.o.forward(&y)?)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.eps as f32)?;
            let g = candle_nn::ops::silu(&ad(li, T::Gate, &h, layer.gate.forward(&h)?)?)?;
            let u = ad(li, T::Up, &h, layer.up.forward(&h)?)?;
            let gu = (g * u)?;
            x = (x + ad(li, T::Down, &gu, layer.down.forward(&gu)?)?)?;
        }
        self.cached = pos + s;
        let x = match logits {
            Logits::Last => x.narrow(1, s - 1, 1)?,
            Logits::All => x,
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.eps as f32)?;
        let out = self.output.forward(&x)?.squeeze(0)?;
        Ok(match logits {
            Logits::Last => out.squeeze(0)?,
            Logits::All => out,
        }
        .to_dtype(DType::F32)?
        .contiguous()?)
    }

    /// Log-softmax over the last dimension (for scoring).
    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{write_tiny_model, TinySpec};

    fn load(spec: &TinySpec) -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_model(&path, spec).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let m = Model::load(&f, &Device::Cpu, 256).unwrap();
        (dir, m)
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter()
            .zip(b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// Decoding one token at a time through the KV cache gives the same logits as running the
    /// whole sequence at once, and a prompt split into chunks the same as one pass.
    fn cache_matches_full_pass(arch: &str) {
        let spec = TinySpec {
            arch: arch.into(),
            ..Default::default()
        };
        let (_d, mut m) = load(&spec);
        let toks: Vec<u32> = vec![1, 40, 77, 100, 5, 9, 250, 33, 12, 80];
        let full = m.forward(&toks, Logits::All).unwrap();
        let full: Vec<Vec<f32>> = full.to_vec2().unwrap();
        m.clear_cache();
        for (i, t) in toks.iter().enumerate() {
            let step: Vec<f32> = m.forward(&[*t], Logits::Last).unwrap().to_vec1().unwrap();
            let d = max_rel_diff(&step, &full[i]);
            assert!(d < 1e-3, "{arch}: position {i} differs by {d}");
        }
        m.clear_cache();
        m.forward(&toks[..4], Logits::Last).unwrap();
        let rest: Vec<Vec<f32>> = m
            .forward(&toks[4..], Logits::All)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, row) in rest.iter().enumerate() {
            let d = max_rel_diff(row, &full[4 + i]);
            assert!(
                d < 1e-4,
                "{arch}: chunked position {} differs by {d}",
                4 + i
            );
        }
        // Truncating the cache and re-running gives the same answer again.
        m.truncate_cache(3);
        let again: Vec<Vec<f32>> = m
            .forward(&toks[3..], Logits::All)
            .unwrap()
            .to_vec2()
            .unwrap();
        let d = max_rel_diff(&again[again.len() - 1], &full[toks.len() - 1]);
        assert!(d < 1e-4, "{arch}: after truncation differs by {d}");
    }

    #[test]
    fn llama_cache_matches_full_pass() {
        cache_matches_full_pass("llama");
    }

    #[test]
    fn qwen2_cache_matches_full_pass() {
        cache_matches_full_pass("qwen2");
    }

    #[test]
    fn context_overflow_is_an_error() {
        let (_d, mut m) = load(&TinySpec::default());
        let toks = vec![5u32; m.max_context() + 1];
        assert!(matches!(
            m.forward(&toks, Logits::Last),
            Err(ModelError::ContextFull { .. })
        ));
    }

    #[test]
    fn unsupported_architecture_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.gguf");
        let spec = TinySpec {
            arch: "gemma3".into(),
            ..Default::default()
        };
        write_tiny_model(&path, &spec).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let e = Model::load(&f, &Device::Cpu, 64).unwrap_err().to_string();
        assert!(e.contains("gemma3") && e.contains("llama"), "{e}");
    }
}
