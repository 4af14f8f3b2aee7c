//! The shape of a `delay` fault's latency: a fixed delay, or one drawn per request from a
//! seeded distribution around it, so a lab can give a disk a median and a tail (p99) of its
//! choosing and get the same draws again from the same seed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fields::ArgError;

/// The longest delay a fault may hold a request (an hour), given or drawn.
pub const MAX_DELAY_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Every request waits `delay_ms`: no jitter.
    Fixed,
    /// `delay_ms + jitter_ms * (2u - 1)`, at least 0: median `delay_ms`.
    Uniform,
    /// `delay_ms - jitter_ms * ln(1 - u)`: `delay_ms` plus an exponential wait of mean
    /// `jitter_ms`.
    Exponential,
    /// `delay_ms + jitter_ms * ((1 - u)^(-1/2) - 1)`: `delay_ms` plus a Lomax (Pareto II)
    /// wait of shape 2 and scale `jitter_ms`, a heavy tail.
    Pareto,
}

/// How far a delay strays from `delay_ms`, drawn per request (`u` uniform in [0, 1) from a
/// generator seeded with `seed`). `fault-list` shows these fields as `fault-add` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Jitter {
    /// Never `Fixed` here: a fixed delay has no jitter at all.
    pub distribution: Distribution,
    pub jitter_ms: u64,
    pub seed: u64,
}

impl Jitter {
    /// `delay`'s optional arguments: None for a fixed delay. `jitter_ms` alone means uniform.
    pub fn from_args(
        jitter_ms: Option<u64>,
        distribution: Option<Distribution>,
        seed: Option<u64>,
    ) -> Result<Option<Jitter>, ArgError> {
        let distribution = match (distribution, jitter_ms) {
            (None | Some(Distribution::Fixed), None) => {
                if seed.is_some() {
                    return Err(ArgError::new(
                        "seed",
                        "only applies to a delay with jitter_ms (a fixed delay draws nothing)",
                    ));
                }
                return Ok(None);
            }
            (Some(Distribution::Fixed), Some(_)) => {
                return Err(ArgError::new(
                    "jitter_ms",
                    "does not go with distribution=fixed: drop jitter_ms, or pick \
                     distribution=uniform, exponential or pareto",
                ))
            }
            (Some(d), None) => {
                return Err(ArgError::new(
                    "jitter_ms",
                    format!(
                        "missing: distribution={} needs jitter_ms=N, the spread in ms",
                        d.name()
                    ),
                ))
            }
            (d, Some(_)) => d.unwrap_or(Distribution::Uniform),
        };
        let jitter_ms = jitter_ms.unwrap_or(0);
        if !(1..=MAX_DELAY_MS).contains(&jitter_ms) {
            return Err(ArgError::new(
                "jitter_ms",
                format!("must be 1 to {MAX_DELAY_MS}, got {jitter_ms}"),
            ));
        }
        Ok(Some(Jitter {
            distribution,
            jitter_ms,
            seed: seed.unwrap_or(0),
        }))
    }

    /// The delay for a draw `u` in [0, 1), around `base_ms`; at most [`MAX_DELAY_MS`]. Not
    /// rounded to whole ms: a jitter of 1 ms still has its shape.
    pub fn sample(&self, base_ms: u64, u: f64) -> Duration {
        let (base, j) = (base_ms as f64, self.jitter_ms as f64);
        // 1 - u is in (0, 1]: the logarithm and the power stay finite.
        let rest = 1.0 - u;
        let ms = match self.distribution {
            Distribution::Fixed => base,
            Distribution::Uniform => base + j * (2.0 * u - 1.0),
            Distribution::Exponential => base - j * rest.ln(),
            Distribution::Pareto => base + j * (rest.powf(-0.5) - 1.0),
        };
        // NaN cannot come of a draw in [0, 1), but would be 0 here rather than a panic.
        let ms = if ms.is_nan() {
            0.0
        } else {
            ms.clamp(0.0, MAX_DELAY_MS as f64)
        };
        Duration::from_secs_f64(ms / 1000.0)
    }
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Fixed => "fixed",
            Distribution::Uniform => "uniform",
            Distribution::Exponential => "exponential",
            Distribution::Pareto => "pareto",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn jitter(distribution: Distribution, jitter_ms: u64) -> Jitter {
        Jitter {
            distribution,
            jitter_ms,
            seed: 0,
        }
    }

