//! Finishing a plain read or write at once, on the worker, when nothing has to wait: a read the
//! page cache holds (preadv2 with RWF_NOWAIT), a buffered write, bytes a layer keeps in memory,
//! the null target. Done inline, a request completes on its own instead of waiting for its
//! batch, so the guest can refill the ring while the worker goes on. The io_uring and null
//! engines both start every job here.

use std::io;
use std::os::fd::AsRawFd;

use super::iovec::{guest_iovecs, sub_iovecs};
use super::{Done, Job, Started};
use crate::storage::{BlockIo, Dir, Extent, MapIo, Mapping, Pass, Source};
use crate::virtio::request::RequestType;

/// A request mapped to more extents than this (a read across many scattered remaps) takes the
/// blocking path rather than a trip per extent.
pub const MAX_EXTENTS: usize = 64;
/// Most iovecs one preadv2/pwritev2 call takes.
const IOV_MAX: usize = 1024;

/// What [`Inline::start`] made of a job.
pub enum Inlined {
    Started(Started),
    /// A plain read or write that would have to wait: the engine queues it, or hands it to
    /// the blocking path.
    WouldWait(Job, Dir),
}

/// How an inline attempt ended.
enum Attempt {
    /// Every extent was moved, and the layers agree they were the right places.
    Done,
    /// Every extent was moved, but a layer's mapping changed meanwhile (`end_io`).
    Stale,
    /// An extent would have to wait for the device: the job needs a queued pass.
    WouldWait,
    /// Only the blocking path can do this one: not a plain read or write, a layer that must
    /// see it itself, an O_DIRECT file with a guest buffer it cannot take as it is, ...
    Blocking,
}

/// The scratch space of inline attempts, kept between jobs so they allocate nothing.
pub struct Inline {
    /// The current job's guest buffers, for a queued pass to reuse.
    pub iov: Vec<libc::iovec>,
    part: Vec<libc::iovec>,
    /// Whether buffered writes may be tried with RWF_NOWAIT (until a file says it cannot).
    write_nowait: bool,
}

// SAFETY: the raw pointers are scratch space, filled and used within one call on the engine's
// owner (the iovecs point into guest memory the job being handled keeps mapped).
unsafe impl Send for Inline {}

impl Default for Inline {
    fn default() -> Inline {
        Inline {
            iov: Vec::new(),
            part: Vec::new(),
            write_nowait: true,
        }
    }
}

/// The direction of a job an engine may move itself: a plain read or write (in writethrough
/// mode a write must be flushed after it, which only the blocking path does).
fn movable(job: &Job) -> Option<Dir> {
    let req = &job.req;
    if req.data_len == 0 || req.data_len > u64::from(u32::MAX) {
        return None;
    }
    match req.kind {
        RequestType::In => Some(Dir::Read),
        RequestType::Out if !job.writethrough => Some(Dir::Write),
        _ => None,
    }
}

impl Inline {
    /// Starts `job` the way every engine that moves bytes itself does: a job only the blocking
    /// path can run is handed back for it; a plain read or write is tried inline.
    pub fn start(&mut self, stack: &dyn BlockIo, job: Job) -> Inlined {
        let Some(dir) = movable(&job) else {
            return Inlined::Started(Started::Blocking(job));
        };
        Inlined::Started(match self.attempt(stack, &job, dir) {
            Attempt::Done => Started::Done(Done::ok(job)),
            Attempt::Stale => Started::Redo(job),
            Attempt::Blocking => Started::Blocking(job),
            Attempt::WouldWait => return Inlined::WouldWait(job, dir),
        })
    }

