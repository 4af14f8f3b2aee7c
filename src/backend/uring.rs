//! The io_uring engine of one queue. The queue's worker routes each plain read or write through
//! the target (`BlockIo::route`), queues one submission per piece, submits the whole kick's
//! batch with one system call, and reaps completions when the ring's eventfd (registered in
//! the worker's epoll) fires. The engine only moves bytes: a request whose ring I/O failed,
//! came up short or was overtaken by a remap is handed back as `failed` / with its ticket, and
//! the worker runs it again on the synchronous path, which owns the error policy (auto-remap,
//! the pending list, per-block retries).
//!
//! Each request keeps a guard on the guest memory it was parsed against, so a memory table
//! change or a disconnect cannot unmap buffers the kernel is still filling.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use log::{error, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryLoadGuard};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag};

use crate::storage::{BlockIo, Dir, Piece, Route, IN_MEMORY, NO_FILE};
use crate::virtio::request::{Request, RequestType};
use crate::virtio::GuestMem;

/// user_data of cancellation requests; never a slot index.
const CANCEL: u64 = u64::MAX;
/// A request split into more runs than this (a read across many scattered remaps) takes the
/// synchronous path rather than flood the ring.
const MAX_PIECES: usize = 64;
/// How long dropping an engine waits for I/O the kernel still holds.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// Whether this kernel lets us use io_uring with the operations the engine needs. The error
/// says why not (io_uring disabled by sysctl or seccomp, kernel too old...).
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks {name}"),
            ));
        }
    }
    Ok(())
}

/// What became of a request the engine took.
pub enum Taken {
    /// On the ring.
    Queued,
    /// Done at once; complete it now.
    Done(Done),
}

/// Most iovecs one preadv2/pwritev2 call takes.
const IOV_MAX: usize = 1024;

/// A request whose ring I/O is over.
pub struct Done {
    pub head: u16,
    pub req: Request,
    pub mem: GuestMemoryLoadGuard<GuestMem>,
    pub since: Instant,
    /// Some piece failed or came up short: do the request again synchronously.
    pub failed: bool,
    /// For `BlockIo::route_valid`.
    pub ticket: u64,
}

struct Slot {
    head: u16,
    req: Request,
    mem: GuestMemoryLoadGuard<GuestMem>,
    since: Instant,
    ticket: u64,
    /// One iovec array per piece; the kernel reads them until the piece completes, and a
    /// Vec's buffer does not move when the Vec does.
    iovs: Vec<Vec<libc::iovec>>,
    /// Bytes each piece must move, by piece index.
    want: Vec<u32>,
    left: usize,
    failed: bool,
}

// SAFETY: the raw pointers in `iovs` point into guest memory that `mem` keeps mapped; the slot
// is only ever touched by whoever holds the engine's lock.
unsafe impl Send for Slot {}

pub struct Engine {
    ring: IoUring,
    events: EventConsumer,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Whether buffered writes may be tried with RWF_NOWAIT (until a file says it cannot).
    write_nowait: bool,
    route: Route,
    iov: Vec<libc::iovec>,
    /// One piece's part of `iov`.
    piece_iov: Vec<libc::iovec>,
    /// Submissions pushed but not yet handed to the kernel, and the bytes they move.
    unsubmitted: usize,
    unsubmitted_bytes: u64,
    /// Submissions the kernel has and has not completed.
    in_kernel: usize,
    /// At most this many submissions in flight: the completion ring (twice the size) can
    /// never overflow, so the kernel never refuses a submission with EBUSY.
    limit: usize,
    queue: usize,
}

// SAFETY: `iov` is scratch space, empty between calls; see Slot for the rest.
unsafe impl Send for Engine {}

