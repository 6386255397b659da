//! LoRA adapters over the frozen quantised base: the configuration (rank, alpha, which
//! projections of which layers), the f32 weights `A` (r × in) and `B` (out × r) of each adapted
//! projection, how they change a projection (`y = W·x + (alpha/r)·B·(A·x)`), their
//! initialisation (A Kaiming-uniform-like from a seed, B zero), and the safetensors files they
//! live in (with their metadata).
//!
//! It must not train (that is `train`), know about the database or versions (that is
//! `adapters`), or change the base weights: adapters are applied next to the base, never into it.

use crate::hparams::Config;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("unknown LoRA target {0:?}; choose from q, k, v, o, gate, up, down")]
    UnknownTarget(String),
    #[error("invalid LoRA configuration: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    NotFinite(String),
    #[error("adapter compute: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, LoraError>;

/// A projection of a transformer layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Target::ALL
            .into_iter()
            .find(|x| x.name() == t || x.peft_short() == t)
            .ok_or_else(|| LoraError::UnknownTarget(s.to_string()))
    }

    /// Parses "q,k,v,o" or "all".
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        if s.trim() == "all" {
            return Ok(Target::ALL.to_vec());
        }
        let mut v: Vec<Target> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Target::parse)
            .collect::<Result<_>>()?;
        v.sort();
        v.dedup();
        if v.is_empty() {
            return Err(LoraError::Config("no targets given".into()));
        }
        Ok(v)
    }

    /// The GGUF tensor name stem (`blk.N.<stem>.weight`).
    pub fn gguf_stem(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    /// The Hugging Face module name (`q_proj`, ...), as PEFT's target_modules lists it.
    pub fn peft_short(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module path inside a Hugging Face layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn peft_module(self) -> String {
        match self {
            Target::Q | Target::K | Target::V | Target::O => {
                format!("self_attn.{}", self.peft_short())
            }
            _ => format!("mlp.{}", self.peft_short()),
        }
    }

    /// (in, out) features of this projection.
    pub fn dims(self, cfg: &Config) -> (usize, usize) {
        let kv = cfg.n_kv_heads * cfg.head_dim;
        let q = cfg.n_heads * cfg.head_dim;
        match self {
            Target::Q => (cfg.dim, q),
            Target::K | Target::V => (cfg.dim, kv),
            Target::O => (q, cfg.dim),
            Target::Gate | Target::Up => (cfg.dim, cfg.ffn_dim),
            Target::Down => (cfg.ffn_dim, cfg.dim),
        }
    }
}

/// Which projections of which layers carry adapters, and their rank and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<Target>,
    /// Layer indices with adapters, ascending.
    pub layers: Vec<usize>,
}

impl LoraConfig {
    /// Adapters on `targets` of the top `top_k` layers of a model with `n_layers`.
    pub fn top_layers(
        rank: usize,
        alpha: f32,
        targets: Vec<Target>,
        n_layers: usize,
        top_k: usize,
    ) -> Result<Self> {
        let c = Self {
            rank,
            alpha,
            targets,
            layers: (n_layers.saturating_sub(top_k.min(n_layers))..n_layers).collect(),
        };
        c.validate(n_layers)?;
        Ok(c)
    }

