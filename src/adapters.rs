//! Adapter versions: saving a trained adapter as `adapters/v<N>.safetensors` (0600) and
//! recording it in SQLite (parent, model and its sha256, config, data, loss curve, sizes),
//! choosing the active one, loading it for a model (refusing one made for another model), and
//! exporting it to the formats other tools load: llama.cpp's GGUF LoRA adapter and PEFT.
//!
//! It must not train or run the model; it moves adapter weights between files, the database
//! and the caller.

use crate::home::Home;
use crate::lora::{self, LoraConfig, LoraError, LoraWeights, Target};
use crate::model::{Arch, Config};
use crate::registry::ModelChoice;
use crate::store::{AdapterRecord, Store, StoreError};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("there is no adapter version {0} (see `hone adapters list`)")]
    NoVersion(i64),
    /// An adapter made for another model (sha256, architecture or shapes differ).
    #[error("{0}")]
    OtherModel(String),
    #[error("{0}")]
    Other(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter compute: {0}")]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, AdapterError>;

/// Which base model an adapter belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelId {
    pub name: String,
    pub sha256: String,
    pub architecture: String,
}

/// The identity of the chosen model: the sha256 from its manifest or registration, else hashed.
pub fn model_id(store: &Store, choice: &ModelChoice, architecture: &str) -> Result<ModelId> {
    let sha = if let Some(m) = &choice.manifest {
        m.sha256.clone()
    } else if let Some(r) = store.registered_model(&choice.name)?.and_then(|r| r.sha256) {
        r
    } else {
        crate::pull::sha256_file(&choice.path).map_err(|e| AdapterError::Other(e.to_string()))?
    };
    Ok(ModelId {
        name: choice.name.clone(),
        sha256: sha,
        architecture: architecture.to_string(),
    })
}

/// Metadata kept inside each adapter file, so a file is self-describing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileMeta {
    pub lora: LoraConfig,
    pub model: ModelId,
}

pub fn adapters_dir(home: &Home) -> PathBuf {
    home.root().join("adapters")
}

/// What a new version records besides its weights.
#[derive(Debug, Clone, Default)]
pub struct NewVersion {
    pub parent: Option<i64>,
    pub config_json: String,
    pub data: Option<String>,
    pub data_sha256: Option<String>,
    pub losses: Vec<f32>,
    pub steps: u64,
    pub tokens: u64,
    pub seconds: Option<f64>,
}

/// Writes the weights (atomically, 0600) and records a new version; returns its number.
pub fn save_version(
    home: &Home,
    store: &mut Store,
    model: &ModelId,
    w: &LoraWeights,
    v: &NewVersion,
    activate: bool,
) -> Result<i64> {
    let version = store.next_adapter_version()?;
    let rel = format!("adapters/v{version}.safetensors");
    let path = home.root().join(&rel);
    let meta = FileMeta {
        lora: w.cfg.clone(),
        model: model.clone(),
    };
    let mut m = BTreeMap::new();
    m.insert(
        "hone.adapter".to_string(),
        serde_json::to_string(&meta).map_err(|e| AdapterError::Other(e.to_string()))?,
    );
    let bytes = lora::write_safetensors(&path, &w.named_tensors(), &m)?;
    let rec = AdapterRecord {
        version,
        parent: v.parent,
        created_at: crate::store::now_rfc3339(),
        model: model.name.clone(),
        model_sha256: model.sha256.clone(),
        architecture: model.architecture.clone(),
        config: v.config_json.clone(),
        data: v.data.clone(),
        data_sha256: v.data_sha256.clone(),
        loss_curve: serde_json::to_string(&v.losses).ok(),
        steps: v.steps,
        tokens: v.tokens,
        seconds: v.seconds,
        params: w.param_count() as u64,
        bytes,
        file: rel,
        active: activate,
    };
    store.add_adapter(&rec, activate)?;
    Ok(version)
}

/// Reads an adapter file (weights and the metadata inside it).
pub fn read_file(path: &Path) -> Result<(LoraWeights, FileMeta)> {
    let (tensors, meta) = lora::read_safetensors(path)?;
    let fm: FileMeta = meta
        .get("hone.adapter")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| {
            AdapterError::Other(format!("{} is not a hone adapter file", path.display()))
        })?;
    let w = LoraWeights::from_named(fm.lora.clone(), &tensors)?;
    Ok((w, fm))
}

/// Loads version `rec` for the model `model` with shapes `cfg`, refusing an adapter made for
/// another model (sha256, architecture or shapes differ).
pub fn load_version(
    home: &Home,
    rec: &AdapterRecord,
    model: &ModelId,
    cfg: &Config,
) -> Result<LoraWeights> {
    let other = |fm_sha: &str, arch: &str| {
        AdapterError::OtherModel(format!(
            "adapter version {} was trained for {} ({arch}, sha256 {}…), not for the model in use ({}, {}, sha256 {}…); use it with `--model {}`",
            rec.version,
            rec.model,
            fm_sha.chars().take(12).collect::<String>(),
            model.name,
            model.architecture,
            model.sha256.chars().take(12).collect::<String>(),
            rec.model
        ))
    };
    if rec.model_sha256 != model.sha256 || rec.architecture != model.architecture {
        return Err(other(&rec.model_sha256, &rec.architecture));
    }
    let (w, fm) = read_file(&home.root().join(&rec.file))?;
    if fm.model.sha256 != model.sha256 || fm.model.architecture != model.architecture {
        return Err(other(&fm.model.sha256, &fm.model.architecture));
    }
    w.check_shapes(cfg)?;
    Ok(w)
}

