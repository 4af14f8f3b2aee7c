//! The block stack's common language: the trait every layer implements, and how a layer says
//! where a request's bytes live so that an engine can move them itself. The bottom layers live
//! here too: the image file or block device, and the null target.
//!
//! The trait follows device-mapper's target interface: the synchronous operations carry a
//! request out through the layer; [`BlockIo::map`] says where a plain read or write lives, as
//! [`Extent`]s, and [`BlockIo::end_io`] tells, once an engine has moved those bytes, whether
//! they were still in the right place, with what the layer kept in the mapping's [`PerIo`]
//! (device-mapper's per-bio data). Each layer owns its own ordering rules behind these two
//! calls; the engines know nothing of what the layers are.

mod extent;
pub mod hold;
pub mod image;
pub mod iov;
pub mod lock;
pub mod medium;
pub mod null;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub use extent::{Extent, Mapping, MemoryExtent, PerIo, Source};
pub use hold::{Hold, IoKind};
pub use image::{Checked, Image, ImageError, ImageKind, OpenOptions};
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

/// A failure a layer below reports on purpose that is not a media error (a torn write told as
/// failed): the layers above pass it on to the guest and remap nothing for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotMediaError(pub String);

impl NotMediaError {
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<NotMediaError>())
    }
}

/// The first and last of the `block_size`-byte blocks that `len` bytes at byte `offset` touch
/// (the first block alone for an empty range).
pub fn block_span(offset: u64, len: u64, block_size: u64) -> (u64, u64) {
    (offset / block_size, (offset + len.max(1) - 1) / block_size)
}

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

/// How an engine will run the extents of a mapping; a layer may map a request differently for
/// each (it is the engine's promise, not a request of the layer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// One extent after the other, at once, and only from memory or the page cache: an extent
    /// that would have to wait for the device ends the attempt, and the engine maps the request
    /// again for a [`Pass::Queued`] run. Extents may overlap; a later one's bytes replace an
    /// earlier one's.
    NoWait,
    /// Possibly all at the same time, waiting on the device as long as it takes: extents must
    /// not overlap.
    Queued,
}

/// A plain read or write of `len` bytes at byte `offset` of the device, as an engine asks the
/// stack where it lives. `at` is the byte of the request the range starts at: a layer that maps
/// part of a request through the layer below passes that part's position ([`MapIo::part`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapIo {
    pub dir: Dir,
    pub offset: u64,
    pub len: u64,
    pub at: u64,
    pub pass: Pass,
}

impl MapIo {
    /// The whole of a request: `len` bytes at `offset`.
    pub fn new(dir: Dir, offset: u64, len: u64, pass: Pass) -> MapIo {
        MapIo {
            dir,
            offset,
            len,
            at: 0,
            pass,
        }
    }

    /// The `len` bytes at device byte `offset`, a part of this range.
    pub fn part(&self, offset: u64, len: u64) -> MapIo {
        MapIo {
            offset,
            len,
            at: self.at + (offset - self.offset),
            ..*self
        }
    }

    /// The same range for another pass.
    pub fn with_pass(self, pass: Pass) -> MapIo {
        MapIo { pass, ..self }
    }
}

/// A place guest data lives: a layer of the block stack. Offsets and lengths are in bytes;
/// callers have validated them against the capacity. Implementations complete the whole
/// transfer or fail: a short read or write is retried, never returned.
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

    /// device-mapper's `map`: appends to `out` where the bytes of `io` live, so an engine can
    /// move them itself. False when this layer must see the request itself (an injected fault,
    /// a block being moved...): the engine then uses [`readv`](Self::readv) /
    /// [`writev`](Self::writev). A layer that must check its mapping once the bytes are moved
    /// keeps what it needs in `out`'s [`PerIo`].
    fn map<'a>(&'a self, _io: MapIo, _out: &mut Mapping<'a>) -> bool {
        false
    }

    /// device-mapper's `end_io`: once an engine has moved every extent of a mapping `map` made
    /// for `io`, whether they were where the data lives (a layer whose mapping changes while
    /// I/O runs looks at what it kept in `per_io`). False: the request must be done again
    /// through `readv` / `writev`. A layer that maps through the layer below asks it too.
    fn end_io(&self, _io: MapIo, _per_io: &PerIo) -> bool {
        true
    }

    /// Whether a request of `kind` on `len` bytes at `offset` must wait before it starts (a
    /// delay or hang fault): asked once per request, before the engine gets it. The wait is
    /// the caller's to serve, off the queue's worker, so nothing else waits with it. A layer
    /// that passes requests down asks the layer below; the answer for nearly every request is
    /// None, found with one atomic load at the fault layer.
    fn hold(&self, _kind: IoKind, _offset: u64, _len: u64) -> Option<Hold> {
        None
    }
}
