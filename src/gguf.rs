//! Opens GGUF model files: memory-maps them (memmap2), validates the header and that every
//! tensor lies inside the file, and hands out metadata and quantised tensors.
//!
//! It must not interpret an architecture (that is `model`) or build a tokenizer (that is
//! `tokenizer`); it only answers "what is in this file" and fails with an error that names
//! the file and the fix.

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use memmap2::Mmap;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Architectures whose forward pass `model` implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// No tensor of a model hone can run has more elements than this (2^36: 256 GiB of f32).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 36;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF model file (it starts with {found}, a GGUF file starts with \"GGUF\"); check the path, or convert the model to GGUF with llama.cpp's convert_hf_to_gguf.py")]
    NotGguf { path: PathBuf, found: String },
    #[error("{path} is a damaged or truncated GGUF file ({reason}); download it again (for a pulled model: hone pull --force NAME)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} has no metadata key {key:?} (or it has the wrong type); this GGUF file was not written for hone's architectures")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path} has no tensor {name:?}; the file is incomplete or for another architecture")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path} is a {arch:?} model; hone runs {supported} models (try smollm2-135m-instruct or qwen2.5-coder-0.5b-instruct)")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    #[error("{path}: {message}")]
    Tensor { path: PathBuf, message: String },
}

/// A GGUF file, memory-mapped, whose header has been parsed and checked.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("bytes", &self.mmap.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` and validates it: magic, header, metadata and the extent of every tensor.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path).map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; hone never writes model files in place (pulls rename a
        // finished file into place), so the bytes do not change under us in normal use.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            let head = &mmap[..mmap.len().min(4)];
            let found = if head.is_empty() {
                "nothing (the file is empty)".to_string()
            } else {
                format!("{:?}", String::from_utf8_lossy(head))
            };
            return Err(GgufError::NotGguf {
                path: path.to_path_buf(),
                found,
            });
        }
        // Walk the header ourselves first, with every length and count bounded by the file, so
        // that what candle's reader is given cannot make it divide by zero (an alignment of 0)
        // or allocate without bound.
        let layout = header_layout(&mmap).map_err(|reason| GgufError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("header: {reason}"),
        })?;
        let mut cursor = std::io::Cursor::new(&mmap[..]);
        let content = Content::read(&mut cursor).map_err(|e| GgufError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("header: {e}"),
        })?;
        let this = Self {
            path: path.to_path_buf(),
            mmap,
            content,
        };
        let mut extents = Vec::with_capacity(this.content.tensor_infos.len());
        for (name, info) in &this.content.tensor_infos {
            let (start, end) = this.extent(name, info)?;
            if info.offset % layout.alignment != 0 {
                return Err(this.corrupt(format!(
                    "tensor {name} has offset {}, not a multiple of the file's alignment {}",
                    info.offset, layout.alignment
                )));
            }
            extents.push((start, end, name.as_str()));
        }
        // Writers (llama.cpp, gguf-py, candle) lay tensors out back to back, each padded to the
        // alignment: an overlap or a gap means an offset, a type or a shape was changed.
        extents.sort();
        let data_start = this.content.tensor_data_offset;
        if let (Some(first), Some(last)) = (extents.first(), extents.last()) {
            if first.0 as u64 != data_start {
                return Err(this.corrupt(format!(
                    "the first tensor, {}, starts {} bytes after the tensor data",
                    first.2,
                    first.0 as u64 - data_start.min(first.0 as u64)
                )));
            }
            let padded = (last.1 as u64).div_ceil(layout.alignment) * layout.alignment;
            if (this.mmap.len() as u64) > padded {
                return Err(this.corrupt(format!(
                    "there are {} unexplained bytes after the last tensor, {}",
                    this.mmap.len() as u64 - last.1 as u64,
                    last.2
                )));
            }
        }
        for pair in extents.windows(2) {
            let (_, prev_end, prev) = pair[0];
            let (next_start, _, next) = pair[1];
            if next_start < prev_end {
                return Err(this.corrupt(format!(
                    "tensors {prev} and {next} overlap (bytes {next_start}..{prev_end})"
                )));
            }
            let padded = (prev_end as u64).div_ceil(layout.alignment) * layout.alignment;
            if next_start as u64 > padded {
                return Err(this.corrupt(format!(
                    "there are {} unexplained bytes between tensors {prev} and {next}",
                    next_start as u64 - prev_end as u64
                )));
            }
        }
        Ok(this)
    }

    fn corrupt(&self, reason: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String, GgufError> {
        self.get_str("general.architecture")
    }

    /// Fails unless the architecture is one `model` implements.
    pub fn require_supported(&self) -> Result<String, GgufError> {
        let arch = self.architecture()?;
        if SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            Ok(arch)
        } else {
            Err(GgufError::UnsupportedArchitecture {
                path: self.path.clone(),
                arch,
                supported: SUPPORTED_ARCHITECTURES.join(" and "),
            })
        }
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<String, GgufError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(self.missing(key)),
        }
    }

    pub fn get_opt_str(&self, key: &str) -> Option<String> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// An unsigned integer of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_opt_u64(key).ok_or_else(|| self.missing(key))
    }

    pub fn get_opt_u64(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::U8(v) => Some(*v as u64),
            Value::U16(v) => Some(*v as u64),
            Value::U32(v) => Some(*v as u64),
            Value::U64(v) => Some(*v),
            Value::I8(v) if *v >= 0 => Some(*v as u64),
            Value::I16(v) if *v >= 0 => Some(*v as u64),
            Value::I32(v) if *v >= 0 => Some(*v as u64),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }

    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.get_opt_f32(key).ok_or_else(|| self.missing(key))
    }

    pub fn get_opt_f32(&self, key: &str) -> Option<f32> {
        match self.get(key)? {
            Value::F32(v) => Some(*v),
            Value::F64(v) => Some(*v as f32),
            _ => None,
        }
    }

    pub fn get_opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(v) => Some(*v),
            _ => None,
        }
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<String>, GgufError> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.missing(key)),
                })
                .collect(),
            _ => Err(self.missing(key)),
        }
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    Value::U8(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    _ => Err(self.missing(key)),
                })
                .collect(),
            _ => Err(self.missing(key)),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.content.tensor_infos.keys()
    }

    /// Shape (candle order: rows first) and type of a tensor.
    pub fn tensor_info(&self, name: &str) -> Result<(Vec<usize>, GgmlDType), GgufError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// Byte range of a tensor's data inside the file, checked against the file's length.
    fn extent(&self, name: &str, info: &TensorInfo) -> Result<(usize, usize), GgufError> {
        let corrupt = |reason: String| GgufError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        // Shape's own element count multiplies without checking: 576 x 2^63 wraps to 0.
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| {
                corrupt(format!(
                    "tensor {name} has dimensions {:?}, impossibly large",
                    info.shape.dims()
                ))
            })?;
        let block = info.ggml_dtype.block_size();
        if block == 0 || !elems.is_multiple_of(block) {
            return Err(corrupt(format!(
                "tensor {name} has {elems} elements, not a multiple of its block size {block}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .ok_or_else(|| corrupt(format!("tensor {name} is impossibly large")))?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .ok_or_else(|| corrupt(format!("tensor {name} has an impossible offset")))?;
        let end = start
            .checked_add(bytes as u64)
            .ok_or_else(|| corrupt(format!("tensor {name} has an impossible offset")))?;
        if end > self.mmap.len() as u64 {
            return Err(corrupt(format!(
                "tensor {name} needs bytes {start}..{end} but the file has only {} bytes",
                self.mmap.len()
            )));
        }
        if start % 4 != 0 {
            return Err(corrupt(format!(
                "tensor {name} starts at unaligned offset {start}"
            )));
        }
        Ok((start as usize, end as usize))
    }

    /// Copies a tensor out of the map into quantised storage on `device`.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor, GgufError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let (start, end) = self.extent(name, info)?;
        let err = |e: candle_core::Error| GgufError::Tensor {
            path: self.path.clone(),
            message: format!("tensor {name}: {e}"),
        };
        let storage = QStorage::from_data(
            Cow::Borrowed(&self.mmap[start..end]),
            device,
            info.ggml_dtype,
        )
        .map_err(err)?;
        // The bytes now live in `storage`: let the kernel drop the mapped pages, so loading
        // does not hold the file twice (peak RSS close to the model's size, not double).
        #[cfg(unix)]
        // SAFETY: the map is a read-only private file mapping; dropped pages are re-read from
        // the file if touched again, so no data can be lost or changed.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                end - start,
            );
        }
        QTensor::new(storage, info.shape.clone()).map_err(err)
    }

    /// A tensor dequantised to f32 (for small tensors such as norms and biases).
    pub fn tensor_f32(
        &self,
        name: &str,
        device: &Device,
    ) -> Result<candle_core::Tensor, GgufError> {
        let q = self.qtensor(name, device)?;
        q.dequantize(device).map_err(|e| GgufError::Tensor {
            path: self.path.clone(),
            message: format!("tensor {name}: {e}"),
        })
    }
}

