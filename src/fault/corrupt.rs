//! What `corrupt` does to one block: which bytes change, and how. A pure function of the
//! block's number and the fault's arguments, so a block reads back the same corruption every
//! time and a seed repeats a run.

use super::spec::Corruption;
use crate::rng::SplitMix64;

/// The bytes of block `block` (of `block_size` bytes) that `how` changes: each as its index in
/// the block and the mask to XOR it with, in index order. `bits` flips exactly that many
/// distinct bits.
pub fn flips(how: Corruption, block: u64, block_size: usize) -> Vec<(usize, u8)> {
    match how {
        Corruption::Xor { xor, offset } => {
            let at = offset as usize;
            if at < block_size {
                vec![(at, xor)]
            } else {
                Vec::new()
            }
        }
        Corruption::Bits { bits, seed } => {
            let total = block_size * 8;
            let want = (bits as usize).min(total);
            // Past half the block, drawing the bits left alone is the shorter job.
            let invert = want > total / 2;
            let draws = if invert { total - want } else { want };
            let mut mask = vec![0u8; block_size];
            // One stream per block: the same block gets the same flips, whatever order the
            // requests come in.
            let mut rng = SplitMix64::new(seed ^ block.wrapping_mul(0xd1b5_4a32_d192_ed03));
            let mut drawn = 0;
            while drawn < draws {
                let bit = rng.below(total);
                let (byte, m) = (bit / 8, 1u8 << (bit % 8));
                if mask[byte] & m == 0 {
                    mask[byte] |= m;
                    drawn += 1;
                }
            }
            if invert {
                mask.iter_mut().for_each(|b| *b = !*b);
            }
            mask.into_iter()
                .enumerate()
                .filter(|&(_, m)| m != 0)
                .collect()
        }
    }
}

/// Corrupts `buf`, the bytes from byte address `start` of the disk, on `blocks` (the rest of
/// `buf` is left alone).
pub fn apply(
    buf: &mut [u8],
    start: u64,
    how: Corruption,
    blocks: std::ops::RangeInclusive<u64>,
    block_size: u64,
) {
    for_each_flip(start, buf.len() as u64, how, blocks, block_size, |at, m| {
        buf[at] ^= m;
    });
}

/// Calls `xor(index, mask)` for each byte of the `len` bytes from byte address `start` that
/// corrupting `blocks` changes; `index` counts from `start`.
pub fn for_each_flip(
    start: u64,
    len: u64,
    how: Corruption,
    blocks: std::ops::RangeInclusive<u64>,
    block_size: u64,
    mut xor: impl FnMut(usize, u8),
) {
    let end = start + len;
    for block in blocks {
        let base = block * block_size;
        for (i, m) in flips(how, block, block_size as usize) {
            let at = base + i as u64;
            if (start..end).contains(&at) {
                xor((at - start) as usize, m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ones(v: &[(usize, u8)]) -> u32 {
        v.iter().map(|(_, m)| m.count_ones()).sum()
    }

    #[test]
    fn bits_flips_exactly_that_many_the_same_each_time() {
        for bits in [1, 3, 100, 4000, 4096] {
            let how = Corruption::Bits { bits, seed: 7 };
            let f = flips(how, 12, 512);
            assert_eq!(ones(&f), bits, "bits={bits}");
            assert_eq!(f, flips(how, 12, 512));
        }
        let how = |seed| Corruption::Bits { bits: 8, seed };
        assert_ne!(flips(how(7), 12, 512), flips(how(8), 12, 512));
        assert_ne!(flips(how(7), 12, 512), flips(how(7), 13, 512));
    }

    #[test]
    fn xor_changes_one_byte() {
        let how = Corruption::Xor {
            xor: 0xff,
            offset: 3,
        };
        assert_eq!(flips(how, 0, 512), vec![(3, 0xff)]);
    }

    #[test]
    fn apply_touches_only_the_faulty_blocks_inside_the_buffer() {
        let how = Corruption::Xor {
            xor: 0x0f,
            offset: 0,
        };
        // Bytes 256..1280 of a disk of 512-byte blocks: half of block 0, block 1, half of 2.
        let mut buf = vec![0u8; 1024];
        apply(&mut buf, 256, how, 0..=2, 512);
        // Block 0's byte 0 is before the buffer; block 1's is at 256; block 2's at 768.
        let changed: Vec<usize> = (0..buf.len()).filter(|&i| buf[i] != 0).collect();
        assert_eq!(changed, vec![256, 768]);
        let mut buf = vec![0u8; 1024];
        apply(&mut buf, 256, how, 2..=2, 512);
        assert_eq!(buf.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(buf[768], 0x0f);
    }
}
