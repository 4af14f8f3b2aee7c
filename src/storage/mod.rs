//! The image underneath everything: opening it, and the I/O engines behind one trait.

pub mod image;

use std::io;

pub use image::{Image, ImageError, ImageKind, OpenOptions};

/// A place guest data lives. Offsets and lengths are in bytes; callers have validated them
/// against the capacity. Implementations complete the whole transfer or fail: a short read or
/// write is retried, never returned.
pub trait BlockIo: Send + Sync {
    /// Reads `iov`'s total length from `offset` into the buffers.
    ///
    /// # Safety
    /// Every iovec must point to memory that is valid for writes of its length for the
    /// duration of the call (guest memory held mapped by the caller).
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()>;

    /// Writes `iov`'s total length at `offset`.
    ///
    /// # Safety
    /// Every iovec must point to memory that is valid for reads of its length for the
    /// duration of the call.
    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;

    /// Deallocates a range; later reads return zeros.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Zeroes a range, deallocating it when `unmap` allows.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}
