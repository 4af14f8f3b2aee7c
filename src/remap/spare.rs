//! The spare file on disk: creating it, opening and checking it (repairing one bad metadata
//! slot from the other), committing the table, and the spare blocks' I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;

use super::metadata::{
    Entry, Header, MetaError, PendingRecord, Slot, HEADER_LEN, PENDING_HEADER_LEN,
};
use super::mirror::Mirror;
use crate::denied;
use crate::filemode::PRIVATE_FILE;
use crate::storage::{open_noatime, Extent, Source};

/// What the user needs of a spare file it cannot open or create.
const SPARE_NEEDS: &str = "read and write access to it, and to create it, write and search \
     access to its directory";

#[derive(Debug, Error)]
pub enum SpareError {
    #[error("spare file {path}: cannot {what}: {source}{}", denied::advice(.source, .path, SPARE_NEEDS))]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("spare file {path}: header: {err}. It is not a usable spare file: move it away to start with an empty table, or give --spare another path")]
    Header { path: PathBuf, err: MetaError },
    #[error("spare file {path}: block_size is {file} but the server runs with --block-size {want}; pass --block-size {file}, or use another --spare")]
    BlockSize { path: PathBuf, file: u32, want: u32 },
    #[error("spare file {path}: image_size is {file} bytes but the image has {want}; it belongs to another image (or the image was resized): use the right --spare, or move this one away")]
    ImageSize { path: PathBuf, file: u64, want: u64 },
    #[error("spare file {path}: both metadata slots are bad (A: {a}; B: {b}); refusing to start with an empty remap table, which would lose every remap. Inspect it with `remapblk metadata check {path}`")]
    BothSlots {
        path: PathBuf,
        a: MetaError,
        b: MetaError,
    },
}

struct CommitState {
    /// Slot a commit writes first (0 = A, 1 = B): the one that did not hold the table found
    /// at start-up, so a crash in the first write never touches the only good copy.
    next: usize,
    seq: u64,
}

pub struct Spare {
    file: File,
    path: PathBuf,
    header: Header,
    commit: Mutex<CommitState>,
    /// The blocks in use, in memory (see `mirror`); None for a spare too big to mirror.
    mirror: Option<Mirror>,
}

/// A spare file just opened: its table, and which slot was rewritten because it was bad.
pub struct Opened {
    pub spare: Spare,
    pub entries: Vec<Entry>,
    pub repaired: Option<char>,
}