/// The active adapter of this model, loaded (None when the base model answers).
pub fn load_active(
    home: &Home,
    store: &Store,
    model: &ModelId,
    cfg: &Config,
) -> Result<Option<(AdapterRecord, LoraWeights)>> {
    match store.active_adapter(&model.sha256)? {
        None => Ok(None),
        Some(rec) => {
            let w = load_version(home, &rec, model, cfg)?;
            Ok(Some((rec, w)))
        }
    }
}

/// Makes `version` active (it must belong to its model; any model's adapter can be chosen).
pub fn use_version(store: &Store, version: i64) -> Result<AdapterRecord> {
    let rec = store
        .adapter(version)?
        .ok_or(AdapterError::NoVersion(version))?;
    store.set_active_adapter(&rec.model_sha256, Some(version))?;
    Ok(rec)
}

/// Goes back from the active adapter of `model_sha256` to its parent (or to no adapter).
pub fn rollback(store: &Store, model_sha256: &str) -> Result<(Option<i64>, Option<i64>)> {
    let Some(cur) = store.active_adapter(model_sha256)? else {
        return Err(AdapterError::Other(
            "no adapter is active for this model: nothing to roll back".into(),
        ));
    };
    let to = cur.parent.filter(|p| *p != cur.version);
    store.set_active_adapter(model_sha256, to)?;
    Ok((Some(cur.version), to))
}

/// Writes llama.cpp's GGUF LoRA adapter: general.type=adapter, adapter.type=lora,
/// adapter.lora.alpha, tensors `blk.N.<proj>.weight.lora_a` (ggml [n_in, r]) and `.lora_b`
/// (ggml [r, n_out]), F32.
pub fn export_gguf(w: &LoraWeights, architecture: &str, name: &str, out: &Path) -> Result<()> {
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (&(l, t), p) in &w.pairs {
        let base = format!("blk.{l}.{}.weight", t.gguf_stem());
        tensors.push((
            format!("{base}.lora_a"),
            QTensor::quantize(&p.a, GgmlDType::F32)?,
        ));
        tensors.push((
            format!("{base}.lora_b"),
            QTensor::quantize(&p.b, GgmlDType::F32)?,
        ));
    }
    let meta: Vec<(&str, Value)> = vec![
        ("general.type", Value::String("adapter".into())),
        ("general.architecture", Value::String(architecture.into())),
        ("general.name", Value::String(name.into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(w.cfg.alpha)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Vec::new();
    gguf_file::write(&mut std::io::Cursor::new(&mut buf), &meta_refs, &t_refs)?;
    lora::write_atomic(out, &buf).map_err(|source| AdapterError::Io {
        path: out.to_path_buf(),
        source,
    })
}

/// Rows of a llama q/k projection output in Hugging Face order: llama.cpp's converter permutes
/// them (pairs interleaved per head) for its rope, so B's rows are permuted back for PEFT.
fn unpermute_rows(b: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, r) = b.dims2()?;
    let hd = out / n_head;
    Ok(b.reshape((n_head, hd / 2, 2, r))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, r))?)
}

/// Writes a PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors` with
/// PEFT's names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in],
/// `lora_B.weight` [out, r]).
pub fn export_peft(w: &LoraWeights, cfg: &Config, base_model: &str, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| AdapterError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut tensors = Vec::new();
    for (&(l, t), p) in &w.pairs {
        let stem = format!("base_model.model.model.layers.{l}.{}", t.peft_module());
        let b = match (cfg.arch, t) {
            (Arch::Llama, Target::Q) => unpermute_rows(&p.b, cfg.n_heads)?,
            (Arch::Llama, Target::K) => unpermute_rows(&p.b, cfg.n_kv_heads)?,
            _ => p.b.clone(),
        };
        tensors.push((format!("{stem}.lora_A.weight"), p.a.clone()));
        tensors.push((format!("{stem}.lora_B.weight"), b));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    lora::write_safetensors(&out.join("adapter_model.safetensors"), &tensors, &meta)?;
    let all_layers = w.cfg.layers.len() == cfg.n_layers;
    let conf = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": w.cfg.rank,
        "lora_alpha": w.cfg.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "target_modules": w.cfg.targets.iter().map(|t| t.peft_short()).collect::<Vec<_>>(),
        "layers_to_transform": if all_layers { serde_json::Value::Null } else { serde_json::json!(w.cfg.layers) },
    });
    let text =
        serde_json::to_string_pretty(&conf).map_err(|e| AdapterError::Other(e.to_string()))?;
    lora::write_atomic(&out.join("adapter_config.json"), text.as_bytes()).map_err(|source| {
        AdapterError::Io {
            path: out.to_path_buf(),
            source,
        }
    })
}
