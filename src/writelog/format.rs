//! The dm-log-writes on-disk format (the kernel's
//! `Documentation/admin-guide/device-mapper/log-writes.rst`, read by xfstests'
//! `src/log-writes/replay-log`), and nothing else: no policy, no I/O.
//!
//! The log is a sequence of sectors of `sectorsize` bytes. Sector 0 holds the super block; the
//! entries follow, each one header sector and then, for a write, its data (`nr_sectors`
//! sectors). A mark keeps its name in its own header sector, after the header. All numbers
//! are little-endian. The super block's `nr_entries` counts the entries a reader may trust:
//! anything after them is ignored, which is what makes a log torn by a crash readable.

/// `WRITE_LOG_MAGIC`: "rhswfsj" read as a little-endian number.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
/// `WRITE_LOG_VERSION`.
pub const VERSION: u64 = 1;
/// The sector size remapblk writes its logs with: entries count 512-byte sectors, whatever the
/// guest's block size (which is a multiple of it).
pub const SECTOR: u64 = 512;

/// The entry's header carries a flush: everything logged before it was durable.
pub const FLUSH: u64 = 1 << 0;
/// A write with forced unit access (virtio-blk has none; kernel logs may).
pub const FUA: u64 = 1 << 1;
/// A discard: `nr_sectors` from `sector` read zeros afterwards; no data follows.
pub const DISCARD: u64 = 1 << 2;
/// A mark: the name follows the header in the same sector (`data_len` bytes).
pub const MARK: u64 = 1 << 3;
/// A write the filesystem tagged as metadata (kernel logs only).
pub const METADATA: u64 = 1 << 4;
/// remapblk's own: a discard that was a virtio WRITE_ZEROES. Readers that do not know it
/// (replay-log) see a discard, which replays to the same bytes: both read as zeros. Far from
/// the kernel's bits so that a new kernel flag will not collide with it.
pub const ZEROES: u64 = 1 << 32;

/// `struct log_write_super`: 8 + 8 + 8 + 4 bytes, padded by the C compiler to 32.
pub const SUPER_LEN: usize = 32;
/// `struct log_write_entry`: four 64-bit fields.
pub const ENTRY_LEN: usize = 32;
/// The longest mark name: the header sector less the header, less one byte for the NUL that
/// replay-log's comparison expects after the name.
pub const MAX_MARK: usize = SECTOR as usize - ENTRY_LEN - 1;

/// `struct log_write_super`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Super {
    pub magic: u64,
    pub version: u64,
    pub nr_entries: u64,
    pub sectorsize: u32,
}

impl Super {
    /// A super block of remapblk's own: the magic, version 1, 512-byte sectors.
    pub fn new(nr_entries: u64) -> Super {
        Super {
            magic: MAGIC,
            version: VERSION,
            nr_entries,
            sectorsize: SECTOR as u32,
        }
    }

    pub fn encode(&self) -> [u8; SUPER_LEN] {
        let mut b = [0u8; SUPER_LEN];
        b[0..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..16].copy_from_slice(&self.version.to_le_bytes());
        b[16..24].copy_from_slice(&self.nr_entries.to_le_bytes());
        b[24..28].copy_from_slice(&self.sectorsize.to_le_bytes());
        b
    }

    /// The fields as they lie in `b`; checking them is the reader's job.
    pub fn decode(b: &[u8; SUPER_LEN]) -> Super {
        Super {
            magic: le64(&b[0..8]),
            version: le64(&b[8..16]),
            nr_entries: le64(&b[16..24]),
            sectorsize: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        }
    }
}

/// `struct log_write_entry`. `sector` and `nr_sectors` count the log's sectors (its super
/// block's `sectorsize`); `data_len` is the length of a mark's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    pub data_len: u64,
}

impl EntryHeader {
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_sectors.to_le_bytes());
        b[16..24].copy_from_slice(&self.flags.to_le_bytes());
        b[24..32].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; ENTRY_LEN]) -> EntryHeader {
        EntryHeader {
            sector: le64(&b[0..8]),
            nr_sectors: le64(&b[8..16]),
            flags: le64(&b[16..24]),
            data_len: le64(&b[24..32]),
        }
    }

    /// What the entry does, by its flags (a mark first: replay-log takes an entry whose
    /// flags are exactly MARK as a mark).
    pub fn kind(&self) -> Kind {
        if self.flags & MARK != 0 {
            Kind::Mark
        } else if self.flags & DISCARD != 0 {
            if self.flags & ZEROES != 0 {
                Kind::WriteZeroes
            } else {
                Kind::Discard
            }
        } else if self.nr_sectors > 0 {
            Kind::Write
        } else if self.flags & FLUSH != 0 {
            Kind::Flush
        } else {
            Kind::Empty
        }
    }

    /// Whether the entry is a flush point (replay-log's `--check flush`): a flush, or a write
    /// a kernel log carries a flush on.
    pub fn is_flush(&self) -> bool {
        self.flags & FLUSH != 0 && self.flags & MARK == 0
    }

    /// The bytes that follow the header sector in the log: a write's data; discards and marks
    /// have none.
    pub fn data_sectors(&self) -> u64 {
        match self.kind() {
            Kind::Write => self.nr_sectors,
            _ => 0,
        }
    }
}

