//! The inference engine: one loaded model (weights, tokenizer, chat template) that turns a
//! conversation into a streamed answer, and scores text (perplexity).
//!
//! It keeps the KV cache of the last prompt and reuses its longest common prefix, so a chat
//! turn only processes the new tokens. Generation is step-wise ([`Decoder`]: logits in, a
//! token and its text out), so `hone serve` can decode many answers in one batch with the same
//! sampling, stop and streaming rules. It must not touch the database or the terminal: callers
//! get text pieces through a callback and record what they want.

use crate::codec::{Codec, SoftTargets};
use crate::gguf::{GgufError, GgufFile};
use crate::lora::LoraWeights;
use crate::model::{KvCache, Logits, Model, ModelError};
use crate::sample::{Sampler, SamplingParams};
use crate::template::{ChatTemplate, Message, TemplateError};
use crate::tokenizer::{TextStream, Tokenizer, TokenizerError};
use candle_core::Device;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("{0}")]
    Other(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(e))
    }
}

type Result<T> = std::result::Result<T, EngineError>;

/// Which device runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Cpu,
    Metal,
}

impl Backend {
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "metal")]
            Backend::Metal => Device::new_metal(0).map_err(EngineError::from),
            #[cfg(not(feature = "metal"))]
            Backend::Metal => Err(EngineError::Other(
                "this hone was built without Metal support; rebuild on macOS with `cargo build --release --features metal`".into(),
            )),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Context length (tokens) to allocate for; capped at the model's trained context.
    pub ctx: usize,
    pub backend: Backend,
    /// Prompt tokens run per forward pass.
    pub batch: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ctx: 4096,
            backend: Backend::Cpu,
            batch: 256,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model ended its turn (EOS / end-of-turn token).
    Eos,
    MaxTokens,
    /// The caller cancelled (Ctrl-C).
    Cancelled,
    /// The context window is full.
    ContextFull,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::MaxTokens => "max_tokens",
            Self::Cancelled => "cancelled",
            Self::ContextFull => "context_full",
        }
    }
}

/// One generated answer with its timings.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    /// The generated token ids (without a stop token).
    #[serde(skip)]
    pub tokens: Vec<u32>,
    /// [`Engine::answer`] handed the question to the base model (the adapter's answer did not
    /// open with the route).
    pub by_base: bool,
    /// With a route: the probability the adapter gave its opening (see [`Engine::answer`]).
    pub route_p: Option<f64>,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the KV cache of the previous call.
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_ms: f64,
    pub generate_ms: f64,
    pub stop: StopReason,
}

impl Generation {
    /// Prompt tokens per second (over the tokens actually processed).
    pub fn prompt_tps(&self) -> f64 {
        let n = (self.prompt_tokens - self.reused_tokens) as f64;
        if self.prompt_ms > 0.0 {
            n / (self.prompt_ms / 1000.0)
        } else {
            0.0
        }
    }
    /// Generated tokens per second (first token excluded: it comes from the prompt pass).
    pub fn decode_tps(&self) -> f64 {
        if self.generate_ms > 0.0 && self.completion_tokens > 1 {
            (self.completion_tokens - 1) as f64 / (self.generate_ms / 1000.0)
        } else {
            0.0
        }
    }
}

/// Perplexity of a text, scored as llama.cpp's `llama-perplexity` does.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Standard error of the mean negative log-likelihood, carried to the perplexity.
    pub ppl_err: f64,
    pub chunks: usize,
    pub ctx: usize,
    pub scored_tokens: usize,
    pub text_tokens: usize,
    pub seconds: f64,
}

impl Perplexity {
    /// `hone perplexity --json`'s object for `model` and the text `file`.
    pub fn to_json(&self, model: &str, file: &Path) -> serde_json::Value {
        serde_json::json!({"model": model, "file": file, "ppl": self.ppl, "ppl_err": self.ppl_err,
               "chunks": self.chunks, "ctx": self.ctx, "scored_tokens": self.scored_tokens,
               "text_tokens": self.text_tokens, "seconds": self.seconds})
    }

    /// `hone perplexity`'s line for `model`.
    pub fn summary(&self, model: &str) -> String {
        format!(
            "{model}: perplexity {:.4} +/- {:.4} over {} chunks of {} tokens ({} scored, {:.1} s)",
            self.ppl, self.ppl_err, self.chunks, self.ctx, self.scored_tokens, self.seconds
        )
    }
}

/// The least probability of the route's opening for [`Engine::answer`] to keep the adapter's
/// answer (see BENCHMARKS.md: measured on the dev notes' questions and the general ones).
pub const ROUTE_MIN_P: f64 = 0.2;

/// The least probability of the route's opening for a question tied to a learned note by common
/// words alone ([`About::Common`]) to be answered from that note: a general question shares
/// common words with a note by chance ("How many days are there in a week?" and a bike hire at
/// "€50 for the week ... six days"), and the adapter, trained to open with the route on its
/// notes' questions and not on general ones, gives it next to nothing (BENCHMARKS.md).
pub const ABOUT_MIN_P: f64 = 0.01;

/// How a question is tied to a learned note (`retrieve::NoteMatch`), for
/// [`Engine::answer_routed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum About {
    /// Not about a learned note: the route decides, as for any question.
    No,
    /// By common words alone: the adapter answers from its weights when it gives the route's
    /// opening at least `Engine::about_min_p` ([`ABOUT_MIN_P`]).
    Common,
    /// By a rare word (a name, a place): the adapter answers from its weights, whatever opening
    /// it would have chosen.
    Rare,
}

/// Hold the text of the first `n` tokens back until the check has seen it (see
/// [`Engine::answer`]).
pub type Hold<'a> = (usize, Box<dyn Fn(&str) -> bool + 'a>);

/// What [`Decoder::step`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Run this token through the model and call `step` again with its logits.
    Feed(u32),
    /// The answer is over.
    Stop(StopReason),
}

/// One answer being generated, a token at a time: sampling, stop tokens, `max_tokens`, the
/// streamed detokenisation and the held opening of a routed answer. It never runs the model:
/// its caller feeds it logits ([`Engine::generate`] one sequence, `hone serve` a batch).
pub struct Decoder<'a> {
    sampler: Sampler,
    history: Vec<u32>,
    tokens: Vec<u32>,
    stream: TextStream,
    text: String,
    generated: usize,
    max_tokens: usize,
    hold: Option<Hold<'a>>,
    refused: bool,
    ignore_eos: bool,
}

impl<'a> Decoder<'a> {
    /// An answer to `prompt` of at most `max_tokens` tokens; with `hold`, the text of the first
    /// `n` tokens is held back until `keep` has seen it.
    pub fn new(
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        hold: Option<Hold<'a>>,
    ) -> Self {
        Self {
            sampler: Sampler::new(sampling.clone()),
            history: prompt.to_vec(),
            tokens: Vec::new(),
            stream: TextStream::new(),
            text: String::new(),
            generated: 0,
            max_tokens,
            hold,
            refused: false,
            ignore_eos: false,
        }
    }