impl Engine {
    /// An engine for a queue of `queue_size` descriptors (so never more requests in flight).
    pub fn new(queue: usize, queue_size: u16) -> io::Result<Engine> {
        let entries = u32::from(queue_size).next_power_of_two().max(8);
        // No SINGLE_ISSUER (a drain cancels from another thread) and no COOP_TASKRUN (the
        // worker sleeps in epoll and must be woken by every completion's eventfd).
        let ring = IoUring::new(entries)?;
        let (events, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        ring.submitter().register_eventfd(notifier.as_raw_fd())?;
        // The kernel holds its own reference to the eventfd; the consumer end is ours.
        drop(notifier);
        Ok(Engine {
            ring,
            events,
            slots: Vec::new(),
            free: Vec::new(),
            write_nowait: true,
            route: Route::default(),
            iov: Vec::new(),
            piece_iov: Vec::new(),
            unsubmitted: 0,
            unsubmitted_bytes: 0,
            in_kernel: 0,
            limit: entries as usize,
            queue,
        })
    }

    /// Resets the completion eventfd after it fired (reaping follows).
    pub fn clear_event(&self) {
        let _ = self.events.consume();
    }

    /// The eventfd to watch for completions.
    pub fn event_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    /// Bytes the queued, not yet submitted requests move.
    pub fn unsubmitted_bytes(&self) -> u64 {
        self.unsubmitted_bytes
    }

    /// Takes `req` if it is a plain read or write the target can route: done at once when
    /// the page cache allows (`Taken::Done`), else queued on the ring; either keeps `mem`, the
    /// view of guest memory its buffers were checked in. Otherwise hands both back for the
    /// synchronous path.
    // The refused request goes straight back to the caller's frame, as `Taken::Done` does on
    // success; boxing it would allocate for every request the synchronous path takes.
    #[allow(clippy::result_large_err)]
    pub fn try_queue(
        &mut self,
        target: &dyn BlockIo,
        head: u16,
        req: Request,
        mem: GuestMemoryLoadGuard<GuestMem>,
        since: Instant,
    ) -> Result<Taken, (Request, GuestMemoryLoadGuard<GuestMem>)> {
        let dir = match req.kind {
            RequestType::In => Dir::Read,
            RequestType::Out => Dir::Write,
            _ => return Err((req, mem)),
        };
        if req.data_len == 0 || req.data_len > u64::from(u32::MAX) {
            return Err((req, mem));
        }
        self.iov.clear();
        for seg in &req.data {
            for slice in GuestMemoryBackend::get_slices(&*mem, seg.addr, seg.len as usize) {
                let Ok(slice) = slice else {
                    // Let the synchronous path report it.
                    return Err((req, mem));
                };
                self.iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        // Overlaid pieces (see Route::may_overlay) are only right when each runs after the one
        // before it, which the inline attempt does and the ring does not: an overlay that
        // cannot be done inline is routed again, split.
        let mut may_overlay = true;
        let inline = loop {
            self.route.pieces.clear();
            self.route.may_overlay = may_overlay;
            self.route.overlaid = false;
            if !target.route(dir, req.offset(), req.data_len, 0, &mut self.route)
                || self.route.pieces.len() > MAX_PIECES
                || self.in_kernel + self.unsubmitted + self.route.pieces.len() > self.limit
            {
                return Err((req, mem));
            }
            let Some(inline) = self.inline_pieces(target, dir) else {
                // O_DIRECT with an unaligned guest buffer: the synchronous path bounces it.
                return Err((req, mem));
            };
            if inline || !self.route.overlaid {
                break inline;
            }
            may_overlay = false;
        };
        if inline {
            return Ok(Taken::Done(Done {
                head,
                req,
                mem,
                since,
                failed: false,
                ticket: self.route.ticket,
            }));
        }
        // Pieces in memory are copied now, once a piece has needed the ring; the ring only
        // moves file pieces.
        for p in self.route.pieces.iter().filter(|p| p.fd == IN_MEMORY) {
            sub_iovecs_into(&self.iov, p.at, p.len, &mut self.piece_iov);
            // SAFETY: guest memory held mapped by `mem`, checked by the parser.
            if dir != Dir::Read || !unsafe { target.copy_in_memory(p, &self.piece_iov) } {
                return Err((req, mem));
            }
        }
        let pieces = std::mem::take(&mut self.route.pieces);
        let mut iovs = Vec::with_capacity(pieces.len());
        let mut want = Vec::with_capacity(pieces.len());
        let mut left = 0;
        for p in &pieces {
            let mut v = Vec::new();
            sub_iovecs_into(&self.iov, p.at, p.len, &mut v);
            iovs.push(v);
            want.push(p.len as u32);
            left += usize::from(p.fd >= 0);
        }
        let slot = self.alloc();
        let s = Slot {
            head,
            req,
            mem,
            since,
            ticket: self.route.ticket,
            iovs,
            want,
            left,
            failed: false,
        };
        for (i, p) in pieces.iter().enumerate() {
            if p.fd < 0 {
                // NO_FILE, IN_MEMORY: done already.
                continue;
            }
            let v = &s.iovs[i];
            let fd = types::Fd(p.fd);
            let entry = match (dir, v.len()) {
                (Dir::Read, 1) => opcode::Read::new(fd, v[0].iov_base.cast(), v[0].iov_len as u32)
                    .offset(p.file_offset)
                    .build(),
                (Dir::Read, n) => opcode::Readv::new(fd, v.as_ptr(), n as u32)
                    .offset(p.file_offset)
                    .build(),
                (Dir::Write, 1) => {
                    opcode::Write::new(fd, v[0].iov_base.cast(), v[0].iov_len as u32)
                        .offset(p.file_offset)
                        .build()
                }
                (Dir::Write, n) => opcode::Writev::new(fd, v.as_ptr(), n as u32)
                    .offset(p.file_offset)
                    .build(),
            };
            let user_data = (u64::from(slot) << 16) | i as u64;
            self.push(entry.user_data(user_data));
        }
        self.route.pieces = pieces;
        self.unsubmitted_bytes += s.req.data_len;
        self.slots[slot as usize] = Some(s);
        Ok(Taken::Queued)
    }

    /// Tries the routed pieces inline, without allocating: page-cache hits, pieces in memory
    /// and null pieces are done now. Once a piece needs the ring, only null pieces (zeros,
    /// never the ring's) still run here; every other piece is queued, and doing one again
    /// there is harmless. Whether every piece was done; None when a piece cannot go to the file
    /// as it is (O_DIRECT with an unaligned guest buffer).
    fn inline_pieces(&mut self, target: &dyn BlockIo, dir: Dir) -> Option<bool> {
        let mut inline = true;
        for p in &self.route.pieces {
            sub_iovecs_into(&self.iov, p.at, p.len, &mut self.piece_iov);
            let aligned = |x: u64| x.is_multiple_of(p.align);
            if !aligned(p.file_offset)
                || self
                    .piece_iov
                    .iter()
                    .any(|v| !aligned(v.iov_base as u64) || !aligned(v.iov_len as u64))
            {
                return None;
            }
            if p.fd == IN_MEMORY {
                // SAFETY: guest memory held mapped by the request's guard, checked by the parser.
                inline = inline
                    && dir == Dir::Read
                    && unsafe { target.copy_in_memory(p, &self.piece_iov) };
            } else if inline || p.fd == NO_FILE {
                inline &= inline_io(&mut self.write_nowait, dir, p, &self.piece_iov);
            }
        }
        Some(inline)
    }

    fn alloc(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every buffer the entry names lives in its slot (guest memory held by the
            // slot's guard, iovec arrays owned by the slot) until its completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            // Full: hand what is queued to the kernel to make room.
            if let Err(e) = self.submit() {
                error!("queue {}: io_uring submit failed: {e}", self.queue);
            }
        }
    }

    /// Hands every queued submission to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.unsubmitted_bytes = 0;
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => {
                    self.unsubmitted -= n.min(self.unsubmitted);
                    self.in_kernel += n;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Collects requests whose every piece is complete into `out`.
    pub fn reap(&mut self, out: &mut Vec<Done>) {
        loop {
            let mut any = false;
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                any = true;
                let user_data = cqe.user_data();
                if user_data == CANCEL {
                    continue;
                }
                self.in_kernel = self.in_kernel.saturating_sub(1);
                let slot = (user_data >> 16) as usize;
                let piece = (user_data & 0xffff) as usize;
                let Some(Some(s)) = self.slots.get_mut(slot) else {
                    warn!("queue {}: completion for an unknown request", self.queue);
                    continue;
                };
                let res = cqe.result();
                if res < 0 || s.want.get(piece).is_none_or(|&w| res as u32 != w) {
                    s.failed = true;
                }
                s.left -= 1;
                if s.left == 0 {
                    if let Some(s) = self.slots[slot].take() {
                        self.free.push(slot as u32);
                        out.push(Done {
                            head: s.head,
                            req: s.req,
                            mem: s.mem,
                            since: s.since,
                            failed: s.failed,
                            ticket: s.ticket,
                        });
                    }
                }
            }
            drop(cq);
            if !any {
                break;
            }
        }
        if self.unsubmitted > 0 {
            // An earlier submission failed; completions made room, so try again.
            if let Err(e) = self.submit() {
                warn!(
                    "queue {}: io_uring submission failed again: {e}",
                    self.queue
                );
            }
        }
    }

    /// Asks the kernel to cancel everything in flight (a drain gave up on it). Cancelled
    /// pieces complete with ECANCELED and are reaped as failures.
    pub fn cancel_all(&mut self) {
        if self.in_kernel == 0 {
            return;
        }
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL);
        self.push(entry);
        if let Err(e) = self.submit() {
            warn!("queue {}: cannot cancel in-flight I/O: {e}", self.queue);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for what it holds: wait for it, and if
        // it does not finish, keep the memory mapped for good rather than free it under the
        // kernel's feet.
        self.cancel_all();
        let deadline = Instant::now() + DROP_WAIT;
        let mut done = Vec::new();
        while self.in_kernel > 0 && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap(&mut done);
        }
        if self.in_kernel > 0 {
            error!(
                "queue {}: {} I/O operations still in the kernel after {:?}; leaking their buffers and ring",
                self.queue, self.in_kernel, DROP_WAIT
            );
            std::mem::forget(std::mem::take(&mut self.slots));
            // Closing the ring would let the kernel finish into memory we no longer track.
            let ring = std::mem::replace(
                &mut self.ring,
                match IoUring::new(1) {
                    Ok(r) => r,
                    Err(_) => return,
                },
            );
            std::mem::forget(ring);
        }
    }
}

/// Moves one piece at once if that cannot block: a read the page cache holds (preadv2
/// with RWF_NOWAIT), a buffered write (pwritev2 with RWF_NOWAIT where the filesystem
/// supports it; where it does not, as ext4 here, a plain pwritev, which only copies into the
/// page cache: the ring would hand such a write to a kernel worker thread, which measured
/// about a third slower). O_DIRECT I/O and page-cache misses go to the ring. Served
/// inline, a request completes on its own instead of waiting for its batch, so the guest
/// can refill the ring while we work on the rest.
fn inline_io(write_nowait: &mut bool, dir: Dir, p: &Piece, v: &[libc::iovec]) -> bool {
    if p.fd == NO_FILE {
        if dir == Dir::Read {
            for v in v {
                // SAFETY: guest memory held mapped by the request's guard, checked by the parser.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
        }
        return true;
    }
    if v.len() > IOV_MAX || p.align > 1 {
        // O_DIRECT: a synchronous call would wait for the device even with RWF_NOWAIT.
        return false;
    }
    let want = p.len as isize;
    let off = p.file_offset as libc::off_t;
    // SAFETY: the iovecs point into guest memory held mapped by the request's guard,
    // checked by the parser; the file descriptor is the target's, open for its lifetime.
    let n = unsafe {
        match dir {
            Dir::Read => libc::preadv2(p.fd, v.as_ptr(), v.len() as i32, off, libc::RWF_NOWAIT),
            Dir::Write if *write_nowait => {
                let n = libc::pwritev2(p.fd, v.as_ptr(), v.len() as i32, off, libc::RWF_NOWAIT);
                if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                    *write_nowait = false;
                    libc::pwritev(p.fd, v.as_ptr(), v.len() as i32, off)
                } else {
                    n
                }
            }
            Dir::Write => libc::pwritev(p.fd, v.as_ptr(), v.len() as i32, off),
        }
    };
    // Short, EAGAIN or an error: the ring (and after it the synchronous path) takes over;
    // doing the whole piece again there is harmless.
    n == want
}

/// The part `[at, at + len)` of the byte stream `iov` describes, into `out`.
fn sub_iovecs_into(iov: &[libc::iovec], at: u64, len: u64, out: &mut Vec<libc::iovec>) {
    out.clear();
    let mut pos = 0u64;
    let end = at + len;
    for v in iov {
        let (start, stop) = (pos, pos + v.iov_len as u64);
        pos = stop;
        if stop <= at {
            continue;
        }
        if start >= end {
            break;
        }
        let skip = at.saturating_sub(start);
        let take = stop.min(end) - start - skip;
        out.push(libc::iovec {
            // SAFETY: stays inside the same iovec.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip as usize) }.cast(),
            iov_len: take as usize,
        });
    }
}

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

    fn sub_iovecs(iov: &[libc::iovec], at: u64, len: u64) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        sub_iovecs_into(iov, at, len, &mut out);
        out
    }

    #[test]
    fn sub_iovecs_cuts_across_buffers() {
        let v = iov(&[(0x1000, 512), (0x8000, 1024), (0x20000, 512)]);
        assert_eq!(flat(&sub_iovecs(&v, 0, 2048)), flat(&v));
        assert_eq!(flat(&sub_iovecs(&v, 0, 512)), vec![(0x1000, 512)]);
        assert_eq!(
            flat(&sub_iovecs(&v, 256, 512)),
            vec![(0x1100, 256), (0x8000, 256)]
        );
        assert_eq!(flat(&sub_iovecs(&v, 1536, 512)), vec![(0x20000, 512)]);
        assert_eq!(flat(&sub_iovecs(&v, 600, 100)), vec![(0x8058, 100)]);
    }
}
