//! The optimiser side of training: AdamW with decoupled weight decay whose moments are plain
//! vectors (so they are saved with the checkpoint and a resumed run continues exactly), the
//! learning-rate schedule (linear warmup, then cosine or linear decay), and global-norm clipping.
//!
//! It must not compute gradients or know the model; it maps (params, grads) to new params.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at optimiser step `step` (0-based) of `total`.
pub fn lr_at(
    base: f64,
    min_ratio: f64,
    warmup: usize,
    total: usize,
    decay: Decay,
    step: usize,
) -> f64 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step.saturating_sub(warmup)) as f64 / span).clamp(0.0, 1.0);
    let min = base * min_ratio;
    match decay {
        Decay::Constant => base,
        Decay::Linear => base + (min - base) * t,
        Decay::Cosine => min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW state for a list of parameter vectors.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub p: AdamWParams,
    /// Updates applied so far (bias correction uses it).
    pub t: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(p: AdamWParams, sizes: &[usize]) -> Self {
        Self {
            p,
            t: 0,
            m: sizes.iter().map(|n| vec![0.0; *n]).collect(),
            v: sizes.iter().map(|n| vec![0.0; *n]).collect(),
        }
    }

    /// One update of every parameter in place.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) {
        self.t += 1;
        let (b1, b2) = (self.p.beta1, self.p.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        let decay = (1.0 - lr * self.p.weight_decay) as f32;
        let eps = self.p.eps;
        // Every element is updated on its own, so the tensors go to the threads in parallel.
        use rayon::prelude::*;
        params
            .par_iter_mut()
            .zip(grads.par_iter())
            .zip(self.m.par_iter_mut().zip(self.v.par_iter_mut()))
            .for_each(|((w, g), (m, v))| {
                for (((wj, &gj), mj), vj) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                {
                    let gj = gj as f64;
                    let mn = b1 * *mj as f64 + (1.0 - b1) * gj;
                    let vn = b2 * *vj as f64 + (1.0 - b2) * gj * gj;
                    *mj = mn as f32;
                    *vj = vn as f32;
                    let upd = (mn / c1) / ((vn / c2).sqrt() + eps);
                    *wj = *wj * decay - (lr * upd) as f32;
                }
            });
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / (norm + 1e-12)) as f32;
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= s;
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_and_decays() {
        assert!((lr_at(1.0, 0.1, 10, 100, Decay::Cosine, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(1.0, 0.1, 10, 100, Decay::Cosine, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, 0.1, 10, 100, Decay::Cosine, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(1.0, 0.0, 0, 10, Decay::Linear, 5) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_clipping_bounds_the_norm() {
        let mut w = vec![vec![5.0f32, -3.0]];
        let mut opt = AdamW::new(AdamWParams::default(), &[2]);
        for _ in 0..500 {
            let mut g = vec![w[0].iter().map(|x| 2.0 * x).collect::<Vec<f32>>()];
            clip_global_norm(&mut g, 1.0);
            opt.step(&mut w, &g, 0.05);
        }
        assert!(w[0].iter().all(|x| x.abs() < 0.05), "{w:?}");
        let mut g = vec![vec![3.0f32, 4.0]];
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!((g[0][0] - 0.6).abs() < 1e-6);
    }
}
