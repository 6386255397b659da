//! Training data: JSON Lines in MLX-LM's formats (`{"text": ...}`, `{"prompt": ...,
//! "completion": ...}`, `{"messages": [...]}`), tokenised with the model's tokenizer and chat
//! template, with a loss mask (completion / assistant tokens only where there is a prompt part),
//! cut into windows and packed into fixed-length sequences.
//!
//! It must not run the model; it turns a file into token sequences, deterministically.

use super::forward::Batch;
pub use super::forward::SHARED_SEGMENT;
use crate::codec::Codec;
pub use crate::codec::SoftTargets;
use crate::template::Message;
use crate::template::TemplateError;
use crate::tokenizer::TokenizerError;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Empty(String),
}

/// Why one example cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ExampleError {
    #[error(transparent)]
    Tokenize(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The example's JSON or conversation has the wrong shape (the message says how).
    #[error("{0}")]
    Shape(&'static str),
}

/// One tokenised example: tokens and, for each, whether it is a training target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub learn: Vec<bool>,
    /// Soft targets: for token `i`, a distribution over candidates (token, probability) to
    /// learn instead of `tokens[i]` alone (distillation); empty for ordinary examples.
    pub soft: SoftTargets,
    /// Loss weight of each learned token (empty: 1.0 each), e.g. to stress the opening of an
    /// answer that greedy decoding commits to first.
    pub weights: Vec<f32>,
}

/// A training set: packed sequences ready to batch, and where they came from.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub seqs: Vec<Batch>,
    pub examples: usize,
    /// Tokens that carry loss.
    pub target_tokens: usize,
    pub sha256: String,
    pub description: String,
}

fn line_err(path: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError::Line {
        path: path.display().to_string(),
        line,
        message: message.into(),
    }
}

/// Tokenises `text` pieces in order, each marked learn or not (BOS first if the model adds it).
fn segments(
    codec: &Codec,
    parts: &[(String, bool)],
    special: bool,
) -> Result<Example, ExampleError> {
    let mut tokens = Vec::new();
    let mut learn = Vec::new();
    for (i, (text, l)) in parts.iter().enumerate() {
        if text.is_empty() {
            continue;
        }
        let ids = if i == 0 {
            codec.text_tokens(text, special)
        } else {
            codec.tokenizer.encode(text, special)
        }?;
        learn.extend(std::iter::repeat_n(*l, ids.len()));
        tokens.extend(ids);
    }
    Ok(Example {
        tokens,
        learn,
        soft: Vec::new(),
        weights: Vec::new(),
    })
}

/// Renders a conversation and marks the assistant turns as targets.
fn chat_example(codec: &Codec, msgs: &[Message]) -> Result<Example, ExampleError> {
    chat_turns(codec, msgs, false)
}

/// A conversation whose last assistant turn alone is learned (the turns before are context,
/// e.g. a worked example).
pub fn chat_last_turn(codec: &Codec, msgs: &[Message]) -> Result<Example, ExampleError> {
    chat_turns(codec, msgs, true)
}

fn chat_turns(codec: &Codec, msgs: &[Message], last_only: bool) -> Result<Example, ExampleError> {
    let last = msgs.iter().rposition(|m| m.role == "assistant");
    let full = codec.template.render(msgs, false)?;
    let mut parts: Vec<(String, bool)> = Vec::new();
    let mut done = 0usize;
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = codec.template.render(&msgs[..i], true)?;
        let end = codec.template.render(&msgs[..=i], false)?;
        if !full.starts_with(&start) || !full.starts_with(&end) || start.len() < done {
            return Err(ExampleError::Shape("the chat template does not render the conversation turn by turn; use {\"text\": ...} instead"));
        }
        parts.push((full[done..start.len()].to_string(), false));
        let learn = !last_only || Some(i) == last;
        parts.push((full[start.len()..end.len()].to_string(), learn));
        done = end.len();
    }
    if parts.is_empty() {
        return Err(ExampleError::Shape(
            "the conversation has no assistant message to learn",
        ));
    }
    if done < full.len() {
        parts.push((full[done..].to_string(), false));
    }
    segments(codec, &parts, true)
}