pub fn slot_name(i: usize) -> char {
    if i == 0 {
        'A'
    } else {
        'B'
    }
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> SpareError + 'a {
    move |source| SpareError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

impl Spare {
    /// Creates the spare file, readable by this process's user only: it holds guest data.
    pub fn create(path: &Path, header: Header) -> Result<Spare, SpareError> {
        let file = open_noatime(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(PRIVATE_FILE),
            0,
            path,
        )
        .map_err(io_err(path, "create it"))?;
        file.set_len(header.file_size())
            .map_err(io_err(path, "size it"))?;
        file.write_all_at(&header.encode(), 0)
            .map_err(io_err(path, "write its header"))?;
        let spare = Spare {
            file,
            path: path.to_path_buf(),
            header,
            commit: Mutex::new(CommitState { next: 0, seq: 0 }),
            mirror: Mirror::new(header.spare_blocks, header.block_size),
        };
        spare
            .commit(&[])
            .map_err(io_err(path, "write its metadata slots"))?;
        Ok(spare)
    }

    /// Opens an existing spare file made for `block_size` and `image_size`, repairing a bad
    /// or stale metadata slot.
    pub fn open(path: &Path, block_size: u32, image_size: u64) -> Result<Opened, SpareError> {
        Spare::open_with(path, block_size, image_size, true)
    }

    /// [`Spare::open`], writing nothing when `repair` is false: a bad or stale slot is left as
    /// it is (the next commit overwrites it first; [`Spare::reload`] repairs it).
    pub fn open_with(
        path: &Path,
        block_size: u32,
        image_size: u64,
        repair: bool,
    ) -> Result<Opened, SpareError> {
        let file = open_noatime(OpenOptions::new().read(true).write(true), 0, path)
            .map_err(io_err(path, "open it"))?;
        let header = read_header(&file, path)?;
        if header.block_size != block_size {
            return Err(SpareError::BlockSize {
                path: path.to_path_buf(),
                file: header.block_size,
                want: block_size,
            });
        }
        if header.image_size != image_size {
            return Err(SpareError::ImageSize {
                path: path.to_path_buf(),
                file: header.image_size,
                want: image_size,
            });
        }
        let spare = Spare {
            file,
            path: path.to_path_buf(),
            mirror: Mirror::new(header.spare_blocks, header.block_size),
            header,
            commit: Mutex::new(CommitState { next: 0, seq: 0 }),
        };
        let (entries, repaired) = spare.load(repair)?;
        Ok(Opened {
            spare,
            entries,
            repaired,
        })
    }

    /// Reads the table again from the file, which another process may have changed (a
    /// migration handed the files over and back), repairing a bad or stale slot; the blocks in
    /// memory are read again too. Returns the table and which slot was bad. Nothing may use
    /// the spare meanwhile.
    pub fn reload(&self) -> Result<(Vec<Entry>, Option<char>), SpareError> {
        self.load(true)
    }

    /// The table: the newest valid slot. The next commit goes to the other slot first; the
    /// mirror holds the table's blocks, and only those. With `repair`, a bad slot, or one a
    /// crash left a commit behind, gets the table again.
    fn load(&self, repair: bool) -> Result<(Vec<Entry>, Option<char>), SpareError> {
        let path = &self.path;
        let slots = read_slots(&self.file, &self.header);
        let (best, slot) = match newest_valid(&slots) {
            Some(best) => best,
            None => {
                let err = |i: usize| slots[i].clone().err().unwrap_or(MetaError::Magic);
                return Err(SpareError::BothSlots {
                    path: path.to_path_buf(),
                    a: err(0),
                    b: err(1),
                });
            }
        };
        let entries = slot.entries.clone();
        *self.commit.lock().unwrap_or_else(|p| p.into_inner()) = CommitState {
            next: 1 - best,
            seq: slot.seq,
        };
        if let Some(m) = &self.mirror {
            m.clear();
        }
        self.fill_mirror(&entries);
        let other = 1 - best;
        let repaired = match &slots[other] {
            Ok(s) if s.seq == slot.seq => None,
            _ if !repair => None,
            twin => {
                // A bad slot, or one a crash left a commit behind: give the table its second
                // copy again before anything else changes it.
                self.commit(&entries)
                    .map_err(io_err(path, "repair its metadata slot"))?;
                twin.is_err().then(|| slot_name(other))
            }
        };
        Ok((entries, repaired))
    }

    /// Where the pending list a handover leaves lives: past the last spare block.
    fn pending_offset(&self) -> u64 {
        self.header.file_size()
    }

    /// Leaves `blocks` as the pending list for whoever takes the files over next, durably.
    pub fn write_pending(&self, blocks: &[u64]) -> io::Result<()> {
        let record = PendingRecord {
            blocks: blocks.to_vec(),
        };
        self.file
            .write_all_at(&record.encode(), self.pending_offset())?;
        self.file.sync_data()
    }

    /// The pending list the last handover left, wiped from the file so that it is used once
    /// (empty when there is none, or it is damaged: the list is a hint, and a block that fails
    /// again goes back on it). Blocks past the disk's end are dropped.
    pub fn take_pending(&self) -> io::Result<Vec<u64>> {
        let disk = self.header.disk_blocks();
        let at = self.pending_offset();
        let mut head = [0u8; PENDING_HEADER_LEN];
        match self.file.read_exact_at(&mut head, at) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let Some(len) = PendingRecord::size(&head, disk) else {
            return Ok(Vec::new());
        };
        let mut b = vec![0u8; len];
        let blocks = match self.file.read_exact_at(&mut b, at) {
            Ok(()) => PendingRecord::decode(&b)
                .map(|r| r.blocks)
                .unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Vec::new(),
            Err(e) => return Err(e),
        };
        self.file.write_all_at(&[0u8; 8], at)?;
        self.file.sync_data()?;
        Ok(blocks.into_iter().filter(|&b| b < disk).collect())
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file, to check that a lock taken by path is on it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Makes `entries` the durable table. Both slots get it under the next sequence number,
    /// one after the other, each made durable before the other is touched: a torn write
    /// leaves the other slot whole (holding the old table or the new one), and once both are
    /// written a slot that rots later has an intact twin, so no acknowledged change lives in
    /// one copy only.
    pub fn commit(&self, entries: &[Entry]) -> io::Result<()> {
        let mut st = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        let slot = Slot {
            seq: st.seq + 1,
            entries: entries.to_vec(),
        };
        let bytes = slot.encode();
        for i in [st.next, 1 - st.next] {
            let at = HEADER_LEN + i as u64 * self.header.slot_size();
            self.file.write_all_at(&bytes, at)?;
            self.file.sync_data()?;
        }
        st.seq += 1;
        Ok(())
    }

    fn block_offset(&self, block: u64) -> u64 {
        self.header.data_offset() + block * u64::from(self.header.block_size)
    }

    /// Where `len` bytes from byte `skip` of spare block `block` live, as an extent of a request
    /// at its byte `at`: in memory when the mirror holds the block, else in the file.
    pub fn extent(&self, block: u64, skip: u64, len: u64, at: u64) -> Extent<'_> {
        let bs = u64::from(self.header.block_size);
        let source = match &self.mirror {
            Some(m) if m.holds(block) => Source::Memory {
                from: m,
                offset: block * bs + skip,
            },
            _ => Source::File {
                fd: self.file.as_fd(),
                offset: self.block_offset(block) + skip,
                align: 1,
            },
        };
        Extent { at, len, source }
    }

    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, self.block_offset(block))
    }

    /// Writes one block to the file, and the mirror with it (which drops the block if the
    /// write failed: the file's contents are then unknown).
    pub fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.file.write_all_at(buf, self.block_offset(block));
        if let Some(m) = &self.mirror {
            match r {
                Ok(()) => m.store(block, buf),
                Err(_) => m.forget(block),
            }
        }
        r
    }

    /// Loads the blocks `entries` use into the mirror. One that cannot be read stays out and
    /// is read from the file, where the error will reach whoever reads it.
    fn fill_mirror(&self, entries: &[Entry]) {
        let Some(m) = &self.mirror else { return };
        let mut buf = vec![0u8; self.header.block_size as usize];
        let mut failed = 0;
        for e in entries {
            match self.read_block(e.spare_block, &mut buf) {
                Ok(()) => m.store(e.spare_block, &buf),
                Err(_) => failed += 1,
            }
        }
        if failed > 0 {
            log::warn!(
                "spare file {}: {failed} spare block(s) could not be read; reads of them will try the file again",
                self.path.display()
            );
        }
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn read_header(file: &File, path: &Path) -> Result<Header, SpareError> {
    let mut b = vec![0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut b, 0).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SpareError::Header {
                path: path.to_path_buf(),
                err: MetaError::Truncated(0),
            }
        } else {
            io_err(path, "read its header")(e)
        }
    })?;
    Header::decode(&b).map_err(|err| SpareError::Header {
        path: path.to_path_buf(),
        err,
    })
}

