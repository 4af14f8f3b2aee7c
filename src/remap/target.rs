//! The remap layer as a block target. Requests that touch no remapped or pending block go
//! straight to the main image (zero copy). The rest are split into per-block pieces through a
//! bounce buffer: that path only runs for damaged areas of the disk.
//!
//! Policy: a write error on the main image remaps each failing block (when auto-remap is on)
//! and the guest's write succeeds; a read error puts the failing blocks on the pending list
//! and reaches the guest (its data is not ours to invent); the next write to a pending block
//! remaps it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::gate::Closed;
use super::metadata::{Cause, Entry};
use super::table::RemapTable;
use super::table::Snapshot;
use crate::inline_vec::InlineVec;
use crate::storage::iov::{gather, scatter};
use crate::storage::{
    block_span, BlockIo, Dir, Extent, Hold, IoKind, MapIo, Mapping, MediaError, NotMediaError,
    Pass, PerIo,
};

pub struct RemapTarget {
    main: Arc<dyn BlockIo>,
    table: Arc<RemapTable>,
    bs: u64,
    auto_remap: bool,
    moves: MoveGuard,
}

/// Keeps guest writes and online moves (remap-add, remap-remove) from losing data, without a
/// lock on the I/O path. The disk is cut into buckets of `BUCKET_BLOCKS` blocks (hashed onto
/// `BUCKETS` counters); a move makes the counters of the buckets it touches odd while it
/// copies and even again when the new mapping is published. A write that saw one of its own
/// buckets' counters change while it ran may have landed on the old location after the copy,
/// so it waits for the move to end and writes again; a write that finds a move of its buckets
/// under way waits for it first. Moves are rare and one at a time; the I/O path pays an atomic
/// load per bucket it touches (usually one) before and after each write.
///
/// Per bucket, not one counter for the disk: under a steady stream of moves elsewhere, a slow
/// write (a failing disk, a delay fault) would otherwise overlap one in time on every attempt
/// and never complete.
struct MoveGuard {
    gens: Vec<AtomicU64>,
    one_at_a_time: Mutex<()>,
    done: Mutex<()>,
    done_cv: Condvar,
}

const BUCKETS: u64 = 1024;
const BUCKET_BLOCKS: u64 = 256;

impl Default for MoveGuard {
    fn default() -> MoveGuard {
        MoveGuard {
            gens: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            one_at_a_time: Mutex::new(()),
            done: Mutex::new(()),
            done_cv: Condvar::new(),
        }
    }
}

impl MoveGuard {
    /// The counters of blocks `first..=last`, each once.
    fn buckets(&self, first: u64, last: u64) -> impl Iterator<Item = &AtomicU64> {
        let (a, b) = (first / BUCKET_BLOCKS, last / BUCKET_BLOCKS);
        let range = if b - a + 1 >= BUCKETS {
            0..BUCKETS
        } else {
            a..b + 1
        };
        range.map(move |x| &self.gens[(x % BUCKETS) as usize])
    }

    /// (sum of the counters, whether a move of these blocks is under way).
    fn state(&self, first: u64, last: u64) -> (u64, bool) {
        self.buckets(first, last)
            .fold((0, false), |(sum, busy), g| {
                let v = g.load(Ordering::SeqCst);
                (sum.wrapping_add(v), busy || !v.is_multiple_of(2))
            })
    }

    fn wait_idle(&self, first: u64, last: u64) -> u64 {
        let mut g = self.done.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (sum, busy) = self.state(first, last);
            if !busy {
                return sum;
            }
            g = self.done_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs `write` (of blocks `first..=last`) until no move of those blocks overlapped it.
    fn write<T>(
        &self,
        first: u64,
        last: u64,
        mut write: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            let (mut before, busy) = self.state(first, last);
            if busy {
                before = self.wait_idle(first, last);
            }
            let r = write();
            // Pairs with the mover's increment before it copies: either this load sees the
            // move, or the move's copy sees this write. Counters only grow, so any move of
            // these buckets changes the sum.
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.state(first, last).0 == before {
                return r;
            }
        }
    }

    /// Runs `body`, a move of blocks `first..=last`.
    fn run<T>(&self, first: u64, last: u64, body: impl FnOnce() -> T) -> T {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        for g in self.buckets(first, last) {
            g.fetch_add(1, Ordering::SeqCst);
        }
        let r = body();
        let _g = self.done.lock().unwrap_or_else(|p| p.into_inner());
        for g in self.buckets(first, last) {
            g.fetch_add(1, Ordering::SeqCst);
        }
        self.done_cv.notify_all();
        r
    }
}

