//! When a learning cycle has learned what it can: the rule that ends its training before the
//! planned steps (5 epochs, at least 100 steps) once the new notes' held-out probes pass and the
//! training loss has flattened, and the record of every check it made.
//!
//! The cycle trains in stretches of `period` steps (one epoch, at least 20 steps); after each
//! stretch from the second epoch on, it asks [`EarlyStop::loss_is_flat`], and only when the loss
//! has flattened (a cycle never stops while it is still falling) answers the new probes with the
//! adapter as it is (the gate's own test, the costly part of a check) and asks
//! [`EarlyStop::decide`]. The learning-rate schedule stays the planned
//! one, so a cycle that stops early ends at a higher learning rate than a full one.
//!
//! Must not: look at the evaluation's questions (only the rule-made probes that the gate uses),
//! or stop before two epochs (the first epoch's loss says nothing about flattening).

use serde::{Deserialize, Serialize};

/// One look at the adapter between stretches of training.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    /// Steps trained when it was made.
    pub step: usize,
    /// New probes answered correctly, of `probes`; None: not asked, because the loss was still
    /// falling (training could not stop there whatever the probes said).
    pub correct: Option<usize>,
    pub probes: usize,
    /// Mean training loss over the stretch before it, and over the stretch before that.
    pub loss: f32,
    pub loss_before: f32,
    /// Whether training stopped here.
    pub stop: bool,
}

/// The rule and its checks so far.
#[derive(Debug, Clone)]
pub struct EarlyStop {
    planned: usize,
    period: usize,
    first: usize,
    need: usize,
    probes: usize,
    pub checks: Vec<Check>,
}

/// The loss has flattened when a stretch improves on the one before by less than this share.
const FLAT: f32 = 0.2;
/// ... or when it is below this (nats per answer token): nothing left to learn.
const FLOOR: f32 = 0.05;
/// The least share of the new probes answered for a cycle to stop early.
const MIN_SHARE: f64 = 0.8;

impl EarlyStop {
    /// For a run of `planned` steps over `seqs` sequences per epoch, with `probes` new probes of
    /// which the gate wants `min_new` (a share) answered.
    pub fn new(seqs: usize, planned: usize, probes: usize, min_new: f64) -> Self {
        let period = seqs.max(20);
        EarlyStop {
            planned,
            period,
            first: (2 * seqs).max(40),
            // The gate's share, but at least four in five: stopping is for cycles that learned
            // their notes, not for ones that only scrape past the gate.
            need: ((probes as f64) * min_new.max(MIN_SHARE)).ceil() as usize,
            probes,
            checks: Vec::new(),
        }
    }

    /// The step after which the next check is due (the planned total when none is left).
    pub fn next_check(&self, step: usize) -> usize {
        if step < self.first {
            return self.first.min(self.planned);
        }
        let k = (step - self.first) / self.period + 1;
        (self.first + k * self.period).min(self.planned)
    }

    /// Whether a check is due after `step` (not at the very end, where training stops anyway).
    pub fn due(&self, step: usize) -> bool {
        step < self.planned && step >= self.first && (step - self.first).is_multiple_of(self.period)
    }

    /// The mean training loss of the last stretch and of the one before it, and whether it has
    /// flattened: improved by less than a fifth, or fallen below the floor.
    fn losses(&self, losses: &[f32]) -> (f32, f32, bool) {
        let mean = |w: &[f32]| w.iter().sum::<f32>() / w.len().max(1) as f32;
        let n = losses.len();
        let p = self.period.min(n / 2).max(1);
        let loss = mean(&losses[n.saturating_sub(p)..]);
        let loss_before = mean(&losses[n.saturating_sub(2 * p)..n.saturating_sub(p)]);
        (
            loss,
            loss_before,
            loss < FLOOR || loss > (1.0 - FLAT) * loss_before,
        )
    }

    /// Whether the loss has flattened, so that a check after these losses could stop training
    /// and is worth its probe answers.
    pub fn loss_is_flat(&self, losses: &[f32]) -> bool {
        self.losses(losses).2
    }

