//! The fault layer as a block target: it decides each request's fate, then hands it to the
//! image underneath.

use std::io;
use std::sync::Arc;

use super::spec::FaultOp;
use super::table::{FaultTable, Verdict};
use crate::storage::{block_span, BlockIo, Dir, MapIo, Mapping, MediaError, PerIo};

pub struct FaultyTarget {
    inner: Arc<dyn BlockIo>,
    table: Arc<FaultTable>,
    block_size: u64,
}

impl FaultyTarget {
    pub fn new(inner: Arc<dyn BlockIo>, table: Arc<FaultTable>, block_size: u32) -> FaultyTarget {
        FaultyTarget {
            inner,
            table,
            block_size: u64::from(block_size),
        }
    }

    fn gate(&self, op: FaultOp, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, last) = block_span(offset, len, self.block_size);
        match self.table.check(op, first, last) {
            Verdict::Pass => Ok(()),
            Verdict::Delay(d) => {
                std::thread::sleep(d);
                Ok(())
            }
            Verdict::Fail(id, bad) => Err(io::Error::other(MediaError {
                cause: format!("injected media error (fault {id})"),
                bad,
            })),
        }
    }
}

impl BlockIo for FaultyTarget {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        self.gate(FaultOp::Read, offset, len as u64)?;
        // SAFETY: the caller vouches for `iov`.
        unsafe { self.inner.readv(offset, iov) }
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        self.gate(FaultOp::Write, offset, len as u64)?;
        // SAFETY: the caller vouches for `iov`.
        unsafe { self.inner.writev(offset, iov) }
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.gate(FaultOp::Write, offset, len)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.gate(FaultOp::Write, offset, len)?;
        self.inner.write_zeroes(offset, len, unmap)
    }

    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        let op = match io.dir {
            Dir::Read => FaultOp::Read,
            Dir::Write => FaultOp::Write,
        };
        let (first, last) = block_span(io.offset, io.len, self.block_size);
        // A fault that could fire must see the request: only readv/writev consult it.
        !self.table.may_apply(op, first, last) && self.inner.map(io, out)
    }

    fn end_io(&self, io: MapIo, per_io: &PerIo) -> bool {
        self.inner.end_io(io, per_io)
    }
}