/// The lowest and highest of `blocks` (0, 0 when there are none).
fn span(blocks: &[u64]) -> (u64, u64) {
    let first = blocks.iter().copied().min().unwrap_or(0);
    (first, blocks.iter().copied().max().unwrap_or(first))
}

fn one(buf: &[u8]) -> [libc::iovec; 1] {
    [libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }]
}

impl RemapTarget {
    pub fn new(
        main: Arc<dyn BlockIo>,
        table: Arc<RemapTable>,
        block_size: u32,
        auto_remap: bool,
    ) -> RemapTarget {
        RemapTarget {
            main,
            table,
            bs: u64::from(block_size),
            auto_remap,
            moves: MoveGuard::default(),
        }
    }

    pub fn table(&self) -> &Arc<RemapTable> {
        &self.table
    }

    /// `remap-add`: copies `blocks` to new spare blocks and switches the table, safely
    /// against concurrent guest writes, one table change per batch of blocks. Blocks already
    /// remapped are left alone. Returns the entries of all of `blocks`.
    pub fn remap_add(&self, blocks: impl Iterator<Item = u64>) -> io::Result<Vec<Entry>> {
        const BATCH: usize = 4096;
        let blocks: Vec<u64> = blocks.collect();
        let (first, last) = span(&blocks);
        self.moves.run(first, last, || {
            for chunk in blocks.chunks(BATCH) {
                let snap = self.table.snapshot();
                let mut copies = Vec::with_capacity(chunk.len());
                for &b in chunk.iter().filter(|b| !snap.map.contains_key(b)) {
                    let data = self.main_read_block(b).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot copy block {b} to the spare: reading it failed: {e}"),
                        )
                    })?;
                    copies.push((b, data));
                }
                self.table.remap_batch(&copies, Cause::Manual)?;
            }
            let snap = self.table.snapshot();
            Ok(blocks
                .iter()
                .filter_map(|b| snap.map.get(b).copied())
                .collect())
        })
    }

    /// `remap-remove`: copies the remapped ones of `blocks` back to the main image and frees
    /// their spare blocks. Returns the entries removed.
    pub fn remap_remove(&self, blocks: impl Iterator<Item = u64>) -> io::Result<Vec<Entry>> {
        let blocks: Vec<u64> = blocks.collect();
        let (first, last) = span(&blocks);
        self.moves.run(first, last, || {
            let mut out = Vec::new();
            for &b in &blocks {
                let removed = self.table.unmap(b, |e| {
                    let mut buf = vec![0u8; self.bs as usize];
                    self.table.spare().read_block(e.spare_block, &mut buf)?;
                    // SAFETY: `buf` is live for the call.
                    unsafe { self.main.writev(b * self.bs, &one(&buf)) }
                        .and_then(|_| self.main.flush())
                        .map_err(|err| {
                            io::Error::new(
                                err.kind(),
                                format!("cannot copy block {b} back to the main image: {err}"),
                            )
                        })
                })?;
                out.extend(removed);
            }
            Ok(out)
        })
    }

    /// Refuses a guest write while this process is not the writer of the image and spare
    /// (see `handover`). The backend runs no queue then; this holds even if a request got
    /// through, so two processes never write one image.
    fn may_write(&self) -> io::Result<()> {
        if self.table.gate().is_open() {
            Ok(())
        } else {
            Err(io::Error::other(Closed))
        }
    }

    fn blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        block_span(offset, len, self.bs)
    }

    /// The blocks of `[first, last]` that failed with `e`: named by an injected fault, or
    /// found by trying each block on its own.
    fn bad_blocks(
        &self,
        e: &io::Error,
        first: u64,
        last: u64,
        probe: impl Fn(u64) -> bool,
    ) -> Vec<u64> {
        match MediaError::of(e) {
            Some(m) => m.bad.clone().collect(),
            None => (first..=last).filter(|&b| !probe(b)).collect(),
        }
    }

    fn main_read_block(&self, b: u64) -> io::Result<Vec<u8>> {
        let buf = vec![0u8; self.bs as usize];
        // SAFETY: `buf` is a live buffer of the iovec's length.
        unsafe { self.main.readv(b * self.bs, &one(&buf))? };
        Ok(buf)
    }

    /// Writes `data` (whole blocks from `first`) to the main image; blocks that fail are
    /// remapped when auto-remap is on.
    fn write_main_remapping(&self, first: u64, data: &[u8]) -> io::Result<()> {
        // SAFETY: `data` is a live buffer.
        match unsafe { self.main.writev(first * self.bs, &one(data)) } {
            Ok(()) => Ok(()),
            Err(e) => self.recover_write(first, data, e),
        }
    }

    /// After the main image refused a write of `data` at block `first` with `e`: remaps the
    /// failing blocks (auto-remap on) after writing the good ones.
    fn recover_write(&self, first: u64, data: &[u8], e: io::Error) -> io::Result<()> {
        // An injected failure that is not a media error (a torn write told as failed) must
        // reach the guest as it is: the disk has no bad block to remap.
        if !self.auto_remap || NotMediaError::is(&e) {
            return Err(e);
        }
        let nblocks = data.len() as u64 / self.bs;
        let block =
            |b: u64| &data[((b - first) * self.bs) as usize..((b - first + 1) * self.bs) as usize];
        let bad = self.bad_blocks(&e, first, first + nblocks - 1, |b| {
            // SAFETY: the block's slice is live.
            unsafe { self.main.writev(b * self.bs, &one(block(b))) }.is_ok()
        });
        if MediaError::of(&e).is_some() {
            // The fault named the bad blocks; the others still need writing.
            for b in (first..first + nblocks).filter(|b| !bad.contains(b)) {
                // SAFETY: as above.
                unsafe { self.main.writev(b * self.bs, &one(block(b)))? };
            }
        }
        for b in bad {
            self.table.remap_with_data(b, block(b), Cause::WriteError)?;
        }
        Ok(())
    }

    /// The slow path for a write touching remapped or pending blocks, one block at a time.
    fn write_split(&self, first: u64, data: &[u8]) -> io::Result<()> {
        let snap = self.table.snapshot();
        for (i, chunk) in data.chunks(self.bs as usize).enumerate() {
            let b = first + i as u64;
            if let Some(e) = snap.map.get(&b) {
                // A false return means a remap-remove moved the block since `snap` was taken;
                // the move changed the generation, so `MoveGuard::write` runs this write again
                // against the new mapping.
                self.table.write_spare_if_mapped(b, e.spare_block, chunk)?;
            } else if self.auto_remap && snap.pending.contains(&b) {
                // Like drive firmware with a pending sector: the next write remaps it.
                self.table.remap_with_data(b, chunk, Cause::WriteError)?;
            } else {
                self.write_main_remapping(b, chunk)?;
            }
        }
        Ok(())
    }

    fn read_split(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        let mut snap = self.table.snapshot();
        for (i, chunk) in out.chunks_mut(self.bs as usize).enumerate() {
            let b = first + i as u64;
            // A block moved since `snap` was taken is read again from where it is now: its old
            // spare block may already hold another block.
            while let Some(e) = snap.map.get(&b) {
                if self.table.read_spare_if_mapped(b, e.spare_block, chunk)? {
                    break;
                }
                snap = self.table.snapshot();
            }
            if snap.map.contains_key(&b) {
                continue;
            }
            match self.main_read_block(b) {
                Ok(buf) => chunk.copy_from_slice(&buf),
                Err(e) => {
                    self.table.add_pending([b]);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl BlockIo for RemapTarget {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let (first, last) = self.blocks(offset, len as u64);
        let snap = self.table.snapshot();
        if snap.remapped(first, last).next().is_none() {
            // SAFETY: the caller vouches for `iov`.
            return unsafe { self.main.readv(offset, iov) }.inspect_err(|e| {
                let bad = self.bad_blocks(e, first, last, |b| self.main_read_block(b).is_ok());
                self.table.add_pending(bad);
            });
        }
        let mut buf = vec![0u8; len];
        self.read_split(first, &mut buf)?;
        // SAFETY: the caller vouches for `iov`; `buf` holds their total length.
        unsafe { scatter(iov, &buf) };
        Ok(())
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        self.may_write()?;
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let (first, last) = self.blocks(offset, len as u64);
        // SAFETY: the caller vouches for `iov`.
        self.moves
            .write(first, last, || unsafe { self.write_once(offset, iov) })
    }

    fn flush(&self) -> io::Result<()> {
        self.main.flush()?;
        self.table.spare().sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.may_write()?;
        let (first, last) = self.blocks(offset, len);
        self.moves.write(first, last, || {
            if !self.table.snapshot().touches(first, last) {
                return self.main.discard(offset, len);
            }
            self.zero_split(first, last, true)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.may_write()?;
        let (first, last) = self.blocks(offset, len);
        self.moves.write(first, last, || {
            if !self.table.snapshot().touches(first, last) {
                return self.main.write_zeroes(offset, len, unmap);
            }
            self.zero_split(first, last, unmap)
        })
    }

    /// Reads are split into runs of the main image and of the spare. Writes go straight only
    /// where no block is remapped or pending: a write to a remapped block would land in a spare
    /// block that a concurrent remap-remove may hand to another block before the write runs.
    /// Either way the move counters of the request's blocks are kept in the per-I/O data and
    /// checked again by `end_io` ([`MoveGuard::write`]'s rule, for I/O that an engine carries
    /// out): a read of a spare block that changed hands meanwhile is done again.
    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        let (first, last) = self.blocks(io.offset, io.len);
        let (gen, moving) = self.moves.state(first, last);
        if moving || !out.per_io_mut().keep(self, gen) {
            return false;
        }
        let snap = self.table.view();
        match io.dir {
            // A write refused here takes the blocking path, where `may_write` says why.
            Dir::Write => {
                self.table.gate().is_open() && !snap.touches(first, last) && self.main.map(io, out)
            }
            Dir::Read => self.map_read(io, &snap, out),
        }
    }

    fn end_io(&self, io: MapIo, per_io: &PerIo) -> bool {
        // Pairs with the mover's increment before it copies, as in MoveGuard::write.
        std::sync::atomic::fence(Ordering::SeqCst);
        let (first, last) = self.blocks(io.offset, io.len);
        self.main.end_io(io, per_io) && per_io.get(self) == Some(self.moves.state(first, last).0)
    }

    /// The faults sit below: a read or write whose every block is remapped never reaches
    /// them, so nothing of theirs holds it (nor counts a firing for it). The look at the table
    /// is one snapshot load and a filter test for a table without those blocks, as `map`
    /// makes for every request.
    fn hold(&self, kind: IoKind, offset: u64, len: u64) -> Option<Hold> {
        if matches!(kind, IoKind::Read | IoKind::Write) && len > 0 {
            let (first, last) = self.blocks(offset, len);
            if self.table.view().remapped(first, last).count() as u64 == last - first + 1 {
                return None;
            }
        }
        self.main.hold(kind, offset, len)
    }
}

impl RemapTarget {
    /// [`BlockIo::map`] of a read: the spare's runs of the remapped blocks, and the image's runs
    /// between them.
    fn map_read<'a>(&'a self, io: MapIo, snap: &Snapshot, out: &mut Mapping<'a>) -> bool {
        let (first, last) = self.blocks(io.offset, io.len);
        let end = io.offset + io.len;
        // Neighbouring blocks often sit in neighbouring spare blocks: one run.
        let mut runs = InlineVec::<Extent<'a>, 4>::default();
        for (&b, e) in snap.remapped(first, last) {
            let start = (b * self.bs).max(io.offset);
            let stop = ((b + 1) * self.bs).min(end);
            let run = self.table.spare().extent(
                e.spare_block,
                start - b * self.bs,
                stop - start,
                io.at + start - io.offset,
            );
            if !runs.last_mut().is_some_and(|prev| prev.absorb(&run)) {
                runs.push(run);
            }
        }
        let offset_of = |e: &Extent| io.offset + (e.at - io.at);
        // The image's runs: the gaps around the spare's.
        let mut gaps = 0;
        let mut pos = io.offset;
        for r in runs.iter() {
            gaps += usize::from(pos < offset_of(r));
            pos = offset_of(r) + r.len;
        }
        gaps += usize::from(pos < end);
        // A remapped block inside a read cuts the image's part in two, so the split costs three
        // calls. When the engine runs the extents in order and from the page cache only, read
        // the whole range from the image and the spare's runs over it instead: two. The image's
        // copy of a remapped block is then only read when it is cached, never from a failing
        // disk. The image may refuse the whole range (a fault on a remapped block): split.
        if io.pass == Pass::NoWait && gaps >= 2 {
            let mark = out.len();
            if self.main.map(io, out) {
                for r in runs.iter() {
                    out.push(*r);
                }
                return true;
            }
            out.truncate(mark);
        }
        let mut pos = io.offset;
        for r in runs.iter() {
            let start = offset_of(r);
            if pos < start && !self.main.map(io.part(pos, start - pos), out) {
                return false;
            }
            out.push(*r);
            pos = start + r.len;
        }
        pos == end || self.main.map(io.part(pos, end - pos), out)
    }
}

impl RemapTarget {
    /// One attempt at a guest write (see `MoveGuard::write`).
    ///
    /// # Safety
    /// As for [`BlockIo::writev`].
    unsafe fn write_once(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let (first, last) = self.blocks(offset, len as u64);
        let snap = self.table.snapshot();
        // Only the slow paths need the data in one buffer of our own.
        let copy = || {
            let mut buf = vec![0u8; len];
            // SAFETY: the caller vouches for `iov`; `buf` holds their total length.
            unsafe { gather(iov, &mut buf) };
            buf
        };
        if !snap.touches(first, last) {
            // SAFETY: the caller vouches for `iov`.
            return match unsafe { self.main.writev(offset, iov) } {
                Ok(()) => Ok(()),
                Err(e) if !self.auto_remap => Err(e),
                Err(e) => self.recover_write(first, &copy(), e),
            };
        }
        self.write_split(first, &copy())
    }

    fn zero_split(&self, first: u64, last: u64, unmap: bool) -> io::Result<()> {
        let snap = self.table.snapshot();
        let zero = vec![0u8; self.bs as usize];
        for b in first..=last {
            if snap.map.contains_key(&b) || snap.pending.contains(&b) {
                self.write_split(b, &zero)?;
            } else {
                self.main.write_zeroes(b * self.bs, self.bs, unmap)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::metadata::Header;
    use super::super::spare::Spare;
    use super::*;
    use crate::storage::Source;
    use std::collections::BTreeSet;
    use std::os::fd::AsFd;

    /// An image that maps every range to its file except ranges holding a `refused` block (as
    /// the fault layer refuses a range with a fault in it).
    struct FakeImage {
        file: std::fs::File,
        refused: BTreeSet<u64>,
    }

    impl BlockIo for FakeImage {
        unsafe fn readv(&self, _: u64, _: &[libc::iovec]) -> io::Result<()> {
            Ok(())
        }
        unsafe fn writev(&self, _: u64, _: &[libc::iovec]) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
            let blocks = io.offset / 512..(io.offset + io.len).div_ceil(512);
            if self.refused.range(blocks).next().is_some() {
                return false;
            }
            out.push(Extent {
                at: io.at,
                len: io.len,
                source: Source::File {
                    fd: self.file.as_fd(),
                    offset: io.offset,
                    align: 1,
                },
            });
            true
        }
    }

    /// A remap target over a `FakeImage` refusing `refused`, with `remapped` blocks remapped.
    fn target(remapped: &[u64], refused: &[u64]) -> (tempfile::TempDir, RemapTarget) {
        let dir = tempfile::tempdir().unwrap();
        let header = Header {
            block_size: 512,
            image_size: 1 << 20,
            spare_blocks: 16,
        };
        let spare = Spare::create(&dir.path().join("s"), header).unwrap();
        let table = Arc::new(RemapTable::new(spare, Vec::new()).unwrap());
        for &b in remapped {
            table
                .remap_with_data(b, &[0u8; 512], Cause::Manual)
                .unwrap();
        }
        let main = Arc::new(FakeImage {
            file: tempfile::tempfile().unwrap(),
            refused: refused.iter().copied().collect(),
        });
        (dir, RemapTarget::new(main, table, 512, true))
    }

    /// Each extent as (kind, request byte, length, source offset): 'F' the image's file, 'M'
    /// the spare's blocks in memory.
    fn map(
        t: &RemapTarget,
        dir: Dir,
        offset: u64,
        len: u64,
        pass: Pass,
    ) -> Vec<(char, u64, u64, u64)> {
        let mut m = Mapping::default();
        assert!(t.map(MapIo::new(dir, offset, len, pass), &mut m));
        m.extents()
            .iter()
            .map(|e| match e.source {
                Source::File { offset, .. } => ('F', e.at, e.len, offset),
                Source::Memory { offset, .. } => ('M', e.at, e.len, offset),
                Source::Zeros => ('Z', e.at, e.len, 0),
            })
            .collect()
    }

    #[test]
    fn a_read_around_remapped_blocks_is_one_image_read_with_the_spare_over_it() {
        let (_dir, t) = target(&[10, 12], &[]);
        let split = map(&t, Dir::Read, 8 * 512, 4096, Pass::Queued);
        let kinds: String = split.iter().map(|e| e.0).collect();
        assert_eq!(kinds, "FMFMF");
        assert_eq!(split[0], ('F', 0, 1024, 8 * 512));
        assert_eq!(split[2], ('F', 1536, 512, 11 * 512));

        let over = map(&t, Dir::Read, 8 * 512, 4096, Pass::NoWait);
        assert_eq!(over[0], ('F', 0, 4096, 8 * 512));
        // The spare's runs follow, the same as in the split, so they land over the image's copy.
        let spare_runs: Vec<_> = split.iter().filter(|e| e.0 == 'M').copied().collect();
        assert_eq!(over[1..], spare_runs[..]);
    }

    #[test]
    fn overlay_only_where_it_saves_a_call() {
        // A remapped block at the edge leaves one image run: the split is as short.
        let (_dir, t) = target(&[8], &[]);
        let r = map(&t, Dir::Read, 8 * 512, 4096, Pass::NoWait);
        assert_eq!(r.iter().map(|e| e.0).collect::<String>(), "MF");
        // Writes never overlay (they do not map around remapped blocks at all).
        let (_dir, t) = target(&[], &[]);
        let r = map(&t, Dir::Write, 0, 4096, Pass::NoWait);
        assert_eq!(r, [('F', 0, 4096, 0)]);
        let (_dir, t) = target(&[3], &[]);
        let mut m = Mapping::default();
        assert!(!t.map(MapIo::new(Dir::Write, 0, 4096, Pass::NoWait), &mut m));
    }

    #[test]
    fn an_image_that_refuses_the_whole_range_gets_the_split() {
        // Block 10 is remapped and the image refuses it (a fault on it): only the runs around
        // it may go to the image.
        let (_dir, t) = target(&[10], &[10]);
        let split = map(&t, Dir::Read, 8 * 512, 4096, Pass::Queued);
        let r = map(&t, Dir::Read, 8 * 512, 4096, Pass::NoWait);
        assert_eq!(r, split);
        assert_eq!(r.len(), 3);
    }

    /// While the process is not the writer (the gate is closed), no guest write reaches the
    /// image: refused, and not mapped for an engine either. Reads go on.
    #[test]
    fn writes_are_refused_while_the_gate_is_closed() {
        let (_dir, t) = target(&[], &[]);
        assert!(t.table().gate().close(std::time::Duration::ZERO));
        let buf = [1u8; 512];
        // SAFETY: `buf` is live for the call.
        let e = unsafe { t.writev(0, &one(&buf)) }.unwrap_err();
        assert!(e.to_string().contains("not the writer"), "{e}");
        assert!(t.discard(0, 512).is_err() && t.write_zeroes(0, 512, false).is_err());
        let mut m = Mapping::default();
        assert!(!t.map(MapIo::new(Dir::Write, 0, 512, Pass::Queued), &mut m));
        assert!(t.map(MapIo::new(Dir::Read, 0, 512, Pass::Queued), &mut m));
        t.table().gate().open();
        // SAFETY: as above.
        unsafe { t.writev(0, &one(&buf)) }.unwrap();
    }

    /// A mapping made before a move of one of its blocks is refused at `end_io`; one made after
    /// it, or of other blocks, is not.
    #[test]
    fn end_io_refuses_a_mapping_a_move_overtook() {
        let (_dir, t) = target(&[], &[]);
        let io = MapIo::new(Dir::Read, 8 * 512, 4096, Pass::Queued);
        let far = MapIo::new(Dir::Read, 1 << 19, 4096, Pass::Queued);
        let (mut before, mut elsewhere) = (Mapping::default(), Mapping::default());
        assert!(t.map(io, &mut before) && t.map(far, &mut elsewhere));
        assert!(t.end_io(io, before.per_io()), "nothing moved yet");
        t.remap_add([9u64].into_iter()).unwrap();
        assert!(
            !t.end_io(io, before.per_io()),
            "block 9 moved under the mapping"
        );
        assert!(t.end_io(far, elsewhere.per_io()), "the move was elsewhere");
        let mut after = Mapping::default();
        assert!(t.map(io, &mut after));
        assert!(t.end_io(io, after.per_io()));
        assert!(
            !t.end_io(io, Mapping::default().per_io()),
            "no word kept: not mapped here"
        );
    }
}