/// Where each tensor's header fields sit in a GGUF file, found by walking the header with every
/// count and length checked against the bytes that remain. Used to validate a file before
/// candle's reader sees it, and by tests and fuzz targets that mutate single fields.
#[derive(Debug, Clone)]
pub struct HeaderLayout {
    pub version: u32,
    /// `general.alignment` as candle reads it (32 when absent or of another type).
    pub alignment: u64,
    pub tensors: Vec<TensorField>,
    /// Where the tensor data begins (a tensor's bytes start at this plus its offset).
    pub data_start: u64,
}

/// One tensor's header entry: its values and the byte positions of its fields.
#[derive(Debug, Clone)]
pub struct TensorField {
    pub name: String,
    /// Position of the u32 number of dimensions; the u64 dimensions follow it.
    pub n_dims_at: usize,
    pub dims: Vec<u64>,
    pub dtype_at: usize,
    pub dtype: u32,
    pub offset_at: usize,
    pub offset: u64,
}

struct Walk<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Walk<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8], String> {
        let start = self.pos;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "needs {n} bytes at {start} but the file ends at {}",
                    self.bytes.len()
                )
            })?;
        self.pos = end;
        Ok(&self.bytes[start..end])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    /// Skips a value of type `t`, returning it when it is an integer (for the alignment).
    fn value(&mut self, t: u32, depth: usize) -> Result<Option<i128>, String> {
        let fixed = |n: u64, w: &mut Self| -> Result<Option<i128>, String> {
            let b = w.take(n)?;
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(b);
            Ok(Some(u64::from_le_bytes(a) as i128))
        };
        match t {
            0 | 7 => fixed(1, self),
            1 => Ok(Some(self.take(1)?[0] as i8 as i128)),
            2 => fixed(2, self),
            3 => {
                let b = self.take(2)?;
                Ok(Some(i16::from_le_bytes([b[0], b[1]]) as i128))
            }
            4 => fixed(4, self),
            5 => Ok(Some(self.u32()? as i32 as i128)),
            6 => self.take(4).map(|_| None),
            8 => self.string().map(|_| None),
            9 => {
                if depth > 8 {
                    return Err("arrays nested too deeply".into());
                }
                let inner = self.u32()?;
                let len = self.u64()?;
                // Every element takes at least one byte.
                if len > (self.bytes.len() - self.pos) as u64 {
                    return Err(format!(
                        "an array of {len} elements is longer than the file"
                    ));
                }
                for _ in 0..len {
                    self.value(inner, depth + 1)?;
                }
                Ok(None)
            }
            10..=12 => self.take(8).map(|_| None),
            other => Err(format!("unknown metadata value type {other}")),
        }
    }
}

