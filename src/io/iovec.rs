//! A request's guest buffers as iovecs, for the system calls that move them.

use vm_memory::GuestMemoryBackend;

use super::ExecError;
use crate::virtio::request::Request;
use crate::virtio::GuestMem;

/// Appends the host iovecs of `req`'s data buffers in `mem` to `out` (cleared first). A buffer
/// may straddle two memory regions, which are two separate mappings here: it takes two.
pub fn guest_iovecs(
    req: &Request,
    mem: &GuestMem,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ExecError> {
    out.clear();
    for seg in &req.data {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.map_err(|_| ExecError::Memory {
                addr: seg.addr.0,
                len: seg.len,
            })?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

pub use crate::storage::iov::sub_iovecs;

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(parts: &[(usize, usize)]) -> Vec<libc::iovec> {
        parts
            .iter()
            .map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            })
            .collect()
    }

    fn flat(v: &[libc::iovec]) -> Vec<(usize, usize)> {
        v.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect()
    }

    fn sub(iov: &[libc::iovec], at: u64, len: u64) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        sub_iovecs(iov, at, len, &mut out);
        out
    }

    #[test]
    fn sub_iovecs_cuts_across_buffers() {
        let v = iov(&[(0x1000, 512), (0x8000, 1024), (0x20000, 512)]);
        assert_eq!(flat(&sub(&v, 0, 2048)), flat(&v));
        assert_eq!(flat(&sub(&v, 0, 512)), vec![(0x1000, 512)]);
        assert_eq!(flat(&sub(&v, 256, 512)), vec![(0x1100, 256), (0x8000, 256)]);
        assert_eq!(flat(&sub(&v, 1536, 512)), vec![(0x20000, 512)]);
        assert_eq!(flat(&sub(&v, 600, 100)), vec![(0x8058, 100)]);
    }
}