/// The newest slot whose checksum holds: the table.
fn newest_valid(slots: &[Result<Slot, MetaError>; 2]) -> Option<(usize, &Slot)> {
    match (&slots[0], &slots[1]) {
        (Ok(a), Ok(b)) if b.seq > a.seq => Some((1, b)),
        (Ok(a), _) => Some((0, a)),
        (Err(_), Ok(b)) => Some((1, b)),
        (Err(_), Err(_)) => None,
    }
}

fn read_slots(file: &File, header: &Header) -> [Result<Slot, MetaError>; 2] {
    [0u64, 1].map(|i| {
        let mut b = vec![0u8; header.slot_size() as usize];
        match file.read_exact_at(&mut b, HEADER_LEN + i * header.slot_size()) {
            Ok(()) => Slot::decode(&b, header.spare_blocks),
            Err(_) => Err(MetaError::Truncated(0)),
        }
    })
}

/// What `remapblk metadata check` and `dump` report about a spare file, without changing it.
pub struct Inspection {
    pub header: Header,
    pub slots: [Result<Slot, MetaError>; 2],
}

pub fn inspect(path: &Path) -> Result<Inspection, SpareError> {
    let file = File::open(path).map_err(io_err(path, "open it"))?;
    let header = read_header(&file, path)?;
    let slots = read_slots(&file, &header);
    Ok(Inspection { header, slots })
}