    /// Never picks a stop token: the answer runs to `max_tokens` (llama-server's `ignore_eos`).
    pub fn ignoring_eos(mut self, ignore: bool) -> Self {
        self.ignore_eos = ignore;
        self
    }

    /// The last token picked that is part of the answer (never a stop token).
    pub fn last_token(&self) -> Option<&u32> {
        self.tokens.last()
    }

    /// Tokens generated so far (a stop token included).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Takes the logits after the last token run and picks the next token; `room` says
    /// whether the KV cache can take one more. Text is given to `on_text` as it decodes
    /// (unless held).
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        logits: &[f32],
        cancel: &AtomicBool,
        room: bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Step> {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Step::Stop(StopReason::Cancelled));
        }
        if self.generated >= self.max_tokens {
            return Ok(Step::Stop(StopReason::MaxTokens));
        }
        let tok = if self.ignore_eos {
            let mut l = logits.to_vec();
            for &t in &tokenizer.stop_tokens {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
            self.sampler.sample(&l, &self.history)
        } else {
            self.sampler.sample(logits, &self.history)
        };
        self.generated += 1;
        if tokenizer.is_stop(tok) {
            return Ok(Step::Stop(StopReason::Eos));
        }
        self.history.push(tok);
        self.tokens.push(tok);
        if let Some(piece) = self.stream.push(tokenizer, tok)? {
            if self.hold.is_none() {
                on_text(&piece);
            }
            self.text.push_str(&piece);
        }
        if self
            .hold
            .as_ref()
            .is_some_and(|(n, _)| self.generated >= *n)
            && !self.release(on_text)
        {
            self.refused = true;
            return Ok(Step::Stop(StopReason::Cancelled));
        }
        if !room {
            return Ok(Step::Stop(StopReason::ContextFull));
        }
        // Do not run the model for a token nobody will read.
        if cancel.load(Ordering::Relaxed) {
            return Ok(Step::Stop(StopReason::Cancelled));
        }
        if self.generated >= self.max_tokens {
            return Ok(Step::Stop(StopReason::MaxTokens));
        }
        Ok(Step::Feed(tok))
    }

    /// Decides on the held text; shows it when kept.
    fn release(&mut self, on_text: &mut dyn FnMut(&str)) -> bool {
        match self.hold.take() {
            Some((_, keep)) if !keep(&self.text) => false,
            _ => {
                on_text(&self.text);
                true
            }
        }
    }

    /// The end of the answer: the rest of the text, and (text, tokens, tokens generated), or
    /// None when the held opening was refused (nothing was shown).
    pub fn finish(
        mut self,
        tokenizer: &Tokenizer,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<(String, Vec<u32>, usize)>> {
        if self.refused {
            return Ok(None);
        }
        if let Some(piece) = self.stream.flush(tokenizer)? {
            if self.hold.is_none() {
                on_text(&piece);
            }
            self.text.push_str(&piece);
        }
        if self.hold.is_some() && !self.release(on_text) {
            return Ok(None);
        }
        Ok(Some((self.text, self.tokens, self.generated)))
    }
}

/// The log-probability of token `t` under the logits `row`.
fn log_p(row: &[f32], t: u32) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|v| (*v as f64 - m).exp()).sum();
    row.get(t as usize)
        .map_or(f64::NEG_INFINITY, |v| *v as f64 - m - z.ln())
}

/// Shown the logits of each position a generation runs, with the index of the token they predict.
type Observer<'a> = &'a mut dyn FnMut(usize, &[f32]);

