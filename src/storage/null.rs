//! `--engine null`: a disk that stores nothing. Reads return zeros, writes are dropped. It
//! measures what the ring handling costs on its own.

use std::io;

use super::{BlockIo, Extent, MapIo, Mapping, Source};

pub struct NullTarget;

impl BlockIo for NullTarget {
    unsafe fn readv(&self, _offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        for v in iov {
            // SAFETY: the caller guarantees each iovec is valid for writes of its length.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
        Ok(())
    }

    unsafe fn writev(&self, _offset: u64, _iov: &[libc::iovec]) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Ok(())
    }

    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        out.push(Extent {
            at: io.at,
            len: io.len,
            source: Source::Zeros,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeros_and_drops_writes() {
        let mut buf = vec![0xa5u8; 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` outlives both calls.
        unsafe {
            NullTarget.writev(0, &iov).unwrap();
            NullTarget.readv(0, &iov).unwrap();
        }
        assert!(buf.iter().all(|&b| b == 0));
    }
}
