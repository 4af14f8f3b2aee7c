//! The overlay as a block-stack layer: where each block of a request lives (overlay or
//! image), copy-up of a block a write covers only in part, and the maps engines run.

use std::io;

use super::{Kind, Overlay};
use crate::storage::iov::sub_iovecs;
use crate::storage::{block_span, BlockIo, Dir, MapIo, Mapping, PerIo};

impl Overlay {
    /// The blocks `len` bytes at `offset` touch.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        block_span(offset, len, self.bs)
    }

    /// Whether a change of `len` bytes at `offset` covers part of a block the overlay does
    /// not hold yet: that block must be copied up before the change.
    fn needs_copy_up(&self, offset: u64, len: u64) -> bool {
        let (first, last) = self.span(offset, len);
        (!offset.is_multiple_of(self.bs) && !self.map.holds(first))
            || (!(offset + len).is_multiple_of(self.bs) && !self.map.holds(last))
    }

    /// Copies the blocks at the edges of a change of `len` bytes at `offset` that it covers
    /// only in part from the image into the overlay, so the rest of each keeps the image's
    /// bytes. Map mode only.
    fn copy_up_edges(&self, offset: u64, len: u64) -> io::Result<()> {
        let (first, last) = self.span(offset, len);
        if !offset.is_multiple_of(self.bs) {
            self.copy_up(first)?;
        }
        if !(offset + len).is_multiple_of(self.bs) {
            self.copy_up(last)?;
        }
        Ok(())
    }

    fn copy_up(&self, block: u64) -> io::Result<()> {
        if self.map.holds(block) {
            return Ok(());
        }
        let stripe = &self.copy_up[(block % self.copy_up.len() as u64) as usize];
        let _g = stripe.lock().unwrap_or_else(|p| p.into_inner());
        // Another writer of this block may have copied it while we waited.
        if self.map.holds(block) {
            return Ok(());
        }
        let mut buf = vec![0u8; self.bs as usize];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let at = block * self.bs;
        // SAFETY: `buf` outlives both calls and is as long as the iovec says.
        unsafe {
            self.base.readv(at, &iov)?;
            self.upper.writev(at, &iov)?;
        }
        self.map.mark(block, block);
        Ok(())
    }

    /// Runs `change` (a write, discard or write-zeroes of `len` bytes at `offset`) on the
    /// overlay and records its blocks as the overlay's.
    fn change(
        &self,
        offset: u64,
        len: u64,
        change: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        if self.kind == Kind::Map {
            self.copy_up_edges(offset, len)?;
        }
        change()?;
        let (first, last) = self.span(offset, len);
        self.map.mark(first, last);
        Ok(())
    }
}

impl BlockIo for Overlay {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        if self.kind == Kind::Reflink {
            // SAFETY: the caller vouches for `iov`.
            return unsafe { self.upper.readv(offset, iov) };
        }
        let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        let (first, last) = self.span(offset, len);
        let end = offset + len;
        let mut part = Vec::new();
        for run in self.map.runs(first, last) {
            let start = (run.first * self.bs).max(offset);
            let stop = (run.end * self.bs).min(end);
            sub_iovecs(iov, start - offset, stop - start, &mut part);
            let from = if run.held { &self.upper } else { &self.base };
            // SAFETY: `part` is a piece of `iov`, which the caller vouches for.
            unsafe { from.readv(start, &part)? };
        }
        Ok(())
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        self.change(offset, len, || {
            // SAFETY: the caller vouches for `iov`.
            unsafe { self.upper.writev(offset, iov) }
        })
    }

    /// Nothing to make durable: the image is not written, and the overlay does not outlive
    /// the process (see the module's doc).
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.change(offset, len, || self.upper.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.change(offset, len, || self.upper.write_zeroes(offset, len, unmap))
    }

    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        let (first, last) = self.span(io.offset, io.len);
        match (self.kind, io.dir) {
            (Kind::Reflink, Dir::Write) => {
                // Counted now, for status only: every block lives in the clone anyway.
                self.map.mark(first, last);
                self.upper.map(io, out)
            }
            (Kind::Reflink, Dir::Read) => self.upper.map(io, out),
            // A copy-up must come first: the blocking path does it.
            (Kind::Map, Dir::Write) if self.needs_copy_up(io.offset, io.len) => false,
            // The blocks are the overlay's once the data is there: `end_io` marks them.
            (Kind::Map, Dir::Write) => self.upper.map(io, out),
            (Kind::Map, Dir::Read) => {
                let end = io.offset + io.len;
                self.map.runs(first, last).all(|run| {
                    let start = (run.first * self.bs).max(io.offset);
                    let stop = (run.end * self.bs).min(end);
                    let from = if run.held { &self.upper } else { &self.base };
                    from.map(io.part(start, stop - start), out)
                })
            }
        }
    }

    fn end_io(&self, io: MapIo, _per_io: &PerIo) -> bool {
        if self.kind == Kind::Map && io.dir == Dir::Write {
            let (first, last) = self.span(io.offset, io.len);
            self.map.mark(first, last);
        }
        true
    }
}
