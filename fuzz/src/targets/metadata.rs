//! The spare file's metadata: the decoders of `remap::metadata` (header, slot, pending list)
//! on raw bytes and on what the encoders made, then mutated (with the checksum made right
//! again or not, so the decoders' later checks are reached too); and whole spare files as
//! `remapblk metadata check`/`dump` inspect them and as `serve` opens them.
//!
//! What must hold: no panic, no abort, no allocation the file does not justify; whatever a
//! decoder accepts encodes back to what it decoded; opening without repair writes nothing;
//! opening with repair leaves two valid slots holding the table it loaded.

use std::os::unix::fs::FileExt;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use remapblk::remap::metadata::{
    Cause, Entry, Header, PendingRecord, Slot, ENTRY_LEN, HEADER_LEN, PENDING_HEADER_LEN,
    SLOT_HEADER_LEN,
};
use remapblk::remap::spare::{inspect, Spare};
use remapblk::remap::{self, RemapTable};

use super::scratch;

/// The first byte of a whole spare file given raw (the seeds are such files).
const RAW_FILE: u8 = b'F';

/// A number likely to sit on a boundary.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Small(u8),
    Pow { shift: u8, minus_one: bool },
    Raw(u64),
}

impl Num {
    fn get(self) -> u64 {
        match self {
            Num::Small(n) => u64::from(n),
            Num::Pow { shift, minus_one } => (1u64 << (shift % 64)) - u64::from(minus_one),
            Num::Raw(n) => n,
        }
    }
}

/// A change to encoded bytes.
#[derive(Arbitrary, Debug)]
enum Edit {
    Flip { at: u16, bit: u8 },
    Set { at: u16, value: u8 },
    SetU64 { at: u16, value: Num },
    Truncate(u16),
    Extend(Vec<u8>),
}

fn apply(b: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        let at = |i: u16| usize::from(i) % b.len().max(1);
        match *e {
            Edit::Flip { at: i, bit } if !b.is_empty() => {
                let i = at(i);
                b[i] ^= 1 << (bit % 8);
            }
            Edit::Set { at: i, value } if !b.is_empty() => {
                let i = at(i);
                b[i] = value;
            }
            Edit::SetU64 { at: i, value } if !b.is_empty() => {
                let i = at(i);
                let end = (i + 8).min(b.len());
                b[i..end].copy_from_slice(&value.get().to_le_bytes()[..end - i]);
            }
            Edit::Truncate(n) => b.truncate(usize::from(n)),
            Edit::Extend(ref more) => b.extend_from_slice(more),
            _ => {}
        }
    }
}

/// The slot and pending-list checksum: everything but the checksum field at 12..16.
fn slot_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[..12]), &b[16..])
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Makes the checksum of an edited record right again, where its count leaves it whole:
/// `fixed` bytes before `each`-byte items, the count at 24 (slot) or 16 (pending).
fn fix_record_crc(b: &mut [u8], fixed: usize, count_at: usize, each: usize) {
    let Some(count) = u64_at(b, count_at) else {
        return;
    };
    let len = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(each))
        .and_then(|n| n.checked_add(fixed));
    if let Some(len) = len.filter(|&l| l <= b.len()) {
        let crc = slot_crc(&b[..len]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
    }
}

fn fix_header_crc(b: &mut [u8]) {
    if b.len() >= 36 {
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
    }
}

#[derive(Arbitrary, Debug)]
struct ArbEntry {
    lba: Num,
    spare_block: Num,
    write_error: bool,
    since: u64,
}

