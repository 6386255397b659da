//! The transformer forward pass for the GGUF architectures hone runs (`llama`, as in SmolLM2,
//! and `qwen2`), in one readable file in the manner of candle's examples: quantised weights
//! (`QMatMul`), RMSNorm, rotary embeddings, grouped-query attention over a KV cache that is
//! appended in place, and a SwiGLU MLP. The model keeps one cache of its own for `forward`; a
//! caller that runs several sequences keeps a [`KvCache`] per sequence, and `forward_batch`
//! decodes one token of each at once: the projections see the sequences' rows stacked (one
//! pass over the weights for all), attention and rotary embeddings stay per sequence.
//!
//! It must not tokenize, sample or touch the database; it maps token ids to logits.

use crate::gguf::{GgufError, GgufFile};
use crate::hparams::HparamsError;
pub use crate::hparams::{Arch, Config};
use crate::kernels::{self, QMatrix, QType};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor, D};
use std::sync::Arc;

mod step;

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

    /// A new buffer holding this one's first `n` positions, with room for `cap` in all.
    fn prefix_copy(&self, n: usize, cap: usize) -> Result<KvBuffer> {
        let n = n.min(self.len);
        let Some(t) = &self.buf else {
            return Ok(KvBuffer::default());
        };
        let (b, h, _, d) = t.dims4()?;
        let fresh = Tensor::zeros((b, h, cap.max(n).max(1), d), t.dtype(), t.device())?;
        if n > 0 {
            fresh.slice_set(&t.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
        }
        Ok(KvBuffer {
            buf: Some(fresh),
            len: n,
        })
    }

    /// Bytes allocated (the whole capacity, not just the positions held).
    fn bytes(&self) -> usize {
        self.buf
            .as_ref()
            .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
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
}

/// The keys and values one sequence has seen, every layer's: [`Model::forward`] uses the
/// model's own, [`Model::forward_batch`] one per sequence (the slots of `hone serve`).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(KvBuffer, KvBuffer)>,
    /// Tokens held.
    len: usize,
}

impl KvCache {
    /// An empty cache for `model` (its buffers grow as tokens are appended).
    pub fn new(model: &Model) -> Self {
        Self::with_layers(model.cfg.n_layers)
    }