/// Walks a GGUF header (versions 2 and 3): metadata and tensor entries, bounded by the file.
pub fn header_layout(bytes: &[u8]) -> Result<HeaderLayout, String> {
    let mut w = Walk { bytes, pos: 0 };
    if w.take(4)? != b"GGUF" {
        return Err("no GGUF magic".into());
    }
    let version = w.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} (hone reads versions 2 and 3; convert the model again with a current llama.cpp)"
        ));
    }
    let n_tensors = w.u64()?;
    let n_kv = w.u64()?;
    let left = (bytes.len() - w.pos) as u64;
    if n_tensors > left / 24 || n_kv > left / 13 {
        return Err(format!(
            "the header declares {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold"
        ));
    }
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = w.string()?;
        let t = w.u32()?;
        let v = w.value(t, 0)?;
        // candle takes the alignment from unsigned or non-negative 8/16/32-bit integers only.
        if key == "general.alignment" && matches!(t, 0..=5) {
            match v {
                Some(a) if a >= 0 => alignment = a as u64,
                _ => {}
            }
        }
    }
    if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
        return Err(format!(
            "general.alignment is {alignment}; it must be a power of two no larger than 1 MiB"
        ));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = w.string()?;
        let n_dims_at = w.pos;
        let n_dims = w.u32()?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!(
                "tensor {name} has {n_dims} dimensions (a GGUF tensor has 1 to 4)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(w.u64()?);
        }
        let dtype_at = w.pos;
        let dtype = w.u32()?;
        let offset_at = w.pos;
        let offset = w.u64()?;
        tensors.push(TensorField {
            name,
            n_dims_at,
            dims,
            dtype_at,
            dtype,
            offset_at,
            offset,
        });
    }
    Ok(HeaderLayout {
        version,
        alignment,
        tensors,
        data_start: (w.pos as u64).div_ceil(alignment) * alignment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hparams::Config;
    use crate::tiny::{write_tiny_model, TinySpec};

    /// A tiny model's bytes and the position of its header fields.
    fn tiny(spec: &TinySpec) -> (tempfile::TempDir, Vec<u8>, HeaderLayout) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_tiny_model(&p, spec).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let layout = header_layout(&bytes).unwrap();
        (dir, bytes, layout)
    }

    /// Opens `bytes` as a model (file + hyper-parameters + tensor checks): Ok or a clean error.
    fn load(dir: &Path, bytes: &[u8]) -> Result<Config, String> {
        let p = dir.join("mutant.gguf");
        std::fs::write(&p, bytes).unwrap();
        let f = GgufFile::open(&p).map_err(|e| e.to_string())?;
        Config::from_gguf(&f).map_err(|e| e.to_string())
    }

    fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn the_tiny_models_load() {
        for arch in ["llama", "qwen2"] {
            let spec = TinySpec {
                arch: arch.into(),
                ..TinySpec::default()
            };
            let (dir, bytes, layout) = tiny(&spec);
            assert!(layout.tensors.len() >= 2 + 9 * spec.layers);
            load(dir.path(), &bytes).unwrap();
        }
    }

    #[test]
    fn a_dimension_of_2_pow_63_is_refused_not_wrapped() {
        let (dir, bytes, layout) = tiny(&TinySpec::default());
        let t = layout
            .tensors
            .iter()
            .find(|t| t.name == "blk.1.attn_v.weight")
            .unwrap();
        let mut b = bytes.clone();
        put_u64(&mut b, t.n_dims_at + 4 + 8, 1 << 63);
        let err = load(dir.path(), &b).unwrap_err();
        assert!(err.contains("blk.1.attn_v.weight"), "{err}");
        assert!(err.contains("mutant.gguf"), "{err}");
    }

    #[test]
    fn every_dimension_offset_and_type_mutant_is_refused() {
        let (dir, bytes, layout) = tiny(&TinySpec::default());
        let mut refused = 0;
        for t in &layout.tensors {
            for (i, &d) in t.dims.iter().enumerate() {
                for v in [
                    0,
                    1,
                    d + 1,
                    d * 2,
                    d / 2,
                    1 << 32,
                    1 << 62,
                    1 << 63,
                    u64::MAX,
                ] {
                    if v == d {
                        continue;
                    }
                    let mut b = bytes.clone();
                    put_u64(&mut b, t.n_dims_at + 4 + 8 * i, v);
                    let r = load(dir.path(), &b);
                    assert!(r.is_err(), "{} dim {i} = {v} was accepted", t.name);
                    refused += 1;
                }
            }
            for v in [
                t.offset + 32,
                t.offset + 1,
                t.offset.wrapping_sub(32),
                0,
                bytes.len() as u64,
                1 << 63,
                u64::MAX,
            ] {
                if v == t.offset {
                    continue;
                }
                let mut b = bytes.clone();
                put_u64(&mut b, t.offset_at, v);
                assert!(
                    load(dir.path(), &b).is_err(),
                    "{} offset {v} was accepted",
                    t.name
                );
                refused += 1;
            }
            for v in 0..40u32 {
                if v == t.dtype {
                    continue;
                }
                let mut b = bytes.clone();
                put_u32(&mut b, t.dtype_at, v);
                assert!(
                    load(dir.path(), &b).is_err(),
                    "{} type {v} was accepted",
                    t.name
                );
                refused += 1;
            }
            for v in [0, 1, 3, 4, 5, u32::MAX] {
                if v as usize == t.dims.len() {
                    continue;
                }
                let mut b = bytes.clone();
                put_u32(&mut b, t.n_dims_at, v);
                assert!(
                    load(dir.path(), &b).is_err(),
                    "{} rank {v} was accepted",
                    t.name
                );
                refused += 1;
            }
        }
        assert!(refused > 1000, "{refused}");
    }

    #[test]
    fn hyper_parameters_out_of_range_are_refused() {
        let spec = TinySpec::default();
        let (dir, bytes, _) = tiny(&spec);
        // The u32/u64 value of a metadata key, found by its name in the header.
        let find = |key: &str| {
            let pat = key.as_bytes();
            bytes
                .windows(pat.len())
                .position(|w| w == pat)
                .map(|i| i + pat.len())
                .unwrap()
        };
        for key in [
            "llama.block_count",
            "llama.embedding_length",
            "llama.feed_forward_length",
            "llama.attention.head_count",
        ] {
            let at = find(key);
            let t = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            for v in [0u64, 1 << 31, 1 << 63] {
                let mut b = bytes.clone();
                match t {
                    4 => put_u32(&mut b, at + 4, v as u32),
                    10 => put_u64(&mut b, at + 4, v),
                    _ => continue,
                }
                let err = load(dir.path(), &b);
                assert!(err.is_err(), "{key} = {v} was accepted");
            }
        }
    }

    #[test]
    fn random_header_bytes_never_panic() {
        let (dir, bytes, layout) = tiny(&TinySpec::default());
        let end = layout.tensors.last().map(|t| t.offset_at + 8).unwrap_or(64);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..400 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % end;
                b[at] = next() as u8;
            }
            let _ = load(dir.path(), &b);
        }
    }
}