impl ArbEntry {
    fn get(&self) -> Entry {
        Entry {
            lba: self.lba.get(),
            spare_block: self.spare_block.get(),
            cause: if self.write_error {
                Cause::WriteError
            } else {
                Cause::Manual
            },
            since: self.since,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Encoded<T> {
    value: T,
    edits: Vec<Edit>,
    fix_crc: bool,
}

#[derive(Arbitrary, Debug)]
struct ArbHeader {
    /// 512, 4096 or anything.
    block_size: Num,
    image_size: Num,
    spare_blocks: Num,
}

impl ArbHeader {
    fn get(&self) -> Header {
        Header {
            block_size: match self.block_size {
                Num::Small(n) if n % 2 == 0 => 512,
                Num::Small(_) => 4096,
                n => n.get() as u32,
            },
            image_size: self.image_size.get(),
            spare_blocks: self.spare_blocks.get(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct ArbSlot {
    seq: u64,
    entries: Vec<ArbEntry>,
}

impl ArbSlot {
    fn get(&self) -> Slot {
        Slot {
            seq: self.seq,
            entries: self.entries.iter().map(ArbEntry::get).collect(),
        }
    }
}

fn encode_header(e: &Encoded<ArbHeader>) -> Vec<u8> {
    let mut b = e.value.get().encode();
    apply(&mut b, &e.edits);
    if e.fix_crc {
        fix_header_crc(&mut b);
    }
    b
}

fn encode_slot(e: &Encoded<ArbSlot>) -> Vec<u8> {
    let mut b = e.value.get().encode();
    apply(&mut b, &e.edits);
    if e.fix_crc {
        fix_record_crc(&mut b, SLOT_HEADER_LEN, 24, ENTRY_LEN);
    }
    b
}

fn encode_pending(e: &Encoded<Vec<Num>>) -> Vec<u8> {
    let blocks = e.value.iter().map(|n| n.get()).collect();
    let mut b = PendingRecord { blocks }.encode();
    apply(&mut b, &e.edits);
    if e.fix_crc {
        fix_record_crc(&mut b, PENDING_HEADER_LEN, 16, 8);
    }
    b
}

/// A spare file laid out as `Spare::create` lays it out, from parts that may be damaged.
#[derive(Arbitrary, Debug)]
struct ArbFile {
    header: Encoded<ArbHeader>,
    slots: [Option<Encoded<ArbSlot>>; 2],
    pending: Option<Encoded<Vec<Num>>>,
    /// The file cut short (or grown) to this length.
    len: Option<Num>,
}

/// The largest file the structured mode writes: spare files past it are written as far as
/// their metadata, which is what a file cut short looks like.
const MAX_FILE: u64 = 64 << 20;

impl ArbFile {
    fn write(&self, f: &std::fs::File) {
        let header_bytes = encode_header(&self.header);
        let _ = f.write_all_at(&header_bytes, 0);
        let h = self.header.value.get();
        let slot_size = remapblk::remap::metadata::slot_size(h.spare_blocks.min(1 << 40));
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                let at = HEADER_LEN + i as u64 * slot_size;
                if at < MAX_FILE {
                    let _ = f.write_all_at(&encode_slot(s), at);
                }
            }
        }
        let end = h
            .spare_blocks
            .checked_mul(u64::from(h.block_size))
            .and_then(|d| d.checked_add(HEADER_LEN + 2 * slot_size));
        if let Some(end) = end.filter(|&e| e < MAX_FILE) {
            let _ = f.set_len(end);
            if let Some(p) = &self.pending {
                let _ = f.write_all_at(&encode_pending(p), end);
            }
        }
        if let Some(len) = self.len {
            let _ = f.set_len(len.get() % MAX_FILE);
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Input {
    Header(Vec<u8>),
    Slot {
        bytes: Vec<u8>,
        spare_blocks: Num,
    },
    Pending {
        bytes: Vec<u8>,
        max_blocks: Num,
    },
    EncodedHeader(Encoded<ArbHeader>),
    EncodedSlot {
        slot: Encoded<ArbSlot>,
        spare_blocks: Num,
        pad: u16,
    },
    EncodedPending {
        pending: Encoded<Vec<Num>>,
        max_blocks: Num,
    },
    File(ArbFile),
}

pub fn run(data: &[u8]) {
    if let Some((&RAW_FILE, file)) = data.split_first() {
        spare_file(|f| {
            let _ = f.write_all_at(file, 0);
        });
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    match input {
        Input::Header(b) => header(&b),
        Input::Slot {
            bytes,
            spare_blocks,
        } => slot(&bytes, spare_blocks.get()),
        Input::Pending { bytes, max_blocks } => pending(&bytes, max_blocks.get()),
        Input::EncodedHeader(e) => header(&encode_header(&e)),
        Input::EncodedSlot {
            slot: e,
            spare_blocks,
            pad,
        } => {
            let mut b = encode_slot(&e);
            b.resize(b.len() + usize::from(pad), 0);
            slot(&b, spare_blocks.get());
        }
        Input::EncodedPending {
            pending: e,
            max_blocks,
        } => pending(&encode_pending(&e), max_blocks.get()),
        Input::File(f) => spare_file(|file| f.write(file)),
    }
}

fn header(b: &[u8]) {
    if let Ok(h) = Header::decode(b) {
        let again = h.encode();
        assert_eq!(Header::decode(&again), Ok(h), "a decoded header re-encodes");
        assert_eq!(again[..36], b[..36], "the header's bytes are canonical");
    }
}

fn slot(b: &[u8], spare_blocks: u64) {
    if let Ok(s) = Slot::decode(b, spare_blocks) {
        assert!(s.entries.len() as u64 <= spare_blocks);
        for e in &s.entries {
            assert!(e.spare_block < spare_blocks, "{e:?} of {spare_blocks}");
        }
        assert_eq!(
            Slot::decode(&s.encode(), spare_blocks).as_ref(),
            Ok(&s),
            "a decoded slot re-encodes"
        );
    }
}

fn pending(b: &[u8], max_blocks: u64) {
    if let Some(len) = PendingRecord::size(b, max_blocks) {
        assert!(len >= PENDING_HEADER_LEN);
        assert_eq!((len - PENDING_HEADER_LEN) % 8, 0);
    }
    if let Ok(r) = PendingRecord::decode(b) {
        let again = r.encode();
        assert_eq!(again[..], b[..again.len()], "the pending list is canonical");
    }
}

/// A whole spare file, written by `fill`: inspected as `remapblk metadata check` and `dump`
/// do, opened without repair (which must write nothing) and with it, as `serve` does.
fn spare_file(fill: impl FnOnce(&std::fs::File)) {
    let path = scratch::dir().join("spare");
    let _ = std::fs::remove_file(&path);
    let f = match std::fs::File::create_new(&path) {
        Ok(f) => f,
        Err(e) => panic!("cannot create {}: {e}", path.display()),
    };
    fill(&f);
    drop(f);
    check_file(&path);
    let _ = std::fs::remove_file(&path);
}

fn check_file(path: &Path) {
    let Ok(i) = inspect(path) else { return };
    let valid = i.slots.iter().filter(|s| s.is_ok()).count();
    let (code, _) = i.check(path);
    assert_eq!(
        code,
        (2 - valid) as u8,
        "check's exit code follows the slots"
    );
    let dump = serde_json::to_value(i.dump()).expect("the dump serializes");
    assert!(dump["header"].is_object());
    let h = i.header;

    // Whether anything wrote the file: its size and change times (the file may be 64 MiB,
    // too much to compare whole thousands of times a second; the stat before makes the next
    // change's time fine-grained where the kernel has multigrain timestamps, as tmpfs does).
    let stamp = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .map(|m| {
                (
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
            })
            .ok()
    };
    let before = stamp();
    let untouched = Spare::open_with(path, h.block_size, h.image_size, false);
    assert_eq!(
        stamp(),
        before,
        "opening without repair wrote to the spare file"
    );
    if let Ok(o) = untouched {
        let _ = RemapTable::new(o.spare, o.entries);
    }

    // As `serve` opens it: a bad slot is repaired from the other.
    let Ok(table) = remap::open(path, h.block_size, h.image_size, None) else {
        return;
    };
    let entries = table.entries();
    assert_eq!(
        table.spare_free() + entries.len() as u64,
        table.spare_total(),
        "every spare block is used or free"
    );
    if let Ok(i) = inspect(path) {
        for (n, s) in i.slots.iter().enumerate() {
            match s {
                Ok(s) => {
                    let mut theirs = s.entries.clone();
                    let mut ours = entries.clone();
                    theirs.sort_by_key(|e| e.lba);
                    ours.sort_by_key(|e| e.lba);
                    assert_eq!(theirs, ours, "slot {n} after the repair holds the table");
                }
                Err(e) => panic!("slot {n} is still bad after opening with repair: {e}"),
            }
        }
    }
    if let Ok((_, pending)) = table.reload() {
        assert!(pending <= h.disk_blocks() as usize);
    }
    for b in table.pending() {
        assert!(b < h.disk_blocks(), "pending block {b} past the disk");
    }
}

/// Real spare files: new, with a table, with a pending list left by a handover, with a slot
/// damaged; each as the raw-file mode takes it.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let dir = scratch::dir().join("seeds");
    let _ = std::fs::create_dir_all(&dir);
    let header = |bs: u32, blocks: u64| Header {
        block_size: bs,
        image_size: 1 << 20,
        spare_blocks: blocks,
    };
    let mut add = |name: &str, bs: u32, blocks: u64, entries: usize, pending: bool| {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let Ok(spare) = Spare::create(&path, header(bs, blocks)) else {
            return;
        };
        let e: Vec<Entry> = (0..entries as u64)
            .map(|i| Entry {
                lba: i * 3,
                spare_block: i,
                cause: if i % 2 == 0 {
                    Cause::Manual
                } else {
                    Cause::WriteError
                },
                since: 1_700_000_000 + i,
            })
            .collect();
        if entries > 0 {
            let _ = spare.commit(&e);
        }
        if pending {
            let _ = spare.write_pending(&[5, 7, 11]);
        }
        drop(spare);
        if let Ok(bytes) = std::fs::read(&path) {
            let mut b = vec![RAW_FILE];
            b.extend_from_slice(&bytes);
            out.push((name.to_string(), b));
        }
        let _ = std::fs::remove_file(&path);
    };
    add("empty-512", 512, 16, 0, false);
    add("table-512", 512, 16, 5, false);
    add("table-4096", 4096, 8, 3, false);
    add("pending", 512, 16, 2, true);
    let _ = std::fs::remove_dir_all(&dir);
    out
}