    /// Maps the current job (whose buffers `attempt` put in `iov`) for `io`'s pass. False:
    /// only the blocking path can do it.
    pub fn map<'a>(&mut self, stack: &'a dyn BlockIo, io: MapIo, out: &mut Mapping<'a>) -> bool {
        out.clear();
        stack.map(io, out) && out.len() <= MAX_EXTENTS && self.aligned(out)
    }

    /// Whether every file extent can take the job's buffers as they are (O_DIRECT wants them
    /// aligned; the blocking path bounces those that are not).
    fn aligned(&mut self, m: &Mapping) -> bool {
        m.extents().iter().all(|e| match e.source {
            Source::File { offset, align, .. } if align > 1 => {
                let ok = |x: u64| x.is_multiple_of(align);
                sub_iovecs(&self.iov, e.at, e.len, &mut self.part);
                ok(offset)
                    && self
                        .part
                        .iter()
                        .all(|v| ok(v.iov_base as u64) && ok(v.iov_len as u64))
            }
            _ => true,
        })
    }

    /// Tries `job` inline: maps it for a no-wait pass and runs the extents in order.
    fn attempt(&mut self, stack: &dyn BlockIo, job: &Job, dir: Dir) -> Attempt {
        let io = MapIo::new(dir, job.req.offset(), job.req.data_len, Pass::NoWait);
        let mut m = Mapping::default();
        if guest_iovecs(&job.req, &job.mem, &mut self.iov).is_err() || !self.map(stack, io, &mut m)
        {
            return Attempt::Blocking;
        }
        for e in m.extents() {
            match self.extent(dir, e) {
                Attempt::Done => {}
                other => return other,
            }
        }
        if stack.end_io(io, m.per_io()) {
            Attempt::Done
        } else {
            Attempt::Stale
        }
    }

    /// Moves one extent at once if that cannot wait.
    fn extent(&mut self, dir: Dir, e: &Extent) -> Attempt {
        sub_iovecs(&self.iov, e.at, e.len, &mut self.part);
        let done = match e.source {
            Source::Zeros => {
                if dir == Dir::Read {
                    // SAFETY: the iovecs point into guest memory the job keeps mapped, checked
                    // by the parser.
                    unsafe { zero(&self.part) };
                }
                true
            }
            Source::Memory { .. } if dir == Dir::Write => return Attempt::Blocking,
            // SAFETY: the iovecs point into guest memory the job keeps mapped, checked by the
            // parser.
            Source::Memory { from, offset } => unsafe { from.copy_to(offset, &self.part) },
            Source::File { fd, offset, align } => {
                align == 1
                    && self.part.len() <= IOV_MAX
                    // SAFETY: as above; the descriptor is the stack's, open as long as it lives.
                    && unsafe {
                        file_nowait(&mut self.write_nowait, dir, fd.as_raw_fd(), offset, &self.part)
                    } == Some(e.len)
            }
        };
        if done {
            Attempt::Done
        } else {
            Attempt::WouldWait
        }
    }

    /// The iovecs of the part `[at, at + len)` of the current job's buffers.
    pub fn part(&mut self, at: u64, len: u64) -> &[libc::iovec] {
        sub_iovecs(&self.iov, at, len, &mut self.part);
        &self.part
    }
}

/// Fills buffers with zeros.
///
/// # Safety
/// Every iovec must point to memory valid for writes of its length.
pub unsafe fn zero(iov: &[libc::iovec]) {
    for v in iov {
        // SAFETY: the caller's promise.
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
    }
}

/// One system call that cannot wait for the device: a read the page cache holds (preadv2 with
/// RWF_NOWAIT), a buffered write (pwritev2 with RWF_NOWAIT where the filesystem supports it;
/// where it does not, as ext4 here, a plain pwritev, which only copies into the page cache:
/// the ring would hand such a write to a kernel worker thread, which measured about a third
/// slower). The bytes moved, or None (EAGAIN, an error): the caller goes the longer way, where
/// doing the whole extent again is harmless.
///
/// # Safety
/// Every iovec must point to memory valid for the transfer's direction, and `fd` must be open.
unsafe fn file_nowait(
    write_nowait: &mut bool,
    dir: Dir,
    fd: i32,
    offset: u64,
    v: &[libc::iovec],
) -> Option<u64> {
    let off = offset as libc::off_t;
    let cnt = v.len() as i32;
    // SAFETY: the caller's promise.
    let n = unsafe {
        match dir {
            Dir::Read => libc::preadv2(fd, v.as_ptr(), cnt, off, libc::RWF_NOWAIT),
            Dir::Write if *write_nowait => {
                let n = libc::pwritev2(fd, v.as_ptr(), cnt, off, libc::RWF_NOWAIT);
                if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                    *write_nowait = false;
                    libc::pwritev(fd, v.as_ptr(), cnt, off)
                } else {
                    n
                }
            }
            Dir::Write => libc::pwritev(fd, v.as_ptr(), cnt, off),
        }
    };
    u64::try_from(n).ok()
}
