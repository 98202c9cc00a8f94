//! Medians and ranges of repeated measurements.

use std::time::Duration;

/// Median and range of a set of repeated measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    /// `None` for an empty set or one holding a value that is not finite.
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 };
        Some(Summary { median, min: sorted[0], max: sorted[sorted.len() - 1], count: sorted.len() })
    }

    pub fn of_durations(values: &[Duration], unit: Unit) -> Option<Summary> {
        Summary::of(&values.iter().map(|d| unit.of(*d)).collect::<Vec<_>>())
    }

    /// Positive and finite throughout (what every figure here must be).
    pub fn is_sane(&self) -> bool {
        self.min > 0.0 && self.max.is_finite() && self.min <= self.median && self.median <= self.max
    }
}

/// The value at fraction `p` (0..=1) of a sorted slice, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Element-wise ratios `a[i] / b[i]` of two series measured in the same rounds.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

#[derive(Clone, Copy, Debug)]
pub enum Unit {
    Millis,
}

impl Unit {
    pub fn of(self, d: Duration) -> f64 {
        match self {
            Unit::Millis => d.as_secs_f64() * 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0, 4.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.count), (3.0, 1.0, 10.0, 5));
        assert!(s.is_sane());
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[1.0, f64::NAN]).is_none());
        assert!(!Summary::of(&[0.0, 1.0]).unwrap().is_sane());
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
    }

    #[test]
    fn percentiles_and_ratios() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(ratios(&[4.0, 9.0], &[2.0, 3.0]), [2.0, 3.0]);
    }
}
