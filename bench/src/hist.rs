//! Log-linear latency histogram: every power of two is split into 16 equal buckets, so a
//! quantile is reported within 1/16 (6.25%) of the true value. Values are nanoseconds.

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Values below SUB get one bucket each; each of the remaining 64 - SUB_BITS powers of two gets
/// SUB buckets.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * SUB as usize;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as usize) * SUB as usize + sub as usize
}

/// The largest value that falls into bucket `i`.
fn upper_bound(i: usize) -> u64 {
    let (block, sub) = ((i as u64) / SUB, (i as u64) % SUB);
    if block == 0 {
        return sub;
    }
    let exp = block as u32 + SUB_BITS - 1;
    let width = 1u64 << (exp - SUB_BITS);
    let low = (1u64 << exp) + sub * width;
    low + (width - 1)
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket holding it, never more
    /// than the largest value recorded. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper_bound(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS);
            assert!(i >= last, "index not monotonic at {v}");
            last = i;
            assert!(upper_bound(i) >= v, "{v} above its bucket's bound");
            if i > 0 {
                assert!(upper_bound(i - 1) < v, "{v} belongs to an earlier bucket");
            }
        }
    }

    #[test]
    fn quantiles_within_one_sixteenth() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        for (q, exact) in [(0.5, 5_000_000.0), (0.99, 9_900_000.0)] {
            let got = h.quantile(q) as f64;
            assert!(
                got >= exact && got <= exact * (1.0 + 1.0 / 16.0),
                "q{q}: {got}"
            );
        }
        assert_eq!(h.quantile(1.0), 10_000_000);
        assert_eq!(h.max(), 10_000_000);
        assert_eq!(h.count(), 10_000);
    }

    #[test]
    fn merge_adds_up() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.record(10);
        b.record(1_000_000);
        b.record(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.quantile(0.5), 1_000_000);
        assert_eq!(a.quantile(0.0), 10);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
