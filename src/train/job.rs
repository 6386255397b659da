//! One training job, the same for every trainer (`hone train`, a learning cycle, and any later
//! one): resume the unfinished run from its checkpoint or start one (fresh, or continuing given
//! weights), run in stretches with a cancel flag and periodic checkpoints, save a checkpoint
//! when interrupted, and at the end save the weights as a new adapter version — activated or
//! not (a candidate waits for its gate; a writer's adapter is never used to answer).
//!
//! A checkpoint write that fails (a full disk) does not end the run: the previous checkpoint is
//! intact (writes are atomic), training goes on and the next step tries again; the caller is
//! told once per streak of failures and once when a write succeeds again.
//!
//! It must not plan (the caller brings the configuration and packed data), print, or decide
//! policy such as gating; it reports progress through [`JobEvent`]s.

use super::data::Dataset;
use super::{Outcome, StepReport, TrainConfig, TrainError, Trainer};
use crate::adapters::{self, AdapterError, Kind, ModelId, NewVersion};
use crate::home::Home;
use crate::lora::LoraWeights;
use crate::model::Model;
use crate::store::Store;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Train(Box<TrainError>),
    #[error("an unfinished run was found in {path}, but it cannot be resumed: {source} (add --fresh to start again)")]
    Resume {
        path: PathBuf,
        #[source]
        source: Box<TrainError>,
    },
    #[error("could not save the checkpoint at step {step}; {}: {source}", kept_hint(*kept, path))]
    Checkpoint {
        step: usize,
        kept: Option<usize>,
        path: PathBuf,
        #[source]
        source: Box<TrainError>,
    },
    #[error("the run finished but its adapter could not be saved{}; free some space and run again: {source}",
        if *checkpoint_kept { format!(" (its progress is kept in {})", path.display()) } else { String::new() })]
    Save {
        path: PathBuf,
        checkpoint_kept: bool,
        #[source]
        source: Box<AdapterError>,
    },
}

fn kept_hint(kept: Option<usize>, path: &Path) -> String {
    match kept {
        Some(s) => format!(
            "the checkpoint of step {s} ({}) is kept, run again to resume from it once there is space",
            path.display()
        ),
        None => "free some space and train again".into(),
    }
}

type Result<T> = std::result::Result<T, JobError>;

impl From<TrainError> for JobError {
    fn from(e: TrainError) -> Self {
        Self::Train(Box::new(e))
    }
}

/// What to do with a checkpoint that exists but cannot be resumed (another configuration, data
/// or model, or a damaged file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadCheckpoint {
    /// Stop with an error that names the file (the user asked for this run and decides).
    Fail,
    /// Warn in the log and start the run again (a cycle that the user never started by hand).
    Restart,
}

/// Everything a job needs besides the model.
pub struct JobSpec {
    pub cfg: TrainConfig,
    pub data: Dataset,
    /// Bytes of frozen-layer outputs the trainer may keep.
    pub cache_limit: u64,
    /// Where the run's checkpoint lives (resumed from when present).
    pub checkpoint: PathBuf,
    /// A fresh run continues these weights instead of a new initialisation.
    pub init: Option<LoraWeights>,
    pub bad_checkpoint: BadCheckpoint,
    /// Checkpoint every N steps (besides the time limit); `None`: by time only.
    pub save_every_steps: Option<usize>,
    /// Checkpoint when this long has passed since the last one.
    pub save_every: Duration,
}

/// What a job tells its caller as it goes.
pub enum JobEvent<'a> {
    Step(&'a StepReport),
    /// A checkpoint write failed (the first of a streak); `kept` is the step of the checkpoint
    /// still on disk.
    CheckpointFailed {
        step: usize,
        error: String,
        kept: Option<usize>,
    },
    /// A checkpoint was written again after failures.
    CheckpointRecovered {
        step: usize,
    },
}

