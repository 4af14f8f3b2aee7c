//! A copy in memory of the spare blocks in use, so that reading a remapped block is a memory
//! copy rather than a system call: with 10,000 remaps about one 4 KiB read in 25 touches one,
//! and its extra `preadv2` (a call and a page-cache lookup) was most of what remaps cost a
//! read. The spare file stays the only durable copy; this one is refilled from it at start-up
//! and follows every write to it (`Spare::write_block`).
//!
//! The memory is an anonymous mapping the size of the spare's data area, reserved but not
//! committed: only blocks ever stored take memory. Spares whose data area is bigger than
//! `MAX_BYTES` get no mirror and are read from the file as before.
//!
//! Each block is read and written under the read or write side of its stripe's lock, so a
//! reader never sees a block half written; a block is only read from here while its valid bit
//! is set, which a failed write to the file clears. These are not the table's stripe locks on
//! spare blocks: those keep an unmap away from running spare I/O, and a spare write holds one
//! shared while it updates the mirror here, which needs its own lock exclusive.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::storage::iov::IovWriter;
use crate::storage::MemoryExtent;

/// Largest data area mirrored: 256 MiB (the default spare of a 25 GiB image of 512-byte blocks).
pub const MAX_BYTES: u64 = 256 << 20;
const STRIPES: u64 = 64;

pub struct Mirror {
    base: NonNull<u8>,
    len: usize,
    bs: usize,
    blocks: u64,
    /// One bit per block: set while the memory holds the block as the file has it.
    valid: Vec<AtomicU64>,
    stripes: Vec<RwLock<()>>,
}

// SAFETY: the mapping is owned by the mirror and every access to its bytes is made under the
// lock of the block's stripe (shared for reads, exclusive for writes).
unsafe impl Send for Mirror {}
// SAFETY: as for Send.
unsafe impl Sync for Mirror {}

