//! The `hone eval` harness: which modes a `--mode` names, what each mode runs, and running
//! every mode in a child process of its own with a fresh data directory (so no mode sees
//! another's notes, adapters or memory peak).
//!
//! The parent gives each child one [`Job`], serialised whole (the learning options included),
//! and reads back the child's [`ModeResult`] from the last line it prints; the child turns its
//! job into a [`Pipeline`] and runs it with [`super::run`].
//!
//! It must NOT print or parse command lines: the caller says how to start a child (the
//! executable's hidden child flag, given the job's JSON), prints the [`Event`]s it reports and
//! the table, and prints a child's result with [`report_line`].

use super::{read_qa, read_retention, ModeResult, Pipeline};
use crate::home::Home;
use crate::learn::{selfedit::Strategy, LearnOptions, Progress};
use crate::registry::{self, ModelChoice};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

/// The modes `mode` names (with `sequential`: K batches instead), in the order they run; the
/// base mode first whenever there is a retention set (the "before" comes from it).
pub fn mode_list(mode: &str, sequential: Option<usize>, retention: bool) -> Result<Vec<String>> {
    if sequential == Some(0) {
        bail!("--sequential needs K >= 1");
    }
    let v: Vec<&str> = match mode {
        _ if sequential.is_some() => vec![],
        "all" => vec!["base", "in-context", "learn", "passage"],
        "ablation" => vec![
            "base",
            "only-passage",
            "only-cloze",
            "only-recall",
            "only-questions",
            "only-qa",
            "only-implications",
            "only-rewrites",
            "only-writer",
            "teacher-qa",
            "combined",
        ],
        m @ ("base" | "in-context" | "passage" | "learn" | "retrieval" | "newest" | "hybrid") => {
            vec![m]
        }
        // One strategy alone (no gate), as in the ablation: `only-writer`, `only-cloze`, ...
        m if m.strip_prefix("only-").is_some_and(|s| Strategy::parse(s).is_ok()) => vec![m],
        m => bail!("unknown --mode {m:?}: use base, in-context, passage, learn, retrieval, newest, hybrid, all or ablation"),
    };
    let mut v: Vec<String> = v.into_iter().map(str::to_string).collect();
    if let Some(k) = sequential {
        v.push(format!("sequential-{k}"));
    }
    if retention && v.first().map(String::as_str) != Some("base") {
        v.insert(0, "base".into());
    }
    Ok(v)
}

/// What `mode` runs, from the options every mode shares. `token_budget` (the tokens the learn
/// mode trained) makes the passage mode train exactly that many, with no early stop.
pub fn pipeline(mode: &str, base: &LearnOptions, token_budget: Option<u64>) -> Result<Pipeline> {
    let with = |strategies: Vec<Strategy>, gate: bool| {
        let mut o = base.clone();
        o.strategies = strategies;
        o.no_gate = !gate;
        o
    };
    Ok(match mode {
        "base" => Pipeline::Base,
        "in-context" => Pipeline::InContext,
        "learn" => Pipeline::Learn(base.clone()),
        "retrieval" => Pipeline::Retrieval,
        "newest" => Pipeline::Newest,
        "hybrid" => Pipeline::Hybrid(base.clone()),
        "passage" => {
            // The notes alone with the same training budget: no self-edits, no anchors.
            let mut o = with(vec![Strategy::Passage], false);
            o.anchor_ratio = 0.0;
            o.token_budget = token_budget;
            o.adaptive = token_budget.is_none();
            o.teacher = None;
            Pipeline::Learn(o)
        }
        "combined" => Pipeline::Learn(with(Strategy::ALL.to_vec(), false)),
        "teacher-qa" => {
            if base.teacher.is_none() {
                bail!("teacher-qa needs --teacher MODEL");
            }
            Pipeline::Learn(with(vec![Strategy::Qa], false))
        }
        m if m.starts_with("only-") => {
            let s = Strategy::parse(&m[5..]).map_err(anyhow::Error::msg)?;
            let mut o = with(vec![s], false);
            o.teacher = None;
            Pipeline::Learn(o)
        }
        m if m.starts_with("sequential-") => {
            let k: usize = m[11..].parse().context("sequential-K")?;
            Pipeline::Sequential(base.clone(), k)
        }
        m => bail!("unknown mode {m:?}"),
    })
}

