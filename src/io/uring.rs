//! `--engine io_uring`: each job is first tried inline (see `inline`); what would have to wait
//! goes on the queue's ring, one submission per file extent, and the whole kick's batch is
//! handed to the kernel with one system call. Completions are reaped when the ring's eventfd
//! (which the worker watches) fires. The engine only moves bytes: a job whose I/O failed, came
//! up short or went to a place a layer has moved since (`end_io`) is handed back for the
//! blocking path, which owns the error policy.
//!
//! Each job keeps its view of guest memory, so a memory table change or a disconnect cannot
//! unmap buffers the kernel is still filling.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use log::{error, warn};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag};

use super::inline::{zero, Inline, Inlined};
use super::uring_refused;
use super::{Done, Engine, Job, Reaped, Started, Target};
use crate::storage::{Dir, MapIo, Mapping, Pass, PerIo, Source};

/// user_data of cancellation requests; never a slot's.
const CANCEL: u64 = u64::MAX;
/// How long dropping an engine waits for I/O the kernel still holds.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// Whether this kernel lets us use io_uring with the operations the engine needs. The error
/// says why not (io_uring disabled by sysctl or seccomp, kernel too old...).
pub fn probe() -> io::Result<()> {
    uring_refused::read_limits();
    let ring = disabled_ring(8)?;
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
    restrict(&ring).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "the kernel's io_uring cannot restrict a ring's operations (Linux 5.10 can): {e}"
            ),
        )
    })
}

/// The operations the engine submits, the only ones its rings accept: io_uring requests
/// pass no seccomp filter, so a ring that took any (an openat, a connect) would be a way
/// around the sandbox for whoever gets to write its submission queue.
const OPS: [u8; 5] = [
    opcode::Read::CODE,
    opcode::Readv::CODE,
    opcode::Write::CODE,
    opcode::Writev::CODE,
    opcode::AsyncCancel::CODE,
];

/// A ring of `entries` that takes nothing until [`restrict`] enables it.
fn disabled_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_r_disabled()
        .build(entries)
        .map_err(uring_refused::explain)
}

/// Restricts a ring set up by [`disabled_ring`] to [`OPS`] (without submission flags) and no
/// further registrations, and enables it.
fn restrict(ring: &IoUring) -> io::Result<()> {
    let mut allow = OPS.map(Restriction::sqe_op);
    ring.submitter().register_restrictions(&mut allow)?;
    ring.submitter().register_enable_rings()
}

/// A job on the ring.
struct Slot {
    job: Job,
    /// What it was mapped as, and what the layers kept for `end_io`.
    io: MapIo,
    per_io: PerIo,
    /// One iovec array per extent (empty for those done at submission); the kernel reads them
    /// until the extent completes, and a Vec's buffer does not move when the Vec does.
    iovs: Vec<Vec<libc::iovec>>,
    /// Bytes each extent must move, by extent index.
    want: Vec<u32>,
    /// Submissions not yet complete.
    left: usize,
    failed: bool,
}

// SAFETY: the raw pointers in `iovs` point into guest memory that the job's view keeps mapped;
// the slot is only ever touched by whoever holds the engine (the queue's worker, or a drain
// under the engine's lock).
unsafe impl Send for Slot {}