impl Mirror {
    /// A mirror of `blocks` blocks of `bs` bytes, all invalid; None when that is more than
    /// `MAX_BYTES` or the memory cannot be reserved (reads then go to the file).
    pub fn new(blocks: u64, bs: u32) -> Option<Mirror> {
        let bytes = blocks.checked_mul(u64::from(bs))?;
        if bytes == 0 || bytes > MAX_BYTES {
            return None;
        }
        let len = bytes as usize;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Mirror {
            base: NonNull::new(p.cast())?,
            len,
            bs: bs as usize,
            blocks,
            valid: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        })
    }

    fn stripe(&self, block: u64) -> &RwLock<()> {
        &self.stripes[(block % STRIPES) as usize]
    }

    /// Whether `block` is held (it may stop being held before it is read).
    pub fn holds(&self, block: u64) -> bool {
        block < self.blocks
            && self.valid[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    fn set_valid(&self, block: u64, on: bool) {
        let (word, bit) = (&self.valid[(block / 64) as usize], 1 << (block % 64));
        if on {
            word.fetch_or(bit, Ordering::Release);
        } else {
            word.fetch_and(!bit, Ordering::Release);
        }
    }

    fn block_ptr(&self, block: u64) -> *mut u8 {
        debug_assert!((block as usize + 1) * self.bs <= self.len);
        // SAFETY: in bounds for any block < self.blocks, which every caller checks.
        unsafe { self.base.as_ptr().add(block as usize * self.bs) }
    }

    /// Holds `data` as block `block`'s contents (what the file now has). Data that is not one
    /// whole block drops the block instead.
    pub fn store(&self, block: u64, data: &[u8]) {
        if block >= self.blocks {
            return;
        }
        let _w = self
            .stripe(block)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if data.len() != self.bs {
            self.set_valid(block, false);
            return;
        }
        // SAFETY: the block's bytes are in the mapping and nobody reads them while we hold the
        // stripe's write lock.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.block_ptr(block), self.bs) };
        self.set_valid(block, true);
    }

    /// Stops holding `block` (its write to the file failed: what the file has is unknown).
    pub fn forget(&self, block: u64) {
        if block < self.blocks {
            let _w = self
                .stripe(block)
                .write()
                .unwrap_or_else(|p| p.into_inner());
            self.set_valid(block, false);
        }
    }

    /// Stops holding every block (the file may have changed under the mirror: another process
    /// wrote it).
    pub fn clear(&self) {
        for word in &self.valid {
            word.store(0, Ordering::Release);
        }
    }

    /// Copies the bytes at `offset` of the data area (block `offset / bs`, onwards) into
    /// `iov`, as many as the iovecs hold. False, with part of the data perhaps copied, when a
    /// block it covers is not held: the caller reads the file instead.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes of its length.
    pub unsafe fn read(&self, offset: u64, iov: &[libc::iovec]) -> bool {
        let mut out = IovWriter::new(iov);
        let mut pos = offset;
        while out.left() > 0 {
            let block = pos / self.bs as u64;
            let skip = (pos % self.bs as u64) as usize;
            let n = (self.bs - skip).min(out.left());
            let _r = self.stripe(block).read().unwrap_or_else(|p| p.into_inner());
            if !self.holds(block) {
                return false;
            }
            // SAFETY: block < self.blocks (held), skip + n <= bs; the stripe's read lock
            // keeps writers out of these bytes; the caller vouches for the iovecs.
            unsafe { out.fill(self.block_ptr(block).add(skip), n) };
            pos += n as u64;
        }
        true
    }
}

impl MemoryExtent for Mirror {
    unsafe fn copy_to(&self, offset: u64, iov: &[libc::iovec]) -> bool {
        // SAFETY: the caller's promise.
        unsafe { self.read(offset, iov) }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used by anyone (we are being dropped).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn iov_of(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
        bufs.iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }

    #[test]
    fn reads_across_blocks_and_buffers() {
        let m = Mirror::new(8, 512).unwrap();
        for b in 2..5u64 {
            m.store(b, &[b as u8; 512]);
        }
        // 1,000 bytes from the middle of block 2 into three buffers of odd sizes.
        let mut bufs = vec![vec![0u8; 100], vec![0u8; 700], vec![0u8; 200]];
        let iov = iov_of(&mut bufs);
        // SAFETY: the buffers behind the iovecs outlive the call.
        assert!(unsafe { m.read(2 * 512 + 300, &iov) });
        let flat: Vec<u8> = bufs.concat();
        let want: Vec<u8> = (2 * 512 + 300..2 * 512 + 1300)
            .map(|i| (i / 512) as u8)
            .collect();
        assert_eq!(flat, want);
    }

    #[test]
    fn a_block_not_held_is_refused() {
        let m = Mirror::new(8, 512).unwrap();
        let mut bufs = vec![vec![0u8; 1024]];
        let iov = iov_of(&mut bufs);
        m.store(1, &[1; 512]);
        // SAFETY: the buffers behind the iovecs outlive the call.
        assert!(!unsafe { m.read(512, &iov) }, "block 2 was never stored");
        m.store(2, &[2; 512]);
        // SAFETY: the buffers behind the iovecs outlive the call.
        assert!(unsafe { m.read(512, &iov) });
        m.forget(2);
        // SAFETY: the buffers behind the iovecs outlive the call.
        assert!(!m.holds(2) && !unsafe { m.read(512, &iov) });
        m.store(3, &[3; 100]);
        assert!(!m.holds(3), "a partial block is not held");
        m.store(8, &[8; 512]);
        assert!(!m.holds(8), "past the end");
        m.clear();
        assert!(!m.holds(1), "cleared");
        assert!(Mirror::new(MAX_BYTES / 512 + 1, 512).is_none());
    }

    /// A reader racing a writer of the same block sees one version or the other, never a mix.
    #[test]
    fn a_block_is_never_seen_half_written() {
        let m = Arc::new(Mirror::new(4, 4096).unwrap());
        m.store(1, &[0; 4096]);
        let w = {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                for i in 0..20_000u32 {
                    m.store(1, &[(i % 251) as u8; 4096]);
                }
            })
        };
        let mut buf = vec![0u8; 4096];
        let iov = iov_of(std::slice::from_mut(&mut buf));
        while !w.is_finished() {
            // SAFETY: the buffers behind the iovecs outlive the call.
            assert!(unsafe { m.read(4096, &iov) });
            assert!(buf.iter().all(|&x| x == buf[0]), "torn read");
        }
        w.join().unwrap();
    }
}
