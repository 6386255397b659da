//! Adapter versions: saving a trained adapter as `adapters/v<N>.safetensors` (0600) and
//! recording it in SQLite (parent, model and its sha256, config, data, loss curve, sizes),
//! choosing the active one, loading it for a model (refusing one made for another model), and
//! exporting it to the formats other tools load: llama.cpp's GGUF LoRA adapter and PEFT.
//!
//! It must not train or run the model; it moves adapter weights between files, the database
//! and the caller.

use crate::home::Home;
use crate::hparams::{Arch, Config};
use crate::lora::{self, LoraConfig, LoraError, LoraWeights, Target};
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
    /// A version whose file is unreadable, changed since it was saved, or not finite.
    #[error("{0}")]
    Damaged(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter compute: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{text:?} is not a version number")]
    BadVersion {
        text: String,
        #[source]
        source: std::num::ParseIntError,
    },
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
        crate::digest::sha256_file(&choice.path).map_err(|e| AdapterError::Other(e.to_string()))?
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
    home.adapters_dir()
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

/// What a LoRA version is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// It answers the user (`adapters`, `hone adapters`).
    Answer,
    /// It writes self-edits and never answers (`learn::writer`, `hone writer`): kept in a
    /// table and folder of its own.
    Writer,
}

/// Writes the weights (atomically, 0600) and records a new answering adapter version; returns
/// its number.
pub fn save_version(
    home: &Home,
    store: &mut Store,
    model: &ModelId,
    w: &LoraWeights,
    v: &NewVersion,
    activate: bool,
) -> Result<i64> {
    save_kind(Kind::Answer, home, store, model, w, v, activate)
}

/// [`save_version`] for either kind: writers go to `writers/w<N>.safetensors` and the
/// `writer_versions` table.
pub fn save_kind(
    kind: Kind,
    home: &Home,
    store: &mut Store,
    model: &ModelId,
    w: &LoraWeights,
    v: &NewVersion,
    activate: bool,
) -> Result<i64> {
    let (version, rel) = match kind {
        Kind::Answer => {
            let n = store.next_adapter_version()?;
            (n, format!("adapters/v{n}.safetensors"))
        }
        Kind::Writer => {
            let n = store.next_writer_version()?;
            (n, format!("writers/w{n}.safetensors"))
        }
    };
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
    // A NaN or infinite weight would make every answer empty: never save one.
    w.check_finite().map_err(|e| {
        AdapterError::Other(format!(
            "the trained adapter is not usable ({e}); nothing was saved and the previous adapter stays active; train again with a smaller --lr"
        ))
    })?;
    let data = lora::safetensors_bytes(&w.named_tensors(), &m)?;
    let sha256 = crate::digest::sha256_hex(&data);
    lora::write_atomic(&path, &data).map_err(|source| AdapterError::Io {
        path: path.clone(),
        source,
    })?;
    let bytes = data.len() as u64;
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
        sha256: Some(sha256),
    };
    match kind {
        Kind::Answer => store.add_adapter(&rec, activate)?,
        Kind::Writer => store.add_writer(&rec, activate)?,
    };
    Ok(version)
}

/// An adapter file's bytes for `w` with its metadata, in f32 or (`f16`) half precision: what
/// `hone writer export --f16` writes to ship a writer.
pub fn file_bytes(w: &LoraWeights, meta: &FileMeta, f16: bool) -> Result<Vec<u8>> {
    let mut m = BTreeMap::new();
    m.insert(
        "hone.adapter".to_string(),
        serde_json::to_string(meta).map_err(|e| AdapterError::Other(e.to_string()))?,
    );
    Ok(lora::safetensors_bytes_as(&w.named_tensors(), &m, f16)?)
}

/// Reads an adapter file (weights and the metadata inside it); every weight must be finite.
pub fn read_file(path: &Path) -> Result<(LoraWeights, FileMeta)> {
    let bytes = std::fs::read(path).map_err(|source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &bytes)
}

