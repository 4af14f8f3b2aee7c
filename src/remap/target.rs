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

use super::metadata::{Cause, Entry};
use super::table::RemapTable;
use crate::storage::iov::{gather, scatter};
use crate::storage::{BlockIo, Dir, MediaError, Piece, Route, IN_MEMORY};

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

    fn blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.bs, (offset + len.max(1) - 1) / self.bs)
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
        if !self.auto_remap {
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
            return self.main.readv(offset, iov).inspect_err(|e| {
                let bad = self.bad_blocks(e, first, last, |b| self.main_read_block(b).is_ok());
                self.table.add_pending(bad);
            });
        }
        let mut buf = vec![0u8; len];
        self.read_split(first, &mut buf)?;
        scatter(iov, &buf);
        Ok(())
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let (first, last) = self.blocks(offset, len as u64);
        self.moves
            .write(first, last, || self.write_once(offset, iov))
    }

    fn flush(&self) -> io::Result<()> {
        self.main.flush()?;
        self.table.spare().sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let (first, last) = self.blocks(offset, len);
        self.moves.write(first, last, || {
            if !self.table.snapshot().touches(first, last) {
                return self.main.discard(offset, len);
            }
            self.zero_split(first, last, true)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let (first, last) = self.blocks(offset, len);
        self.moves.write(first, last, || {
            if !self.table.snapshot().touches(first, last) {
                return self.main.write_zeroes(offset, len, unmap);
            }
            self.zero_split(first, last, unmap)
        })
    }

    /// Reads are split into runs of the main image and of the spare file. Writes go straight
    /// only where no block is remapped or pending: a write to a remapped block would land in a
    /// spare block that a concurrent remap-remove may hand to another block before the write
    /// runs. Either way the ticket is the move counters of the request's blocks, checked again
    /// at the end ([`MoveGuard::write`]'s rule, for I/O that someone else carries out): a read
    /// of a spare block that changed hands meanwhile is done again.
    fn route(&self, dir: Dir, offset: u64, len: u64, at: u64, route: &mut Route) -> bool {
        let start = route.pieces.len();
        if !self.route_split(dir, offset, len, at, route) {
            return false;
        }
        if !route.may_overlay || dir != Dir::Read {
            return true;
        }
        // A remapped block inside a read cuts the image's part in two, so the split costs three
        // calls. Read the whole range from the image and the spare's runs over it instead: two.
        // The caller runs overlaid pieces in order and from the page cache only, so the image's
        // copy of a remapped block is only read when it is cached, never from a failing disk.
        let spare_fd = self.table.spare().fd();
        let is_spare = |p: &Piece| p.fd == spare_fd || p.fd == IN_MEMORY;
        let pieces = &mut route.pieces;
        if pieces[start..].iter().filter(|p| !is_spare(p)).count() < 2 {
            return true;
        }
        let mut kept = start;
        for i in start..pieces.len() {
            if is_spare(&pieces[i]) {
                pieces[kept] = pieces[i];
                kept += 1;
            }
        }
        pieces.truncate(kept);
        if self.main.route(dir, offset, len, at, route) {
            let whole = route.pieces.len() - kept;
            route.pieces[start..].rotate_right(whole);
            route.overlaid = true;
            return true;
        }
        // The image will not take the whole range (a fault on a remapped block): split after all.
        route.pieces.truncate(start);
        self.route_split(dir, offset, len, at, route)
    }

    fn route_valid(&self, ticket: u64, offset: u64, len: u64) -> bool {
        // Pairs with the mover's increment before it copies, as in MoveGuard::write.
        std::sync::atomic::fence(Ordering::SeqCst);
        let (first, last) = self.blocks(offset, len);
        self.moves.state(first, last).0 == ticket
    }

    /// The spare's blocks in memory: a copy, where the file would take a system call. A
    /// spare block that changes hands meanwhile is caught by the ticket like a file read.
    unsafe fn copy_in_memory(&self, piece: &Piece, iov: &[libc::iovec]) -> bool {
        self.table.spare().copy_in_memory(piece, iov)
    }
}

impl RemapTarget {
    /// [`BlockIo::route`] with every piece in its own place: runs of the image and of the spare.
    fn route_split(&self, dir: Dir, offset: u64, len: u64, at: u64, route: &mut Route) -> bool {
        let (first, last) = self.blocks(offset, len);
        let (gen, moving) = self.moves.state(first, last);
        if moving {
            return false;
        }
        route.ticket = gen;
        let snap = self.table.view();
        if dir == Dir::Write {
            return !snap.touches(first, last) && self.main.route(dir, offset, len, at, route);
        }
        let end = offset + len;
        let mut pos = offset;
        for (&b, e) in snap.remapped(first, last) {
            let start = (b * self.bs).max(offset);
            if pos < start
                && !self
                    .main
                    .route(dir, pos, start - pos, at + pos - offset, route)
            {
                return false;
            }
            let stop = ((b + 1) * self.bs).min(end);
            let piece = self.table.spare().piece(
                e.spare_block,
                start - b * self.bs,
                stop - start,
                at + start - offset,
            );
            match route.pieces.last_mut() {
                // Neighbouring blocks often sit in neighbouring spare blocks: one run.
                Some(prev)
                    if prev.fd == piece.fd
                        && prev.file_offset + prev.len == piece.file_offset
                        && prev.at + prev.len == piece.at =>
                {
                    prev.len += piece.len
                }
                _ => route.pieces.push(piece),
            }
            pos = stop;
        }
        pos == end
            || self
                .main
                .route(dir, pos, end - pos, at + pos - offset, route)
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
        if !snap.touches(first, last) {
            return match self.main.writev(offset, iov) {
                Ok(()) => Ok(()),
                Err(e) if !self.auto_remap => Err(e),
                Err(e) => {
                    let mut buf = vec![0u8; len];
                    gather(iov, &mut buf);
                    self.recover_write(first, &buf, e)
                }
            };
        }
        let mut buf = vec![0u8; len];
        gather(iov, &mut buf);
        self.write_split(first, &buf)
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
    use std::collections::BTreeSet;

    const MAIN_FD: i32 = 1000;

    /// An image that routes every range to `MAIN_FD` except ranges holding a `refused` block
    /// (as the fault layer refuses a range with a fault in it).
    struct FakeImage {
        refused: BTreeSet<u64>,
    }

    impl BlockIo for FakeImage {
        unsafe fn readv(&self, _: u64, _: &[libc::iovec]) -> io::Result<()> {
            unreachable!("routing only")
        }
        unsafe fn writev(&self, _: u64, _: &[libc::iovec]) -> io::Result<()> {
            unreachable!("routing only")
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
        fn route(&self, _: Dir, offset: u64, len: u64, at: u64, route: &mut Route) -> bool {
            if self
                .refused
                .range(offset / 512..(offset + len).div_ceil(512))
                .next()
                .is_some()
            {
                return false;
            }
            route.pieces.push(Piece {
                fd: MAIN_FD,
                file_offset: offset,
                at,
                len,
                align: 1,
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
            refused: refused.iter().copied().collect(),
        });
        (dir, RemapTarget::new(main, table, 512, true))
    }

    fn route(t: &RemapTarget, dir: Dir, offset: u64, len: u64, may_overlay: bool) -> Route {
        let mut r = Route {
            may_overlay,
            ..Route::default()
        };
        assert!(t.route(dir, offset, len, 0, &mut r));
        r
    }

    #[test]
    fn a_read_around_remapped_blocks_is_one_image_read_with_the_spare_over_it() {
        let (_dir, t) = target(&[10, 12], &[]);
        let split = route(&t, Dir::Read, 8 * 512, 4096, false);
        assert!(!split.overlaid);
        let fds: Vec<i32> = split.pieces.iter().map(|p| p.fd).collect();
        assert_eq!(fds, [MAIN_FD, IN_MEMORY, MAIN_FD, IN_MEMORY, MAIN_FD]);

        let over = route(&t, Dir::Read, 8 * 512, 4096, true);
        assert!(over.overlaid);
        assert_eq!(over.ticket, split.ticket);
        assert_eq!(
            over.pieces[0],
            Piece {
                fd: MAIN_FD,
                file_offset: 8 * 512,
                at: 0,
                len: 4096,
                align: 1,
            }
        );
        // The spare's runs follow, the same as in the split, so they land over the image's copy.
        let spare_runs: Vec<Piece> = split
            .pieces
            .iter()
            .filter(|p| p.fd == IN_MEMORY)
            .copied()
            .collect();
        assert_eq!(over.pieces[1..], spare_runs[..]);
    }

    #[test]
    fn overlay_only_where_it_saves_a_call() {
        // A remapped block at the edge leaves one image run: the split is as short.
        let (_dir, t) = target(&[8], &[]);
        let r = route(&t, Dir::Read, 8 * 512, 4096, true);
        assert!(!r.overlaid);
        assert_eq!(r.pieces.len(), 2);
        // Writes never overlay (they do not route around remapped blocks at all).
        let (_dir, t) = target(&[], &[]);
        let r = route(&t, Dir::Write, 0, 4096, true);
        assert!(!r.overlaid);
        assert_eq!(r.pieces.len(), 1);
    }

    #[test]
    fn an_image_that_refuses_the_whole_range_gets_the_split() {
        // Block 10 is remapped and the image refuses it (a fault on it): only the runs around
        // it may go to the image.
        let (_dir, t) = target(&[10], &[10]);
        let split = route(&t, Dir::Read, 8 * 512, 4096, false);
        let r = route(&t, Dir::Read, 8 * 512, 4096, true);
        assert!(!r.overlaid);
        assert_eq!(r.pieces, split.pieces);
        assert_eq!(r.pieces.len(), 3);
    }
}
