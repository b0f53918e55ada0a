//! Percentile summaries of recorded durations.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Percentiles in milliseconds (nearest-rank).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summarizes durations given in microseconds; None when there are none.
    pub fn of_micros(mut micros: Vec<u64>) -> Option<Self> {
        if micros.is_empty() {
            return None;
        }
        micros.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        let rank = |q: f64| {
            let index = (q * micros.len() as f64).ceil() as usize;
            micros[index.clamp(1, micros.len()) - 1]
        };
        let total: u128 = micros.iter().map(|&us| us as u128).sum();
        Some(Self {
            count: micros.len(),
            mean: total as f64 / micros.len() as f64 / 1000.0,
            p50: ms(rank(0.50)),
            p90: ms(rank(0.90)),
            p99: ms(rank(0.99)),
            max: ms(micros[micros.len() - 1]),
        })
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The median of some measurements (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of_micros((1..=100).map(|i| i * 1000).collect()).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(s.count, 100);
        assert!((s.mean - 50.5).abs() < 1e-9);
        let one = Summary::of_micros(vec![1500]).unwrap();
        assert_eq!((one.p50, one.p99), (1.5, 1.5));
        assert!(Summary::of_micros(Vec::new()).is_none());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
    }
}