/// Parses one JSON line into an example. `system` is added to conversations that have none
/// (the same system message `hone ask` uses, so training and asking see the same prompt).
pub fn parse_line(codec: &Codec, v: &Value, system: Option<&str>) -> Result<Example, ExampleError> {
    let obj = v
        .as_object()
        .ok_or(ExampleError::Shape("each line must be a JSON object"))?;
    let with_system = |mut msgs: Vec<Message>| {
        if let Some(s) = system {
            if msgs.first().map(|m| m.role.as_str()) != Some("system") {
                msgs.insert(0, Message::system(s));
            }
        }
        msgs
    };
    if let Some(t) = obj.get("text") {
        let t = t
            .as_str()
            .ok_or(ExampleError::Shape("\"text\" must be a string"))?;
        if t.trim().is_empty() {
            return Err(ExampleError::Shape("\"text\" is empty"));
        }
        let mut ex = segments(codec, &[(t.to_string(), true)], false)?;
        if let Some(eos) = codec.tokenizer.eos {
            ex.tokens.push(eos);
            ex.learn.push(true);
        }
        return Ok(ex);
    }
    if let (Some(p), Some(c)) = (obj.get("prompt"), obj.get("completion")) {
        let p = p
            .as_str()
            .ok_or(ExampleError::Shape("\"prompt\" must be a string"))?;
        let c = c
            .as_str()
            .ok_or(ExampleError::Shape("\"completion\" must be a string"))?;
        let msgs = with_system(vec![Message::user(p), Message::assistant(c)]);
        return chat_example(codec, &msgs);
    }
    if let Some(m) = obj.get("messages") {
        let arr = m
            .as_array()
            .ok_or(ExampleError::Shape("\"messages\" must be an array"))?;
        let mut msgs = Vec::new();
        for x in arr {
            let role = x
                .get("role")
                .and_then(Value::as_str)
                .ok_or(ExampleError::Shape("each message needs a string \"role\""))?;
            let content = x
                .get("content")
                .and_then(Value::as_str)
                .ok_or(ExampleError::Shape(
                    "each message needs a string \"content\"",
                ))?;
            msgs.push(Message::new(role, content));
        }
        return chat_example(codec, &with_system(msgs));
    }
    Err(ExampleError::Shape(
        "expected {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}",
    ))
}

/// Plain text as an example, every token a target; `eos` appends the end token (leave it off
/// for notes taught to an instruct model, or it learns to answer with nothing).
pub fn text_example(codec: &Codec, text: &str, eos: bool) -> Result<Example, ExampleError> {
    let mut ex = segments(codec, &[(text.to_string(), true)], false)?;
    if eos {
        if let Some(e) = codec.tokenizer.eos {
            ex.tokens.push(e);
            ex.learn.push(true);
        }
    }
    Ok(ex)
}

/// One question and its answer as a chat (with `system` if given), loss on the answer.
pub fn chat_pair(
    codec: &Codec,
    system: Option<&str>,
    user: &str,
    assistant: &str,
) -> Result<Example, ExampleError> {
    let mut msgs: Vec<Message> = system.map(Message::system).into_iter().collect();
    msgs.push(Message::user(user));
    msgs.push(Message::assistant(assistant));
    chat_example(codec, &msgs)
}

/// Packs in-memory examples (named `name` in messages) into a dataset.
pub fn pack_examples(
    codec: &Codec,
    name: &str,
    examples: &[Example],
    sha: String,
    seq_len: usize,
) -> Result<Dataset, DataError> {
    let pad = codec.tokenizer.eos.unwrap_or(0);
    let seqs = pack(examples, seq_len, pad);
    if seqs.is_empty() {
        return Err(DataError::Empty(format!(
            "{name} has no tokens to learn (every example is masked out or too short)"
        )));
    }
    let target_tokens = seqs
        .iter()
        .map(|q| q.weights.iter().filter(|w| **w > 0.0).count())
        .sum();
    Ok(Dataset {
        examples: examples.len(),
        target_tokens,
        description: format!(
            "{name} ({} examples, {target_tokens} target tokens)",
            examples.len()
        ),
        seqs,
        sha256: sha,
    })
}

