//! The self-edit writer: the model that writes a note's training data (SEAL's self-edits),
//! with an adapter of its own. Which writer writes ([`WriterChoice`]), loading it, writing one
//! self-edit with it ([`write`]), turning the text into kept and dropped items ([`items`]) and
//! back into the canonical text a writer is trained on ([`render`]).
//!
//! Writer versions live in their own table and folder (`writer_versions`, `writers/`), so a
//! writer can never answer the user. The default model's trained writer ships inside the
//! binary ([`shipped`]), so `--strategies writer` works on a fresh install.
//!
//! It must NOT train the writer or compute rewards (that is `teach`), nor decide which
//! strategies a cycle uses.

use super::selfedit::{self, Candidate, Strategy};
use super::NOTES_PREFIX;
use crate::adapters::{self, ModelId};
use crate::codec::Codec;
use crate::engine::Engine;
use crate::home::Home;
use crate::hparams::Config;
use crate::lora::LoraWeights;
use crate::sample::SamplingParams;
use crate::store::{AdapterRecord, Store};
use crate::template::Message;
use crate::train::data::{self, Example};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Which writer writes the `writer` strategy's self-edits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriterChoice {
    /// The model's active writer version, else the writer shipped for it, else the model alone.
    #[default]
    Active,
    /// The model alone, with no writer adapter (SEAL's round 0).
    Untrained,
    /// A writer adapter file (`hone writer export`, or a shipped one).
    File(PathBuf),
}

impl WriterChoice {
    /// `active`, `none`, or a path to a writer file.
    pub fn parse(s: &str) -> WriterChoice {
        match s.trim() {
            "active" => WriterChoice::Active,
            "none" | "untrained" => WriterChoice::Untrained,
            p => WriterChoice::File(PathBuf::from(p)),
        }
    }
}

/// A loaded writer: its weights (None: the model alone) and what they are, for provenance.
#[derive(Clone)]
pub struct Writer {
    pub weights: Option<Arc<LoraWeights>>,
    /// "w3", "shipped", "none" or a file name.
    pub label: String,
    /// The version, when it is one of this data directory's.
    pub version: Option<i64>,
}

impl Writer {
    /// The model alone.
    pub fn untrained() -> Writer {
        Writer {
            weights: None,
            label: "none".into(),
            version: None,
        }
    }
}

/// The trained writer shipped for a model, by the model's sha256: the bytes of its adapter file.
pub fn shipped(model_sha256: &str) -> Option<&'static [u8]> {
    SHIPPED
        .iter()
        .find(|(sha, _)| *sha == model_sha256)
        .map(|(_, b)| *b)
}

/// The writers shipped with hone, by the sha256 of the model they write with (see
/// `writers/README.md` for the command that made each).
const SHIPPED: &[(&str, &[u8])] = &[(
    // SmolLM2-135M-Instruct Q4_1, the default model.
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    include_bytes!("../../writers/smollm2-135m-instruct.writer.f16.safetensors"),
)];

/// Loads the writer `choice` names for `model` (shapes `cfg`), refusing a writer made for
/// another model.
pub fn load(
    home: &Home,
    store: &Store,
    model: &ModelId,
    cfg: &Config,
    choice: &WriterChoice,
) -> Result<Writer> {
    match choice {
        WriterChoice::Untrained => Ok(Writer::untrained()),
        WriterChoice::File(path) => {
            let (w, fm) = adapters::read_file(path)
                .with_context(|| format!("reading the writer file {}", path.display()))?;
            check_model(&w, &fm.model, model, cfg, &path.display().to_string())?;
            Ok(Writer {
                weights: Some(Arc::new(w.prepare()?)),
                label: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                version: None,
            })
        }
        WriterChoice::Active => {
            if let Some(rec) = store.active_writer(&model.sha256)? {
                let w = adapters::load_version(home, &rec, model, cfg)
                    .with_context(|| format!("loading writer w{}", rec.version))?;
                return Ok(Writer {
                    weights: Some(Arc::new(w.prepare()?)),
                    label: format!("w{}", rec.version),
                    version: Some(rec.version),
                });
            }
            match shipped(&model.sha256) {
                Some(bytes) => {
                    let name = PathBuf::from("<shipped writer>");
                    let (w, fm) = adapters::parse_file(&name, bytes)?;
                    check_model(&w, &fm.model, model, cfg, "the shipped writer")?;
                    Ok(Writer {
                        weights: Some(Arc::new(w.prepare()?)),
                        label: "shipped".into(),
                        version: None,
                    })
                }
                None => Ok(Writer::untrained()),
            }
        }
    }
}