    /// `n` draws of `j` around `base`, in ms, sorted.
    fn quantiles(j: Jitter, base: u64, n: usize) -> Vec<f64> {
        let mut rng = SplitMix64::new(42);
        let mut v: Vec<f64> = (0..n)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                j.sample(base, u).as_secs_f64() * 1000.0
            })
            .collect();
        v.sort_unstable_by(f64::total_cmp);
        v
    }

    /// The `q` quantile of sorted draws.
    fn at(v: &[f64], q: f64) -> f64 {
        v[((v.len() as f64) * q) as usize]
    }

    fn near(got: f64, want: f64, tolerance: f64) {
        assert!(
            (got - want).abs() <= want * tolerance,
            "got {got}, want {want} within {tolerance}"
        );
    }

    #[test]
    fn each_distribution_has_the_median_and_p99_the_readme_gives() {
        let n = 200_000;
        // Uniform in [100, 300]: median 200, p99 200 + 0.98 * 100.
        let v = quantiles(jitter(Distribution::Uniform, 100), 200, n);
        near(at(&v, 0.5), 200.0, 0.02);
        near(at(&v, 0.99), 298.0, 0.02);
        assert!(v[0] >= 100.0 && v[n - 1] <= 300.0);
        // Exponential: median 100 + 50 ln 2, p99 100 + 50 ln 100.
        let v = quantiles(jitter(Distribution::Exponential, 50), 100, n);
        assert!(v[0] >= 100.0);
        near(at(&v, 0.5), 100.0 + 50.0 * 2f64.ln(), 0.02);
        near(at(&v, 0.99), 100.0 + 50.0 * 100f64.ln(), 0.05);
        // Pareto, shape 2: median 100 + 50 (sqrt 2 - 1), p99 100 + 50 * 9.
        let v = quantiles(jitter(Distribution::Pareto, 50), 100, n);
        assert!(v[0] >= 100.0);
        near(at(&v, 0.5), 100.0 + 50.0 * (2f64.sqrt() - 1.0), 0.02);
        near(at(&v, 0.99), 550.0, 0.05);
        // The README's example: a 1 ms jitter keeps its shape (no rounding to whole ms).
        let v = quantiles(jitter(Distribution::Pareto, 1), 2, n);
        near(at(&v, 0.5), 2.414, 0.01);
        near(at(&v, 0.99), 11.0, 0.05);
    }

    #[test]
    fn samples_stay_between_zero_and_an_hour() {
        let u = jitter(Distribution::Uniform, 500);
        assert_eq!(u.sample(10, 0.0), Duration::ZERO);
        let p = jitter(Distribution::Pareto, MAX_DELAY_MS);
        // The largest draw below 1: (2^-53)^(-1/2) is 2^26.5 jitters.
        assert_eq!(
            p.sample(MAX_DELAY_MS, 1.0 - f64::EPSILON / 2.0),
            Duration::from_millis(MAX_DELAY_MS)
        );
        assert_eq!(
            jitter(Distribution::Exponential, 1).sample(5, 0.0),
            Duration::from_millis(5),
            "u = 0 is the base"
        );
    }

    #[test]
    fn arguments_name_the_field_at_fault() {
        let field = |j, d, s| Jitter::from_args(j, d, s).unwrap_err().field;
        assert_eq!(Jitter::from_args(None, None, None).unwrap(), None);
        assert_eq!(
            Jitter::from_args(None, Some(Distribution::Fixed), None).unwrap(),
            None
        );
        assert_eq!(
            Jitter::from_args(Some(5), None, Some(3)).unwrap(),
            Some(Jitter {
                distribution: Distribution::Uniform,
                jitter_ms: 5,
                seed: 3
            })
        );
        assert_eq!(field(Some(5), Some(Distribution::Fixed), None), "jitter_ms");
        assert_eq!(field(None, Some(Distribution::Pareto), None), "jitter_ms");
        assert_eq!(field(Some(0), None, None), "jitter_ms");
        assert_eq!(field(Some(MAX_DELAY_MS + 1), None, None), "jitter_ms");
        assert_eq!(field(None, None, Some(1)), "seed");
    }
}