/// Reads a JSONL file into examples; the first bad line stops it with its line number.
pub fn read_jsonl(
    codec: &Codec,
    path: &Path,
    system: Option<&str>,
) -> Result<(Vec<Example>, String), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let sha = crate::digest::sha256_hex(&bytes);
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        line_err(
            path,
            bytes[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1,
            "not valid UTF-8",
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| line_err(path, i + 1, format!("not JSON: {e}")))?;
        out.push(parse_line(codec, &v, system).map_err(|m| line_err(path, i + 1, m.to_string()))?);
    }
    if out.is_empty() {
        return Err(DataError::Empty(format!(
            "{} has no examples (one JSON object per line)",
            path.display()
        )));
    }
    Ok((out, sha))
}

/// A window of an example: its tokens, which of them are learned, the example, where the
/// window starts in it, and whether it opens with the shared prefix.
type Piece<'a> = (&'a [u32], &'a [bool], &'a Example, usize, bool);

/// The shortest shared prefix worth sharing, in tokens.
const MIN_SHARED: usize = 4;

/// Cuts examples longer than `s` tokens into windows overlapping by one token (so every target
/// is predicted once) and packs them greedily, in order, into sequences of `s` positions.
///
/// Examples that open with the same tokens (a chat template's system turn and the user turn's
/// header: a third of a short question-and-answer) share one copy of them per sequence: the
/// prefix sits at the start of the sequence in [`SHARED_SEGMENT`], and each example after it
/// keeps its own positions (counting the prefix) and attends to the prefix and to itself. Every
/// position then sees exactly what it would see alone, so the loss and its gradients are those
/// of the unshared packing, on fewer positions.
pub fn pack(examples: &[Example], s: usize, pad: u32) -> Vec<Batch> {
    pack_sharing(examples, s, pad, true)
}

/// [`pack`], with or without the shared prefix.
pub fn pack_sharing(examples: &[Example], s: usize, pad: u32, share: bool) -> Vec<Batch> {
    let s = s.max(2);
    let prefix = if share {
        shared_prefix(examples, s)
    } else {
        Vec::new()
    };
    let n = prefix.len();
    let mut pieces: Vec<Piece> = Vec::new();
    for ex in examples {
        if ex.tokens.len() < 2 {
            continue;
        }
        let mut start = 0;
        loop {
            let end = (start + s).min(ex.tokens.len());
            let (toks, learn) = (&ex.tokens[start..end], &ex.learn[start..end]);
            let shares = n > 0
                && start == 0
                && toks.len() > n + 1
                && toks[..n] == prefix[..]
                && !learn[..=n].iter().any(|l| *l);
            pieces.push((toks, learn, ex, start, shares));
            if end == ex.tokens.len() {
                break;
            }
            start = end - 1;
        }
    }
    let mut seqs = Vec::new();
    let mut cur = empty_seq(s);
    let mut used = 0usize;
    let mut seg = 0u32;
    let mut has_prefix = false;
    for (toks, learn, ex, start, shares) in pieces {
        let shared_here = |used: usize, has_prefix: bool| shares && (has_prefix || used == 0);
        let cost = |used: usize, has_prefix: bool| match shared_here(used, has_prefix) && has_prefix
        {
            true => toks.len() - n,
            false => toks.len(),
        };
        if used + cost(used, has_prefix) > s {
            finish(&mut cur, used, pad, seg);
            seqs.push(std::mem::replace(&mut cur, empty_seq(s)));
            used = 0;
            seg = 0;
            has_prefix = false;
        }
        let from = if shared_here(used, has_prefix) {
            if !has_prefix {
                for (i, &t) in prefix.iter().enumerate() {
                    cur.tokens[i] = t;
                    cur.positions[i] = i as u32;
                    cur.segments[i] = SHARED_SEGMENT;
                    cur.targets[i] = toks[i + 1];
                    cur.weights[i] = 0.0;
                }
                used = n;
                has_prefix = true;
            }
            n
        } else {
            0
        };
        // The piece from its token `from` on: position `from + i`, predicting token `from + i + 1`.
        for (i, &t) in toks[from..].iter().enumerate() {
            let (p, k) = (used + i, from + i);
            cur.tokens[p] = t;
            cur.positions[p] = k as u32;
            cur.segments[p] = seg;
            if k + 1 < toks.len() {
                cur.targets[p] = toks[k + 1];
                cur.weights[p] = match learn[k + 1] {
                    true => ex.weights.get(start + k + 1).copied().unwrap_or(1.0),
                    false => 0.0,
                };
            }
        }
        // Soft targets of the tokens this piece predicts (its positions from+1..len).
        for (ti, dist) in &ex.soft {
            if *ti > start + from && *ti < start + toks.len() && learn[ti - start] {
                let p = used + ti - start - from - 1;
                cur.soft.push((p, dist.clone()));
            }
        }
        used += toks.len() - from;
        seg += 1;
    }
    if used > 0 {
        finish(&mut cur, used, pad, seg);
        seqs.push(cur);
    }
    seqs.retain(|q| q.weights.iter().any(|w| *w > 0.0));
    seqs
}