/// `remapblk metadata dump`'s output: the header and each slot, the newest valid one marked,
/// and that slot's entries.
#[derive(Debug, serde::Serialize)]
pub struct Dump<'a> {
    pub header: HeaderDump,
    pub slots: Vec<SlotDump>,
    /// The slot that holds the table, if either is valid.
    pub current: Option<char>,
    pub entries: &'a [Entry],
}

#[derive(Debug, serde::Serialize)]
pub struct HeaderDump {
    pub version: u32,
    #[serde(flatten)]
    pub header: Header,
    pub slot_size: u64,
    pub data_offset: u64,
}

/// One metadata slot: `valid` says which of the two shapes it has.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum SlotDump {
    Valid {
        slot: char,
        valid: bool,
        seq: u64,
        entries: usize,
    },
    Bad {
        slot: char,
        valid: bool,
        error: String,
    },
}

impl Inspection {
    /// `remapblk metadata dump`.
    pub fn dump(&self) -> Dump<'_> {
        let newest = newest_valid(&self.slots);
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Ok(slot) => SlotDump::Valid {
                    slot: slot_name(i),
                    valid: true,
                    seq: slot.seq,
                    entries: slot.entries.len(),
                },
                Err(e) => SlotDump::Bad {
                    slot: slot_name(i),
                    valid: false,
                    error: e.to_string(),
                },
            })
            .collect();
        Dump {
            header: HeaderDump {
                version: super::metadata::VERSION,
                header: self.header,
                slot_size: self.header.slot_size(),
                data_offset: self.header.data_offset(),
            },
            slots,
            current: newest.map(|(i, _)| slot_name(i)),
            entries: newest.map_or(&[], |(_, s)| &s.entries),
        }
    }
}

#[cfg(test)]
mod dump_tests {
    use super::super::metadata::Cause;
    use super::*;
    use serde_json::json;

    #[test]
    fn the_dump_has_the_shape_scripts_read() {
        let header = Header {
            block_size: 512,
            image_size: 1 << 20,
            spare_blocks: 64,
        };
        let entry = Entry {
            lba: 9,
            spare_block: 3,
            cause: Cause::WriteError,
            since: 5,
        };
        let i = Inspection {
            header,
            slots: [
                Err(MetaError::Checksum),
                Ok(Slot {
                    seq: 2,
                    entries: vec![entry],
                }),
            ],
        };
        assert_eq!(
            serde_json::to_value(i.dump()).unwrap(),
            json!({
                "header": {
                    "version": super::super::metadata::VERSION,
                    "block_size": 512,
                    "image_size": 1 << 20,
                    "spare_blocks": 64,
                    "slot_size": header.slot_size(),
                    "data_offset": header.data_offset(),
                },
                "slots": [
                    {"slot": "A", "valid": false, "error": "checksum mismatch"},
                    {"slot": "B", "valid": true, "seq": 2, "entries": 1},
                ],
                "current": "B",
                "entries": [{"lba": 9, "spare_block": 3, "cause": "write-error", "since": 5}],
            })
        );
        let none = Inspection {
            header,
            slots: [Err(MetaError::Magic), Err(MetaError::Checksum)],
        };
        let v = serde_json::to_value(none.dump()).unwrap();
        assert_eq!((&v["current"], &v["entries"]), (&json!(null), &json!([])));
    }
}

