//! The image underneath everything: opening it, and the I/O engines behind one trait.

pub mod image;
pub mod iov;
pub mod null;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub use image::{Image, ImageError, ImageKind, OpenOptions};
pub use null::NullTarget;

/// Opens `path` with `opts` and the open(2) `flags`, plus O_NOATIME where the kernel allows it
/// (we own the file, or have CAP_FOWNER): otherwise every read asks whether the file's access
/// time is due an update, a few percent of a page-cache read, for a time no one reads.
pub fn open_noatime(opts: &mut FsOpenOptions, flags: i32, path: &Path) -> io::Result<File> {
    opts.custom_flags(flags | libc::O_NOATIME);
    match opts.open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            opts.custom_flags(flags);
            opts.open(path)
        }
        r => r,
    }
}

/// A read or write that failed on blocks the layer that failed it can name (an injected media
/// error): the layers above need not probe the request's blocks one by one to find them.
#[derive(Debug, thiserror::Error)]
#[error("{cause} on blocks {}..={}", bad.start(), bad.end())]
pub struct MediaError {
    pub cause: String,
    /// The bad blocks, in logical blocks of the device.
    pub bad: std::ops::RangeInclusive<u64>,
}

impl MediaError {
    /// The bad blocks an I/O error names, if a layer below said which.
    pub fn of(e: &io::Error) -> Option<&MediaError> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<MediaError>())
    }
}

/// Which way data moves, for [`BlockIo::route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

/// The `fd` of a [`Piece`] that moves no data (the null engine): reads of it return zeros,
/// writes to it are dropped, and it never waits for anything.
pub const NO_FILE: RawFd = -1;

/// The `fd` of a [`Piece`] whose bytes the target holds in memory: a read of it is done by
/// [`BlockIo::copy_in_memory`], never by the ring. Its `file_offset` means what the target wants.
pub const IN_MEMORY: RawFd = -2;

/// A run of a request that can go straight to a file: `len` bytes at byte `at` of the
/// request's data live at `file_offset` in `fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub fd: RawFd,
    pub file_offset: u64,
    pub at: u64,
    pub len: u64,
    /// O_DIRECT files need buffers, offsets and lengths aligned to this; 1 for none.
    pub align: u64,
}

/// Where a request's data lives, as found by [`BlockIo::route`]. Reused between requests so
/// routing allocates nothing.
#[derive(Debug, Default)]
pub struct Route {
    pub pieces: Vec<Piece>,
    /// Handed back to [`BlockIo::route_valid`] once the pieces are done.
    pub ticket: u64,
    /// Set by the caller: a read's pieces may overlap, a later piece overwriting part of an
    /// earlier one, because the caller runs them one after another, from the page cache only.
    pub may_overlay: bool,
    /// Set by `route` when it made use of `may_overlay`: the pieces are only right in order.
    pub overlaid: bool,
}

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

    /// For an engine that does the I/O itself (io_uring): the file runs a plain read or write
    /// of `len` bytes at `offset` would touch, appended to `route.pieces` with request
    /// positions starting at `at`. False when this layer must see the request itself (an
    /// injected fault, a block being repaired...): then [`readv`](Self::readv) /
    /// [`writev`](Self::writev) must be used.
    fn route(&self, _dir: Dir, _offset: u64, _len: u64, _at: u64, _route: &mut Route) -> bool {
        false
    }

    /// Whether pieces found by [`route`](Self::route) for `len` bytes at `offset` with
    /// `ticket` are still where the data lives now that the I/O is done (a remap may have moved
    /// it meanwhile). When false the request must be done again through `readv` / `writev`.
    fn route_valid(&self, _ticket: u64, _offset: u64, _len: u64) -> bool {
        true
    }

    /// Copies the bytes of an [`IN_MEMORY`] read piece found by [`route`](Self::route) into
    /// `iov` (the piece's part of the request). False when they are no longer in memory: the
    /// caller then hands the request to [`readv`](Self::readv). Like every routed piece it is
    /// checked by [`route_valid`](Self::route_valid) once the request is done.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes of its length.
    unsafe fn copy_in_memory(&self, _piece: &Piece, _iov: &[libc::iovec]) -> bool {
        false
    }
}
