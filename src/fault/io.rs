//! The fault layer as a block target: it decides each request's fate, then hands it to the
//! image underneath.

use std::io;
use std::sync::Arc;

use super::spec::FaultOp;
use super::table::{FaultTable, Verdict};
use crate::storage::{BlockIo, Dir, MediaError, Piece, Route};

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
        let first = offset / self.block_size;
        let last = (offset + len - 1) / self.block_size;
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
        self.inner.readv(offset, iov)
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        self.gate(FaultOp::Write, offset, len as u64)?;
        self.inner.writev(offset, iov)
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

    fn route(&self, dir: Dir, offset: u64, len: u64, at: u64, route: &mut Route) -> bool {
        let op = match dir {
            Dir::Read => FaultOp::Read,
            Dir::Write => FaultOp::Write,
        };
        let first = offset / self.block_size;
        let last = (offset + len.max(1) - 1) / self.block_size;
        // A fault that could fire must see the request: only readv/writev consult it.
        !self.table.may_apply(op, first, last) && self.inner.route(dir, offset, len, at, route)
    }

    fn route_valid(&self, ticket: u64, offset: u64, len: u64) -> bool {
        self.inner.route_valid(ticket, offset, len)
    }

    unsafe fn copy_in_memory(&self, piece: &Piece, iov: &[libc::iovec]) -> bool {
        self.inner.copy_in_memory(piece, iov)
    }
}
