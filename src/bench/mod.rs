//! Benchmarks of this machine: model inference measured the way `llama-bench` does
//! ([`infer`]), LoRA training rounds on fixed synthetic data ([`train`]), each optionally
//! against a peer (llama.cpp's llama-bench, PyTorch + PEFT) run on the same file and data, and
//! the medians they report.
//!
//! It must NOT print, parse arguments or pick the model: the caller loads the model and gives
//! the settings; it returns the figures (result structs), [`report`] renders them and the
//! command line prints them.

pub mod infer;
pub mod report;
pub mod train;

/// Median, min and max of a list of figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `v` (all zeros when it is empty).
    pub fn of(v: &[f64]) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// The median of `v` (0 when it is empty).
pub fn median(v: &[f64]) -> f64 {
    Spread::of(v).median
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_lists() {
        assert_eq!(
            Spread::of(&[3.0, 1.0, 2.0]),
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(Spread::of(&[]), Spread::default());
    }
}
