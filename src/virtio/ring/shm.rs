//! A range of a file that the frontend and this process both map (MAP_SHARED): the inflight
//! region (`inflight`) and the dirty log (`dirty_log`).
//!
//! The range is checked against the file's size before it is mapped. A mapping that runs past
//! the end of its file faults (SIGBUS) on the first touch of a page beyond it, which would kill
//! the daemon with every queue of every frontend, so such a range is refused instead. The
//! frontend could still shrink its file after we mapped it: a memfd we create is sealed against
//! that; a file the frontend sends is trusted as far as its guest memory is, which carries the
//! same risk.
//!
//! Every access goes through atomics: the other side may read or write the bytes at any time,
//! and atomics are what makes our own stores reach the shared pages in program order.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8};

/// Why a shared range could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("cannot create a memfd: {0}")]
    Memfd(io::Error),
    #[error("cannot size the memfd to {size} bytes: {source}")]
    Resize { size: u64, source: io::Error },
    #[error("cannot seal the memfd against resizing: {0}")]
    Seal(io::Error),
    #[error("cannot stat the file descriptor: {0}")]
    Stat(io::Error),
    #[error("the file descriptor is not a regular file or memfd; its size cannot be checked")]
    NotRegular,
    #[error("the size is 0")]
    Empty,
    #[error("the offset {offset} is not a multiple of {align}")]
    Misaligned { offset: u64, align: u64 },
    #[error(
        "offset {offset} + size {size} runs past the end of the file ({file_size} bytes); \
         mapping it would fault on access"
    )]
    PastEnd {
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("size {size} at offset {offset} is more than this process can map")]
    TooBig { offset: u64, size: u64 },
    #[error("mmap of {size} bytes at offset {offset} failed: {source}")]
    Mmap {
        offset: u64,
        size: u64,
        source: io::Error,
    },
}

/// A new memfd of `size` zero bytes, close-on-exec, sealed so that nobody (the frontend
/// included) can shrink or grow it or change the seals: a shrink would make our mapping of it
/// fault.
pub fn sealed_memfd(name: &CStr, size: u64) -> Result<File, MapError> {
    // SAFETY: `name` is NUL-terminated; the call only creates a descriptor.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MapError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)
        .map_err(|source| MapError::Resize { size, source })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MapError::Seal(io::Error::last_os_error()));
    }
    Ok(file)
}

/// `len` bytes of a file from `offset`, mapped shared, read and write. Unmapped on drop.
pub struct SharedMap {
    /// What mmap returned: page-aligned, `map_len` bytes.
    map: NonNull<u8>,
    map_len: usize,
    /// Where the caller's range starts inside the mapping: mmap takes page-aligned offsets
    /// only, so the mapping starts at the page boundary at or below `offset`.
    skew: usize,
    len: usize,
}

// SAFETY: the mapping belongs to the SharedMap alone and lives until it is dropped; its bytes
// are only reached through atomics (the accessors below), so any thread may use them.
unsafe impl Send for SharedMap {}
// SAFETY: as for Send: shared access is atomic access.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes of `file` from `offset`, once fstat says the file holds them all;
    /// `offset` must be a multiple of `align` (so that the accessors' atomics are aligned).
    pub fn map(file: &File, offset: u64, len: u64, align: u64) -> Result<SharedMap, MapError> {
        if len == 0 {
            return Err(MapError::Empty);
        }
        if !offset.is_multiple_of(align) {
            return Err(MapError::Misaligned { offset, align });
        }
        let meta = file.metadata().map_err(MapError::Stat)?;
        // Only a regular file (a memfd is one) has a size fstat vouches for: a device or a pipe
        // reports 0 or nothing useful, and we would map blind.
        if !meta.file_type().is_file() {
            return Err(MapError::NotRegular);
        }
        let file_size = meta.len();
        if offset.checked_add(len).is_none_or(|end| end > file_size) {
            return Err(MapError::PastEnd {
                offset,
                size: len,
                file_size,
            });
        }
        let page = page_size();
        let skew = offset % page;
        let too_big = MapError::TooBig { offset, size: len };
        let map_len = usize::try_from(len + skew).map_err(|_| too_big)?;
        let start = libc::off_t::try_from(offset - skew)
            .map_err(|_| MapError::TooBig { offset, size: len })?;
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is touched. The
        // range lies inside the file (checked above), so no page of it faults on access.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                start,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::Mmap {
                offset,
                size: len,
                source: io::Error::last_os_error(),
            });
        }
        let map = NonNull::new(p.cast::<u8>()).ok_or(MapError::Mmap {
            offset,
            size: len,
            source: io::Error::other("mmap returned a null pointer"),
        })?;
        Ok(SharedMap {
            map,
            map_len,
            skew: skew as usize,
            len: len as usize,
        })
    }

    /// The range as bytes, each reached atomically.
    pub fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: `skew + len == map_len` bytes are mapped for as long as `self` lives (the
        // slice borrows it); AtomicU8 has u8's size and alignment; nothing reaches the bytes
        // except through atomics.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(self.skew).cast::<AtomicU8>(),
                self.len,
            )
        }
    }

    /// The 16-bit field at byte `off` of the range. Panics if it is outside the range or
    /// misaligned: callers compute offsets from validated indices, so either is our bug.
    pub fn u16(&self, off: usize) -> &AtomicU16 {
        let p = self.field(off, 2).cast::<u16>();
        // SAFETY: `field` checked that the 2 bytes lie inside the mapping, which lives as long
        // as the returned borrow of `self`, and that they are 2-aligned; nothing reaches them
        // except through atomics.
        unsafe { AtomicU16::from_ptr(p) }
    }

    /// The 64-bit field at byte `off` of the range; panics as `u16` does.
    pub fn u64(&self, off: usize) -> &AtomicU64 {
        let p = self.field(off, 8).cast::<u64>();
        // SAFETY: as in `u16`, for 8 bytes, 8-aligned.
        unsafe { AtomicU64::from_ptr(p) }
    }

    /// A pointer to the `size` bytes at `off`, checked to lie in the range and to be aligned
    /// to `size`.
    fn field(&self, off: usize, size: usize) -> *mut u8 {
        assert!(
            off.checked_add(size).is_some_and(|end| end <= self.len),
            "shared mapping: {size} bytes at {off} lie outside its {} bytes",
            self.len
        );
        // SAFETY: `skew + off + size <= skew + len == map_len`: inside the mapping.
        let p = unsafe { self.map.as_ptr().add(self.skew + off) };
        assert!(
            (p as usize).is_multiple_of(size),
            "shared mapping: {size}-byte field at {off} is misaligned"
        );
        p
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every borrow of its bytes borrowed `self`, so none is left.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a system constant and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}