/// The `k` most likely tokens under the logits (or log-probabilities) `row`, most likely first,
/// with their probabilities renormalised over those `k`.
fn top_k_probs(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.clamp(1, row.len().max(1));
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    if idx.is_empty() {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |a, b| row[*b as usize].total_cmp(&row[*a as usize]));
    idx.truncate(k);
    let m = idx
        .iter()
        .map(|&t| row[t as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut top: Vec<(u32, f32)> = idx
        .iter()
        .map(|&t| (t, (row[t as usize] - m).exp()))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let z: f32 = top.iter().map(|x| x.1).sum();
    if z > 0.0 && z.is_finite() {
        top.iter_mut().for_each(|x| x.1 /= z);
    }
    top
}

/// Greedy answers to many prompts being decoded together ([`Engine::decode_top_k`],
/// [`Engine::decode_until`]).
pub struct DecodeBatch {
    pending: VecDeque<(usize, Vec<u32>)>,
    active: Vec<BatchSeq>,
    ended: VecDeque<(usize, BatchAnswer)>,
    /// The KV cache of the prompts' common opening, once run.
    opening: Option<KvCache>,
    common: usize,
    width: usize,
    max_tokens: usize,
    /// Rows of the top-k kept per position (0: none).
    k: usize,
    /// Per prompt: the answer ends as soon as its text so far passes this.
    until: Vec<Option<Until>>,
}

/// A test of an answer's text so far that ends it ([`Engine::decode_until`]).
pub type Until = Box<dyn Fn(&str) -> bool + Send>;

#[derive(Clone, Copy)]
enum BatchState {
    Run,
    /// The answer hit `max_tokens`; its last token runs for the end of turn's row.
    Last(StopReason),
}

/// One answer of a [`DecodeBatch`] being decoded.
struct BatchSeq {
    index: usize,
    d: Decoder<'static>,
    cache: KvCache,
    /// Prompt and answer tokens in `cache`, in order.
    tokens: Vec<u32>,
    prompt_tokens: usize,
    reused: usize,
    logits: Vec<f32>,
    seen: SoftTargets,
    state: BatchState,
    /// The answer's text so far (for `until`).
    text: String,
    prompt_ms: f64,
    t1: Instant,
}

impl BatchSeq {
    fn finish(self, tokenizer: &Tokenizer, stop: StopReason) -> Result<(usize, BatchAnswer)> {
        let (text, tokens, generated) = self
            .d
            .finish(tokenizer, &mut |_| {})?
            .ok_or_else(|| EngineError::Other("a generation without a check was refused".into()))?;
        Ok((
            self.index,
            BatchAnswer {
                generation: Generation {
                    text,
                    tokens,
                    by_base: false,
                    route_p: None,
                    prompt_tokens: self.prompt_tokens,
                    reused_tokens: self.reused,
                    completion_tokens: generated,
                    prompt_ms: self.prompt_ms,
                    generate_ms: self.t1.elapsed().as_secs_f64() * 1000.0,
                    stop,
                },
                seen: self.seen,
                cache: self.cache,
                cache_tokens: self.tokens,
            },
        ))
    }
}

/// One answer of [`Engine::decode_top_k`]: the generation, the top-k rows seen while
/// generating it, and the KV cache they were computed on.
pub struct BatchAnswer {
    pub generation: Generation,
    pub seen: SoftTargets,
    cache: KvCache,
    cache_tokens: Vec<u32>,
}

/// A loaded model ready to answer.
pub struct Engine {
    pub name: String,
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub load_time: Duration,
    batch: usize,
    /// Tokens whose keys and values are in the model's KV cache, in order.
    cache_tokens: Vec<u32>,
    /// With an adapter set: [`Engine::answer`] keeps the adapter's answer only when it opens
    /// with this text, and otherwise lets the base model answer (see `learn::NOTES_PREFIX`).
    pub route: Option<String>,
    /// The least probability of the route's opening that keeps the adapter's answer
    /// ([`ROUTE_MIN_P`]).
    pub route_min_p: f64,
    /// The same for a question tied to a learned note by common words alone
    /// ([`ABOUT_MIN_P`]).
    pub about_min_p: f64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

impl Engine {
    /// Opens, checks and loads a GGUF model.
    pub fn load(name: &str, path: &Path, opts: &LoadOptions) -> Result<Self> {
        let t0 = Instant::now();
        let file = GgufFile::open(path)?;
        file.require_supported()?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or("")
                .to_string()
        };
        let template = ChatTemplate::from_gguf(&file, &text(tokenizer.bos), &text(tokenizer.eos))?;
        let device = opts.backend.device()?;
        let model = Model::load(&file, &device, opts.ctx)?;
        if tokenizer.vocab_size() > model.cfg.vocab {
            return Err(EngineError::Other(format!(
                "{}: the tokenizer has {} tokens but token_embd.weight has only {} rows; the file is damaged (download it again)",
                path.display(),
                tokenizer.vocab_size(),
                model.cfg.vocab
            )));
        }
        drop(file);
        Ok(Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            model,
            tokenizer,
            template,
            load_time: t0.elapsed(),
            batch: opts.batch.max(1),
            cache_tokens: Vec::new(),
            route: None,
            route_min_p: ROUTE_MIN_P,
            about_min_p: ABOUT_MIN_P,
        })
    }

    /// The prompt token ids for a conversation, ending with the assistant's turn opened.
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.text_tokens(&text, true)
    }

    /// Token ids of `text` with special tokens parsed, and BOS first when the model asks for
    /// it (and the text does not already start with it).
    pub fn text_tokens(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        Ok(self.codec().text_tokens(text, parse_special)?)
    }

    /// The tokenizer and chat template, borrowed together (what training data is built with).
    pub fn codec(&self) -> Codec<'_> {
        Codec {
            tokenizer: &self.tokenizer,
            template: &self.template,
        }
    }

    /// Forgets the KV cache (the next call processes its whole prompt).
    pub fn reset(&mut self) {
        self.cache_tokens.clear();
        self.model.clear_cache();
    }

    /// How many leading tokens of `tokens` the KV cache already holds.
    fn cached_prefix(&self, tokens: &[u32]) -> usize {
        self.cache_tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(self.model.cached_len())
    }

    /// Runs the prompt through the model, reusing the cached prefix; returns the logits of its
    /// last position and how many tokens were reused.
    fn prefill(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        if prompt.is_empty() {
            return Err(EngineError::Other("empty prompt".into()));
        }
        let mut common = self.cached_prefix(prompt);
        if common == prompt.len() {
            common -= 1; // at least one token must run to produce logits
        }
        self.model.truncate_cache(common);
        self.cache_tokens.truncate(common);
        let mut logits = None;
        for chunk in prompt[common..].chunks(self.batch) {
            let l = self.model.forward(chunk, Logits::Last)?;
            self.cache_tokens.extend_from_slice(chunk);
            logits = Some(l);
        }
        let logits = logits.ok_or_else(|| EngineError::Other("no prompt tokens ran".into()))?;
        Ok((logits.to_vec1::<f32>()?, common))
    }

    /// Generates an answer to the prompt tokens, calling `on_text` with each piece of text as
    /// it is decoded. Setting `cancel` stops it after the current token.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let g = self.generate_held(prompt, sampling, max_tokens, cancel, on_text, None, None)?;
        g.ok_or_else(|| EngineError::Other("a generation without a check was refused".into()))
    }

    /// [`Engine::generate`] with the whole answer held back until `keep` has seen it: None when
    /// `keep` refuses it (nothing was shown). For an answer that must pass a check before anyone
    /// reads it (`assistant::answer_with_notes`).
    pub fn generate_checked(
        &mut self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
        keep: Box<dyn Fn(&str) -> bool + '_>,
    ) -> Result<Option<Generation>> {
        let hold: Option<Hold<'_>> = Some((usize::MAX, keep));
        self.generate_held(prompt, sampling, max_tokens, cancel, on_text, hold, None)
    }

    /// [`Engine::generate`]'s greedy answer to `prompt`, keeping the model's `k` most likely
    /// tokens (renormalised over those `k`) at every position it predicted: `(i, top)` for the
    /// token at index `i` of prompt-and-answer, as [`Engine::top_k_targets`] gives them. When the
    /// answer stopped at `max_tokens`, the position after its last token is run too, so the end
    /// of the turn has its distribution. [`Engine::top_k_targets_reusing`] takes them.
    pub fn generate_top_k(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        k: usize,
        cancel: &AtomicBool,
    ) -> Result<(Generation, SoftTargets)> {
        let mut seen = Vec::new();
        let g = self.generate_held(
            prompt,
            &SamplingParams::default(),
            max_tokens,
            cancel,
            &mut |_| {},
            None,
            Some(&mut |i, logits| seen.push((i, top_k_probs(logits, k)))),
        )?;
        let g =
            g.ok_or_else(|| EngineError::Other("a generation without a check was refused".into()))?;
        Ok((g, seen))
    }

    /// [`Engine::generate_top_k`] for many prompts, `width` of them decoded together: one pass
    /// over the weights per step for all of them ([`Model::forward_batch`]), each with its own
    /// KV cache; a slot freed by an answer that ended takes the next prompt. The prompts' common
    /// opening runs once. [`Engine::next_answer`] gives the answers as they end.
    pub fn decode_top_k(
        &self,
        prompts: Vec<Vec<u32>>,
        width: usize,
        max_tokens: usize,
        k: usize,
    ) -> DecodeBatch {
        let mut common = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
        if let Some(first) = prompts.first() {
            for p in &prompts {
                common = common.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
            }
        }
        // At least one token of each prompt runs after the opening, for its logits.
        let common = common.saturating_sub(1);
        let until = prompts.iter().map(|_| None).collect();
        DecodeBatch {
            pending: prompts.into_iter().enumerate().collect(),
            active: Vec::new(),
            ended: VecDeque::new(),
            opening: None,
            common,
            width: width.max(1),
            max_tokens,
            k,
            until,
        }
    }

    /// Greedy answers to many prompts decoded together as [`Engine::decode_top_k`] does, without
    /// the top-k rows; each answer ends as soon as its text so far passes its `until` test
    /// (a probe's answer once it holds the expected span: greedy decoding cannot take it back).
    pub fn decode_until(
        &self,
        prompts: Vec<(Vec<u32>, Until)>,
        width: usize,
        max_tokens: usize,
    ) -> DecodeBatch {
        let (prompts, until): (Vec<Vec<u32>>, Vec<Until>) = prompts.into_iter().unzip();
        let mut b = self.decode_top_k(prompts, width, max_tokens, 0);
        b.until = until.into_iter().map(Some).collect();
        b
    }

    /// The next answer of `batch` to end, with its prompt's index, or None when all have.
    /// Each answer is the one `generate_top_k` gives its prompt alone, up to rounding (several
    /// rows are summed in another order), which can flip a near tie.
    pub fn next_answer(
        &mut self,
        batch: &mut DecodeBatch,
        cancel: &AtomicBool,
    ) -> Result<Option<(usize, BatchAnswer)>> {
        let max_ctx = self.model.max_context();
        let use_lora = self.model.adapter().is_some();
        let sampling = SamplingParams::default();
        loop {
            if let Some(a) = batch.ended.pop_front() {
                return Ok(Some(a));
            }
            while batch.active.len() < batch.width {
                let Some((index, p)) = batch.pending.pop_front() else {
                    break;
                };
                let t0 = Instant::now();
                self.room_for(p.len())?;
                let common = batch.common.min(p.len().saturating_sub(1));
                if batch.opening.is_none() {
                    let mut c = KvCache::new(&self.model);
                    for chunk in p[..common].chunks(self.batch) {
                        self.model
                            .forward_cached(&mut c, chunk, Logits::Last, use_lora)?;
                    }
                    batch.opening = Some(c);
                }
                let opening = batch.opening.as_ref().map_or(0, KvCache::len).min(common);
                let mut cache = match &batch.opening {
                    Some(c) => c.prefix_copy(opening, p.len() + batch.max_tokens + 2)?,
                    None => KvCache::new(&self.model),
                };
                let logits = self.prefill_into(&mut cache, &p[opening..], use_lora)?;
                batch.active.push(BatchSeq {
                    index,
                    d: Decoder::new(&p, &sampling, batch.max_tokens, None),
                    cache,
                    tokens: p.clone(),
                    prompt_tokens: p.len(),
                    reused: opening,
                    logits,
                    seen: Vec::new(),
                    state: BatchState::Run,
                    text: String::new(),
                    prompt_ms: t0.elapsed().as_secs_f64() * 1000.0,
                    t1: Instant::now(),
                });
            }
            if batch.active.is_empty() {
                return Ok(None);
            }
            let mut feed: Vec<(usize, u32)> = Vec::new();
            let mut i = 0;
            while i < batch.active.len() {
                let s = &mut batch.active[i];
                if batch.k > 0 {
                    s.seen
                        .push((s.cache.len(), top_k_probs(&s.logits, batch.k)));
                }
                let until = batch.until.get(s.index).and_then(Option::as_ref);
                let end = match s.state {
                    BatchState::Last(r) => Some(r),
                    BatchState::Run => {
                        let room = s.cache.len() < max_ctx;
                        let text = &mut s.text;
                        let on_text = &mut |piece: &str| text.push_str(piece);
                        match s
                            .d
                            .step(&self.tokenizer, &s.logits, cancel, room, on_text)?
                        {
                            // Enough said: what follows a greedy answer cannot take it back.
                            Step::Feed(_) if until.is_some_and(|u| u(&s.text)) => {
                                Some(StopReason::Cancelled)
                            }
                            Step::Feed(t) => {
                                feed.push((i, t));
                                None
                            }
                            Step::Stop(StopReason::MaxTokens) if s.cache.len() + 1 < max_ctx => {
                                match s.d.last_token() {
                                    Some(&last) => {
                                        s.state = BatchState::Last(StopReason::MaxTokens);
                                        feed.push((i, last));
                                        None
                                    }
                                    None => Some(StopReason::MaxTokens),
                                }
                            }
                            Step::Stop(r) => Some(r),
                        }
                    }
                };
                match end {
                    Some(stop) => {
                        let s = batch.active.remove(i);
                        // Indices in `feed` are below i: they stay valid.
                        let a = s.finish(&self.tokenizer, stop)?;
                        batch.ended.push_back(a);
                    }
                    None => i += 1,
                }
            }
            if feed.is_empty() {
                continue;
            }
            let toks: Vec<u32> = feed.iter().map(|f| f.1).collect();
            let lora = vec![use_lora; feed.len()];
            let mut caches: Vec<&mut KvCache> = Vec::with_capacity(feed.len());
            let mut next = feed.iter().peekable();
            for (i, s) in batch.active.iter_mut().enumerate() {
                if next.peek().is_some_and(|f| f.0 == i) {
                    next.next();
                    caches.push(&mut s.cache);
                }
            }
            let rows = self
                .model
                .forward_batch(&mut caches, &toks, &lora)?
                .to_vec2::<f32>()?;
            for (&(i, t), row) in feed.iter().zip(rows) {
                batch.active[i].tokens.push(t);
                batch.active[i].logits = row;
            }
        }
    }

    /// Every answer of [`Engine::decode_top_k`], in the prompts' order (each keeps its cache:
    /// for a few prompts; [`Engine::next_answer`] lets each go as it ends).
    pub fn generate_top_k_many(
        &mut self,
        prompts: &[Vec<u32>],
        width: usize,
        max_tokens: usize,
        k: usize,
        cancel: &AtomicBool,
    ) -> Result<Vec<BatchAnswer>> {
        let mut batch = self.decode_top_k(prompts.to_vec(), width, max_tokens, k);
        let mut out: Vec<Option<BatchAnswer>> = (0..prompts.len()).map(|_| None).collect();
        while let Some((i, a)) = self.next_answer(&mut batch, cancel)? {
            out[i] = Some(a);
        }
        out.into_iter()
            .map(|a| a.ok_or_else(|| EngineError::Other("an answer of a batch is missing".into())))
            .collect()
    }

    /// [`Engine::top_k_targets_reusing`] of `tokens` after one of
    /// [`Engine::next_answer`]'s answers: its cache becomes the engine's, and the rows
    /// it kept are taken where `tokens` agrees with it.
    pub fn top_k_targets_of(
        &mut self,
        answer: BatchAnswer,
        tokens: &[u32],
        scored: &[bool],
        k: usize,
    ) -> Result<SoftTargets> {
        let BatchAnswer {
            seen,
            mut cache,
            mut cache_tokens,
            ..
        } = answer;
        self.model.swap_cache(&mut cache);
        cache_tokens.truncate(self.model.cached_len());
        self.cache_tokens = cache_tokens;
        self.top_k_targets_reusing(tokens, scored, k, &seen)
    }

    /// [`Engine::top_k_targets`] of `tokens`, taking the rows of `known` (from
    /// [`Engine::generate_top_k`], just before: the cache still holds what they were computed
    /// on) wherever `tokens` agrees with that cache up to them, and running only the rest, from
    /// the cached prefix. The same targets as `top_k_targets` without running the answer again.
    pub fn top_k_targets_reusing(
        &mut self,
        tokens: &[u32],
        scored: &[bool],
        k: usize,
        known: &SoftTargets,
    ) -> Result<SoftTargets> {
        let common = self.cached_prefix(tokens);
        let known: BTreeMap<usize, &Vec<(u32, f32)>> = known
            .iter()
            .filter(|(i, _)| *i <= common)
            .map(|(i, d)| (*i, d))
            .collect();
        let wanted: Vec<usize> = (1..tokens.len())
            .filter(|&i| scored.get(i).copied().unwrap_or(false))
            .collect();
        let missing: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|i| !known.contains_key(i))
            .collect();
        if missing.first().is_some_and(|&i| i - 1 < common) {
            // A row inside the cached prefix that nobody kept: run it all again.
            return self.top_k_targets(tokens, scored, k);
        }
        let mut computed: BTreeMap<usize, Vec<(u32, f32)>> = BTreeMap::new();
        if !missing.is_empty() {
            self.model.truncate_cache(common);
            self.cache_tokens.truncate(common);
            let rest = &tokens[common..];
            for (c, part) in rest.chunks(self.batch).enumerate() {
                let start = common + c * self.batch;
                let rows: Vec<u32> = (0..part.len())
                    .filter(|&p| missing.binary_search(&(start + p + 1)).is_ok())
                    .map(|p| p as u32)
                    .collect();
                let logits = self.model.forward_rows(part, &rows)?;
                self.cache_tokens.extend_from_slice(part);
                if rows.is_empty() {
                    continue;
                }
                for (&p, row) in rows.iter().zip(logits.to_vec2::<f32>()?) {
                    computed.insert(start + p as usize + 1, top_k_probs(&row, k));
                }
            }
        }
        Ok(wanted
            .into_iter()
            .filter_map(|i| {
                let d = known
                    .get(&i)
                    .map(|d| (*d).clone())
                    .or_else(|| computed.remove(&i));
                d.map(|d| (i, d))
            })
            .collect())
    }

    /// [`Engine::generate`], optionally holding the text of the first `n` tokens back until
    /// `keep` has seen it (None when `keep` refuses it: nothing was shown), and optionally
    /// showing `observe` the logits of every position run, with the index of the token they
    /// predict.
    #[allow(clippy::too_many_arguments)]
    fn generate_held(
        &mut self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
        hold: Option<Hold<'_>>,
        mut observe: Option<Observer<'_>>,
    ) -> Result<Option<Generation>> {
        let max_ctx = self.model.max_context();
        self.room_for(prompt.len())?;
        let t0 = Instant::now();
        let (mut logits, reused) = self.prefill(prompt)?;
        let prompt_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let t1 = Instant::now();
        let mut d = Decoder::new(prompt, sampling, max_tokens, hold);
        let stop = loop {
            let room = self.model.cached_len() < max_ctx;
            if let Some(o) = observe.as_mut() {
                o(self.model.cached_len(), &logits);
            }
            match d.step(&self.tokenizer, &logits, cancel, room, on_text)? {
                Step::Stop(r) => break r,
                Step::Feed(tok) => {
                    logits = self.model.forward(&[tok], Logits::Last)?.to_vec1::<f32>()?;
                    self.cache_tokens.push(tok);
                }
            }
        };
        if let (Some(o), StopReason::MaxTokens, Some(&last)) = (observe, stop, d.last_token()) {
            if self.model.cached_len() + 1 < max_ctx {
                logits = self
                    .model
                    .forward(&[last], Logits::Last)?
                    .to_vec1::<f32>()?;
                self.cache_tokens.push(last);
                o(self.model.cached_len(), &logits);
            }
        }
        // Keep the cache consistent with what it holds (the last sampled token never ran).
        self.cache_tokens.truncate(self.model.cached_len());
        Ok(d.finish(&self.tokenizer, on_text)?
            .map(|(text, tokens, generated)| Generation {
                text,
                tokens,
                by_base: false,
                route_p: None,
                prompt_tokens: prompt.len(),
                reused_tokens: reused,
                completion_tokens: generated,
                prompt_ms,
                generate_ms: t1.elapsed().as_secs_f64() * 1000.0,
                stop,
            }))
    }

    /// The least probability of the route's opening for the adapter to answer a question tied
    /// to a learned note as `about` says.
    pub fn min_p(&self, about: About) -> f64 {
        match about {
            About::No => self.route_min_p,
            About::Common => self.about_min_p,
            About::Rare => 0.0,
        }
    }

    /// The probability that the attached adapter opens its answer to `prompt` with its route's
    /// opening, from a cache of its own (the engine's is untouched); None without an adapter
    /// and a route, or when the prompt and the opening do not fit in the context.
    pub fn route_probability(&self, prompt: &[u32]) -> Result<Option<f64>> {
        let (Some(route), Some(_)) = (&self.route, self.model.adapter()) else {
            return Ok(None);
        };
        let ids = self.tokenizer.encode(route.trim(), false)?;
        if ids.is_empty()
            || prompt.is_empty()
            || prompt.len() + ids.len() >= self.model.max_context()
        {
            return Ok(None);
        }
        let mut cache = KvCache::new(&self.model);
        let logits = self.prefill_into(&mut cache, prompt, true)?;
        Ok(Some(
            self.opening_probability_after(&mut cache, &logits, &ids)?,
        ))
    }

    /// Appends `prompt` to `cache` in chunks of the engine's prompt batch, with the adapter
    /// when `use_lora`; returns the logits of its last position. The counterpart of
    /// `generate`'s prefill for callers that keep one cache per sequence.
    pub fn prefill_into(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        use_lora: bool,
    ) -> Result<Vec<f32>> {
        self.room_for(cache.len() + prompt.len())?;
        let mut logits = None;
        for chunk in prompt.chunks(self.batch) {
            logits = Some(
                self.model
                    .forward_cached(cache, chunk, Logits::Last, use_lora)?,
            );
        }
        let logits = logits.ok_or_else(|| EngineError::Other("empty prompt".into()))?;
        Ok(logits.to_vec1::<f32>()?)
    }

    /// Attaches an adapter together with the route its learning cycle trained (None: the base
    /// model answers, unrouted). Adapter and route are set as one value so they never disagree.
    pub fn attach(&mut self, adapter: Option<(Arc<LoraWeights>, Option<String>)>) {
        let (weights, route) = match adapter {
            Some((w, r)) => (Some(w), r),
            None => (None, None),
        };
        self.model.set_adapter(weights);
        self.route = route;
    }

    /// Answers a user: [`Engine::generate`], except that with an adapter and a `route` set, the
    /// adapter answers only when it claims the answer comes from the user's notes: its greedy
    /// answer opens with the route's text (nothing is shown until that is decided), or it gives
    /// that opening a probability of at least [`ROUTE_MIN_P`] (a note asked in other words than
    /// training used), and then its answer starts with the opening. Otherwise the base model
    /// answers, as it would have before any learning.
    pub fn answer(
        &mut self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.answer_routed(prompt, sampling, max_tokens, cancel, on_text, About::No)
    }

    /// [`Engine::answer`]; for a question about a learned note (as `retrieve` found) the adapter
    /// answers from its weights, starting with the route's opening, when it gives that opening
    /// the probability `about` asks ([`Engine::min_p`]: any, for a note named by a rare word).
    pub fn answer_routed(
        &mut self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
        about: About,
    ) -> Result<Generation> {
        let (Some(route), Some(adapter)) = (self.route.clone(), self.model.adapter().cloned())
        else {
            return self.generate(prompt, sampling, max_tokens, cancel, on_text);
        };
        if about == About::No {
            let n = self.tokenizer.encode(&route, false)?.len() + 1;
            let opens = |t: &str| t.trim_start().starts_with(route.trim());
            let hold: Option<Hold<'_>> = Some((n, Box::new(opens)));
            if let Some(g) =
                self.generate_held(prompt, sampling, max_tokens, cancel, on_text, hold, None)?
            {
                return Ok(g);
            }
        }
        // Not the greedy opening; still the adapter's answer when it gives the opening enough
        // probability (a note asked in other words than training used).
        let route = route.trim().to_string();
        let ids = self.tokenizer.encode(&route, false)?;
        let t0 = Instant::now();
        let (p, reused) = self.opening_probability(prompt, &ids)?;
        if p >= self.min_p(about)
            && !ids.is_empty()
            && prompt.len() + ids.len() < self.model.max_context()
        {
            // The opening is shown as it is, and the answer goes on from the cache that already
            // holds it.
            on_text(&route);
            let mut full = prompt.to_vec();
            full.extend_from_slice(&ids);
            let rest = max_tokens.saturating_sub(ids.len());
            let mut g = self.generate(&full, sampling, rest, cancel, on_text)?;
            g.text = format!("{route}{}", g.text);
            let mut tokens = ids.clone();
            tokens.append(&mut g.tokens);
            g.tokens = tokens;
            g.completion_tokens += ids.len();
            g.prompt_tokens = prompt.len();
            g.reused_tokens = reused;
            g.prompt_ms = (t0.elapsed().as_secs_f64() * 1000.0 - g.generate_ms).max(0.0);
            g.route_p = Some(p);
            return Ok(g);
        }
        // The base model answers; the cache holds the adapter's keys, so it starts again (and
        // again after, when the adapter is back).
        self.model.set_adapter(None);
        self.reset();
        let g = self.generate(prompt, sampling, max_tokens, cancel, on_text);
        self.model.set_adapter(Some(adapter));
        self.reset();
        g.map(|g| Generation {
            by_base: true,
            route_p: Some(p),
            ..g
        })
    }

    /// An error unless the context has room for `tokens` and one more to generate.
    fn room_for(&self, tokens: usize) -> Result<()> {
        let max = self.model.max_context();
        if tokens >= max {
            return Err(ModelError::ContextFull {
                needed: tokens + 1,
                max,
                trained: self.model.cfg.trained_ctx,
            }
            .into());
        }
        Ok(())
    }

    /// The probability that the model with its adapter continues `cache` (whose last
    /// position gave `logits`) with the tokens `opening`; all but the last opening token are
    /// appended to the cache. [`Engine::answer_routed`]'s decision, for one cache of many.
    pub fn opening_probability_after(
        &self,
        cache: &mut KvCache,
        logits: &[f32],
        opening: &[u32],
    ) -> Result<f64> {
        let Some((&first, rest)) = opening.split_first() else {
            return Ok(0.0);
        };
        self.room_for(cache.len() + opening.len())?;
        let mut lp = log_p(logits, first);
        if !rest.is_empty() {
            let fed = &opening[..opening.len() - 1];
            let rows = self
                .model
                .forward_cached(cache, fed, Logits::All, true)?
                .to_vec2::<f32>()?;
            for (row, t) in rows.iter().zip(rest) {
                lp += log_p(row, *t);
            }
        }
        Ok(lp.exp())
    }

    /// The probability that the model (with its adapter) opens its answer to `prompt` with the
    /// tokens `opening`, and how many prompt tokens came from the cache; leaves the prompt and
    /// all but the last opening token in the cache.
    fn opening_probability(&mut self, prompt: &[u32], opening: &[u32]) -> Result<(f64, usize)> {
        self.room_for(prompt.len() + opening.len())?;
        let Some((&first, rest)) = opening.split_first() else {
            return Ok((0.0, 0));
        };
        let (logits, reused) = self.prefill(prompt)?;
        let mut lp = log_p(&logits, first);
        if !rest.is_empty() {
            let fed = &opening[..opening.len() - 1];
            let rows = self.model.forward(fed, Logits::All)?.to_vec2::<f32>()?;
            self.cache_tokens.extend_from_slice(fed);
            for (row, t) in rows.iter().zip(rest) {
                lp += log_p(row, *t);
            }
        }
        Ok((lp.exp(), reused))
    }

    /// Mean negative log-likelihood (nats per token) of the tokens marked in `scored`, each given
    /// the tokens before it: how strongly the model (with its adapter, if any) prefers a known
    /// answer. Used to measure drift from the base model's answers.
    pub fn scored_nll(&mut self, tokens: &[u32], scored: &[bool]) -> Result<f64> {
        let lsm = self.next_token_log_probs(tokens, scored)?;
        let (mut nll, mut n) = (0.0f64, 0usize);
        for (i, row) in &lsm {
            nll -= row[tokens[*i] as usize] as f64;
            n += 1;
        }
        Ok(if n == 0 { 0.0 } else { nll / n as f64 })
    }

    /// Log-probabilities of the next token at each position `i` marked in `scored` (same
    /// length as `tokens`): row `i - 1` of the logits, after `tokens[..i]`, as `(i, row)` in
    /// increasing `i`. Only those rows go through the output head.
    fn next_token_log_probs(
        &mut self,
        tokens: &[u32],
        scored: &[bool],
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        if tokens.len() < 2
            || tokens.len() != scored.len()
            || tokens.len() > self.model.max_context()
        {
            return Err(EngineError::Other(format!(
                "cannot score {} tokens (context {})",
                tokens.len(),
                self.model.max_context()
            )));
        }
        self.reset();
        let mut out = Vec::new();
        for (c, part) in tokens.chunks(self.batch).enumerate() {
            let start = c * self.batch;
            // Position p of the chunk predicts token start + p + 1.
            let rows: Vec<u32> = (0..part.len())
                .filter(|&p| scored.get(start + p + 1).copied().unwrap_or(false))
                .map(|p| p as u32)
                .collect();
            let logits = self.model.forward_rows(part, &rows)?;
            if rows.is_empty() {
                continue;
            }
            let lsm = Model::log_softmax(&logits)?.to_vec2::<f32>()?;
            out.extend(rows.iter().map(|&p| start + p as usize + 1).zip(lsm));
        }
        self.reset();
        Ok(out)
    }

    /// The model's `k` most likely next tokens and their probabilities (renormalised over
    /// those `k`) at every scored position `i` (predicting `tokens[i]` from the tokens before
    /// it): `(i, [(token, p)])`, for distillation toward this model's own distribution.
    pub fn top_k_targets(
        &mut self,
        tokens: &[u32],
        scored: &[bool],
        k: usize,
    ) -> Result<SoftTargets> {
        let lsm = self.next_token_log_probs(tokens, scored)?;
        Ok(lsm
            .into_iter()
            .map(|(i, row)| (i, top_k_probs(&row, k)))
            .collect())
    }

    /// Perplexity of `text` in chunks of `ctx` tokens, scored like llama.cpp's
    /// `llama-perplexity`: the text is tokenized once (BOS first if the model adds one), cut
    /// into whole chunks, each chunk's first token replaced by BOS (if added), and only the
    /// second half of each chunk is scored, so every scored token has at least ctx/2 tokens of
    /// context.
    pub fn perplexity(
        &mut self,
        text: &str,
        ctx: usize,
        on_chunk: &mut dyn FnMut(usize, usize, f64),
    ) -> Result<Perplexity> {
        let t0 = Instant::now();
        // llama-perplexity drops one trailing newline of the file before tokenizing.
        let text = text.strip_suffix('\n').unwrap_or(text);
        let tokens = self.text_tokens(text, false)?;
        if ctx < 8 || ctx > self.model.max_context() {
            return Err(EngineError::Other(format!(
                "--ctx {ctx} must be between 8 and the loaded context {}",
                self.model.max_context()
            )));
        }
        let chunks = tokens.len() / ctx;
        if chunks == 0 {
            return Err(EngineError::Other(format!(
                "the text has {} tokens, fewer than one chunk of {ctx}; use a longer text or a smaller --ctx",
                tokens.len()
            )));
        }
        let first = ctx / 2;
        let mut nll = 0.0f64;
        let mut nll2 = 0.0f64;
        let mut count = 0usize;
        for c in 0..chunks {
            let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
            if self.tokenizer.add_bos {
                if let Some(bos) = self.tokenizer.bos {
                    chunk[0] = bos;
                }
            }
            self.reset();
            let mut rows = Vec::with_capacity(ctx);
            for part in chunk.chunks(self.batch) {
                rows.push(self.model.forward(part, Logits::All)?);
            }
            let logits = candle_core::Tensor::cat(&rows, 0)?;
            let scored = logits.narrow(0, first, ctx - 1 - first)?;
            let lsm = Model::log_softmax(&scored)?.to_vec2::<f32>()?;
            for (i, row) in lsm.iter().enumerate() {
                let target = tokens[c * ctx + first + i + 1] as usize;
                let v = -(row[target] as f64);
                nll += v;
                nll2 += v * v;
                count += 1;
            }
            on_chunk(c + 1, chunks, (nll / count as f64).exp());
        }
        self.reset();
        let mean = nll / count as f64;
        let var = (nll2 / count as f64 - mean * mean).max(0.0);
        let err = (var / (count as f64 - 1.0).max(1.0)).sqrt();
        let ppl = mean.exp();
        Ok(Perplexity {
            ppl,
            ppl_err: ppl * err,
            chunks,
            ctx,
            scored_tokens: count,
            text_tokens: tokens.len(),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraWeights;
    use std::sync::Arc;

    /// The distributions kept while generating are the ones `top_k_targets` computes over the
    /// prompt-and-answer, whether the answer ends at the token limit, is followed by other
    /// tokens, or differs from what was generated (then its rows are run again).
    #[test]
    fn top_k_kept_while_generating_match_a_fresh_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_model(&path, &crate::tiny::TinySpec::default()).unwrap();
        let mut e = Engine::load("tiny", &path, &LoadOptions::default()).unwrap();
        let cancel = AtomicBool::new(false);
        let prompt = e.text_tokens("hello there", false).unwrap();
        let (g, seen) = e.generate_top_k(&prompt, 6, 4, &cancel).unwrap();
        assert!(!g.tokens.is_empty());
        assert!(seen.iter().all(|(_, d)| d.len() == 4));
        let last = g.tokens[g.tokens.len() - 1];
        let edited = (last + 1) % e.model.cfg.vocab as u32;
        let variants: Vec<Vec<u32>> = vec![
            [prompt.clone(), g.tokens.clone()].concat(),
            [prompt.clone(), g.tokens.clone(), vec![3, 4]].concat(),
            [
                prompt.clone(),
                g.tokens[..g.tokens.len() - 1].to_vec(),
                vec![edited, 5],
            ]
            .concat(),
        ];
        for tokens in variants {
            let scored: Vec<bool> = (0..tokens.len()).map(|i| i >= prompt.len()).collect();
            e.reset();
            let (_, seen) = e.generate_top_k(&prompt, 6, 4, &cancel).unwrap();
            let reused = e.top_k_targets_reusing(&tokens, &scored, 4, &seen).unwrap();
            let fresh = e.top_k_targets(&tokens, &scored, 4).unwrap();
            assert_eq!(reused.len(), fresh.len());
            for ((i, a), (j, b)) in reused.iter().zip(&fresh) {
                assert_eq!(i, j);
                let ta: Vec<u32> = a.iter().map(|x| x.0).collect();
                let tb: Vec<u32> = b.iter().map(|x| x.0).collect();
                assert_eq!(ta, tb, "position {i}");
                for (x, y) in a.iter().zip(b) {
                    assert!((x.1 - y.1).abs() < 1e-3, "position {i}: {x:?} vs {y:?}");
                }
            }
        }
    }

    /// Answers decoded together are the answers decoded alone: the same tokens, the same top-k
    /// rows kept on the way, and the same targets taken from each answer's own cache, for
    /// prompts of different lengths that share an opening, ending at the limit or not.
    #[test]
    fn top_k_answers_decoded_together_match_each_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_model(&path, &crate::tiny::TinySpec::default()).unwrap();
        let mut e = Engine::load("tiny", &path, &LoadOptions::default()).unwrap();
        let cancel = AtomicBool::new(false);
        let prompts: Vec<Vec<u32>> = ["hello there", "hello there, how", "hello", "a b c d e f"]
            .iter()
            .map(|t| e.text_tokens(t, false).unwrap())
            .collect();
        for max in [1, 5, 9] {
            let together = e.generate_top_k_many(&prompts, 3, max, 4, &cancel).unwrap();
            assert_eq!(together.len(), prompts.len());
            for (p, t) in prompts.iter().zip(together) {
                e.reset();
                let (g, seen) = e.generate_top_k(p, max, 4, &cancel).unwrap();
                assert_eq!(t.generation.tokens, g.tokens, "max {max}");
                assert_eq!(t.generation.stop, g.stop);
                assert_eq!(t.seen.len(), seen.len());
                let close = |a: &SoftTargets, b: &SoftTargets| {
                    for ((i, a), (j, b)) in a.iter().zip(b) {
                        assert_eq!(i, j);
                        let ta: Vec<u32> = a.iter().map(|x| x.0).collect();
                        let tb: Vec<u32> = b.iter().map(|x| x.0).collect();
                        assert_eq!(ta, tb, "position {i}");
                        for (x, y) in a.iter().zip(b) {
                            assert!((x.1 - y.1).abs() < 1e-3, "position {i}: {x:?} vs {y:?}");
                        }
                    }
                };
                close(&t.seen, &seen);
                let tokens = [p.clone(), g.tokens.clone(), vec![3, 4]].concat();
                let scored: Vec<bool> = (0..tokens.len()).map(|i| i >= p.len()).collect();
                let of = e.top_k_targets_of(t, &tokens, &scored, 4).unwrap();
                let fresh = e.top_k_targets(&tokens, &scored, 4).unwrap();
                assert_eq!(of.len(), fresh.len());
                close(&of, &fresh);
            }
        }
    }

    /// Answers decoded together with an `until` test stop at the first token whose text passes
    /// it, and are otherwise the answers decoded alone.
    #[test]
    fn answers_decoded_until_stop_where_their_text_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_model(&path, &crate::tiny::TinySpec::default()).unwrap();
        let mut e = Engine::load("tiny", &path, &LoadOptions::default()).unwrap();
        let cancel = AtomicBool::new(false);
        let prompts: Vec<Vec<u32>> = ["hello there", "hello there, how", "a b c d e f"]
            .iter()
            .map(|t| e.text_tokens(t, false).unwrap())
            .collect();
        let alone: Vec<Generation> = prompts
            .iter()
            .map(|p| {
                e.reset();
                e.generate(p, &SamplingParams::default(), 9, &cancel, &mut |_| {})
                    .unwrap()
            })
            .collect();
        for stop_early in [false, true] {
            let tests: Vec<(Vec<u32>, Until)> = prompts
                .iter()
                .map(|p| {
                    let u: Until = if stop_early {
                        Box::new(|t: &str| !t.is_empty())
                    } else {
                        Box::new(|_: &str| false)
                    };
                    (p.clone(), u)
                })
                .collect();
            let mut batch = e.decode_until(tests, 2, 9);
            let (mut seen, mut shorter) = (0, 0);
            while let Some((i, a)) = e.next_answer(&mut batch, &cancel).unwrap() {
                seen += 1;
                let (got, want) = (&a.generation, &alone[i]);
                assert!(a.seen.is_empty(), "no top-k rows were asked for");
                if stop_early && !want.text.is_empty() {
                    assert!(!got.text.is_empty() && want.text.starts_with(&got.text));
                    assert!(want.tokens.starts_with(&got.tokens));
                    shorter += usize::from(got.tokens.len() < want.tokens.len());
                } else {
                    assert_eq!(got.tokens, want.tokens);
                    assert_eq!(got.text, want.text);
                }
            }
            if stop_early {
                assert!(shorter > 0, "no answer stopped early");
            }
            assert_eq!(seen, prompts.len());
        }
    }

    /// A tiny random model with an adapter that changes its answers: `answer` gives the
    /// adapter's answer when it opens with the route, the base model's otherwise, and leaves
    /// the adapter in place either way.
    #[test]
    fn answers_are_routed_by_their_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_model(&path, &crate::tiny::TinySpec::default()).unwrap();
        let mut e = Engine::load("tiny", &path, &LoadOptions::default()).unwrap();
        // Several random adapters: the texts differ, multi-byte pieces included.
        for seed in 0..4u64 {
            let w = Arc::new(
                LoraWeights::random_for_tests(&e.model.cfg, seed)
                    .prepare()
                    .unwrap(),
            );
            let prompt = e.text_tokens("hello there", false).unwrap();
            let greedy = SamplingParams::greedy();
            let cancel = AtomicBool::new(false);
            let gen = |e: &mut Engine, routed: bool| {
                e.reset();
                let g = match routed {
                    true => e.answer(&prompt, &greedy, 12, &cancel, &mut |_| {}),
                    false => e.generate(&prompt, &greedy, 12, &cancel, &mut |_| {}),
                };
                g.unwrap()
            };
            e.model.set_adapter(None);
            e.route = None;
            let base = gen(&mut e, false);
            e.model.set_adapter(Some(w));
            let adapted = gen(&mut e, false);
            assert_ne!(
                base.tokens, adapted.tokens,
                "the adapter changes the answer"
            );

            e.route = Some("\u{1}never said".into());
            let g = gen(&mut e, true);
            assert_eq!(
                g.tokens, base.tokens,
                "an answer not opening with the route is the base's"
            );
            assert!(g.by_base);
            assert!(
                e.model.adapter().is_some(),
                "the adapter is back afterwards"
            );

            let opening: String = adapted.text.chars().take(3).collect();
            e.route = Some(opening);
            let mut shown = String::new();
            e.reset();
            let g = e
                .answer(&prompt, &greedy, 12, &cancel, &mut |t| shown.push_str(t))
                .unwrap();
            assert_eq!(
                g.tokens, adapted.tokens,
                "an answer opening with the route is kept"
            );
            assert_eq!(shown, adapted.text, "and shown whole");
            assert_eq!(g.completion_tokens, adapted.completion_tokens);
            assert!(!g.by_base);

            // An opening that is not the greedy one but likely enough: the answer starts with it
            // and goes on as the adapter continues it; its probability is the product of the
            // opening's next-token probabilities.
            e.route = Some("zebra".into());
            let ids = e.tokenizer.encode("zebra", false).unwrap();
            let mut full = prompt.clone();
            full.extend_from_slice(&ids);
            let scored: Vec<bool> = (0..full.len()).map(|i| i >= prompt.len()).collect();
            let want_p = (-e.scored_nll(&full, &scored).unwrap() * ids.len() as f64).exp();
            e.route_min_p = 2.0; // nothing is likely enough: the base answers
            let g = gen(&mut e, true);
            assert!(g.by_base && g.tokens == base.tokens);
            let p = g.route_p.unwrap();
            assert!(
                (p - want_p).abs() <= 1e-4 * want_p.max(1e-12),
                "{p} vs {want_p}"
            );
            e.route_min_p = 0.0; // any probability: the opening is forced
            e.reset();
            let cont = e
                .generate(&full, &greedy, 12 - ids.len(), &cancel, &mut |_| {})
                .unwrap();
            let mut shown = String::new();
            e.reset();
            let g = e
                .answer(&prompt, &greedy, 12, &cancel, &mut |t| shown.push_str(t))
                .unwrap();
            assert!(!g.by_base);
            assert_eq!(g.tokens[..ids.len()], ids[..]);
            assert_eq!(g.tokens[ids.len()..], cont.tokens[..]);
            assert_eq!(shown, g.text);
            assert!(g.text.starts_with("zebra"), "{:?}", g.text);
            assert_eq!(g.completion_tokens, ids.len() + cont.completion_tokens);
            e.route_min_p = ROUTE_MIN_P;

            // A checked answer is shown whole once the check keeps it, and not at all when it
            // refuses it.
            e.model.set_adapter(None);
            let mut shown = String::new();
            e.reset();
            let kept = e
                .generate_checked(
                    &prompt,
                    &greedy,
                    12,
                    &cancel,
                    &mut |t| shown.push_str(t),
                    Box::new(|t: &str| t == base.text),
                )
                .unwrap()
                .expect("the check keeps the answer it sees");
            assert_eq!(kept.tokens, base.tokens);
            assert_eq!(shown, base.text);
            let mut shown = String::new();
            e.reset();
            let refused = e
                .generate_checked(
                    &prompt,
                    &greedy,
                    12,
                    &cancel,
                    &mut |t| shown.push_str(t),
                    Box::new(|_: &str| false),
                )
                .unwrap();
            assert!(refused.is_none() && shown.is_empty(), "{shown:?}");
        }
    }
}