/// The opening that the examples with a prompt part (no target in their first tokens) have in
/// common, cut before the first token any of them learns; empty when shorter than
/// [`MIN_SHARED`] tokens or when no two examples share it.
pub fn shared_prefix(examples: &[Example], s: usize) -> Vec<u32> {
    let mut with_prompt = examples
        .iter()
        .filter(|e| e.tokens.len() >= 2 && !e.learn.first().copied().unwrap_or(true));
    let Some(first) = with_prompt.next() else {
        return Vec::new();
    };
    let first_target = |e: &Example| e.learn.iter().position(|l| *l).unwrap_or(e.tokens.len());
    // The prefix's last position predicts the token after it, which no example may learn.
    let mut n = first
        .tokens
        .len()
        .min(first_target(first).saturating_sub(1));
    let mut count = 1;
    for e in with_prompt {
        let common = first
            .tokens
            .iter()
            .zip(&e.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        n = n.min(common).min(first_target(e).saturating_sub(1));
        count += 1;
    }
    // Half a sequence at most, so that an example still fits after it.
    n = n.min(s / 2);
    if count < 2 || n < MIN_SHARED {
        return Vec::new();
    }
    first.tokens[..n].to_vec()
}

fn empty_seq(s: usize) -> Batch {
    Batch {
        b: 1,
        s,
        tokens: vec![0; s],
        targets: vec![0; s],
        weights: vec![0.0; s],
        positions: vec![0; s],
        segments: vec![0; s],
        soft: Vec::new(),
    }
}

fn finish(b: &mut Batch, used: usize, pad: u32, seg: u32) {
    for p in used..b.s {
        b.tokens[p] = pad;
        b.positions[p] = (p - used) as u32;
        b.segments[p] = seg;
    }
}

/// Stacks sequences into one micro-batch.
pub fn stack(seqs: &[&Batch]) -> Batch {
    let s = seqs.first().map(|q| q.s).unwrap_or(0);
    let mut out = Batch {
        b: seqs.len(),
        s,
        tokens: Vec::new(),
        targets: Vec::new(),
        weights: Vec::new(),
        positions: Vec::new(),
        segments: Vec::new(),
        soft: Vec::new(),
    };
    for q in seqs {
        let off = out.tokens.len();
        out.soft
            .extend(q.soft.iter().map(|(p, d)| (off + p, d.clone())));
        out.tokens.extend_from_slice(&q.tokens);
        out.targets.extend_from_slice(&q.targets);
        out.weights.extend_from_slice(&q.weights);
        out.positions.extend_from_slice(&q.positions);
        out.segments.extend_from_slice(&q.segments);
    }
    out
}

/// Fixed synthetic data for benchmarks: `n` sequences of `s` ordinary (non-special) tokens
/// from a seeded generator, every position a target.
pub fn synthetic(tok: &crate::tokenizer::Tokenizer, n: usize, s: usize, seed: u64) -> Dataset {
    let vocab = tok.vocab_size() as u64;
    let mut x = seed | 1;
    let mut next = || loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = (x % vocab) as u32;
        if !tok.is_special(id) {
            return id;
        }
    };
    let seqs = (0..n)
        .map(|_| {
            let toks: Vec<u32> = (0..=s).map(|_| next()).collect();
            Batch {
                b: 1,
                s,
                tokens: toks[..s].to_vec(),
                targets: toks[1..].to_vec(),
                weights: vec![1.0; s],
                positions: (0..s as u32).collect(),
                segments: vec![0; s],
                soft: Vec::new(),
            }
        })
        .collect();
    Dataset {
        seqs,
        examples: n,
        target_tokens: n * s,
        sha256: format!("synthetic-{seed}"),
        description: format!("synthetic {n}x{s}"),
    }
}