fn check_model(
    w: &LoraWeights,
    made_for: &ModelId,
    model: &ModelId,
    cfg: &Config,
    what: &str,
) -> Result<()> {
    if made_for.sha256 != model.sha256 || made_for.architecture != model.architecture {
        anyhow::bail!(
            "{what} is a writer for {} ({}, sha256 {}…), not for {} (sha256 {}…); train one for this model with `hone writer train --qa FILE --model {}`",
            made_for.name,
            made_for.architecture,
            made_for.sha256.chars().take(12).collect::<String>(),
            model.name,
            model.sha256.chars().take(12).collect::<String>(),
            model.name
        );
    }
    w.check_shapes(cfg)?;
    Ok(())
}

/// The worked example the writer sees before each note (a fictional note that shares no name
/// with any note set of this repository): one turn of the format, and one implied answer.
const EXAMPLE_NOTE: &str = "My cousin Quillan moved to Aalborg in 2019, two years after he finished his degree. He pays 850 euros a month in rent.";
const EXAMPLE_EDIT: &str = "Q: Where does Quillan live?\nA: Aalborg\nQ: In which year did Quillan finish his degree?\nA: 2017\nQ: How much rent does Quillan pay?\nA: 850 euros a month";

/// What every self-edit starts with: the writer's answer is begun with it, so that even an
/// untrained writer writes in the format.
pub const OPENING: &str = "Q:";

/// The conversation that asks the writer for `note`'s self-edit: the worked example as an
/// earlier turn, then the note.
pub fn messages(system: Option<&str>, note: &str) -> Vec<Message> {
    let ask = |n: &str| selfedit::prompt_for(Strategy::Writer, n).unwrap_or_default();
    let mut m: Vec<Message> = system.map(Message::system).into_iter().collect();
    m.push(Message::user(&ask(EXAMPLE_NOTE)));
    m.push(Message::assistant(EXAMPLE_EDIT));
    m.push(Message::user(&ask(note)));
    m
}

/// A training example that teaches the writer to answer `note` with `edit` (only that turn is
/// learned).
pub fn example(codec: &Codec, system: Option<&str>, note: &str, edit: &str) -> Result<Example> {
    let mut m = messages(system, note);
    m.push(Message::assistant(edit));
    data::chat_last_turn(codec, &m).map_err(anyhow::Error::msg)
}

/// Writes one self-edit for `note` with `writer` on `engine` (whose own adapter is put back
/// afterwards).
pub fn write(
    engine: &mut Engine,
    writer: &Writer,
    system: Option<&str>,
    note: &str,
    params: &SamplingParams,
    max_tokens: usize,
    cancel: &AtomicBool,
) -> Result<String> {
    let before = engine.model.adapter().cloned();
    engine.model.set_adapter(writer.weights.clone());
    engine.reset();
    let out = (|| -> Result<String> {
        let mut toks = engine.chat_tokens(&messages(system, note))?;
        toks.extend(engine.text_tokens(OPENING, false)?);
        let g = engine.generate(&toks, params, max_tokens, cancel, &mut |_| {})?;
        Ok(format!("{OPENING}{}", g.text))
    })();
    engine.model.set_adapter(before);
    engine.reset();
    out
}

/// The writer's text as items with verdicts (the `writer` strategy's filters); with
/// `attribute`, answers open with [`NOTES_PREFIX`] as the rule-made questions' do.
pub fn items(note: &str, raw: &str, attribute: bool, seen: &mut HashSet<String>) -> Vec<Candidate> {
    let mut v = selfedit::filter(Strategy::Writer, note, raw, seen);
    if attribute {
        for c in v.iter_mut().filter(|c| c.dropped.is_none()) {
            c.completion = format!("{NOTES_PREFIX} {}", c.completion);
        }
    }
    v
}