    /// Records the check after `step` (with `correct` new probes answered, None when they were
    /// not asked, and the run's losses so far) and says whether to stop: the probes pass (all of
    /// them, or at least four in five and no more than at the best check before that asked them:
    /// nothing gained) and the loss is flat.
    pub fn decide(&mut self, step: usize, correct: Option<usize>, losses: &[f32]) -> bool {
        let (loss, loss_before, flat) = self.losses(losses);
        let best_before = self.checks.iter().filter_map(|c| c.correct).max();
        let probes_pass = correct.is_some_and(|c| {
            c >= self.probes || (c >= self.need && best_before.is_some_and(|b| c <= b))
        });
        let stop = flat && probes_pass;
        self.checks.push(Check {
            step,
            correct,
            probes: self.probes,
            loss,
            loss_before,
            stop,
        });
        stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_come_every_epoch_from_the_second_on() {
        let e = EarlyStop::new(126, 630, 40, 0.5);
        assert_eq!(e.next_check(0), 252);
        assert_eq!(e.next_check(252), 378);
        assert_eq!(e.next_check(600), 630);
        assert!(e.due(252) && e.due(378) && e.due(504) && !e.due(630) && !e.due(300));
        // A small cycle: 5 sequences, 100 steps: checks at 40, 60, 80.
        let s = EarlyStop::new(5, 100, 4, 0.5);
        assert_eq!(s.next_check(0), 40);
        assert!(s.due(40) && s.due(60) && s.due(80) && !s.due(100));
    }

    #[test]
    fn stops_only_when_probes_pass_and_the_loss_is_flat() {
        let mut e = EarlyStop::new(10, 100, 10, 0.5);
        // Loss still falling fast: no stop even with every probe right.
        let falling: Vec<f32> = (0..40).map(|i| 2.0 - i as f32 * 0.04).collect();
        assert!(!EarlyStop::new(10, 100, 10, 0.5).decide(40, Some(10), &falling));
        assert!(!e.decide(40, Some(5), &falling));
        // Flat loss, but only 4 of 10 probes: go on.
        let flat: Vec<f32> = (0..60).map(|i| if i < 40 { 1.0 } else { 0.9 }).collect();
        assert!(!e.decide(60, Some(4), &flat));
        // Flat, 8 of 10 (four in five) and more than before: still gaining, go on.
        let flat2: Vec<f32> = (0..80).map(|_| 0.9).collect();
        assert!(!e.decide(80, Some(8), &flat2));
        // Flat and no gain over the best check: stop.
        let flat3: Vec<f32> = (0..100).map(|_| 0.9).collect();
        assert!(e.decide(90, Some(8), &flat3));
        assert_eq!(e.checks.len(), 4);
        assert!(e.checks[3].stop && !e.checks[2].stop);
        assert!(
            (e.checks[3].loss - 0.9).abs() < 1e-6 && e.checks[0].loss < e.checks[0].loss_before
        );
        // Enough for the gate (half) but under four in five, and no gain: go on.
        let mut g = EarlyStop::new(10, 100, 10, 0.5);
        assert!(!g.decide(40, Some(7), &flat3[..40]));
        assert!(!g.decide(60, Some(7), &flat3[..60]));
        // Every probe right and the loss at the floor: stop at the first check.
        let mut f = EarlyStop::new(10, 100, 4, 0.5);
        // (four probes: four in five is all of them)
        let low: Vec<f32> = (0..40).map(|i| if i < 20 { 0.5 } else { 0.01 }).collect();
        assert!(f.decide(40, Some(4), &low));
    }

    #[test]
    fn a_check_while_the_loss_falls_asks_no_probes_and_never_stops() {
        let mut e = EarlyStop::new(10, 100, 10, 0.5);
        let falling: Vec<f32> = (0..40).map(|i| 2.0 - i as f32 * 0.04).collect();
        assert!(!e.loss_is_flat(&falling));
        assert!(!e.decide(40, None, &falling));
        // A later flat check with 8 of 10 compares only with checks that asked the probes:
        // none did, so it is a gain, and training goes on.
        let flat: Vec<f32> = (0..60).map(|_| 0.9).collect();
        assert!(e.loss_is_flat(&flat));
        assert!(!e.decide(60, Some(8), &flat));
        assert!(e.decide(80, Some(8), &flat));
        assert_eq!(e.checks[0].correct, None);
        // A report written before `correct` could be absent still reads.
        let old: Check = serde_json::from_str(
            r#"{"step":3,"correct":2,"probes":4,"loss":0.5,"loss_before":0.6,"stop":false}"#,
        )
        .unwrap();
        assert_eq!(old.correct, Some(2));
    }
}