impl Inspection {
    /// `remapblk metadata check`: the exit code (0 healthy, 1 one slot bad, 2 both bad) and
    /// what to tell the user.
    pub fn check(&self, path: &Path) -> (u8, String) {
        let bad: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref()
                    .err()
                    .map(|e| format!("slot {}: {e}", slot_name(i)))
            })
            .collect();
        match bad.as_slice() {
            [] => (0, format!("{}: healthy (both metadata slots valid)", path.display())),
            [one] => (
                1,
                format!("{}: {one}; the other slot is valid and the bad one is rewritten on the next start", path.display()),
            ),
            _ => (
                2,
                format!("{}: both metadata slots are bad ({}); remapblk serve refuses to start with this spare", path.display(), bad.join("; ")),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::metadata::Cause;
    use super::*;
    use std::os::fd::AsRawFd;

    fn header() -> Header {
        Header {
            block_size: 512,
            image_size: 1 << 20,
            spare_blocks: 64,
        }
    }

    fn entry(lba: u64, spare_block: u64) -> Entry {
        Entry {
            lba,
            spare_block,
            cause: Cause::Manual,
            since: 1,
        }
    }

    /// Reads an extent's bytes the way an engine does: from memory, else from the file.
    fn read_extent(s: &Spare, e: &Extent) -> Vec<u8> {
        let mut buf = vec![0u8; e.len as usize];
        match e.source {
            Source::Memory { from, offset } => {
                let iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: `buf` outlives the call.
                assert!(unsafe { from.copy_to(offset, &iov) });
            }
            Source::File { fd, offset, .. } => {
                assert_eq!(fd.as_raw_fd(), s.file.as_raw_fd());
                s.file.read_exact_at(&mut buf, offset).unwrap();
            }
            Source::Zeros => panic!("a spare block is never zeros"),
        }
        buf
    }

    fn in_memory(e: &Extent) -> bool {
        matches!(e.source, Source::Memory { .. })
    }

    #[test]
    fn blocks_in_use_are_read_from_memory_which_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let s = Spare::create(&p, header()).unwrap();
        assert!(
            !in_memory(&s.extent(3, 0, 512, 0)),
            "never written: the file"
        );
        s.write_block(3, &[5; 512]).unwrap();
        s.write_block(4, &[6; 512]).unwrap();
        let e = s.extent(3, 100, 600, 0);
        assert!(in_memory(&e));
        let want: Vec<u8> = [[5u8; 412].as_slice(), &[6u8; 188]].concat();
        assert_eq!(read_extent(&s, &e), want);
        s.write_block(3, &[7; 512]).unwrap();
        assert_eq!(read_extent(&s, &s.extent(3, 0, 512, 0)), [7; 512]);
        // After a restart the blocks the table uses are in memory again, and only those.
        s.commit(&[entry(9, 3)]).unwrap();
        drop(s);
        let o = Spare::open(&p, 512, 1 << 20).unwrap();
        let e = o.spare.extent(3, 0, 512, 0);
        assert!(in_memory(&e));
        assert_eq!(read_extent(&o.spare, &e), [7; 512]);
        let e = o.spare.extent(4, 0, 512, 0);
        assert!(!in_memory(&e), "block 4 is not in the table");
        assert_eq!(read_extent(&o.spare, &e), [6; 512]);
    }

    #[test]
    fn a_spare_too_big_to_mirror_is_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let h = Header {
            block_size: 4096,
            image_size: 1 << 40,
            spare_blocks: super::super::mirror::MAX_BYTES / 4096 + 1,
        };
        let s = Spare::create(&dir.path().join("s"), h).unwrap();
        s.write_block(3, &[5; 4096]).unwrap();
        let e = s.extent(3, 0, 4096, 0);
        assert!(!in_memory(&e));
        assert_eq!(read_extent(&s, &e), [5; 4096]);
    }

    #[test]
    fn commits_go_to_both_slots_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let s = Spare::create(&p, header()).unwrap();
        s.commit(&[entry(1, 0)]).unwrap();
        s.commit(&[entry(1, 0), entry(2, 1)]).unwrap();
        drop(s);
        let o = Spare::open(&p, 512, 1 << 20).unwrap();
        assert_eq!(o.entries, vec![entry(1, 0), entry(2, 1)]);
        assert_eq!(o.repaired, None);
    }

    #[test]
    fn one_bad_slot_is_repaired_both_bad_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let s = Spare::create(&p, header()).unwrap();
        s.commit(&[entry(7, 3)]).unwrap();
        drop(s);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 8], HEADER_LEN + 20).unwrap(); // corrupt A
        drop(f);
        let o = Spare::open(&p, 512, 1 << 20).unwrap();
        assert_eq!(o.repaired, Some('A'));
        assert_eq!(
            o.entries,
            vec![entry(7, 3)],
            "B holds the same, newest table"
        );
        drop(o);
        let i = inspect(&p).unwrap();
        assert!(i.slots[0].is_ok() && i.slots[1].is_ok());

        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 8], HEADER_LEN + 20).unwrap();
        f.write_all_at(&[0xff; 8], HEADER_LEN + header().slot_size() + 20)
            .unwrap();
        drop(f);
        let e = Spare::open(&p, 512, 1 << 20).err().unwrap();
        assert!(matches!(e, SpareError::BothSlots { .. }), "{e}");
    }

    /// A crash between the two writes of a commit: one slot has the new table, the other the
    /// old one. The new one wins, and start-up brings the other level with it.
    #[test]
    fn interrupted_commit_is_completed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let s = Spare::create(&p, header()).unwrap();
        s.commit(&[entry(1, 0)]).unwrap();
        let old_b = {
            let mut b = vec![0u8; header().slot_size() as usize];
            s.file
                .read_exact_at(&mut b, HEADER_LEN + header().slot_size())
                .unwrap();
            b
        };
        s.commit(&[entry(1, 0), entry(2, 1)]).unwrap();
        // Put B back as it was before the last commit's second write.
        s.file
            .write_all_at(&old_b, HEADER_LEN + header().slot_size())
            .unwrap();
        drop(s);
        let before = inspect(&p).unwrap();
        assert!(matches!(&before.slots[1], Ok(b) if b.entries == vec![entry(1, 0)]));
        let o = Spare::open(&p, 512, 1 << 20).unwrap();
        assert_eq!(o.entries, vec![entry(1, 0), entry(2, 1)]);
        assert_eq!(o.repaired, None, "a stale slot is not a bad one");
        drop(o);
        let after = inspect(&p).unwrap();
        assert!(matches!(&after.slots[1], Ok(b) if b.entries == vec![entry(1, 0), entry(2, 1)]));
    }

    /// Another process's changes, seen by a reload: its table, its data in blocks this one
    /// held in memory, its pending list (used once). Opening without repair writes nothing.
    #[test]
    fn reload_sees_what_another_opener_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let s = Spare::create(&p, header()).unwrap();
        s.write_block(3, &[1; 512]).unwrap();
        s.commit(&[entry(9, 3)]).unwrap();
        corrupt_slot_a(&p);
        let before = std::fs::read(&p).unwrap();
        let mine = Spare::open_with(&p, 512, 1 << 20, false).unwrap();
        assert_eq!(
            (mine.entries.clone(), mine.repaired),
            (vec![entry(9, 3)], None)
        );
        assert_eq!(std::fs::read(&p).unwrap(), before, "nothing written");
        let mine = mine.spare;
        assert_eq!(read_extent(&mine, &mine.extent(3, 0, 512, 0)), [1; 512]);

        s.write_block(3, &[2; 512]).unwrap();
        s.write_block(4, &[4; 512]).unwrap();
        s.sync().unwrap();
        s.commit(&[entry(9, 3), entry(10, 4)]).unwrap();
        s.write_pending(&[7, 1 << 40]).unwrap();
        drop(s);
        let (entries, repaired) = mine.reload().unwrap();
        assert_eq!(entries, vec![entry(9, 3), entry(10, 4)]);
        assert_eq!(repaired, None, "the other's commits rewrote slot A");
        for (block, want) in [(3, [2u8; 512]), (4, [4; 512])] {
            let e = mine.extent(block, 0, 512, 0);
            assert!(in_memory(&e));
            assert_eq!(read_extent(&mine, &e), want);
        }
        assert_eq!(
            mine.take_pending().unwrap(),
            [7],
            "past the disk's end: dropped"
        );
        assert!(mine.take_pending().unwrap().is_empty(), "used once");
    }

    fn corrupt_slot_a(p: &Path) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&[0xff; 8], HEADER_LEN + 20).unwrap();
    }

    #[test]
    fn mismatches_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        drop(Spare::create(&p, header()).unwrap());
        let e = Spare::open(&p, 4096, 1 << 20).err().unwrap();
        assert!(e.to_string().contains("block_size"), "{e}");
        let e = Spare::open(&p, 512, 2 << 20).err().unwrap();
        assert!(e.to_string().contains("image_size"), "{e}");
        std::fs::write(&p, b"not a spare").unwrap();
        let e = Spare::open(&p, 512, 1 << 20).err().unwrap();
        assert!(matches!(e, SpareError::Header { .. }), "{e}");
    }
}