/// The kept items as the canonical text a writer learns to write ("Q: …" / "A: …" lines;
/// attribution removed).
pub fn render(kept: &[&Candidate]) -> String {
    let mut out = String::new();
    for c in kept {
        let a = c
            .completion
            .strip_prefix(NOTES_PREFIX)
            .unwrap_or(&c.completion)
            .trim();
        if let Some(q) = &c.prompt {
            out.push_str(&format!("Q: {}\nA: {a}\n", q.trim()));
        }
    }
    out.trim_end().to_string()
}

/// The writer versions of the model with this sha256, oldest first.
pub fn versions(store: &Store, model_sha256: &str) -> Result<Vec<AdapterRecord>> {
    Ok(store
        .writers()?
        .into_iter()
        .filter(|r| r.model_sha256 == model_sha256)
        .collect())
}

/// Makes writer `version` the writer of its model, after checking its file.
pub fn use_version(home: &Home, store: &Store, version: i64) -> Result<AdapterRecord> {
    let rec = store
        .writer(version)?
        .with_context(|| format!("there is no writer version {version} (`hone writer list`)"))?;
    adapters::read_checked(home, &rec)
        .with_context(|| format!("writer w{version} was not made the writer"))?;
    store.set_active_writer(&rec.model_sha256, Some(version))?;
    Ok(rec)
}

/// Writes writer `version`'s weights to `out` (checked first), in half precision with `f16`.
pub fn export(
    home: &Home,
    store: &Store,
    version: i64,
    out: &std::path::Path,
    f16: bool,
) -> Result<()> {
    let rec = store
        .writer(version)?
        .with_context(|| format!("there is no writer version w{version} (`hone writer list`)"))?;
    let (w, meta) = adapters::read_checked(home, &rec)?;
    let bytes = adapters::file_bytes(&w, &meta, f16)?;
    crate::lora::write_atomic(out, &bytes)
        .with_context(|| format!("writing writer w{version} to {}", out.display()))
}

/// Goes back from the model's writer to its parent (or to the model alone); returns (from, to).
pub fn rollback(store: &Store, model_sha256: &str) -> Result<(i64, Option<i64>)> {
    let cur = store
        .active_writer(model_sha256)?
        .context("no writer version is in use for this model: nothing to roll back")?;
    let to = cur.parent.filter(|p| *p != cur.version);
    store.set_active_writer(model_sha256, to)?;
    Ok((cur.version, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTE: &str = "I started at Vantor Logistics in September 2018 and was promoted to shift lead exactly three years later.";

    #[test]
    fn implied_numbers_pass_and_render_round_trips() {
        let raw = "Q: Where was I promoted to shift lead?\nA: Vantor Logistics\nQ: In which year was I promoted?\nA: 2021\nQ: What is my dog called?\nA: Rex\nQ: When did Quillan start at Vantor Logistics?\nA: September 2018";
        let mut seen = HashSet::new();
        let v = items(NOTE, raw, true, &mut seen);
        let kept: Vec<&Candidate> = v.iter().filter(|c| c.dropped.is_none()).collect();
        assert_eq!(kept.len(), 2, "{v:?}");
        assert!(kept[1].completion.starts_with(NOTES_PREFIX));
        assert!(v[2].dropped.as_deref().unwrap().contains("not grounded"));
        assert!(
            v[3].dropped.as_deref().unwrap().contains("Quillan"),
            "{v:?}"
        );
        let text = render(&kept);
        assert_eq!(
            text,
            "Q: Where was I promoted to shift lead?\nA: Vantor Logistics\nQ: In which year was I promoted?\nA: 2021"
        );
        // The plain QA strategy still refuses the implied year.
        let mut seen = HashSet::new();
        let qa = selfedit::filter(Strategy::Qa, NOTE, raw, &mut seen);
        assert!(qa[1].dropped.is_some());
    }

    #[test]
    fn choice_parses() {
        assert_eq!(WriterChoice::parse("none"), WriterChoice::Untrained);
        assert_eq!(WriterChoice::parse("active"), WriterChoice::Active);
        assert_eq!(
            WriterChoice::parse("/x/w.safetensors"),
            WriterChoice::File("/x/w.safetensors".into())
        );
    }
}