pub struct UringEngine {
    target: Target,
    /// Dropped by hand: never while the kernel may still write into guest memory for it.
    ring: ManuallyDrop<IoUring>,
    events: EventConsumer,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    inline: Inline,
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

impl UringEngine {
    /// An engine for a queue of `queue_size` descriptors (so never more jobs in flight).
    pub fn new(target: Target, queue: usize, queue_size: u16) -> io::Result<UringEngine> {
        let entries = u32::from(queue_size).next_power_of_two().max(8);
        // No SINGLE_ISSUER (a drain cancels from another thread) and no COOP_TASKRUN (the
        // worker sleeps in epoll and must be woken by every completion's eventfd).
        let (events, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let ring = disabled_ring(entries)?;
        ring.submitter().register_eventfd(notifier.as_raw_fd())?;
        restrict(&ring)?;
        // The kernel holds its own reference to the eventfd; the consumer end is ours.
        drop(notifier);
        Ok(UringEngine {
            target,
            ring: ManuallyDrop::new(ring),
            events,
            slots: Vec::new(),
            free: Vec::new(),
            inline: Inline::default(),
            unsubmitted: 0,
            unsubmitted_bytes: 0,
            in_kernel: 0,
            limit: entries as usize,
            queue,
        })
    }

    /// Queues a job the inline attempt could not finish: maps it again for a queued pass, does
    /// the extents in memory now and puts the file extents on the ring.
    fn queue(&mut self, job: Job, dir: Dir) -> Started {
        let stack = &*self.target.stack;
        let io = MapIo::new(dir, job.req.offset(), job.req.data_len, Pass::Queued);
        let mut m = Mapping::default();
        if !self.inline.map(stack, io, &mut m) {
            return Started::Blocking(job);
        }
        let files = m
            .extents()
            .iter()
            .filter(|e| matches!(e.source, Source::File { .. }))
            .count();
        if self.in_kernel + self.unsubmitted + files > self.limit {
            return Started::Blocking(job);
        }
        let mut iovs = Vec::with_capacity(m.len());
        let mut want = Vec::with_capacity(m.len());
        let mut sqes = Vec::with_capacity(files);
        for (i, e) in m.extents().iter().enumerate() {
            let part = self.inline.part(e.at, e.len);
            match e.source {
                // SAFETY: guest memory the job keeps mapped, checked by the parser.
                Source::Zeros if dir == Dir::Read => unsafe { zero(part) },
                Source::Zeros => {}
                Source::Memory { from, offset } if dir == Dir::Read => {
                    // SAFETY: as above.
                    if !unsafe { from.copy_to(offset, part) } {
                        return Started::Blocking(job);
                    }
                }
                Source::Memory { .. } => return Started::Blocking(job),
                Source::File { fd, offset, .. } => sqes.push((i, fd.as_raw_fd(), offset)),
            }
            iovs.push(if matches!(e.source, Source::File { .. }) {
                part.to_vec()
            } else {
                Vec::new()
            });
            want.push(e.len as u32);
        }
        if sqes.is_empty() {
            return if stack.end_io(io, m.per_io()) {
                Started::Done(Done::ok(job))
            } else {
                Started::Redo(job)
            };
        }
        let per_io = *m.per_io();
        drop(m);
        let slot = self.alloc();
        self.unsubmitted_bytes += job.req.data_len;
        let s = Slot {
            job,
            io,
            per_io,
            iovs,
            want,
            left: sqes.len(),
            failed: false,
        };
        for &(i, fd, offset) in &sqes {
            let v = &s.iovs[i];
            let fd = types::Fd(fd);
            let entry = match (dir, v.len()) {
                (Dir::Read, 1) => opcode::Read::new(fd, v[0].iov_base.cast(), v[0].iov_len as u32)
                    .offset(offset)
                    .build(),
                (Dir::Read, n) => opcode::Readv::new(fd, v.as_ptr(), n as u32)
                    .offset(offset)
                    .build(),
                (Dir::Write, 1) => {
                    opcode::Write::new(fd, v[0].iov_base.cast(), v[0].iov_len as u32)
                        .offset(offset)
                        .build()
                }
                (Dir::Write, n) => opcode::Writev::new(fd, v.as_ptr(), n as u32)
                    .offset(offset)
                    .build(),
            };
            let user_data = (u64::from(slot) << 16) | i as u64;
            self.push(entry.user_data(user_data));
        }
        self.slots[slot as usize] = Some(s);
        Started::Queued
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
            // job's view, iovec arrays owned by the slot) until its completion is reaped.
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

    /// The job in slot `slot`, now that its last submission completed.
    fn finished(&mut self, slot: usize) -> Option<Reaped> {
        let s = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot as u32);
        if s.failed || !self.target.stack.end_io(s.io, &s.per_io) {
            return Some(Reaped::Redo(s.job));
        }
        Some(Reaped::Done(Done::ok(s.job)))
    }
}

impl Engine for UringEngine {
    fn start(&mut self, job: Job) -> Started {
        match self.inline.start(&*self.target.stack, job) {
            Inlined::Started(started) => started,
            Inlined::WouldWait(job, dir) => self.queue(job, dir),
        }
    }

    fn submit(&mut self) -> io::Result<()> {
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

    fn unsubmitted_bytes(&self) -> u64 {
        self.unsubmitted_bytes
    }

    fn reap(&mut self, out: &mut Vec<Reaped>) {
        loop {
            let mut any = false;
            let mut finished = Vec::new();
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                any = true;
                let user_data = cqe.user_data();
                // Every submission counted in `in_kernel` completes once, the cancel request
                // too: left counted, it made a dropped engine wait out DROP_WAIT for an I/O
                // that was over and then leak its ring.
                self.in_kernel = self.in_kernel.saturating_sub(1);
                if user_data == CANCEL {
                    continue;
                }
                let slot = (user_data >> 16) as usize;
                let extent = (user_data & 0xffff) as usize;
                let Some(Some(s)) = self.slots.get_mut(slot) else {
                    warn!("queue {}: completion for an unknown request", self.queue);
                    continue;
                };
                let res = cqe.result();
                if res < 0 || s.want.get(extent).is_none_or(|&w| res as u32 != w) {
                    s.failed = true;
                }
                s.left -= 1;
                if s.left == 0 {
                    finished.push(slot);
                }
            }
            drop(cq);
            out.extend(finished.into_iter().filter_map(|slot| self.finished(slot)));
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

    fn notifier(&self) -> Option<RawFd> {
        Some(self.events.as_raw_fd())
    }

    fn clear_notifier(&self) {
        let _ = self.events.consume();
    }

    fn cancel_all(&mut self) {
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

impl Drop for UringEngine {
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
            // Closing the ring would let the kernel finish into memory we no longer track:
            // it stays open, for good.
            return;
        }
        // SAFETY: the ring is not used again; this is the engine's drop.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's rings take its operations and refuse every other (EACCES), so a ring is
    /// no way around the seccomp sandbox.
    #[test]
    fn rings_refuse_operations_the_engine_does_not_submit() {
        let mut ring = disabled_ring(8).unwrap();
        restrict(&ring).unwrap();
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let mut buf = [1u8; 64];
        let read = opcode::Read::new(types::Fd(zero.as_raw_fd()), buf.as_mut_ptr(), 64)
            .build()
            .user_data(1);
        let path = c"/tmp";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(2);
        let nop = opcode::Nop::new().build().user_data(3);
        // One at a time: the kernel stops a batch at the first request it refuses.
        let mut results = Vec::new();
        for e in [read, open, nop] {
            // SAFETY: the buffer and the path outlive the wait below.
            unsafe { ring.submission().push(&e).unwrap() };
            ring.submit_and_wait(1).unwrap();
            results.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        assert_eq!(results, [(1, 64), (2, -libc::EACCES), (3, -libc::EACCES)]);
        assert_eq!(buf, [0u8; 64]);
        // Nor does it take registrations any more.
        assert!(ring
            .submitter()
            .register_probe(&mut io_uring::Probe::new())
            .is_err());
    }
}
