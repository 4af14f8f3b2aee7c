//! Carries out a parsed request against the block target, moving data directly between guest
//! memory and the target (no bounce copy).

use std::io;

use vm_memory::{Bytes, GuestMemoryBackend};

use crate::storage::BlockIo;
use crate::virtio::request::{Request, RequestType};
use crate::virtio::GuestMem;
use crate::virtio::ID_BYTES;

/// The per-connection context a request needs besides the target.
pub struct ExecCtx<'a> {
    /// CONFIG_WCE writeback mode; when false every write is made durable before completing.
    pub writeback: bool,
    pub serial: &'a [u8; ID_BYTES],
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("guest buffer at {addr:#x}+{len} is no longer mapped")]
    Memory { addr: u64, len: u32 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Runs `req`; returns how many bytes were written into guest buffers (for the used length).
pub fn execute(
    req: &Request,
    mem: &GuestMem,
    target: &dyn BlockIo,
    ctx: &ExecCtx<'_>,
) -> Result<u32, ExecError> {
    match req.kind {
        RequestType::In => {
            let iov = iovecs(req, mem)?;
            // SAFETY: the iovecs point into guest memory that `mem` keeps mapped until we
            // return; the parser checked every range lies inside it.
            unsafe { target.readv(req.offset(), &iov)? };
            Ok(req.data_len as u32)
        }
        RequestType::Out => {
            let iov = iovecs(req, mem)?;
            // SAFETY: as above.
            unsafe { target.writev(req.offset(), &iov)? };
            if !ctx.writeback {
                target.flush()?;
            }
            Ok(0)
        }
        RequestType::Flush => {
            target.flush()?;
            Ok(0)
        }
        RequestType::GetId => {
            let mut left = ID_BYTES;
            let mut written = 0u32;
            for seg in &req.data {
                if left == 0 {
                    break;
                }
                let n = left.min(seg.len as usize);
                let from = ID_BYTES - left;
                mem.write_slice(&ctx.serial[from..from + n], seg.addr)
                    .map_err(|_| ExecError::Memory {
                        addr: seg.addr.0,
                        len: seg.len,
                    })?;
                left -= n;
                written += n as u32;
            }
            Ok(written)
        }
        RequestType::Discard => {
            for r in &req.ranges {
                target.discard(r.offset(), r.len())?;
            }
            if !ctx.writeback {
                target.flush()?;
            }
            Ok(0)
        }
        RequestType::WriteZeroes => {
            for r in &req.ranges {
                target.write_zeroes(r.offset(), r.len(), r.unmap)?;
            }
            if !ctx.writeback {
                target.flush()?;
            }
            Ok(0)
        }
    }
}

fn iovecs(req: &Request, mem: &GuestMem) -> Result<Vec<libc::iovec>, ExecError> {
    let mut iov = Vec::with_capacity(req.data.len());
    for seg in &req.data {
        let bad = || ExecError::Memory {
            addr: seg.addr.0,
            len: seg.len,
        };
        // A buffer may straddle two memory regions, which are two separate mappings here.
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.map_err(|_| bad())?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(iov)
}
