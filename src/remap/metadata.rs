//! The spare file's on-disk format, kept apart from any I/O:
//!
//! ```text
//! 0      header (4 KiB): magic "RMPBLKSP", version, block size, image size, spare blocks, CRC32C
//! 4 KiB  metadata slot A  } written alternately; each: magic "RMPBLKMT", version, CRC32C,
//! +slot  metadata slot B  } sequence number, entry count, entries (lba, spare block, cause, since)
//! data   spare block 0, 1, ... (one logical block each)
//! ```
//!
//! A slot is as large as a table that fills the whole spare, so the table has no cap of its
//! own. The newest slot whose checksum holds is the table; a torn write leaves the other.
//!
//! Past the last spare block, a writer that hands the files to another process (a migration,
//! see `handover`) leaves its pending list: magic "RMPBLKPD", version, CRC32C, count, the
//! blocks. The pending list is otherwise kept in memory only; whoever takes the files over next
//! reads it and wipes it, so it never outlives the handover it was written for.

use serde::Serialize;
use thiserror::Error;

pub const HEADER_MAGIC: [u8; 8] = *b"RMPBLKSP";
pub const SLOT_MAGIC: [u8; 8] = *b"RMPBLKMT";
pub const PENDING_MAGIC: [u8; 8] = *b"RMPBLKPD";
/// Bytes of the pending list's record before its blocks.
pub const PENDING_HEADER_LEN: usize = 24;
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 4096;
const HEADER_USED: usize = 36;
pub const SLOT_HEADER_LEN: usize = 40;
pub const ENTRY_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Header {
    pub block_size: u32,
    pub image_size: u64,
    pub spare_blocks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    Manual,
    WriteError,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::Manual => "manual",
            Cause::WriteError => "write-error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub lba: u64,
    pub spare_block: u64,
    pub cause: Cause,
    /// Seconds since the Unix epoch when the remap was made.
    pub since: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub seq: u64,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetaError {
    #[error("bad magic (not a remapblk spare file, or this part of it is overwritten)")]
    Magic,
    #[error("format version {0}; this remapblk reads version {VERSION}")]
    Version(u32),
    #[error("checksum mismatch")]
    Checksum,
    #[error("too short: {0} bytes")]
    Truncated(usize),
    #[error("{0}")]
    Entry(String),
    #[error("{0}")]
    Layout(String),
}

impl Header {
    pub fn slot_size(&self) -> u64 {
        slot_size(self.spare_blocks)
    }

    pub fn data_offset(&self) -> u64 {
        HEADER_LEN + 2 * self.slot_size()
    }

    /// Blocks of the image the table maps.
    pub fn disk_blocks(&self) -> u64 {
        self.image_size / u64::from(self.block_size.max(1))
    }

    pub fn file_size(&self) -> u64 {
        self.data_offset() + self.spare_blocks * u64::from(self.block_size)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.spare_blocks.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, MetaError> {
        if b.len() < HEADER_USED {
            return Err(MetaError::Truncated(b.len()));
        }
        if b[0..8] != HEADER_MAGIC {
            return Err(MetaError::Magic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(MetaError::Version(version));
        }
        if u32_at(b, 32) != crc32c::crc32c(&b[0..32]) {
            return Err(MetaError::Checksum);
        }
        let h = Header {
            block_size: u32_at(b, 12),
            image_size: u64_at(b, 16),
            spare_blocks: u64_at(b, 24),
        };
        // A checksum that holds does not make the numbers sane (a header written by a buggy
        // or hostile tool): the layout computed from them must exist before anything sizes a
        // buffer or an offset by it.
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&h.block_size)
            || !h.block_size.is_power_of_two()
        {
            return Err(MetaError::Layout(format!(
                "block size {} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
                h.block_size
            )));
        }
        if h.checked_file_size().is_none() {
            return Err(MetaError::Layout(format!(
                "{} spare blocks of {} bytes are more than a file can hold",
                h.spare_blocks, h.block_size
            )));
        }
        Ok(h)
    }

    /// [`Header::file_size`], or None when the layout does not fit in 64 bits.
    fn checked_file_size(&self) -> Option<u64> {
        let slot = (ENTRY_LEN as u64)
            .checked_mul(self.spare_blocks)?
            .checked_add(SLOT_HEADER_LEN as u64)?
            .checked_next_multiple_of(4096)?;
        slot.checked_mul(2)?
            .checked_add(HEADER_LEN)?
            .checked_add(self.spare_blocks.checked_mul(u64::from(self.block_size))?)
    }
}

/// The block sizes a spare file may have (the server takes 512 and 4096).
const MIN_BLOCK_SIZE: u32 = 512;
const MAX_BLOCK_SIZE: u32 = 64 << 10;

/// Bytes of a metadata slot for `spare_blocks` entries. Headers are checked by
/// [`Header::decode`] to have a layout that fits in 64 bits.
pub fn slot_size(spare_blocks: u64) -> u64 {
    (SLOT_HEADER_LEN as u64 + ENTRY_LEN as u64 * spare_blocks).next_multiple_of(4096)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn slot_crc(b: &[u8]) -> u32 {
    // Everything but the CRC field itself.
    let c = crc32c::crc32c(&b[0..12]);
    crc32c::crc32c_append(c, &b[16..])
}

impl Slot {
    /// The slot's bytes: header and entries, not padded to the slot size.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT_HEADER_LEN + ENTRY_LEN * self.entries.len()];
        b[0..8].copy_from_slice(&SLOT_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let at = SLOT_HEADER_LEN + i * ENTRY_LEN;
            b[at..at + 8].copy_from_slice(&e.lba.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&e.spare_block.to_le_bytes());
            b[at + 16] = match e.cause {
                Cause::Manual => 1,
                Cause::WriteError => 2,
            };
            b[at + 24..at + 32].copy_from_slice(&e.since.to_le_bytes());
        }
        let crc = slot_crc(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a slot of a spare with `spare_blocks` blocks; `b` may carry padding.
    pub fn decode(b: &[u8], spare_blocks: u64) -> Result<Slot, MetaError> {
        if b.len() < SLOT_HEADER_LEN {
            return Err(MetaError::Truncated(b.len()));
        }
        if b[0..8] != SLOT_MAGIC {
            return Err(MetaError::Magic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(MetaError::Version(version));
        }
        let count = u64_at(b, 24);
        if count > spare_blocks {
            return Err(MetaError::Entry(format!(
                "{count} entries for {spare_blocks} spare blocks"
            )));
        }
        // Checked: `spare_blocks` bounds the count, and the caller's may be anything.
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(ENTRY_LEN))
            .and_then(|n| n.checked_add(SLOT_HEADER_LEN))
            .filter(|&n| n <= b.len())
            .ok_or(MetaError::Truncated(b.len()))?;
        if u32_at(b, 12) != slot_crc(&b[..len]) {
            return Err(MetaError::Checksum);
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = SLOT_HEADER_LEN + i * ENTRY_LEN;
            let cause = match b[at + 16] {
                1 => Cause::Manual,
                2 => Cause::WriteError,
                c => return Err(MetaError::Entry(format!("entry {i}: unknown cause {c}"))),
            };
            let spare_block = u64_at(b, at + 8);
            if spare_block >= spare_blocks {
                return Err(MetaError::Entry(format!(
                    "entry {i}: spare block {spare_block} past the spare's {spare_blocks}"
                )));
            }
            entries.push(Entry {
                lba: u64_at(b, at),
                spare_block,
                cause,
                since: u64_at(b, at + 24),
            });
        }
        Ok(Slot {
            seq: u64_at(b, 16),
            entries,
        })
    }
}

/// The pending list a writer leaves in the spare file when it hands the files over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    pub blocks: Vec<u64>,
}

impl PendingRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PENDING_HEADER_LEN + 8 * self.blocks.len()];
        b[0..8].copy_from_slice(&PENDING_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for (i, lba) in self.blocks.iter().enumerate() {
            let at = PENDING_HEADER_LEN + 8 * i;
            b[at..at + 8].copy_from_slice(&lba.to_le_bytes());
        }
        let crc = slot_crc(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// How many bytes the record whose first [`PENDING_HEADER_LEN`] bytes are `head` takes;
    /// None when `head` is not a record's start, or names more than `max_blocks` blocks.
    pub fn size(head: &[u8], max_blocks: u64) -> Option<usize> {
        if head.len() < PENDING_HEADER_LEN || head[0..8] != PENDING_MAGIC {
            return None;
        }
        let count = u64_at(head, 16);
        if count > max_blocks {
            return None;
        }
        usize::try_from(count)
            .ok()?
            .checked_mul(8)?
            .checked_add(PENDING_HEADER_LEN)
    }

    /// Decodes a whole record ([`PendingRecord::len`] bytes).
    pub fn decode(b: &[u8]) -> Result<PendingRecord, MetaError> {
        if b.len() < PENDING_HEADER_LEN {
            return Err(MetaError::Truncated(b.len()));
        }
        if b[0..8] != PENDING_MAGIC {
            return Err(MetaError::Magic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(MetaError::Version(version));
        }
        let count = u64_at(b, 16) as usize;
        let len = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(PENDING_HEADER_LEN))
            .filter(|&n| n <= b.len())
            .ok_or(MetaError::Truncated(b.len()))?;
        if u32_at(b, 12) != slot_crc(&b[..len]) {
            return Err(MetaError::Checksum);
        }
        Ok(PendingRecord {
            blocks: (0..count)
                .map(|i| u64_at(b, PENDING_HEADER_LEN + 8 * i))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries() -> impl Strategy<Value = Vec<Entry>> {
        proptest::collection::vec(
            (any::<u64>(), 0u64..1000, any::<bool>(), any::<u64>()),
            0..50,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(lba, spare_block, manual, since)| Entry {
                    lba,
                    spare_block,
                    cause: if manual {
                        Cause::Manual
                    } else {
                        Cause::WriteError
                    },
                    since,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn slot_round_trips(seq in any::<u64>(), entries in entries()) {
            let s = Slot { seq, entries };
            let mut b = s.encode();
            b.resize(slot_size(1000) as usize, 0);
            prop_assert_eq!(Slot::decode(&b, 1000).unwrap(), s);
        }

        #[test]
        fn any_flipped_bit_is_caught(seq in any::<u64>(), entries in entries(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let s = Slot { seq, entries };
            let mut b = s.encode();
            let i = pos.index(b.len());
            b[i] ^= 1 << bit;
            prop_assert!(Slot::decode(&b, 1000).is_err());
        }

        #[test]
        fn header_round_trips_and_flips_are_caught(bs in prop::sample::select(vec![512u32, 4096]), size in any::<u64>(), spare in 0u64..1 << 40, pos in 0usize..36, bit in 0u8..8) {
            let h = Header { block_size: bs, image_size: size, spare_blocks: spare };
            let mut b = h.encode();
            prop_assert_eq!(Header::decode(&b).unwrap(), h);
            b[pos] ^= 1 << bit;
            prop_assert!(Header::decode(&b).is_err());
        }
    }

    proptest! {
        #[test]
        fn pending_records_round_trip_and_flips_are_caught(blocks in proptest::collection::vec(any::<u64>(), 0..40), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let r = PendingRecord { blocks };
            let mut b = r.encode();
            prop_assert_eq!(PendingRecord::size(&b, 40), Some(b.len()));
            prop_assert_eq!(PendingRecord::decode(&b).unwrap(), r.clone());
            let i = pos.index(b.len());
            b[i] ^= 1 << bit;
            prop_assert!(PendingRecord::decode(&b).is_err());
        }
    }

    /// Found by the fuzzer (`remapblk-fuzz run metadata`): a header whose checksum holds but
    /// whose spare block count makes the layout overflow made `slot_size` panic (debug) or
    /// wrap to a wrong size (release); a block size of 0 or 3 has no layout either.
    #[test]
    fn a_header_without_a_layout_is_refused() {
        for (block_size, spare_blocks) in [
            (512, u64::MAX / 16),
            (512, u64::MAX),
            (4096, 1 << 60),
            (0, 16),
            (3, 16),
            (1 << 20, 16),
        ] {
            let h = Header {
                block_size,
                image_size: 1 << 20,
                spare_blocks,
            };
            let e = Header::decode(&h.encode()).unwrap_err();
            assert!(
                matches!(e, MetaError::Layout(_)),
                "{block_size} x {spare_blocks}: {e}"
            );
        }
        let big = Header {
            block_size: 4096,
            image_size: 1 << 50,
            spare_blocks: 1 << 40,
        };
        assert_eq!(Header::decode(&big.encode()), Ok(big));
    }

    /// Found by the fuzzer: a slot counting 2^59 entries, decoded for a spare of as many
    /// blocks, overflowed the length computation (a panic, or a wrong length in release).
    #[test]
    fn a_slot_count_past_any_buffer_is_truncation() {
        let mut b = Slot {
            seq: 1,
            entries: Vec::new(),
        }
        .encode();
        b[24..32].copy_from_slice(&(1u64 << 59).to_le_bytes());
        assert_eq!(
            Slot::decode(&b, u64::MAX),
            Err(MetaError::Truncated(b.len()))
        );
    }

    /// Found by the fuzzer: a pending list counting 2^61 blocks, sized for a disk of as
    /// many, overflowed its length.
    #[test]
    fn a_pending_count_past_any_length_has_no_size() {
        let mut b = PendingRecord { blocks: vec![1] }.encode();
        b[16..24].copy_from_slice(&(1u64 << 61).to_le_bytes());
        assert_eq!(PendingRecord::size(&b, u64::MAX), None);
        assert_eq!(PendingRecord::size(&b, 1 << 60), None);
        assert_eq!(
            PendingRecord::decode(&b),
            Err(MetaError::Truncated(b.len()))
        );
    }

    #[test]
    fn layout_is_what_the_docs_say() {
        let h = Header {
            block_size: 512,
            image_size: 1 << 30,
            spare_blocks: 1024,
        };
        assert_eq!(h.slot_size(), (40 + 32 * 1024u64).next_multiple_of(4096));
        assert_eq!(h.data_offset(), 4096 + 2 * h.slot_size());
        assert_eq!(h.file_size(), h.data_offset() + 1024 * 512);
    }
}