    pub fn validate(&self, n_layers: usize) -> Result<()> {
        if self.rank == 0 || self.rank > 1024 {
            return Err(LoraError::Config(format!(
                "rank {} must be between 1 and 1024",
                self.rank
            )));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(LoraError::Config(format!(
                "alpha {} must be > 0",
                self.alpha
            )));
        }
        if self.targets.is_empty() || self.layers.is_empty() {
            return Err(LoraError::Config("no targets or no layers".into()));
        }
        if let Some(l) = self.layers.iter().find(|l| **l >= n_layers) {
            return Err(LoraError::Config(format!(
                "layer {l} does not exist (the model has {n_layers})"
            )));
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha as f64 / self.rank as f64
    }

    /// The lowest layer with an adapter: the backward pass stops there.
    pub fn first_layer(&self) -> usize {
        self.layers.first().copied().unwrap_or(0)
    }

    pub fn targets_string(&self) -> String {
        self.targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Tensor name of A or B in hone's adapter files: `blk.N.attn_q.lora_a`.
pub fn tensor_name(layer: usize, t: Target, which: char) -> String {
    format!("blk.{layer}.{}.lora_{which}", t.gguf_stem())
}

/// One adapted projection: A (r × in) and B (out × r).
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// The adapter weights for a model: one pair per adapted (layer, projection).
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub cfg: LoraConfig,
    pub pairs: BTreeMap<(usize, Target), LoraPair>,
    /// For inference: Aᵀ and (scale·B)ᵀ, contiguous, made once by [`LoraWeights::prepare`].
    pub prepared: BTreeMap<(usize, Target), (Tensor, Tensor)>,
}

impl LoraWeights {
    /// Fresh adapters: A uniform in ±sqrt(3/in)·gain... (Kaiming-uniform with a=sqrt(5), as
    /// PEFT does: bound 1/sqrt(in)), B zero, so the adapted model starts equal to the base.
    pub fn init(cfg: &LoraConfig, model: &Config, seed: u64) -> Result<Self> {
        cfg.validate(model.n_layers)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for &l in &cfg.layers {
            for &t in &cfg.targets {
                let (n_in, n_out) = t.dims(model);
                let bound = 1.0 / (n_in as f32).sqrt();
                let a: Vec<f32> = (0..cfg.rank * n_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (cfg.rank, n_in), &Device::Cpu)?;
                let b = Tensor::zeros((n_out, cfg.rank), DType::F32, &Device::Cpu)?;
                pairs.insert((l, t), LoraPair { a, b });
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            pairs,
            prepared: BTreeMap::new(),
        })
    }

    /// Precomputes the transposed, scaled factors used at inference (the weights no longer
    /// change): each projection then costs two small contiguous products.
    pub fn prepare(mut self) -> Result<Self> {
        let s = self.cfg.scale();
        let mut prepared = BTreeMap::new();
        for (k, p) in &self.pairs {
            let at = p.a.t()?.contiguous()?;
            let sbt = (&p.b * s)?.t()?.contiguous()?;
            prepared.insert(*k, (at, sbt));
        }
        self.prepared = prepared;
        Ok(self)
    }

    pub fn get(&self, layer: usize, t: Target) -> Option<&LoraPair> {
        self.pairs.get(&(layer, t))
    }

    /// `y + scale·(x·Aᵀ)·Bᵀ` for the projection `t` of `layer`, or `y` when it has no adapter.
    pub fn apply(&self, layer: usize, t: Target, x: &Tensor, y: Tensor) -> Result<Tensor> {
        if let Some((at, sbt)) = self.prepared.get(&(layer, t)) {
            let x2 = x.reshape(((), at.dim(0)?))?;
            let d = x2.matmul(at)?.matmul(sbt)?.reshape(y.shape())?;
            return Ok((y + d)?);
        }
        match self.pairs.get(&(layer, t)) {
            None => Ok(y),
            Some(p) => {
                let n_in = p.a.dim(1)?;
                let x2 = x.reshape(((), n_in))?;
                let ax = x2.matmul(&p.a.t()?)?;
                let sb = (&p.b * self.cfg.scale())?;
                let d = ax.matmul(&sb.t()?)?;
                let d = d.reshape(y.shape())?;
                Ok((y + d)?)
            }
        }
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// Fails naming the first tensor that holds a NaN or an infinity: such an adapter would
    /// make every answer empty, so it is never saved, loaded or served.
    pub fn check_finite(&self) -> Result<()> {
        for (&(l, t), p) in &self.pairs {
            for (which, x) in [('a', &p.a), ('b', &p.b)] {
                let v = x.flatten_all()?.to_vec1::<f32>()?;
                if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                    return Err(LoraError::NotFinite(format!(
                        "adapter tensor {} holds {bad}, not a finite number",
                        tensor_name(l, t, which)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks that these adapters fit the model's shapes.
    pub fn check_shapes(&self, model: &Config) -> Result<()> {
        self.cfg.validate(model.n_layers)?;
        for (&(l, t), p) in &self.pairs {
            let (n_in, n_out) = t.dims(model);
            let want_a = [self.cfg.rank, n_in];
            let want_b = [n_out, self.cfg.rank];
            if p.a.dims() != want_a || p.b.dims() != want_b {
                return Err(LoraError::Config(format!(
                    "adapter blk.{l}.{} has shapes {:?}/{:?}, this model needs {want_a:?}/{want_b:?}",
                    t.gguf_stem(),
                    p.a.dims(),
                    p.b.dims()
                )));
            }
        }
        Ok(())
    }

    /// The adapters merged into dense f32 deltas `scale·B·A` (out × in), one per projection,
    /// applied as one extra matrix product each. Faster only when the rank is close to the
    /// dimensions; it costs in × out floats per projection.
    pub fn merged(&self) -> Result<BTreeMap<(usize, Target), Tensor>> {
        let mut out = BTreeMap::new();
        for (k, p) in &self.pairs {
            out.insert(*k, (p.b.matmul(&p.a)? * self.cfg.scale())?);
        }
        Ok(out)
    }

    /// The named tensors (`blk.N.attn_q.lora_a` / `lora_b`).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (&(l, t), p) in &self.pairs {
            v.push((tensor_name(l, t, 'a'), p.a.clone()));
            v.push((tensor_name(l, t, 'b'), p.b.clone()));
        }
        v
    }

    /// Rebuilds adapters from named tensors and their config.
    pub fn from_named(cfg: LoraConfig, tensors: &BTreeMap<String, Tensor>) -> Result<Self> {
        let mut pairs = BTreeMap::new();
        for &l in &cfg.layers {
            for &t in &cfg.targets {
                let get = |w: char| {
                    let n = tensor_name(l, t, w);
                    tensors
                        .get(&n)
                        .cloned()
                        .ok_or_else(|| LoraError::Config(format!("missing tensor {n}")))
                };
                pairs.insert(
                    (l, t),
                    LoraPair {
                        a: get('a')?,
                        b: get('b')?,
                    },
                );
            }
        }
        Ok(Self {
            cfg,
            pairs,
            prepared: BTreeMap::new(),
        })
    }
}

/// Writes f32 tensors and string metadata as a safetensors file, privately (0600), atomically:
/// a temporary file in the same folder, fsync, rename, fsync of the folder.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<u64> {
    let bytes = safetensors_bytes(tensors, metadata)?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// The bytes of a safetensors file holding f32 tensors.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    safetensors_bytes_as(tensors, metadata, false)
}

/// [`safetensors_bytes`], in half precision when `f16` (half the size; read back as f32).
pub fn safetensors_bytes_as(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
    f16: bool,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in tensors {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let start = data.len();
        for x in &v {
            if f16 {
                data.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes());
            } else {
                data.extend_from_slice(&x.to_le_bytes());
            }
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": if f16 { "F16" } else { "F32" }, "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Reads a safetensors file of f32 tensors, with its metadata; every extent is checked.
pub fn read_safetensors(
    path: &Path,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let bad = |message: String| LoraError::File {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    parse_safetensors(path, &bytes)
}

/// Parses the bytes of a safetensors file of f32 (or f16) tensors (read from `path`, named in errors);
/// every extent and size is checked, nothing is allocated from an unchecked size.
#[allow(clippy::type_complexity)]
pub fn parse_safetensors(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let bad = |message: String| LoraError::File {
        path: path.display().to_string(),
        message,
    };
    if bytes.len() < 8 {
        return Err(bad("too short for a safetensors file".into()));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let hlen = u64::from_le_bytes(n) as usize;
    if hlen > bytes.len() - 8 || hlen > 100 << 20 {
        return Err(bad("damaged safetensors header".into()));
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen])
        .map_err(|e| bad(format!("damaged safetensors header: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad("safetensors header is not an object".into()))?;
    let data = &bytes[8 + hlen..];
    let mut tensors = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for (k, v) in obj {
        if k == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (mk, mv) in m {
                    if let Some(s) = mv.as_str() {
                        meta.insert(mk.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let size = match v.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => 4usize,
            Some("F16") => 2,
            _ => return Err(bad(format!("tensor {k} is neither F32 nor F16"))),
        };
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .ok_or_else(|| bad(format!("tensor {k} has no shape")))?;
        let off: Vec<usize> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .ok_or_else(|| bad(format!("tensor {k} has no offsets")))?;
        let bytes_needed = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {k} has an impossible shape {shape:?}")))?;
        if off.len() != 2
            || off[0] > off[1]
            || off[1] > data.len()
            || off[1] - off[0] != bytes_needed
        {
            return Err(bad(format!("tensor {k} has a bad extent")));
        }
        let vals: Vec<f32> = match size {
            2 => data[off[0]..off[1]]
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => data[off[0]..off[1]]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        tensors.insert(k.clone(), Tensor::from_vec(vals, shape, &Device::Cpu)?);
    }
    Ok((tensors, meta))
}

/// Creates `dir` and its missing parents with mode 0700 (an existing folder is left as it is).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Writes `bytes` to `path` atomically and privately: temp file (0600) in the same folder,
/// fsync, rename over `path`, fsync of the folder. A crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A tiny model's adapter on its top two layers with B uniform in ±1 from `seed`, so that it
/// changes the model's answers: for tests of adapted inference.
#[cfg(test)]
impl LoraWeights {
    pub(crate) fn random_for_tests(model: &Config, seed: u64) -> Self {
        let cfg = LoraConfig::top_layers(8, 16.0, Target::ALL.to_vec(), 2, 2).unwrap();
        let mut w = LoraWeights::init(&cfg, model, 3).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for p in w.pairs.values_mut() {
            let b: Vec<f32> = (0..p.b.elem_count())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            p.b = Tensor::from_vec(b, p.b.shape(), &Device::Cpu).unwrap();
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            arch: crate::hparams::Arch::Llama,
            arch_name: "llama".into(),
            dim: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_dim: 128,
            eps: 1e-5,
            rope_base: 10000.0,
            trained_ctx: 256,
            vocab: 300,
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse_list("q,v").unwrap(),
            vec![Target::Q, Target::V]
        );
        assert_eq!(Target::parse_list("all").unwrap().len(), 7);
        assert!(Target::parse_list("q,x").is_err());
    }

    #[test]
    fn safetensors_roundtrip_and_private() {
        let c = LoraConfig::top_layers(4, 8.0, Target::ALL.to_vec(), 2, 1).unwrap();
        let w = LoraWeights::init(&c, &cfg(), 7).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        write_safetensors(&p, &w.named_tensors(), &meta).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (t, m) = read_safetensors(&p).unwrap();
        assert_eq!(m.get("k").map(String::as_str), Some("v"));
        let back = LoraWeights::from_named(c, &t).unwrap();
        back.check_shapes(&cfg()).unwrap();
        let a0 = w.get(1, Target::Q).unwrap().a.to_vec2::<f32>().unwrap();
        let a1 = back.get(1, Target::Q).unwrap().a.to_vec2::<f32>().unwrap();
        assert_eq!(a0, a1);
    }
}