    fn with_layers(n: usize) -> Self {
        Self {
            layers: (0..n).map(|_| Default::default()).collect(),
            len: 0,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on (the buffers are kept for reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for (k, v) in &mut self.layers {
            k.len = self.len;
            v.len = self.len;
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// A copy of the first `n` positions (all of them if fewer), in new buffers with room for
    /// `cap` positions, so that this cache stays as it is.
    pub fn prefix_copy(&self, n: usize, cap: usize) -> Result<KvCache> {
        let n = n.min(self.len);
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.prefix_copy(n, cap)?, v.prefix_copy(n, cap)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers, len: n })
    }

    /// Bytes the buffers take (their capacity, which is at least what they hold).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }
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
    /// The KV cache `forward` uses.
    cache: KvCache,
    device: Device,
    /// What the one-token CPU path (`step`) needs, made at its first use; None inside when
    /// this model's weights need candle.
    step_weights: std::sync::OnceLock<Option<Arc<step::StepWeights>>>,
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
        let cfg_layers = cfg.n_layers;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed,
            layers,
            norm,
            output,
            max_ctx,
            cache: KvCache::with_layers(cfg_layers),
            device: dev.clone(),
            lora: None,
            step_weights: Default::default(),
        })
    }

    /// The most tokens the KV cache holds.
    pub fn max_context(&self) -> usize {
        self.max_ctx
    }

    /// Tokens currently in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cache.len
    }

    /// Forgets cached positions from `len` on (keeping a common prefix of a conversation).
    pub fn truncate_cache(&mut self, len: usize) {
        self.cache.truncate(len);
    }

    pub fn clear_cache(&mut self) {
        self.truncate_cache(0);
    }

    /// Exchanges the model's own KV cache with `other` (a cache one of [`Model::forward_batch`]'s
    /// sequences filled, to go on from it with [`Model::forward`]).
    pub fn swap_cache(&mut self, other: &mut KvCache) {
        std::mem::swap(&mut self.cache, other);
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
                })
                .collect(),
            norm: self.norm.clone(),
            output: self.output.clone(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            lora: None,
            max_ctx: self.max_ctx,
            cache: KvCache::with_layers(self.layers.len()),
            device: self.device.clone(),
            step_weights: self.step_weights.clone(),
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
        let mut cache = std::mem::take(&mut self.cache);
        let use_lora = self.lora.is_some();
        let r = self.forward_cached(&mut cache, tokens, logits, use_lora);
        self.cache = cache;
        r
    }

    /// [`Model::forward`] over `cache` instead of the model's own, with the adapter when
    /// `use_lora` (and one is set).
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        logits: Logits,
        use_lora: bool,
    ) -> Result<Tensor> {
        let s = tokens.len();
        if s == 0 {
            return Err(candle_core::Error::Msg("forward on no tokens".into()).into());
        }
        if let [t] = tokens {
            if let Some(l) = self.step(cache, *t, use_lora)? {
                let vocab = l.len();
                return Ok(match logits {
                    Logits::Last => Tensor::from_vec(l, vocab, &self.device)?,
                    Logits::All => Tensor::from_vec(l, (1, vocab), &self.device)?,
                });
            }
        }
        let x = self.hidden(cache, tokens, use_lora)?;
        let x = match logits {
            Logits::Last => x.narrow(0, s - 1, 1)?,
            Logits::All => x,
        };
        let out = self.head(&x)?;
        Ok(match logits {
            Logits::Last => out.squeeze(0)?,
            Logits::All => out,
        })
    }

    /// [`Model::forward`] returning the logits of the positions `rows` of `tokens` only, shape
    /// (rows, vocab): scoring the answer of a prompt-and-answer without the output head's cost
    /// (a sixth of the model's products per position) for the prompt. Every token still runs
    /// through the layers and into the cache.
    pub fn forward_rows(&mut self, tokens: &[u32], rows: &[u32]) -> Result<Tensor> {
        let s = tokens.len();
        if s == 0 || rows.iter().any(|&r| r as usize >= s) {
            return Err(candle_core::Error::Msg(format!(
                "forward_rows: rows {rows:?} of {s} tokens"
            ))
            .into());
        }
        let mut cache = std::mem::take(&mut self.cache);
        let x = self.hidden(&mut cache, tokens, self.lora.is_some());
        self.cache = cache;
        let x = x?;
        if rows.is_empty() {
            let (vocab, _) = self.output.q.shape().dims2()?;
            return Ok(Tensor::zeros((0, vocab), DType::F32, &self.device)?);
        }
        let idx = Tensor::new(rows, &self.device)?;
        self.head(&x.index_select(&idx, 0)?)
    }

    /// The final hidden states (tokens, dim) of `tokens` run at `cache`'s positions, appended
    /// to it: what [`Model::forward_cached`] and [`Model::forward_rows`] put through the head.
    fn hidden(&self, cache: &mut KvCache, tokens: &[u32], use_lora: bool) -> Result<Tensor> {
        let s = tokens.len();
        self.check_cache(cache, s)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let x = self.embed.embedding(&ids)?;
        self.layers_forward(x, &mut [cache], &[s], &[use_lora])
    }

    /// One decoding step for several sequences at once: `tokens[i]` is appended to
    /// `caches[i]` at that cache's own position, and row i of the result (n, vocab) is the
    /// next-token logits of sequence i. Every projection runs once over the n rows stacked
    /// (one pass over the weights for all of them); attention and rotary embeddings are per
    /// sequence. `lora[i]` says whether row i uses the adapter (when one is set).
    pub fn forward_batch(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[u32],
        lora: &[bool],
    ) -> Result<Tensor> {
        let n = tokens.len();
        if n == 0 || caches.len() != n || lora.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "forward_batch: {n} tokens, {} caches, {} adapter flags",
                caches.len(),
                lora.len()
            ))
            .into());
        }
        if let Some(rows) = self.step_many(caches, tokens, lora)? {
            let vocab = rows.first().map_or(0, Vec::len);
            return Ok(Tensor::from_vec(rows.concat(), (n, vocab), &self.device)?);
        }
        self.forward_batch_tensors(caches, tokens, lora)
    }

    /// [`Model::forward_batch`] on candle's tensor operations (where `step` does not run).
    fn forward_batch_tensors(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[u32],
        lora: &[bool],
    ) -> Result<Tensor> {
        let n = tokens.len();
        for c in caches.iter() {
            self.check_cache(c, 1)?;
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let x = self.embed.embedding(&ids)?;
        let x = self.layers_forward(x, caches, &vec![1; n], lora)?;
        self.head(&x)
    }

    fn check_cache(&self, cache: &KvCache, s: usize) -> Result<()> {
        if cache.layers.len() != self.layers.len() {
            return Err(candle_core::Error::Msg(format!(
                "a KV cache of {} layers for a model of {}",
                cache.layers.len(),
                self.layers.len()
            ))
            .into());
        }
        if cache.len + s > self.max_ctx {
            return Err(ModelError::ContextFull {
                needed: cache.len + s,
                max: self.max_ctx,
                trained: self.cfg.trained_ctx,
            });
        }
        Ok(())
    }

    /// The final norm and the output projection: (rows, dim) to (rows, vocab) logits.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.cfg.eps as f32)?;
        Ok(self
            .output
            .forward(&x)?
            .to_dtype(DType::F32)?
            .contiguous()?)
    }

    /// The transformer layers over `x` (rows, dim): the rows are the sequences' tokens one
    /// after another, `lens[i]` of them for sequence i, which continues `caches[i]`.
    fn layers_forward(
        &self,
        mut x: Tensor,
        caches: &mut [&mut KvCache],
        lens: &[usize],
        lora_rows: &[bool],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let rows: usize = lens.iter().sum();
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let n_rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        // Per sequence: its first row, position, causal mask (prompts) and rotary rows.
        struct Seq {
            row: usize,
            s: usize,
            pos: usize,
            mask: Option<Tensor>,
            cos: Tensor,
            sin: Tensor,
        }
        let mut seqs = Vec::with_capacity(lens.len());
        let mut row = 0;
        for (c, &s) in caches.iter().zip(lens) {
            let pos = c.len;
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
            seqs.push(Seq {
                row,
                s,
                pos,
                mask,
                cos: self.cos.narrow(0, pos, s)?,
                sin: self.sin.narrow(0, pos, s)?,
            });
            row += s;
        }
        // Which rows take the adapter's delta: all, none, or a 0/1 column to scale it by.
        let lora = match &self.lora {
            Some(l) if lora_rows.iter().any(|&u| u) => Some(l),
            _ => None,
        };
        let row_mask = if lora_rows.iter().all(|&u| u) {
            None
        } else {
            let m: Vec<f32> = lens
                .iter()
                .zip(lora_rows)
                .flat_map(|(&s, &u)| std::iter::repeat_n(if u { 1.0 } else { 0.0 }, s))
                .collect();
            Some(Tensor::from_vec(m, (rows, 1), &self.device)?)
        };
        use crate::lora::Target as T;
        let ad = |i: usize, t: T, x: &Tensor, y: Tensor| -> Result<Tensor> {
            let Some(l) = lora else { return Ok(y) };
            let map = |e| match e {
                crate::lora::LoraError::Candle(c) => ModelError::Candle(c),
                e => ModelError::Candle(candle_core::Error::Msg(e.to_string())),
            };
            match &row_mask {
                None => l.apply(i, t, x, y).map_err(map),
                Some(m) => {
                    // The delta alone, scaled to zero on the rows that do not use it.
                    let d = l.apply(i, t, x, y.zeros_like()?).map_err(map)?;
                    Ok((y + d.broadcast_mul(m)?)?)
                }
            }
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps as f32)?;
            let q = ad(li, T::Q, &h, layer.q.forward(&h)?)?;
            let k = ad(li, T::K, &h, layer.k.forward(&h)?)?;
            let v = ad(li, T::V, &h, layer.v.forward(&h)?)?;
            let mut ys = Vec::with_capacity(seqs.len());
            for (sq, cache) in seqs.iter().zip(caches.iter_mut()) {
                let s = sq.s;
                let q = q.narrow(0, sq.row, s)?;
                let k = k.narrow(0, sq.row, s)?;
                let v = v.narrow(0, sq.row, s)?;
                let q = q.reshape((1, s, nh, hd))?.transpose(1, 2)?.contiguous()?;
                let k = k.reshape((1, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
                let v = v.reshape((1, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
                let (q, k) = match cfg.arch {
                    Arch::Llama => (
                        candle_nn::rotary_emb::rope_i(&q, &sq.cos, &sq.sin)?,
                        candle_nn::rotary_emb::rope_i(&k, &sq.cos, &sq.sin)?,
                    ),
                    Arch::Qwen2 => (
                        candle_nn::rotary_emb::rope(&q, &sq.cos, &sq.sin)?,
                        candle_nn::rotary_emb::rope(&k, &sq.cos, &sq.sin)?,
                    ),
                };
                let (kc, vc) = &mut cache.layers[li];
                let k = kc.append(&k, self.max_ctx)?;
                let v = vc.append(&v, self.max_ctx)?;
                let l = sq.pos + s;
                // Heads that share a kv head are stacked as rows: no copy of K or V per head.
                let q = q.reshape((1, nkv, n_rep * s, hd))?;
                let att = (q.matmul(&k.t()?)? * scale)?;
                let att = match &sq.mask {
                    Some(m) => att
                        .reshape((1, nkv, n_rep, s, l))?
                        .broadcast_add(m)?
                        .reshape((1, nkv, n_rep * s, l))?,
                    None => att,
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att.matmul(&v)?;
                ys.push(
                    y.reshape((1, nh, s, hd))?
                        .transpose(1, 2)?
                        .reshape((s, nh * hd))?,
                );
            }
            let y = if ys.len() == 1 {
                ys.swap_remove(0)
            } else {
                Tensor::cat(&ys, 0)?
            };
            x = (x + ad(li, T::O, &y, layer.o.forward(&y)?)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.eps as f32)?;
            let g = candle_nn::ops::silu(&ad(li, T::Gate, &h, layer.gate.forward(&h)?)?)?;
            let u = ad(li, T::Up, &h, layer.up.forward(&h)?)?;
            let gu = (g * u)?;
            x = (x + ad(li, T::Down, &gu, layer.down.forward(&gu)?)?)?;
        }
        for (c, sq) in caches.iter_mut().zip(&seqs) {
            c.len = sq.pos + sq.s;
        }
        Ok(x)
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
        // Some positions only: their rows of the full pass, and the cache filled all the same.
        m.clear_cache();
        let picked: Vec<Vec<f32>> = m
            .forward_rows(&toks, &[0, 3, 9])
            .unwrap()
            .to_vec2()
            .unwrap();
        for (row, i) in picked.iter().zip([0, 3, 9]) {
            let d = max_rel_diff(row, &full[i]);
            assert!(d < 1e-4, "{arch}: selected position {i} differs by {d}");
        }
        assert_eq!(m.cached_len(), toks.len());
        assert_eq!(m.forward_rows(&[5], &[]).unwrap().dims2().unwrap().0, 0);
        assert!(m.forward_rows(&[5], &[1]).is_err());
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

    /// Several sequences decoded together, each from its own prompt at its own position, give
    /// the logits each gives decoded alone; with an adapter, the rows that ask for it get its
    /// delta and the others the base model's logits.
    fn batch_matches_one_at_a_time(arch: &str) {
        use crate::lora::LoraWeights;
        let spec = TinySpec {
            arch: arch.into(),
            ..Default::default()
        };
        let (_d, mut m) = load(&spec);
        let w = Arc::new(LoraWeights::random_for_tests(&m.cfg, 7).prepare().unwrap());
        let prompts: [&[u32]; 3] = [&[1, 40, 77], &[5, 9, 250, 33, 12], &[80]];
        let steps: [[u32; 4]; 3] = [[3, 4, 5, 6], [200, 201, 7, 8], [9, 9, 9, 10]];
        for adapter in [false, true] {
            let use_lora = [false, adapter, true];
            m.set_adapter(adapter.then(|| w.clone()));
            // Alone, through the model's own cache.
            let mut want: Vec<Vec<Vec<f32>>> = Vec::new();
            for (i, (p, st)) in prompts.iter().zip(&steps).enumerate() {
                let mut c = KvCache::new(&m);
                m.forward_cached(&mut c, p, Logits::Last, use_lora[i])
                    .unwrap();
                let rows = st
                    .iter()
                    .map(|t| {
                        m.forward_cached(&mut c, &[*t], Logits::Last, use_lora[i])
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    })
                    .collect();
                want.push(rows);
            }
            // Together: on the plain-loop step (the default) and on candle's tensors.
            for tensors in [false, true] {
                let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(&m)).collect();
                for (i, (c, p)) in caches.iter_mut().zip(prompts).enumerate() {
                    m.forward_cached(c, p, Logits::Last, use_lora[i]).unwrap();
                }
                for k in 0..4 {
                    let toks: Vec<u32> = steps.iter().map(|s| s[k]).collect();
                    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                    let out = if tensors {
                        m.forward_batch_tensors(&mut refs, &toks, &use_lora)
                    } else {
                        m.forward_batch(&mut refs, &toks, &use_lora)
                    };
                    let out: Vec<Vec<f32>> = out.unwrap().to_vec2().unwrap();
                    for (i, row) in out.iter().enumerate() {
                        let d = max_rel_diff(row, &want[i][k]);
                        assert!(
                            d < 1e-4,
                            "{arch} adapter {adapter} tensors {tensors}: seq {i} step {k} differs by {d}"
                        );
                    }
                }
                for (c, p) in caches.iter().zip(prompts) {
                    assert_eq!(c.len(), p.len() + 4);
                }
            }
            if adapter {
                // The adapter changes the rows that use it (so the check above means something).
                let mut c = KvCache::new(&m);
                let base = m
                    .forward_cached(&mut c, prompts[2], Logits::Last, false)
                    .unwrap();
                let base: Vec<f32> = base.to_vec1().unwrap();
                let mut c = KvCache::new(&m);
                let with: Vec<f32> = m
                    .forward_cached(&mut c, prompts[2], Logits::Last, true)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(max_rel_diff(&with, &base) > 1e-3);
            }
        }
        // A batch whose caches do not match its tokens is refused, not half-run.
        let mut c = KvCache::new(&m);
        assert!(m
            .forward_batch(&mut [&mut c], &[1, 2], &[false, false])
            .is_err());
    }

    /// The one-token CPU path (`step`) runs (it is not silently skipped) and gives the logits
    /// of the tensor path, with and without an adapter, over a growing cache.
    fn step_matches_the_tensor_path(arch: &str) {
        use crate::lora::LoraWeights;
        let spec = TinySpec {
            arch: arch.into(),
            ..Default::default()
        };
        let (_d, mut m) = load(&spec);
        let w = Arc::new(LoraWeights::random_for_tests(&m.cfg, 11).prepare().unwrap());
        for adapter in [false, true] {
            m.set_adapter(adapter.then(|| w.clone()));
            let mut alone = KvCache::new(&m);
            // Two copies of one sequence decode as a batch on candle's tensors.
            let mut pair: Vec<KvCache> = (0..2).map(|_| KvCache::new(&m)).collect();
            let prompt = [1u32, 40, 77, 100];
            m.forward_cached(&mut alone, &prompt, Logits::Last, adapter)
                .unwrap();
            for c in pair.iter_mut() {
                m.forward_cached(c, &prompt, Logits::Last, adapter).unwrap();
            }
            for (i, t) in [5u32, 9, 250, 33, 12, 80, 3].into_iter().enumerate() {
                let fast = m
                    .step(&mut alone, t, adapter)
                    .unwrap()
                    .expect("the tiny model's weights run on the one-token path");
                let mut refs: Vec<&mut KvCache> = pair.iter_mut().collect();
                let slow: Vec<Vec<f32>> = m
                    .forward_batch_tensors(&mut refs, &[t, t], &[adapter, adapter])
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                let d = max_rel_diff(&fast, &slow[0]);
                assert!(
                    d < 1e-4,
                    "{arch} adapter {adapter}: step {i} differs by {d}"
                );
                assert_eq!(alone.len(), pair[0].len());
            }
        }
    }

    #[test]
    fn llama_step_matches_the_tensor_path() {
        step_matches_the_tensor_path("llama");
    }

    #[test]
    fn qwen2_step_matches_the_tensor_path() {
        step_matches_the_tensor_path("qwen2");
    }

    #[test]
    fn llama_batch_matches_one_at_a_time() {
        batch_matches_one_at_a_time("llama");
    }

    #[test]
    fn qwen2_batch_matches_one_at_a_time() {
        batch_matches_one_at_a_time("qwen2");
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