/// Parses the bytes of an adapter file read from `path` (named in errors).
pub fn parse_file(path: &Path, bytes: &[u8]) -> Result<(LoraWeights, FileMeta)> {
    let (tensors, meta) = lora::parse_safetensors(path, bytes)?;
    let fm: FileMeta = meta
        .get("hone.adapter")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| {
            AdapterError::Other(format!("{} is not a hone adapter file", path.display()))
        })?;
    let w = LoraWeights::from_named(fm.lora.clone(), &tensors)?;
    w.check_finite()
        .map_err(|e| AdapterError::Damaged(format!("{}: {e}", path.display())))?;
    Ok((w, fm))
}

/// Reads version `rec`'s file, checking it against the sha256 recorded when it was saved and
/// that every weight is finite.
pub fn read_checked(home: &Home, rec: &AdapterRecord) -> Result<(LoraWeights, FileMeta)> {
    let path = home.root().join(&rec.file);
    let bytes = std::fs::read(&path).map_err(|e| {
        AdapterError::Damaged(format!(
            "the file of adapter version {}, {}, cannot be read: {e}",
            rec.version,
            path.display()
        ))
    })?;
    if let Some(want) = &rec.sha256 {
        let got = crate::digest::sha256_hex(&bytes);
        if &got != want {
            return Err(AdapterError::Damaged(format!(
                "the file of adapter version {}, {}, has changed since it was saved (sha256 {}…, recorded {}…)",
                rec.version,
                path.display(),
                &got[..12],
                want.chars().take(12).collect::<String>()
            )));
        }
    }
    parse_file(&path, &bytes).map_err(|e| match e {
        AdapterError::Damaged(m) => AdapterError::Damaged(m),
        other => AdapterError::Damaged(format!(
            "adapter version {} is damaged: {other}",
            rec.version
        )),
    })
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
    let (w, fm) = read_checked(home, rec)?;
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

/// The active adapter of this model, or, when its file is damaged (changed since it was
/// saved, unreadable, not finite, not this model's shapes), the nearest good version among its
/// parents, or none (the base model). The second value says what happened, for the user; the
/// fallback is recorded as the active version when the database can be written.
#[allow(clippy::type_complexity)]
pub fn load_active_or_fallback(
    home: &Home,
    store: &Store,
    model: &ModelId,
    cfg: &Config,
) -> Result<(Option<(AdapterRecord, LoraWeights)>, Option<String>)> {
    let Some(first) = store.active_adapter(&model.sha256)? else {
        return Ok((None, None));
    };
    let first_err = match load_version(home, &first, model, cfg) {
        Ok(w) => return Ok((Some((first, w)), None)),
        Err(e) => e,
    };
    let mut seen = vec![first.version];
    let mut next = first.parent;
    let mut found = None;
    while let Some(v) = next.filter(|v| !seen.contains(v)) {
        seen.push(v);
        let Some(rec) = store.adapter(v)? else { break };
        next = rec.parent;
        if let Ok(w) = load_version(home, &rec, model, cfg) {
            found = Some((rec, w));
            break;
        }
    }
    let to = found.as_ref().map(|(r, _)| r.version);
    let recorded = store.set_active_adapter(&model.sha256, to).is_ok();
    let instead = match to {
        Some(v) => format!("adapter v{v}"),
        None => "the base model".to_string(),
    };
    let msg = format!(
        "warning: adapter v{} cannot be used ({first_err}); answering with {instead}{}",
        first.version,
        if recorded {
            format!(", which is active now (`hone adapters list`; `hone adapters use {}` once its file is restored)", first.version)
        } else {
            String::new()
        }
    );
    Ok((found, Some(msg)))
}

/// Makes `version` active (it must belong to its model; any model's adapter can be chosen).
/// Its file is checked first (sha256 recorded at save, finite weights): a damaged file is
/// refused and the active version stays.
pub fn use_version(home: &Home, store: &Store, version: i64) -> Result<AdapterRecord> {
    let rec = store
        .adapter(version)?
        .ok_or(AdapterError::NoVersion(version))?;
    read_checked(home, &rec).map_err(|e| {
        AdapterError::Damaged(format!(
            "{e}; adapter version {version} was not activated (the active version is unchanged)"
        ))
    })?;
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

/// A version as the user writes it: `3` or `v3`.
pub fn parse_version(text: &str) -> Result<i64> {
    text.trim_start_matches('v')
        .parse()
        .map_err(|source| AdapterError::BadVersion {
            text: text.to_string(),
            source,
        })
}

/// Exports `version` (else the model's active one) of the model `model` with shapes `cfg` to
/// `out`: llama.cpp's GGUF adapter for `format` "gguf", else a PEFT folder naming `base_model`.
/// Returns the version exported.
pub fn export(
    home: &Home,
    store: &Store,
    model: &ModelId,
    cfg: &Config,
    version: Option<i64>,
    format: &str,
    out: &Path,
) -> Result<i64> {
    let rec = match version {
        Some(v) => store.adapter(v)?.ok_or(AdapterError::NoVersion(v))?,
        None => store.active_adapter(&model.sha256)?.ok_or_else(|| {
            AdapterError::Other("no adapter is active for this model; name a VERSION".into())
        })?,
    };
    let w = load_version(home, &rec, model, cfg)?;
    match format {
        "gguf" => export_gguf(
            &w,
            &model.architecture,
            &format!("hone adapter v{}", rec.version),
            out,
        )?,
        _ => export_peft(&w, cfg, &model.name, out)?,
    }
    Ok(rec.version)
}

/// `hone adapters list`: one line per version (the active one marked `*`: date, model, parent,
/// steps, first and last loss, size, data), a hint when there is none, or with `json` one
/// object per line.
pub fn list_text(records: &[AdapterRecord], json: bool) -> Result<String> {
    use std::fmt::Write as _;
    let mut s = String::new();
    if json {
        for r in records {
            let line = serde_json::to_string(r).map_err(|e| AdapterError::Other(e.to_string()))?;
            let _ = writeln!(s, "{line}");
        }
        return Ok(s);
    }
    if records.is_empty() {
        s.push_str("no adapters yet: train one with `hone train --data FILE.jsonl`\n");
    }
    for r in records {
        let losses: Vec<f32> = r
            .loss_curve
            .as_deref()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{} v{:<3} {} {} parent {} | {} steps, loss {:.3} -> {:.3} | {} params, {} | {}",
            if r.active { "*" } else { " " },
            r.version,
            &r.created_at[..r.created_at.len().min(19)],
            r.model,
            r.parent.map(|p| format!("v{p}")).unwrap_or("-".into()),
            r.steps,
            losses.first().copied().unwrap_or(f32::NAN),
            losses.last().copied().unwrap_or(f32::NAN),
            r.params,
            crate::sys::human_bytes(r.bytes),
            r.data.as_deref().unwrap_or("")
        );
    }
    Ok(s)
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

/// The identity of the chosen model, its architecture read from the file's header (the model
/// is not loaded).
pub fn model_id_of(store: &Store, choice: &ModelChoice) -> anyhow::Result<ModelId> {
    use anyhow::Context;
    let arch = crate::gguf::GgufFile::open(&choice.path)
        .and_then(|f| f.architecture())
        .with_context(|| format!("reading {}", choice.path.display()))?;
    Ok(model_id(store, choice, &arch)?)
}

/// The active adapter version of the chosen model, if any (the same lookup `ask` does, without
/// loading the model); None when the file cannot be read.
pub fn active_version_of(store: &Store, choice: &ModelChoice) -> Option<i64> {
    let arch = crate::gguf::GgufFile::open(&choice.path)
        .ok()
        .and_then(|f| f.architecture().ok())?;
    let id = model_id(store, choice, &arch).ok()?;
    store
        .active_adapter(&id.sha256)
        .ok()
        .flatten()
        .map(|r| r.version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::lora::Target;
    use crate::tiny::{write_tiny_model, TinySpec};

    struct Fixture {
        _dir: tempfile::TempDir,
        home: Home,
        store: Store,
        id: ModelId,
        cfg: Config,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        write_tiny_model(&p, &TinySpec::default()).unwrap();
        let cfg = Config::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
        let home = Home::at(dir.path().join("home"));
        home.ensure().unwrap();
        let store = Store::open(&home.db_path()).unwrap();
        let id = ModelId {
            name: "tiny".into(),
            sha256: "ab".repeat(32),
            architecture: "llama".into(),
        };
        Fixture {
            _dir: dir,
            home,
            store,
            id,
            cfg,
        }
    }

    fn weights(f: &Fixture, seed: u64) -> LoraWeights {
        let lc =
            LoraConfig::top_layers(4, 8.0, vec![Target::Q, Target::V], f.cfg.n_layers, 2).unwrap();
        LoraWeights::init(&lc, &f.cfg, seed).unwrap()
    }

    fn save(f: &mut Fixture, seed: u64, parent: Option<i64>) -> i64 {
        let w = weights(f, seed);
        let nv = NewVersion {
            parent,
            ..NewVersion::default()
        };
        save_version(&f.home, &mut f.store, &f.id, &w, &nv, true).unwrap()
    }

    #[test]
    fn writer_versions_never_become_answering_adapters() {
        let mut f = fixture();
        let answering = save(&mut f, 1, None);
        let w = weights(&f, 2);
        let nv = NewVersion::default();
        let w1 = save_kind(Kind::Writer, &f.home, &mut f.store, &f.id, &w, &nv, true).unwrap();
        let nv2 = NewVersion {
            parent: Some(w1),
            ..NewVersion::default()
        };
        let w2 = save_kind(Kind::Writer, &f.home, &mut f.store, &f.id, &w, &nv2, true).unwrap();
        assert!(f
            .home
            .root()
            .join(format!("writers/w{w2}.safetensors"))
            .is_file());
        // The answering adapter is untouched and no writer is listed among adapters.
        let active = f.store.active_adapter(&f.id.sha256).unwrap().unwrap();
        assert_eq!(active.version, answering);
        assert_eq!(f.store.adapters().unwrap().len(), 1);
        assert_eq!(
            f.store
                .active_writer(&f.id.sha256)
                .unwrap()
                .unwrap()
                .version,
            w2
        );
        // `hone adapters use` on a writer's number finds no such adapter (or another one).
        assert!(use_version(&f.home, &f.store, w2).is_err() || w2 == answering);
        // Writer use / rollback move only the writer.
        crate::learn::writer::use_version(&f.home, &f.store, w1).unwrap();
        assert_eq!(
            f.store
                .active_writer(&f.id.sha256)
                .unwrap()
                .unwrap()
                .version,
            w1
        );
        crate::learn::writer::use_version(&f.home, &f.store, w2).unwrap();
        let (from, to) = crate::learn::writer::rollback(&f.store, &f.id.sha256).unwrap();
        assert_eq!((from, to), (w2, Some(w1)));
        assert_eq!(
            f.store
                .active_adapter(&f.id.sha256)
                .unwrap()
                .unwrap()
                .version,
            answering
        );
        // A writer loads for its model and is refused for another.
        let choice = crate::learn::writer::WriterChoice::Active;
        let got = crate::learn::writer::load(&f.home, &f.store, &f.id, &f.cfg, &choice).unwrap();
        assert_eq!(got.version, Some(w1));
        let file = crate::learn::writer::WriterChoice::File(
            f.home.root().join(format!("writers/w{w1}.safetensors")),
        );
        let other = ModelId {
            sha256: "cd".repeat(32),
            ..f.id.clone()
        };
        let e = crate::learn::writer::load(&f.home, &f.store, &other, &f.cfg, &file)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("not for tiny"), "{e:#}");
        // An f16 export is half the size and reads back within half precision.
        let (w32, meta) = read_checked(&f.home, &f.store.writer(w1).unwrap().unwrap()).unwrap();
        let b32 = file_bytes(&w32, &meta, false).unwrap();
        let b16 = file_bytes(&w32, &meta, true).unwrap();
        assert!(
            b16.len() * 10 < b32.len() * 6,
            "{} vs {}",
            b16.len(),
            b32.len()
        );
        let (w16, _) = parse_file(Path::new("w.f16"), &b16).unwrap();
        for (k, p) in &w32.pairs {
            let a = p.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = w16.pairs[k]
                .a
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-3 * x.abs().max(1e-2), "{x} vs {y}");
            }
        }
    }

    /// Overwrites the last 4 bytes of version `v`'s file (a B or A value) with `value`.
    fn damage(f: &Fixture, v: i64, value: f32) {
        let p = f.home.root().join(format!("adapters/v{v}.safetensors"));
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 4..].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&p, b).unwrap();
    }

    fn with_nan(f: &Fixture) -> LoraWeights {
        let mut w = weights(f, 3);
        let key = *w.pairs.keys().next().unwrap();
        let p = w.pairs.get_mut(&key).unwrap();
        let (r, n) = p.a.dims2().unwrap();
        let mut v = vec![0.1f32; r * n];
        v[5] = f32::NAN;
        p.a = Tensor::from_vec(v, (r, n), &candle_core::Device::Cpu).unwrap();
        w
    }

    #[test]
    fn a_version_records_its_sha256_and_loads() {
        let mut f = fixture();
        let v = save(&mut f, 1, None);
        let rec = f.store.adapter(v).unwrap().unwrap();
        let file = std::fs::read(f.home.root().join(&rec.file)).unwrap();
        assert_eq!(
            rec.sha256.as_deref(),
            Some(crate::digest::sha256_hex(&file).as_str())
        );
        load_version(&f.home, &rec, &f.id, &f.cfg).unwrap();
    }

    #[test]
    fn non_finite_weights_are_never_saved() {
        let mut f = fixture();
        let w = with_nan(&f);
        let err = save_version(
            &f.home,
            &mut f.store,
            &f.id,
            &w,
            &NewVersion::default(),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("NaN") && err.contains("previous adapter stays"),
            "{err}"
        );
        assert!(f.store.adapters().unwrap().is_empty());
    }

    #[test]
    fn a_changed_file_is_refused_by_use_and_load() {
        let mut f = fixture();
        let v1 = save(&mut f, 1, None);
        let v2 = save(&mut f, 2, Some(v1));
        for bad in [f32::NAN, 1e30, f32::from_bits(u32::MAX), 0.5] {
            damage(&f, v1, bad);
            let err = use_version(&f.home, &f.store, v1).unwrap_err().to_string();
            assert!(err.contains("not activated"), "{err}");
            assert!(err.contains("v1.safetensors"), "{err}");
            // v2 stays active.
            let active = f.store.active_adapter(&f.id.sha256).unwrap().unwrap();
            assert_eq!(active.version, v2);
            let rec = f.store.adapter(v1).unwrap().unwrap();
            assert!(matches!(
                load_version(&f.home, &rec, &f.id, &f.cfg),
                Err(AdapterError::Damaged(_))
            ));
        }
    }

    #[test]
    fn a_file_without_a_recorded_hash_is_still_checked_for_finite_weights() {
        let mut f = fixture();
        let v1 = save(&mut f, 1, None);
        f.store
            .conn()
            .execute("UPDATE adapters SET sha256 = NULL", [])
            .unwrap();
        damage(&f, v1, f32::INFINITY);
        let rec = f.store.adapter(v1).unwrap().unwrap();
        let err = load_version(&f.home, &rec, &f.id, &f.cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("inf") && err.contains("not a finite number"),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_active_adapter_falls_back_to_its_parent_then_the_base() {
        let mut f = fixture();
        let v1 = save(&mut f, 1, None);
        let v2 = save(&mut f, 2, Some(v1));
        // Good: no warning.
        let (got, warn) = load_active_or_fallback(&f.home, &f.store, &f.id, &f.cfg).unwrap();
        assert_eq!(got.unwrap().0.version, v2);
        assert!(warn.is_none());
        // v2 damaged: v1 answers, is made active, and it is said once.
        damage(&f, v2, f32::NAN);
        let (got, warn) = load_active_or_fallback(&f.home, &f.store, &f.id, &f.cfg).unwrap();
        assert_eq!(got.unwrap().0.version, v1);
        let warn = warn.unwrap();
        assert!(
            warn.contains("adapter v2 cannot be used") && warn.contains("adapter v1"),
            "{warn}"
        );
        let (_, again) = load_active_or_fallback(&f.home, &f.store, &f.id, &f.cfg).unwrap();
        assert!(again.is_none(), "said once: {again:?}");
        // A structurally broken v1 (truncated) and v2: the base model answers.
        let p1 = f.home.root().join(format!("adapters/v{v1}.safetensors"));
        std::fs::write(&p1, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
        let (got, warn) = load_active_or_fallback(&f.home, &f.store, &f.id, &f.cfg).unwrap();
        assert!(got.is_none());
        assert!(warn.unwrap().contains("the base model"));
        assert!(f.store.active_adapter(&f.id.sha256).unwrap().is_none());
    }
}
