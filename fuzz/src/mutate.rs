//! Byte-level mutations of corpus inputs, as libFuzzer's mutator makes them (without its
//! coverage feedback, which a stable toolchain cannot give): bit flips, interesting values
//! over integers of every width, insertions, deletions, copies inside the input and splices
//! with another input. A few at a time, so a mutant stays close to a valid input and gets past
//! the first checks of the code under test.

use crate::rng::Rng;

/// Values that sit on boundaries code checks: zero, one, the signed and unsigned extremes,
/// sizes that rings, sectors, pages and memory regions use.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    15,
    16,
    17,
    32,
    64,
    100,
    127,
    128,
    255,
    256,
    511,
    512,
    1023,
    1024,
    4095,
    4096,
    4097,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x10_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 1,
    u64::MAX,
];

/// `input` changed by one to eight mutations, at most `max_len` bytes long. `other` is another
/// input to splice with.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut b = input.to_vec();
    let n = 1 + rng.below(8);
    for _ in 0..n {
        one(rng, &mut b, other);
    }
    b.truncate(max_len);
    b
}

fn one(rng: &mut Rng, b: &mut Vec<u8>, other: &[u8]) {
    if b.is_empty() {
        let mut fresh = vec![0u8; 1 + rng.below(16)];
        rng.fill(&mut fresh);
        b.extend_from_slice(&fresh);
        return;
    }
    let at = rng.below(b.len());
    match rng.below(10) {
        0 => b[at] ^= 1 << rng.below(8),
        1 => b[at] = INTERESTING[rng.below(INTERESTING.len())] as u8,
        2 => {
            let d = 1 + rng.below(8) as u8;
            b[at] = if rng.one_in(2) {
                b[at].wrapping_add(d)
            } else {
                b[at].wrapping_sub(d)
            };
        }
        3 => {
            // An interesting value, or one off an integer already there, over 2, 4 or 8 bytes.
            let width = [2usize, 4, 8][rng.below(3)];
            if at + width > b.len() {
                return;
            }
            let mut cur = [0u8; 8];
            cur[..width].copy_from_slice(&b[at..at + width]);
            let v = match rng.below(3) {
                0 => u64::from_le_bytes(cur).wrapping_add(1),
                1 => u64::from_le_bytes(cur).wrapping_sub(1),
                _ => INTERESTING[rng.below(INTERESTING.len())],
            };
            b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
        }
        4 => {
            let mut fresh = vec![0u8; 1 + rng.below(16)];
            rng.fill(&mut fresh);
            b.splice(at..at, fresh);
        }
        5 => {
            let end = (at + 1 + rng.below(16)).min(b.len());
            b.drain(at..end);
        }
        6 => {
            // A copy of a part of the input over another part (repeated structures: ring
            // entries, descriptors, metadata entries, messages).
            let len = 1 + rng.below(64.min(b.len()));
            let from = rng.below(b.len() - len + 1);
            let chunk = b[from..from + len].to_vec();
            if rng.one_in(2) {
                b.splice(at..at, chunk);
            } else {
                let end = (at + len).min(b.len());
                b[at..end].copy_from_slice(&chunk[..end - at]);
            }
        }
        7 if !other.is_empty() => {
            let cut = rng.below(other.len());
            b.truncate(at);
            b.extend_from_slice(&other[cut..]);
        }
        8 => b.truncate(at),
        _ => {
            let mut fresh = vec![0u8; 1 + rng.below(8)];
            rng.fill(&mut fresh);
            let end = (at + fresh.len()).min(b.len());
            b[at..end].copy_from_slice(&fresh[..end - at]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutants_differ_and_respect_the_bound() {
        let mut rng = Rng::new(3);
        let input: Vec<u8> = (0..200).map(|i| i as u8).collect();
        let mut changed = 0;
        for _ in 0..1000 {
            let m = mutate(&mut rng, &input, b"other input", 150);
            assert!(m.len() <= 150);
            changed += usize::from(m != input);
        }
        assert!(changed > 900, "only {changed} of 1000 mutants differ");
        assert!(!mutate(&mut rng, &[], &[], 100).is_empty());
    }
}