/// A run in progress.
pub struct TrainJob<'m> {
    pub trainer: Trainer<'m>,
    checkpoint: PathBuf,
    /// The step the run resumed at (`None`: it started here).
    pub resumed_at: Option<usize>,
    save_every_steps: Option<usize>,
    save_every: Duration,
    last_save: Instant,
    save_failed: bool,
    saved_step: Option<usize>,
}

/// A finished job's new adapter version.
pub struct Finished {
    pub version: i64,
    pub weights: LoraWeights,
    pub cfg: TrainConfig,
    pub steps: usize,
    pub losses: Vec<f32>,
    pub tokens: u64,
    pub seconds: f64,
    checkpoint: PathBuf,
}

impl Finished {
    /// Removes the run's checkpoint, once the caller has recorded the new version.
    pub fn clear_checkpoint(&self) {
        let _ = std::fs::remove_file(&self.checkpoint);
    }
}

impl<'m> TrainJob<'m> {
    /// Resumes the run from its checkpoint when there is one, else starts it.
    pub fn start(model: &'m Model, model_sha256: &str, spec: JobSpec) -> Result<Self> {
        let JobSpec {
            cfg,
            data,
            cache_limit,
            checkpoint,
            init,
            bad_checkpoint,
            save_every_steps,
            save_every,
        } = spec;
        let fresh = |cfg: TrainConfig, data: Dataset, init: Option<LoraWeights>| match init {
            Some(w) => Trainer::from_weights(model, cfg, data, w, model_sha256),
            None => Trainer::new(model, cfg, data, model_sha256),
        };
        let (mut trainer, resumed_at) = if checkpoint.exists() {
            match Trainer::resume(model, cfg.clone(), data.clone(), model_sha256, &checkpoint) {
                Ok(t) => {
                    let at = t.step;
                    (t, Some(at))
                }
                Err(source) if bad_checkpoint == BadCheckpoint::Fail => {
                    return Err(JobError::Resume {
                        path: checkpoint,
                        source: Box::new(source),
                    })
                }
                Err(e) => {
                    tracing::warn!(
                        "not resuming {}: {e}; starting the training again",
                        checkpoint.display()
                    );
                    (fresh(cfg, data, init)?, None)
                }
            }
        } else {
            (fresh(cfg, data, init)?, None)
        };
        trainer.cache_limit = cache_limit;
        Ok(Self {
            trainer,
            checkpoint,
            saved_step: resumed_at.filter(|s| *s > 0),
            resumed_at,
            save_every_steps,
            save_every,
            last_save: Instant::now(),
            save_failed: false,
        })
    }