/// What an entry does, as `remapblk log list` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Write,
    Discard,
    WriteZeroes,
    Flush,
    Mark,
    /// Flags without data, e.g. a bare FUA in a kernel log: nothing to replay.
    Empty,
}

/// The header sector of an entry: the header, then (for a mark) its name, then zeros.
pub fn header_sector(h: &EntryHeader, name: &[u8]) -> [u8; SECTOR as usize] {
    let mut s = [0u8; SECTOR as usize];
    s[..ENTRY_LEN].copy_from_slice(&h.encode());
    let n = name.len().min(MAX_MARK);
    s[ENTRY_LEN..ENTRY_LEN + n].copy_from_slice(&name[..n]);
    s
}

/// The super block's sector.
pub fn super_sector(s: &Super) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[..SUPER_LEN].copy_from_slice(&s.encode());
    b
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_magic_spells_the_kernels_constant() {
        // dm-log-writes.c: #define WRITE_LOG_MAGIC 0x6a736677736872
        assert_eq!(MAGIC, 0x6a736677736872);
        assert_eq!(&MAGIC.to_le_bytes(), b"rhswfsj\0");
    }

    /// The byte layout of `struct log_write_super` on x86_64 and aarch64 (natural alignment,
    /// little-endian): magic at 0, version at 8, nr_entries at 16, sectorsize at 24, four
    /// bytes of padding.
    #[test]
    fn super_block_layout_matches_the_c_struct() {
        let s = Super {
            magic: MAGIC,
            version: 1,
            nr_entries: 0x0102_0304_0506_0708,
            sectorsize: 512,
        };
        let b = s.encode();
        assert_eq!(
            b,
            [
                0x72, 0x68, 0x73, 0x77, 0x66, 0x73, 0x6a, 0x00, // magic
                1, 0, 0, 0, 0, 0, 0, 0, // version
                8, 7, 6, 5, 4, 3, 2, 1, // nr_entries
                0, 2, 0, 0, // sectorsize 512
                0, 0, 0, 0, // padding
            ]
        );
        assert_eq!(Super::decode(&b), s);
        let sector = super_sector(&s);
        assert_eq!(&sector[..SUPER_LEN], &b);
        assert!(sector[SUPER_LEN..].iter().all(|&x| x == 0));
    }

    #[test]
    fn entry_layout_matches_the_c_struct() {
        let h = EntryHeader {
            sector: 0x10,
            nr_sectors: 8,
            flags: FLUSH | FUA,
            data_len: 0,
        };
        let b = h.encode();
        let mut want = [0u8; 32];
        want[0] = 0x10;
        want[8] = 8;
        want[16] = 3;
        assert_eq!(b, want);
        assert_eq!(EntryHeader::decode(&b), h);
    }

    #[test]
    fn a_mark_keeps_its_name_in_its_header_sector_with_a_nul_after_it() {
        let h = EntryHeader {
            sector: 0,
            nr_sectors: 0,
            flags: MARK,
            data_len: 5,
        };
        let s = header_sector(&h, b"mkfs1");
        assert_eq!(&s[32..37], b"mkfs1");
        assert!(s[37..].iter().all(|&x| x == 0));
        let long = vec![b'x'; MAX_MARK];
        let s = header_sector(&h, &long);
        assert_eq!(s[SECTOR as usize - 1], 0, "room for replay-log's NUL");
    }

    #[test]
    fn kinds_follow_the_flags() {
        let e = |nr_sectors, flags| EntryHeader {
            sector: 0,
            nr_sectors,
            flags,
            data_len: 0,
        };
        assert_eq!(e(8, 0).kind(), Kind::Write);
        assert_eq!(e(8, 0).data_sectors(), 8);
        assert_eq!(e(8, DISCARD).kind(), Kind::Discard);
        assert_eq!(e(8, DISCARD).data_sectors(), 0);
        assert_eq!(e(8, DISCARD | ZEROES).kind(), Kind::WriteZeroes);
        assert_eq!(e(0, FLUSH).kind(), Kind::Flush);
        assert!(e(0, FLUSH).is_flush());
        assert!(e(8, FLUSH).is_flush(), "a kernel's write with a preflush");
        assert_eq!(e(8, FLUSH).kind(), Kind::Write);
        assert_eq!(e(0, MARK).kind(), Kind::Mark);
        assert_eq!(e(0, MARK).data_sectors(), 0);
        assert_eq!(e(0, FUA).kind(), Kind::Empty);
        assert_eq!(e(8, METADATA).kind(), Kind::Write);
    }
}
