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
        for (name, info) in &this.content.tensor_infos {
            this.extent(name, info)?;
        }
        Ok(this)
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
        let elems = info.shape.elem_count();
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