/// Everything one child needs to run one mode, serialised whole to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub mode: String,
    /// The model as the child's data directory knows it: a manifest name (the file is linked
    /// into its `models/`) or a path.
    pub model: String,
    /// The teacher the same way; the child resolves it (its `teacher` option is not serialised).
    pub teacher: Option<String>,
    /// Absolute paths of the notes with questions and of the retention set.
    pub qa: PathBuf,
    pub retention: Option<PathBuf>,
    /// The options every mode shares; [`pipeline`] derives the mode's own.
    pub options: LearnOptions,
    /// The passage mode's training budget: the tokens the learn mode trained.
    pub token_budget: Option<u64>,
    /// The data directory already holds the learned notes and adapter (`--answer-in`): answer
    /// only.
    #[serde(default)]
    pub answer_only: bool,
}

impl Job {
    /// The job a parent wrote as JSON.
    pub fn from_json(s: &str) -> Result<Job> {
        serde_json::from_str(s).context("reading the eval job its parent process gave")
    }
}

/// In the child: runs `job` in `home` (the fresh data directory its parent made) and scores it.
pub fn run_job(
    home: &Home,
    store: &Store,
    job: &Job,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ModeResult> {
    let qa = read_qa(&job.qa)?;
    let retention = job.retention.as_deref().map(read_retention).transpose()?;
    let choice = registry::resolve(home, store, Some(&job.model))?;
    let mut opts = job.options.clone();
    opts.teacher = None;
    opts.teacher_name = None;
    if let Some(t) = &job.teacher {
        let t = registry::resolve(home, store, Some(t))
            .with_context(|| format!("the teacher model {t:?}"))?;
        opts.teacher_name = Some(t.name.clone());
        opts.teacher = Some(t);
    }
    let p = pipeline(&job.mode, &opts, job.token_budget)?;
    super::run(
        home,
        &choice,
        &p,
        &qa,
        retention.as_deref(),
        job.answer_only,
        cancel,
        progress,
    )
}

/// The line a child prints (last) for its parent: the result as JSON, every answer included.
pub fn report_line(r: &ModeResult) -> Result<String> {
    Ok(serde_json::to_string(r)?)
}

/// What every mode of one evaluation shares.
#[derive(Debug, Clone)]
pub struct Setup {
    pub model: ModelChoice,
    pub teacher: Option<ModelChoice>,
    /// The learning options; each mode's own come from [`pipeline`].
    pub options: LearnOptions,
    /// The notes with questions and the retention set (made absolute by [`Setup::inputs`]).
    pub qa: PathBuf,
    pub retention: Option<PathBuf>,
    /// Keep each mode's data directory, with the child's result in `result.json`.
    pub keep: bool,
    /// A kept learn or hybrid data directory whose notes and adapter the learn and hybrid modes
    /// answer with (a copy of it), instead of learning.
    pub answer_in: Option<PathBuf>,
}

/// Refuses `--answer-in DIR` unless DIR is a data directory (one `hone eval --keep` printed, or
/// a `HONE_HOME` whose notes `hone learn` learned) and every mode that learns is one that can
/// answer in it.
pub fn check_answer_in(dir: &Path, modes: &[String]) -> Result<()> {
    if !dir.join("hone.db").is_file() {
        bail!(
            "{} has no hone.db: --answer-in takes a data directory (one `hone eval --keep` \
             printed, or a HONE_HOME whose notes were learned)",
            dir.display()
        );
    }
    if let Some(m) = modes
        .iter()
        .find(|m| !matches!(m.as_str(), "base" | "learn" | "hybrid"))
    {
        bail!("--answer-in answers with a learned cycle: use --mode learn or hybrid, not {m}");
    }
    Ok(())
}

/// Copies the kept data directory `from` into the fresh `to`, all but its models (linked anew)
/// and its result.
fn copy_kept(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let name = e.file_name();
        if name == "models" || name == "result.json" {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if e.file_type()?.is_dir() {
            std::fs::create_dir_all(&dst)?;
            copy_kept(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

impl Setup {
    /// Reads the notes with questions and the retention set (so a bad file fails before any
    /// mode runs) and returns their absolute paths for the children.
    pub fn inputs(qa: &Path, retention: Option<&Path>) -> Result<(PathBuf, Option<PathBuf>)> {
        read_qa(qa)?;
        if let Some(r) = retention {
            read_retention(r)?;
        }
        Ok((abs(qa)?, retention.map(abs).transpose()?))
    }
}

fn abs(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("cannot find {}", p.display()))
}

/// What the harness is doing, for the caller to show.
#[derive(Debug)]
pub enum Event<'a> {
    /// The mode needs a teacher and there is none.
    SkippedNoTeacher(&'a str),
    Started(&'a str),
    /// The mode's data directory stays (`Setup::keep`), its answers in `result.json`.
    Kept(&'a str, &'a Path),
    Finished(&'a str, &'a ModeResult),
}

/// Runs `modes` one after another, each in a child process that `child` starts given the
/// job's JSON (the harness adds `HONE_HOME` and reads its standard output); the passage mode
/// trains the tokens the learn mode trained before it.
pub fn run_modes(
    setup: &Setup,
    modes: &[String],
    child: &dyn Fn(&str) -> Result<Command>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Vec<(String, ModeResult)>> {
    let mut results: Vec<(String, ModeResult)> = Vec::new();
    let mut learn_tokens = None;
    for m in modes {
        if m == "teacher-qa" && setup.teacher.is_none() {
            on_event(Event::SkippedNoTeacher(m));
            continue;
        }
        on_event(Event::Started(m));
        let token_budget = learn_tokens.filter(|_| m == "passage");
        let r = run_child(setup, m, token_budget, child, on_event)?;
        if m == "learn" {
            learn_tokens = Some(r.train_tokens);
        }
        on_event(Event::Finished(m, &r));
        results.push((m.clone(), r));
    }
    Ok(results)
}

/// Runs one mode in a child process with a fresh data directory holding links to the models.
fn run_child(
    setup: &Setup,
    mode: &str,
    token_budget: Option<u64>,
    child: &dyn Fn(&str) -> Result<Command>,
    on_event: &mut dyn FnMut(Event),
) -> Result<ModeResult> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("hone-eval-{mode}-"))
        .tempdir()
        .context("creating a temporary data directory")?;
    let answer_only = matches!(mode, "learn" | "hybrid") && setup.answer_in.is_some();
    if let (true, Some(from)) = (answer_only, &setup.answer_in) {
        copy_kept(from, dir.path())?;
    }
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models)?;
    let job = Job {
        answer_only,
        mode: mode.to_string(),
        model: link(&setup.model, &models)?,
        teacher: setup
            .teacher
            .as_ref()
            .map(|t| link(t, &models))
            .transpose()?,
        qa: setup.qa.clone(),
        retention: setup.retention.clone(),
        options: setup.options.clone(),
        token_budget,
    };
    let mut cmd = child(&serde_json::to_string(&job)?)?;
    let out = cmd
        .env("HONE_HOME", dir.path())
        .stderr(Stdio::inherit())
        .output()
        .context("running an eval mode")?;
    if !out.status.success() {
        bail!(
            "eval mode {mode} failed ({}); its errors are above",
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    let r: ModeResult =
        serde_json::from_str(last).with_context(|| format!("eval mode {mode} printed {last:?}"))?;
    if setup.keep {
        let kept = dir.keep();
        // Every question with its answer and verdict, to read next to the kept database.
        let file = kept.join("result.json");
        std::fs::write(&file, format!("{last}\n"))
            .with_context(|| format!("writing {}", file.display()))?;
        on_event(Event::Kept(mode, &kept));
    }
    Ok(r)
}

/// How the child names `c`: manifest models by name (linked into its `models/`, where its
/// registry finds them), others by path.
fn link(c: &ModelChoice, models: &Path) -> Result<String> {
    if let (Some(m), Some(name)) = (&c.manifest, c.path.file_name()) {
        let src = std::fs::canonicalize(&c.path)
            .with_context(|| format!("model file {}", c.path.display()))?;
        std::os::unix::fs::symlink(&src, models.join(name))
            .with_context(|| format!("linking {} into {}", src.display(), models.display()))?;
        Ok(m.name.clone())
    } else {
        Ok(c.path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_in_takes_a_kept_directory_and_copies_all_but_its_models() {
        let kept = tempfile::tempdir().unwrap();
        let modes = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let err = check_answer_in(kept.path(), &modes(&["learn"])).unwrap_err();
        assert!(format!("{err:#}").contains("hone.db"), "{err:#}");
        std::fs::write(kept.path().join("hone.db"), "hone.db").unwrap();
        std::fs::write(kept.path().join("result.json"), "{}").unwrap();
        std::fs::create_dir_all(kept.path().join("adapters/smol")).unwrap();
        std::fs::write(kept.path().join("adapters/smol/v1.gguf"), "lora").unwrap();
        std::fs::create_dir_all(kept.path().join("models")).unwrap();
        std::fs::write(kept.path().join("models/m.gguf"), "model").unwrap();
        check_answer_in(kept.path(), &modes(&["base", "hybrid"])).unwrap();
        let err = check_answer_in(kept.path(), &modes(&["retrieval"])).unwrap_err();
        assert!(format!("{err:#}").contains("retrieval"), "{err:#}");
        let to = tempfile::tempdir().unwrap();
        copy_kept(kept.path(), to.path()).unwrap();
        assert_eq!(
            std::fs::read(to.path().join("hone.db")).unwrap(),
            b"hone.db"
        );
        assert_eq!(
            std::fs::read(to.path().join("adapters/smol/v1.gguf")).unwrap(),
            b"lora"
        );
        assert!(!to.path().join("models").exists());
        assert!(!to.path().join("result.json").exists());
    }

    #[test]
    fn modes_put_base_first_when_retention_is_measured() {
        assert_eq!(
            mode_list("learn", None, true).unwrap(),
            vec!["base", "learn"]
        );
        assert_eq!(
            mode_list("all", Some(3), false).unwrap(),
            vec!["sequential-3"]
        );
        assert!(mode_list("all", Some(0), false).is_err());
        assert!(mode_list("nope", None, false).is_err());
    }

    #[test]
    fn the_passage_mode_trains_the_learn_modes_budget_without_stopping_early() {
        let base = LearnOptions::default();
        let Pipeline::Learn(o) = pipeline("passage", &base, Some(1234)).unwrap() else {
            panic!("passage learns")
        };
        assert_eq!(
            (o.token_budget, o.adaptive, o.anchor_ratio),
            (Some(1234), false, 0.0)
        );
        let Pipeline::Learn(o) = pipeline("passage", &base, None).unwrap() else {
            panic!("passage learns")
        };
        assert_eq!((o.token_budget, o.adaptive), (None, true));
    }

    /// The child gets the options through JSON: every number a person would type (up to four
    /// significant digits) must arrive bit for bit.
    #[test]
    fn options_reach_the_child_bit_for_bit() {
        let mut values = Vec::new();
        for exp in -9..=4 {
            for m in 1..10_000u32 {
                values.push(format!("{m}e{exp}"));
            }
        }
        for v in &values {
            let mut o = LearnOptions {
                alpha: v.parse().unwrap(),
                anchor_lead_weight: v.parse().unwrap(),
                lr: v.parse().unwrap(),
                anchor_ratio: v.parse().unwrap(),
                ..LearnOptions::default()
            };
            o.replay_ratio = o.anchor_ratio;
            let back: LearnOptions =
                serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
            assert_eq!(back.alpha.to_bits(), o.alpha.to_bits(), "{v}");
            assert_eq!(
                back.anchor_lead_weight.to_bits(),
                o.anchor_lead_weight.to_bits()
            );
            assert_eq!(back.lr.to_bits(), o.lr.to_bits(), "{v}");
            assert_eq!(back.anchor_ratio.to_bits(), o.anchor_ratio.to_bits());
            assert_eq!(back.temperature.to_bits(), o.temperature.to_bits());
        }
    }
}