/// Packs examples read from `path` into a dataset of sequences of `seq_len` tokens.
pub fn pack_dataset(
    codec: &Codec,
    path: &Path,
    examples: &[Example],
    sha: String,
    seq_len: usize,
) -> Result<Dataset, DataError> {
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string());
    pack_examples(codec, &name, examples, sha, seq_len)
}

/// Reads and packs a data file.
pub fn load(
    codec: &Codec,
    path: &Path,
    seq_len: usize,
    system: Option<&str>,
) -> Result<Dataset, DataError> {
    let (examples, sha) = read_jsonl(codec, path, system)?;
    pack_dataset(codec, path, &examples, sha, seq_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_windows_and_masks() {
        let a = Example {
            tokens: vec![1, 2, 3],
            learn: vec![false, true, true],
            soft: Vec::new(),
            weights: Vec::new(),
        };
        // Soft targets for tokens 5 and 8 of b (15 and 18), each led by the token itself.
        let b = Example {
            tokens: (10..20).collect(),
            learn: vec![true; 10],
            soft: vec![(5, vec![(15, 0.7), (1, 0.3)]), (8, vec![(18, 1.0)])],
            // Token 7 (17) weighs 3; the rest 1.
            weights: (0..10).map(|i| if i == 7 { 3.0 } else { 1.0 }).collect(),
        };
        let seqs = pack(&[a, b], 4, 0);
        // a fits in one sequence (3 tokens, 2 targets); b becomes windows of 4 overlapping by 1.
        assert_eq!(seqs[0].tokens[..3], [1, 2, 3]);
        assert_eq!(seqs[0].weights[..3], [1.0, 1.0, 0.0]);
        assert_eq!(seqs[0].targets[..2], [2, 3]);
        let total: usize = seqs
            .iter()
            .map(|q| q.weights.iter().filter(|w| **w > 0.0).count())
            .sum();
        assert_eq!(total, 2 + 9, "every target predicted exactly once");
        for q in &seqs {
            assert_eq!(q.tokens.len(), 4);
        }
        // Each soft target lands once, at the position that predicts its token.
        let mut n_soft = 0;
        for q in &seqs {
            for (p, d) in &q.soft {
                assert_eq!(q.targets[*p], d[0].0);
                assert!(q.weights[*p] > 0.0);
                n_soft += 1;
            }
        }
        assert_eq!(n_soft, 2);
        // A token's weight lands on the position that predicts it, across windows.
        for q in &seqs {
            for (t, w) in q.targets.iter().zip(&q.weights) {
                if *w > 0.0 && *t >= 11 {
                    assert_eq!(*w, if *t == 17 { 3.0 } else { 1.0 }, "target {t}");
                }
            }
        }
        let st = stack(&seqs.iter().collect::<Vec<_>>());
        for (p, d) in &st.soft {
            assert_eq!(
                st.targets[*p], d[0].0,
                "stacking keeps soft targets in place"
            );
        }
        assert_eq!(st.soft.len(), 2);
    }
}
