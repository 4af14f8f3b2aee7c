//! A filter in front of the remap table: says "no" for requests that touch no remapped or
//! pending block, so that those skip the ordered map's search (two tree descents per request,
//! measured at about 5% of a worker's time with 10,000 remaps).
//!
//! One bit per group of blocks, over the whole disk: exact at the group's grain, so a request
//! that lies in clean groups never reaches the map. Groups are one 4 KiB page of 512-byte
//! blocks (the usual request) while the bitmap stays within `MAX_BITS` (a 16 GiB disk: a
//! 512 KiB bitmap), coarser beyond. A 1 GiB disk takes 32 KiB, about the first-level cache of
//! a core, so most probes hit it. Built once per published snapshot, read without a lock.

/// Blocks per group at the finest: 8 blocks of 512 bytes are one 4 KiB page.
const MIN_GROUP_SHIFT: u32 = 3;
/// 2^22 bits = 512 KiB at most.
const MAX_BITS_LOG2: u32 = 22;

#[derive(Debug, Default, Clone)]
pub struct BlockFilter {
    /// Empty when the filter holds nothing.
    words: Vec<u64>,
    group_shift: u32,
}

impl BlockFilter {
    /// A filter of `blocks` (block numbers) on a disk of `disk_blocks` blocks. A block past
    /// the end (a table from a bigger disk) counts as being in the last group.
    pub fn new(disk_blocks: u64, blocks: impl Iterator<Item = u64>) -> BlockFilter {
        let mut blocks = blocks.peekable();
        if blocks.peek().is_none() {
            return BlockFilter::default();
        }
        let disk_log2 = disk_blocks.max(1).next_power_of_two().trailing_zeros();
        let group_shift = disk_log2.saturating_sub(MAX_BITS_LOG2).max(MIN_GROUP_SHIFT);
        let groups = (disk_blocks.max(1) - 1) >> group_shift;
        let mut f = BlockFilter {
            words: vec![0; (groups / 64 + 1) as usize],
            group_shift,
        };
        for b in blocks {
            let g = f.group(b);
            f.words[g / 64] |= 1 << (g % 64);
        }
        f
    }

    fn group(&self, block: u64) -> usize {
        let last = self.words.len() * 64 - 1;
        ((block >> self.group_shift) as usize).min(last)
    }

    /// False only if none of blocks `first..=last` is in the filter.
    pub fn may_hold(&self, first: u64, last: u64) -> bool {
        if self.words.is_empty() {
            return false;
        }
        let (a, b) = (self.group(first), self.group(last));
        let (wa, wb) = (a / 64, b / 64);
        // Bits a..=b, a word at a time: from a's bit up in the first word, to b's bit in the last.
        let low = u64::MAX << (a % 64);
        let high = u64::MAX >> (63 - b % 64);
        if wa == wb {
            return self.words[wa] & low & high != 0;
        }
        self.words[wa] & low != 0
            || self.words[wa + 1..wb].iter().any(|&w| w != 0)
            || self.words[wb] & high != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_filter_holds_nothing() {
        let f = BlockFilter::new(1 << 21, std::iter::empty());
        assert!(!f.may_hold(0, u64::MAX));
    }

    #[test]
    fn requests_beside_remapped_pages_are_refused() {
        // 10,000 blocks spread over a 1 GiB disk of 512-byte blocks, as in the benchmark.
        let disk = (1u64 << 30) / 512;
        let blocks: Vec<u64> = (0..10_000u64).map(|i| 7 + i * 209).collect();
        let f = BlockFilter::new(disk, blocks.iter().copied());
        assert_eq!(f.words.len() * 8, 32 << 10, "one bit per 4 KiB page");
        let pages = disk / 8;
        let maybe = (0..pages).filter(|p| f.may_hold(p * 8, p * 8 + 7)).count();
        let real = (0..pages)
            .filter(|p| blocks.iter().any(|b| b / 8 == *p))
            .count();
        assert_eq!(maybe, real, "no false positives at page grain");
    }

    #[test]
    fn a_huge_disk_gets_coarser_groups_and_a_bounded_bitmap() {
        let f = BlockFilter::new(1 << 40, [5u64, (1 << 40) - 1].into_iter());
        assert_eq!(f.words.len() * 64, 1 << MAX_BITS_LOG2);
        assert!(f.may_hold(0, 0) && f.may_hold((1 << 40) - 1, (1 << 40) - 1));
        assert!(!f.may_hold(1 << 30, 1 << 31));
    }

    proptest! {
        /// Never a false "no", whatever the disk size (even blocks past its end), and a
        /// "yes" only for a range that shares a group with one of the blocks.
        #[test]
        fn exact_at_group_grain(
            disk in 1u64..1 << 45,
            blocks in proptest::collection::vec(0u64..1 << 46, 0..300),
            probe in 0u64..1 << 46,
            pick in any::<prop::sample::Index>(),
            back in 0u64..300,
            len in prop_oneof![0u64..300, 0u64..1 << 40],
        ) {
            let f = BlockFilter::new(disk, blocks.iter().copied());
            // A probe at random, or one that starts shortly before one of the blocks.
            let probe = if blocks.is_empty() || probe % 2 == 0 {
                probe
            } else {
                blocks[pick.index(blocks.len())].saturating_sub(back)
            };
            let last = probe.saturating_add(len);
            let hit = blocks.iter().any(|&b| (probe..=last).contains(&b));
            let shares_group = blocks.iter().any(|&b| {
                (f.group(probe)..=f.group(last)).contains(&f.group(b))
            });
            prop_assert_eq!(f.may_hold(probe, last), shares_group);
            if hit {
                prop_assert!(f.may_hold(probe, last));
            }
            for &b in &blocks {
                prop_assert!(f.may_hold(b, b));
            }
        }
    }
}
