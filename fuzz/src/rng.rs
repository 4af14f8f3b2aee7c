//! The driver's random numbers: remapblk's SplitMix64, so that a run is repeatable from its seed
//! alone on any platform, with what the driver draws on top.

use remapblk::rng::SplitMix64;

pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }

    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A length up to `max`, small ones far likelier (most bugs need few bytes, and small
    /// inputs run fast): a uniform number of bits, then a uniform value of that many.
    pub fn len(&mut self, max: usize) -> usize {
        let bits = self.below(usize::BITS as usize - max.leading_zeros() as usize + 1);
        let cap = if bits >= usize::BITS as usize {
            usize::MAX
        } else {
            (1usize << bits) - 1
        };
        self.below(cap.min(max) + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_bounds_hold() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let (x, y) = (a.below(10), b.below(10));
            assert!(x < 10);
            assert_eq!(x, y);
            assert!(a.len(100) <= 100);
            b.len(100);
        }
        // Lengths are spread from 0 to the bound, small ones likelier.
        let lens: Vec<usize> = (0..10_000).map(|_| a.len(4096)).collect();
        assert!(lens.contains(&0) && lens.iter().any(|&l| l > 2048));
        assert!(lens.iter().filter(|&&l| l < 64).count() > lens.len() / 3);
        assert_eq!(a.below(0), 0);
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }
}
