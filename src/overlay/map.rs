//! Which blocks the overlay file holds: one bit per block, set once the block's data is in
//! the overlay (written, copied up, or zeroed there). A clear bit means the base image holds
//! the block. Bits are only set while the device serves; they are cleared only by a reset or
//! a commit, which run with every queue quiesced, so a reader that saw a bit set can rely on
//! the overlay's copy for as long as its request runs.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct BlockMap {
    words: Vec<AtomicU64>,
    blocks: u64,
    /// Bits set, kept beside the bits so that status never scans the map.
    held: AtomicU64,
}

/// A run of neighbouring blocks `[first, end)` that all live in the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub end: u64,
    pub held: bool,
}

impl BlockMap {
    /// An empty map of a disk of `blocks` blocks.
    pub fn new(blocks: u64) -> BlockMap {
        BlockMap {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
            held: AtomicU64::new(0),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks the overlay holds.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub fn holds(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (block % 64)) != 0)
    }

    /// Records that the overlay holds blocks `first..=last` (those past the disk's end are
    /// ignored). Release: whoever sees a bit set sees the overlay data written before it.
    pub fn mark(&self, first: u64, last: u64) {
        let last = last.min(self.blocks.saturating_sub(1));
        let mut b = first;
        while b <= last {
            let bit = b % 64;
            let n = (64 - bit).min(last - b + 1);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if let Some(w) = self.words.get((b / 64) as usize) {
                let before = w.fetch_or(mask, Ordering::AcqRel);
                let new = (mask & !before).count_ones();
                self.held.fetch_add(u64::from(new), Ordering::Relaxed);
            }
            b += n;
        }
    }

    /// Forgets every block: the base image holds them all again.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
        self.held.store(0, Ordering::Relaxed);
    }

    /// Blocks `first..=last` as runs of the same place, in order.
    pub fn runs(&self, first: u64, last: u64) -> Runs<'_> {
        Runs {
            map: self,
            next: first,
            last,
        }
    }

    /// The first block at or after `from` (up to `last`) whose bit is `held`, if any; whole
    /// words are skipped at once, so a scan of a mostly empty map is cheap.
    fn find(&self, from: u64, last: u64, held: bool) -> Option<u64> {
        let mut b = from;
        while b <= last {
            let word = self.words.get((b / 64) as usize)?.load(Ordering::Acquire);
            let word = if held { word } else { !word };
            let rest = word >> (b % 64);
            if rest != 0 {
                let found = b + u64::from(rest.trailing_zeros());
                return (found <= last).then_some(found);
            }
            b = (b / 64 + 1) * 64;
        }
        None
    }
}

pub struct Runs<'a> {
    map: &'a BlockMap,
    next: u64,
    last: u64,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.next > self.last {
            return None;
        }
        let first = self.next;
        let held = self.map.holds(first);
        let end = self
            .map
            .find(first, self.last, !held)
            .unwrap_or(self.last + 1);
        self.next = end;
        Some(Run { first, end, held })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_count_once_and_runs_split_where_the_place_changes() {
        let m = BlockMap::new(200);
        m.mark(3, 5);
        m.mark(4, 70);
        m.mark(199, 300);
        assert_eq!(m.held(), 69);
        let runs: Vec<Run> = m.runs(0, 199).collect();
        assert_eq!(
            runs,
            [
                Run {
                    first: 0,
                    end: 3,
                    held: false
                },
                Run {
                    first: 3,
                    end: 71,
                    held: true
                },
                Run {
                    first: 71,
                    end: 199,
                    held: false
                },
                Run {
                    first: 199,
                    end: 200,
                    held: true
                },
            ]
        );
        assert_eq!(
            m.runs(65, 66).collect::<Vec<_>>(),
            [Run {
                first: 65,
                end: 67,
                held: true
            }]
        );
        m.clear();
        assert_eq!(m.held(), 0);
        assert_eq!(
            m.runs(0, 199).collect::<Vec<_>>(),
            [Run {
                first: 0,
                end: 200,
                held: false
            }]
        );
    }

    proptest! {
        /// The map against a plain set of blocks, for any sequence of marks.
        #[test]
        fn runs_match_a_model(marks in prop::collection::vec((0u64..300, 0u64..140), 0..20),
                              from in 0u64..300, span in 0u64..300) {
            let m = BlockMap::new(300);
            let mut model = [false; 300];
            for (first, n) in marks {
                let last = first + n;
                m.mark(first, last);
                for b in first..=last.min(299) {
                    model[b as usize] = true;
                }
            }
            prop_assert_eq!(m.held(), model.iter().filter(|&&h| h).count() as u64);
            let last = (from + span).min(299);
            let mut b = from;
            for r in m.runs(from, last) {
                prop_assert_eq!(r.first, b);
                prop_assert!(r.end > r.first);
                for x in r.first..r.end {
                    prop_assert_eq!(model[x as usize], r.held);
                }
                if r.end <= last {
                    prop_assert_ne!(model[r.end as usize], r.held);
                }
                b = r.end;
            }
            prop_assert_eq!(b, last + 1);
        }
    }
}