    /// The checkpoint's path.
    pub fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }

    /// Trains up to step `until` (at most the planned steps), checkpointing as it goes. When
    /// `cancel` stops it, the checkpoint is saved before this returns `Interrupted`.
    pub fn run_until(
        &mut self,
        until: usize,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Outcome> {
        let ckpt = self.checkpoint.clone();
        let (every_steps, every) = (self.save_every_steps, self.save_every);
        let last_save = &mut self.last_save;
        let save_failed = &mut self.save_failed;
        let saved_step = &mut self.saved_step;
        let outcome = self.trainer.run_until(until, cancel, &mut |r, t| {
            on_event(JobEvent::Step(r));
            let due = every_steps.is_some_and(|n| r.step % n.max(1) == 0)
                || last_save.elapsed() >= every
                || *save_failed;
            if r.step < r.steps && due {
                match t.save_checkpoint(&ckpt) {
                    Ok(_) => {
                        if std::mem::take(save_failed) {
                            on_event(JobEvent::CheckpointRecovered { step: r.step });
                        }
                        *saved_step = Some(r.step);
                    }
                    Err(e) => {
                        if !*save_failed {
                            on_event(JobEvent::CheckpointFailed {
                                step: r.step,
                                error: e.to_string(),
                                kept: *saved_step,
                            });
                        }
                        *save_failed = true;
                    }
                }
                *last_save = Instant::now();
            }
            Ok(())
        })?;
        if outcome == Outcome::Interrupted {
            self.save_checkpoint()?;
        }
        Ok(outcome)
    }

    /// Trains every planned step (see [`run_until`](Self::run_until)).
    pub fn run(
        &mut self,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Outcome> {
        let steps = self.trainer.cfg.steps;
        self.run_until(steps, cancel, on_event)
    }

    /// Saves the checkpoint now; the error says which earlier checkpoint is still on disk.
    pub fn save_checkpoint(&mut self) -> Result<()> {
        match self.trainer.save_checkpoint(&self.checkpoint) {
            Ok(_) => {
                self.saved_step = Some(self.trainer.step);
                Ok(())
            }
            Err(source) => Err(JobError::Checkpoint {
                step: self.trainer.step,
                kept: self.saved_step,
                path: self.checkpoint.clone(),
                source: Box::new(source),
            }),
        }
    }

    /// Saves the trained weights as a new adapter version of `model` with `parent`, described
    /// by `data` (activated when `activate`). If the save fails, the run's progress is kept in
    /// its checkpoint. The checkpoint stays until [`Finished::clear_checkpoint`].
    pub fn finish(
        self,
        home: &Home,
        store: &mut Store,
        model: &ModelId,
        parent: Option<i64>,
        data: String,
        activate: bool,
    ) -> Result<Finished> {
        self.finish_as(Kind::Answer, home, store, model, parent, data, activate)
    }

    /// [`finish`](Self::finish) for either kind of version (a self-edit writer is saved as a
    /// writer version, which never answers).
    #[allow(clippy::too_many_arguments)]
    pub fn finish_as(
        self,
        kind: Kind,
        home: &Home,
        store: &mut Store,
        model: &ModelId,
        parent: Option<i64>,
        data: String,
        activate: bool,
    ) -> Result<Finished> {
        let tr = &self.trainer;
        let weights = tr.weights()?;
        let nv = NewVersion {
            parent,
            config_json: serde_json::to_string(&tr.cfg)
                .map_err(|e| TrainError::Checkpoint(e.to_string()))?,
            data: Some(data),
            data_sha256: Some(tr.data().sha256.clone()),
            losses: tr.losses.clone(),
            steps: tr.step as u64,
            tokens: tr.tokens_done,
            seconds: Some(tr.seconds),
        };
        let version = match adapters::save_kind(kind, home, store, model, &weights, &nv, activate) {
            Ok(v) => v,
            Err(source) => {
                let _ = tr.save_checkpoint(&self.checkpoint);
                return Err(JobError::Save {
                    checkpoint_kept: self.checkpoint.exists(),
                    path: self.checkpoint.clone(),
                    source: Box::new(source),
                });
            }
        };
        Ok(Finished {
            version,
            weights,
            cfg: tr.cfg.clone(),
            steps: tr.step,
            losses: tr.losses.clone(),
            tokens: tr.tokens_done,
            seconds: tr.seconds,
            checkpoint: self.checkpoint,
        })
    }
}

/// A plan chosen inside the memory budget and the data packed for it.
pub struct Packed {
    pub plan: super::plan::Plan,
    pub data: Dataset,
    /// Bytes of frozen-layer outputs the trainer may keep under the budget.
    pub cache_limit: u64,
}

/// Chooses the fastest configuration that fits `req`'s budget and packs `examples` (named
/// `name` in messages) into sequences of its length.
pub fn plan_and_pack(
    mcfg: &crate::hparams::Config,
    req: &super::plan::PlanRequest,
    codec: &crate::codec::Codec,
    name: &str,
    examples: &[super::data::Example],
    data_sha: String,
) -> std::result::Result<Packed, TrainError> {
    let plan = super::plan::choose(mcfg, req)?;
    let data = super::data::pack_examples(codec, name, examples, data_sha, plan.seq_len)?;
    let cache_limit = super::plan::cache_bytes(mcfg, &plan, data.seqs.len(), req.budget);
    Ok(Packed {
        plan,
        data,
        cache_limit,
    })
}
