//! Builds the tokenizer from a GGUF file's own metadata, so that hone splits text into exactly
//! the token ids llama.cpp gives for the same file (checked against a fixture of llama.cpp's
//! output in `tests/tokenizer_fixture.rs`).
//!
//! The BPE itself is the `tokenizers` crate; this module supplies what candle's
//! `Tokenizer::from_gguf` gets wrong: the pre-tokenizer regexes per `tokenizer.ggml.pre` (as in
//! llama.cpp's `llama-vocab.cpp`), no prefix space, and special tokens matched whole before BPE.
//! It must not know about chat formats (that is `template`) or sampling.

use crate::gguf::{GgufError, GgufFile};
use std::collections::{HashMap, HashSet};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model {model:?} is not supported (hone reads byte-level BPE, tokenizer.ggml.model = \"gpt2\")")]
    UnsupportedModel { path: String, model: String },
    #[error("{path}: cannot build the tokenizer: {message}")]
    Build { path: String, message: String },
    #[error("tokenizer: {0}")]
    Run(String),
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The GPT-2 pre-tokenizer regex (also the second stage of "smollm"/"starcoder").
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Qwen2's regex, as in its tokenizer.json.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's regex (pre "llama-bpe").
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes, applied in order, for a `tokenizer.ggml.pre` value.
fn pre_regexes(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            &[r"\p{N}", GPT2_REGEX]
        }
        "gpt2" | "default" | "mpt" | "olmo" | "jais" => &[GPT2_REGEX],
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => &[QWEN2_REGEX],
        "llama-bpe" | "llama3" | "smaug-bpe" => &[LLAMA3_REGEX],
        _ => return None,
    })
}

/// A tokenizer built from a GGUF file.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Same vocabulary, but special tokens in text are plain text (for untrusted text).
    literal: tokenizers::Tokenizer,
    tokens: Vec<String>,
    special: HashSet<u32>,
    by_text: HashMap<String, u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end a turn or the text: generation stops on any of them.
    pub stop_tokens: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let path = file.path().display().to_string();
        let build = |message: String| TokenizerError::Build {
            path: path.clone(),
            message,
        };
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel { path, model });
        }
        let pre = file
            .get_opt_str("tokenizer.ggml.pre")
            .unwrap_or_else(|| "default".to_string());
        let regexes = pre_regexes(&pre).ok_or_else(|| {
            build(format!(
                "pre-tokenizer {pre:?} is not known to hone (known: smollm, gpt2, qwen2, llama-bpe)"
            ))
        })?;
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let types = file
            .get_i64_array("tokenizer.ggml.token_type")
            .unwrap_or_else(|_| vec![1; tokens.len()]);
        let merges = file.get_str_array("tokenizer.ggml.merges")?;
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| {
                let (a, b) = m.split_once(' ')?;
                Some((a.to_string(), b.to_string()))
            })
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .map_err(|e| build(format!("BPE: {e}")))?;

        let mut pres: Vec<PreTokenizerWrapper> = Vec::new();
        for re in regexes {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| build(format!("regex {re}: {e}")))?;
            pres.push(split.into());
        }
        pres.push(ByteLevel::new(false, false, false).into());

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(pres)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let mut special = HashSet::new();
        let mut added = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(types.iter()).enumerate() {
            if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
                let is_control = *ty == TOKEN_TYPE_CONTROL;
                if is_control {
                    special.insert(i as u32);
                }
                added.push(AddedToken::from(t.clone(), is_control).normalized(false));
            }
        }
        inner
            .add_special_tokens(added)
            .map_err(|e| build(format!("special tokens: {e}")))?;
        let mut literal = inner.clone();
        literal.set_encode_special_tokens(true);

        let bos = file
            .get_opt_u64("tokenizer.ggml.bos_token_id")
            .map(|v| v as u32);
        let eos = file
            .get_opt_u64("tokenizer.ggml.eos_token_id")
            .map(|v| v as u32);
        let add_bos = file
            .get_opt_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(false);
        let mut stop_tokens: Vec<u32> = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = file.get_opt_u64(key) {
                stop_tokens.push(id as u32);
            }
        }
        for name in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end|>",
            "<end_of_turn>",
        ] {
            if let Some(&id) = vocab.get(name) {
                if special.contains(&id) && !stop_tokens.contains(&id) {
                    stop_tokens.push(id);
                }
            }
        }
        Ok(Self {
            inner,
            literal,
            by_text: vocab,
            tokens,
            special,
            bos,
            eos,
            add_bos,
            stop_tokens,
        })
    }

    /// Token ids for `text`. With `parse_special`, special-token text such as `<|im_start|>`
    /// becomes that one token (as llama.cpp does for templates); without it, it is plain text.
    /// No BOS is added here.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let tk = if parse_special {
            &self.inner
        } else {
            &self.literal
        };
        let enc = tk
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Run(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text for `ids`; special tokens are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Run(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }
}

/// Turns a stream of token ids into text pieces, holding back bytes that do not yet form
/// complete UTF-8 characters (byte-level BPE may split a character across tokens).
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prev: usize,
    cur: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prev..self.cur], true)?;
        let after = tok.decode(&self.ids[self.prev..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let piece = after.get(before.len()..).unwrap_or(&after).to_string();
            self.prev = self.cur;
            self.cur = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (at the end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let before = tok.decode(&self.ids[self.prev..self.cur], true)?;
        let after = tok.decode(&self.ids[self.prev..], true)?;
        self.prev = self.ids.len();
        self.cur = self.ids.len();
        if after.len() > before.len() {
            Ok(Some(
                after.get(before.len()..).unwrap_or(&after).to_string(),
            ))
        } else {
            Ok(None)
        }
    }
}
