//! The vhost-user glue: one `BlkBackend` per frontend connection, on top of the process-wide
//! [`Device`]. Each queue has its own worker thread (one bit per `queues_per_thread` entry) and
//! its own [`QueueCtl`], so the I/O path shares no lock between queues.

use std::io;
use std::num::Wrapping;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::cursor::Cursor;
use super::device::Device;
use super::exec::{execute, ExecCtx, ExecError};
use super::inflight::{Completion, DrainReport, Gm, InflightReq, Phase, Pop, QueueCtl, Vring};
use super::uring::{Done, Engine, Taken};
use super::used::{avail_u16, used_event};
use crate::stats::QueueStats;
use crate::virtio::chain::Chain;
use crate::virtio::config::WRITEBACK_OFFSET;
use crate::virtio::request::{self, Rejected, Request, RequestError, RequestType};
use crate::virtio::GuestMem;
use crate::virtio::Status;

struct Conn {
    dev: Arc<Device>,
    mem: Gm,
    queues: Vec<QueueCtl>,
    event_idx: AtomicBool,
    /// CONFIG_WCE: the guest may switch the cache to writethrough; a new connection starts in
    /// writeback, as a fresh device would.
    writeback: AtomicBool,
    wce_acked: AtomicBool,
    /// The io_uring engine of each queue, when the device uses one. Only the queue's worker
    /// takes the lock, except a drain that cancels what it gave up on.
    engines: Vec<Option<Mutex<Engine>>>,
}

/// Requests done inline are completed in groups of at most this many.
const INLINE_GROUP: usize = 8;

/// Queued ring I/O of this many bytes is submitted at once instead of with the batch.
const EARLY_SUBMIT_BYTES: u64 = 256 << 10;

/// The epoll token of a queue's io_uring eventfd in its worker's loop (the crate reserves
/// `0..=num_queues`; with one queue per worker the same token serves every worker).
fn engine_token(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

#[derive(Clone)]
pub struct BlkBackend {
    conn: Arc<Conn>,
}

impl BlkBackend {
    pub fn new(dev: Arc<Device>, mem: Gm) -> BlkBackend {
        let n = dev.cfg.num_queues as usize;
        let queues = (0..n).map(QueueCtl::new).collect();
        let engines = (0..n)
            .map(|q| {
                if !dev.cfg.uring {
                    return None;
                }
                Engine::new(q, dev.cfg.queue_size)
                    .inspect_err(|e| {
                        warn!("queue {q}: cannot set up io_uring ({e}); using synchronous I/O")
                    })
                    .ok()
                    .map(Mutex::new)
            })
            .collect();
        BlkBackend {
            conn: Arc::new(Conn {
                dev,
                mem,
                queues,
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(true),
                wce_acked: AtomicBool::new(false),
                engines,
            }),
        }
    }

    /// The eventfds the workers must watch for io_uring completions, by queue, with the epoll
    /// token `handle_event` knows them by.
    pub fn engine_fds(&self) -> Vec<(usize, RawFd, u64)> {
        let token = engine_token(self.conn.queues.len());
        self.conn
            .engines
            .iter()
            .enumerate()
            .filter_map(|(q, e)| e.as_ref().map(|e| (q, lock(e).event_fd(), token)))
            .collect()
    }

    fn engine(&self, q: usize) -> Option<MutexGuard<'_, Engine>> {
        self.conn.engines.get(q)?.as_ref().map(lock)
    }

    pub fn memory(&self) -> Gm {
        self.conn.mem.clone()
    }

    /// Requests accepted and not yet completed, over all queues.
    pub fn inflight(&self) -> usize {
        self.conn.queues.iter().map(QueueCtl::inflight).sum()
    }

    #[cfg(test)]
    pub fn phases(&self) -> Vec<Phase> {
        self.conn.queues.iter().map(QueueCtl::phase).collect()
    }

    /// Drains every queue (concurrently: the deadline is one bound for all of them, not one
    /// per queue) and leaves them in `until`.
    pub fn drain_all(&self, until: Phase) -> DrainReport {
        let timeout = self.conn.dev.cfg.drain_timeout;
        let start = Instant::now();
        let reports: Vec<DrainReport> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .conn
                .queues
                .iter()
                .map(|q| s.spawn(move || q.drain(&self.conn.mem, until, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut total = DrainReport {
            duration: start.elapsed(),
            ..Default::default()
        };
        for (q, r) in reports.into_iter().enumerate() {
            self.record_drain(q, &r);
            total.waited_for += r.waited_for;
            total.abandoned.extend(r.abandoned);
        }
        total
    }

    /// Requests accepted and not yet completed on queue `q`.
    pub fn queue_inflight(&self, q: usize) -> usize {
        self.conn.queues.get(q).map_or(0, QueueCtl::inflight)
    }

    /// Makes every queue's worker look at its ring again (after a resume): a kick that came
    /// while the queue was quiesced was consumed without popping anything.
    pub fn poke(&self) {
        for q in &self.conn.queues {
            q.poke();
        }
    }

    /// Requests a drain gave up on count as errors of their queue.
    fn record_drain(&self, q: usize, report: &DrainReport) {
        let stats = self.conn.dev.stats.queue(q);
        let n = report.abandoned.len() as u64;
        QueueStats::add(&stats.abandoned, n);
        QueueStats::add(&stats.errors, n);
        if n > 0 {
            // What the ring still holds for them is of no use to anyone now.
            if let Some(mut e) = self.engine(q) {
                e.cancel_all();
            }
        }
    }

    /// Whether any drain of this connection gave up on a request (so a worker may still be
    /// inside it, and joining the workers could wait as long as that request takes).
    pub fn abandoned_any(&self) -> bool {
        self.conn.queues.iter().any(QueueCtl::gave_up)
    }

    fn process_queue(&self, q: usize, vring: &Vring) {
        let conn = &*self.conn;
        let ctl = &conn.queues[q];
        if !ctl.start_if_ready(vring, || !conn.dev.is_quiesced()) {
            return;
        }
        if !self.pop_all(q, ctl, vring) {
            self.reap(q, vring, true);
            return;
        }
        // One system call for the whole kick's batch; completions that the kernel finished
        // inline (page-cache hits) are reaped right away rather than on the next wakeup.
        self.reap(q, vring, true);
        let poll = conn.dev.cfg.poll;
        if !poll.is_zero() {
            self.poll(q, ctl, vring, poll);
        }
    }

    /// `--poll-us`: keeps watching the ring (guest notifications off, so it need not kick)
    /// and the engine's completions until nothing has happened for `poll`, then goes back
    /// to sleeping on the kick eventfd. Trades CPU time for the wakeups it saves.
    fn poll(&self, q: usize, ctl: &QueueCtl, vring: &Vring, poll: std::time::Duration) {
        let _ = vring.disable_notification();
        // When the ring last went idle: the clock is read on idle rounds only, not on each
        // busy one (under load those reads showed in profiles).
        let mut idle_since: Option<Instant> = None;
        loop {
            let (popped, running) = self.pop_available(q, ctl, vring);
            let reaped = self.reap(q, vring, popped > 0);
            // The frontend may take the ring away, or a quiesce begin, while we spin.
            let ready = vring.get_ref().get_queue().ready() && !self.conn.dev.is_quiesced();
            if !running || !ready {
                break;
            }
            if popped + reaped > 0 {
                idle_since = None;
            } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= poll {
                break;
            }
            std::hint::spin_loop();
        }
        // Notifications back on, and whatever slipped in before they were is taken now.
        if self.pop_all(q, ctl, vring) {
            self.reap(q, vring, true);
        }
    }

    /// Takes every available descriptor chain, with guest notifications off while it does;
    /// returns false when the queue stopped running meanwhile.
    fn pop_all(&self, q: usize, ctl: &QueueCtl, vring: &Vring) -> bool {
        let mut empty_rounds = 0;
        loop {
            // The guest need not kick for what it adds while we are taking chains anyway.
            let _ = vring.disable_notification();
            let (popped, running) = self.pop_available(q, ctl, vring);
            if !running {
                return false;
            }
            // Re-enabling notification tells us whether the guest added more meanwhile.
            match vring.enable_notification() {
                // Once, that is a driver that added entries just now; twice in a row with
                // nothing taken, a ring whose entries cannot be taken: spinning on it would
                // burn this core forever.
                Ok(true) if popped == 0 && empty_rounds > 0 => {
                    if vring.get_ref().get_queue().ready() {
                        ctl.ring_broken();
                    }
                    return true;
                }
                Ok(true) => {
                    empty_rounds = if popped == 0 { empty_rounds + 1 } else { 0 };
                    continue;
                }
                Ok(false) => return true,
                Err(e) => {
                    warn!("queue {q}: cannot re-enable notifications: {e}");
                    return true;
                }
            }
        }
    }

    /// Pops and starts (or runs) every chain in the avail ring. Returns how many, and false
    /// when the queue is not running (stopping: the rest stays in the ring for whoever
    /// starts it again).
    fn pop_available(&self, q: usize, ctl: &QueueCtl, vring: &Vring) -> (usize, bool) {
        let conn = &*self.conn;
        let mut n = 0;
        // Requests done inline, completed a few at a time: each group is one used-ring update
        // and one interrupt, yet the guest gets its first buffers back while we work on the
        // rest. Inline I/O does not block, so nothing waits behind a slow request here; the
        // group is completed before anything that may block (the synchronous path).
        let mut held: Vec<Completion> = Vec::new();
        let mut cursor = Cursor::default();
        // One clock read per group rather than two per request (they showed in profiles):
        // requests popped in a group count from the group's start, and the group's inline
        // requests all take its latency.
        let mut clock = Instant::now();
        let stats = conn.dev.stats.queue(q);
        let flush = |held: &mut Vec<Completion>, clock: &mut Instant| {
            if !held.is_empty() {
                ctl.complete_many(vring, &conn.mem.memory(), held);
                let now = Instant::now();
                let took = now.saturating_duration_since(*clock);
                for _ in 0..held.len() {
                    stats.latency.record(took);
                }
                *clock = now;
                held.clear();
            }
        };
        let running = loop {
            match self.pop(ctl, vring, clock, &mut cursor) {
                Pop::Popped(Popped {
                    head,
                    parsed,
                    since: popped,
                    mem,
                    guest_waiting,
                }) => {
                    n += 1;
                    // The request's view of memory goes with it to the engine, which keeps it
                    // for as long as the I/O runs, and comes back when the engine refuses it.
                    let (parsed, mem) = match (self.engine(q), parsed) {
                        (Some(mut e), Ok(req)) => {
                            match e.try_queue(conn.dev.target.as_ref(), head, req, mem, popped) {
                                Ok(taken) => {
                                    QueueStats::inc(&stats.ring_io);
                                    let big = e.unsubmitted_bytes() >= EARLY_SUBMIT_BYTES;
                                    drop(e);
                                    match taken {
                                        Taken::Done(d) => {
                                            QueueStats::inc(&stats.ring_inline);
                                            held.extend(self.finish_ring_io(q, &d));
                                            if held.len() >= INLINE_GROUP || guest_waiting {
                                                flush(&mut held, &mut clock);
                                            }
                                        }
                                        // Large transfers: start them (and complete those the
                                        // kernel finishes inline) now rather than after the
                                        // whole batch, so the guest gets its first buffers back
                                        // while we copy the rest.
                                        Taken::Queued if big => {
                                            self.reap(q, vring, true);
                                        }
                                        Taken::Queued => {}
                                    }
                                    continue;
                                }
                                Err((req, mem)) => {
                                    // About to block on synchronous I/O: let the kernel start
                                    // on what is queued first.
                                    self.submit(q, &mut e);
                                    (Ok(req), mem)
                                }
                            }
                        }
                        (_, parsed) => (parsed, mem),
                    };
                    flush(&mut held, &mut clock);
                    self.run(q, ctl, vring, &mem, head, parsed);
                    clock = Instant::now();
                    stats
                        .latency
                        .record(clock.saturating_duration_since(popped));
                }
                Pop::Empty => break true,
                Pop::NotRunning => break false,
            }
        };
        flush(&mut held, &mut clock);
        (n, running)
    }

    fn submit(&self, q: usize, e: &mut Engine) {
        if let Err(err) = e.submit() {
            // The requests stay queued in the ring; the next kick or completion retries.
            error!("queue {q}: io_uring submission failed: {err}");
        }
    }

    /// Submits what is queued on queue `q`'s ring (when `submit`) and completes every request
    /// whose ring I/O is over. Returns how many were.
    fn reap(&self, q: usize, vring: &Vring, submit: bool) -> usize {
        let mut done = Vec::new();
        {
            let Some(mut e) = self.engine(q) else {
                return 0;
            };
            if submit {
                self.submit(q, &mut e);
            }
            e.reap(&mut done);
        }
        if done.is_empty() {
            return 0;
        }
        let ctl = &self.conn.queues[q];
        let completions: Vec<Completion> = done
            .iter()
            .filter_map(|d| self.finish_ring_io(q, d))
            .collect();
        // One used-ring update and one interrupt for the whole batch.
        let mem = self.conn.mem.memory();
        ctl.complete_many(vring, &mem, &completions);
        let stats = self.conn.dev.stats.queue(q);
        for d in &done {
            stats.latency.record(d.since.elapsed());
        }
        done.len()
    }

    /// The outcome of a request whose ring I/O is over (done again synchronously if need be).
    /// Whether a drain completed it meanwhile is only asked before doing it again:
    /// `complete_many` skips such requests anyway, and the question takes the table's lock.
    fn finish_ring_io(&self, q: usize, d: &Done) -> Option<Completion> {
        let dev = &*self.conn.dev;
        let target = dev.target.as_ref();
        let ctx = self.exec_ctx();
        let result = if d.failed || !target.route_valid(d.ticket, d.req.offset(), d.req.data_len) {
            if !self.conn.queues[q].holds(d.head) {
                // A drain gave up on it and completed it already: doing it again now could
                // land after whatever the guest wrote since it saw the error.
                return None;
            }
            // The synchronous path owns retries and the error policy (remaps, pending).
            QueueStats::inc(&dev.stats.queue(q).ring_redone);
            execute(&d.req, &d.mem, target, &ctx)
        } else if d.req.kind == RequestType::In {
            Ok(d.req.data_len as u32)
        } else if ctx.writeback {
            Ok(0)
        } else {
            target.flush().map(|()| 0).map_err(ExecError::from)
        };
        Some(self.outcome(q, d.head, &d.req, result))
    }

    fn exec_ctx(&self) -> ExecCtx<'_> {
        ExecCtx {
            writeback: self.conn.writeback.load(Ordering::Relaxed),
            serial: &self.conn.dev.cfg.serial,
        }
    }

    /// Pops one chain, with a view of guest memory loaded after the chain was seen available
    /// (so it holds every region the frontend added before); the request keeps that view.
    fn pop(&self, ctl: &QueueCtl, vring: &Vring, now: Instant, cursor: &mut Cursor) -> Pop<Popped> {
        let limits = self.conn.dev.limits();
        ctl.pop(
            vring,
            |state, run| {
                let queue = state.get_queue_mut();
                // A ring stopped or reset and not set up again has nothing to take (the check
                // virtio-queue's iterator makes).
                if !queue.ready() || queue.avail_ring() == 0 {
                    return None;
                }
                let next = Wrapping(queue.next_avail());
                let mem = match cursor.ahead(run, next) {
                    Some(mem) => mem,
                    None => {
                        // See an entry first, then load the memory table. A load that began
                        // before the frontend added a region may linearise before that change
                        // even if it returns after it (ArcSwap); a load that begins after we
                        // saw an entry the frontend made available once the region was
                        // acknowledged cannot miss it, nor any entry before that one.
                        let avail = queue
                            .avail_idx(&*self.conn.mem.memory(), Ordering::Acquire)
                            .ok()?;
                        // More entries than the ring holds: a broken driver; take nothing (as
                        // virtio-queue's iterator does) rather than process entries twice.
                        if avail == next || (avail - next).0 > queue.size() {
                            return None;
                        }
                        cursor.saw(run, avail, next, self.conn.mem.memory())
                    }
                };
                let guest_waiting = queue.event_idx_enabled()
                    && used_event(queue, &mem) == Some(Wrapping(queue.next_used()));
                let table = cursor.table(GuestAddress(queue.desc_table()), queue.size())?;
                let head = avail_entry(queue, &mem, next)?;
                queue.set_next_avail(next.0.wrapping_add(1));
                cursor.took(next);
                Some((head, table, mem, guest_waiting))
            },
            |(head, table, mem, guest_waiting)| {
                // SAFETY: the cursor found `table` in the memory table `mem` is a view of.
                let chain = unsafe { Chain::with_map(&mem, table, head) };
                let parsed = request::parse(chain, &mem, &limits);
                let entry = match &parsed {
                    Ok(r) => InflightReq {
                        head,
                        kind: r.kind.name(),
                        sector: r.sector,
                        len: r.data_len,
                        since: now,
                        status_addr: Some(r.status_addr),
                    },
                    Err(rej) => InflightReq {
                        head,
                        kind: rej.kind.map_or("malformed", RequestType::name),
                        sector: 0,
                        len: 0,
                        since: now,
                        status_addr: rej.status_addr,
                    },
                };
                let popped = Popped {
                    head,
                    parsed,
                    since: now,
                    mem,
                    guest_waiting,
                };
                (popped, entry)
            },
        )
    }

    fn run(
        &self,
        q: usize,
        ctl: &QueueCtl,
        vring: &Vring,
        mem: &GuestMem,
        head: u16,
        parsed: Result<Request, Rejected>,
    ) {
        let dev = &*self.conn.dev;
        let stats = dev.stats.queue(q);
        let (status, used_len) = match parsed {
            Err(rej) => {
                if let Some(kind) = rej.kind {
                    QueueStats::inc(op_counter(stats, kind));
                }
                QueueStats::inc(&stats.errors);
                if matches!(rej.error, RequestError::Unsupported(_)) {
                    QueueStats::inc(&stats.unsupported);
                } else {
                    QueueStats::inc(&stats.malformed);
                }
                debug!("queue {q}: rejected descriptor {head}: {}", rej.error);
                let status = rej.status_addr.map(|a| (a, rej.error.status()));
                (status, u32::from(status.is_some()))
            }
            Ok(req) => {
                let result = execute(&req, mem, dev.target.as_ref(), &self.exec_ctx());
                return self.finish(q, ctl, vring, head, &req, result);
            }
        };
        ctl.complete(vring, &self.conn.mem.memory(), head, status, used_len);
    }

    /// Counts a request's outcome and completes it, through the current memory table (the
    /// synchronous path may have blocked while the frontend sent a new one).
    fn finish(
        &self,
        q: usize,
        ctl: &QueueCtl,
        vring: &Vring,
        head: u16,
        req: &Request,
        result: Result<u32, ExecError>,
    ) {
        let c = self.outcome(q, head, req, result);
        ctl.complete(vring, &self.conn.mem.memory(), c.head, c.status, c.used_len);
    }

    /// Counts (and logs, when it failed) a request's outcome.
    fn outcome(
        &self,
        q: usize,
        head: u16,
        req: &Request,
        result: Result<u32, ExecError>,
    ) -> Completion {
        count(self.conn.dev.stats.queue(q), req, result.is_ok());
        let (status, used_len) = match result {
            Ok(n) => (Status::Ok, n + 1),
            Err(e) => {
                warn!(
                    "queue {q}: {} at sector {} ({} bytes) failed: {e}",
                    req.kind.name(),
                    req.sector,
                    req.data_len
                );
                (Status::IoErr, 1)
            }
        };
        Completion {
            head,
            status: Some((req.status_addr, status)),
            used_len,
        }
    }
}

/// A popped chain.
struct Popped {
    head: u16,
    parsed: Result<Request, Rejected>,
    since: Instant,
    /// The guest memory view it was parsed against.
    mem: GuestMemoryLoadGuard<GuestMem>,
    /// The guest has taken every used entry and asked to be notified of the next one
    /// (event-idx): it is waiting, so a completion should reach it at once.
    guest_waiting: bool,
}

/// The head of the chain in avail ring slot `at`.
fn avail_entry(queue: &impl QueueT, mem: &GuestMem, at: Wrapping<u16>) -> Option<u16> {
    avail_u16(queue, mem, u64::from(at.0.checked_rem(queue.size())?))
}

fn lock(e: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    // A worker that panicked left the engine as consistent as any reap leaves it.
    e.lock().unwrap_or_else(|p| p.into_inner())
}

fn op_counter(stats: &QueueStats, kind: RequestType) -> &std::sync::atomic::AtomicU64 {
    match kind {
        RequestType::In => &stats.reads,
        RequestType::Out => &stats.writes,
        RequestType::Flush => &stats.flushes,
        RequestType::GetId => &stats.get_ids,
        RequestType::Discard => &stats.discards,
        RequestType::WriteZeroes => &stats.write_zeroes,
    }
}

fn count(stats: &QueueStats, req: &Request, ok: bool) {
    QueueStats::inc(op_counter(stats, req.kind));
    if !ok {
        QueueStats::inc(&stats.errors);
        return;
    }
    match req.kind {
        RequestType::In => QueueStats::add(&stats.bytes_read, req.data_len),
        RequestType::Out => QueueStats::add(&stats.bytes_written, req.data_len),
        _ => {}
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.conn.dev.cfg.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.conn.dev.cfg.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.conn.dev.features()
    }

    fn acked_features(&self, features: u64) {
        self.conn.wce_acked.store(
            features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0,
            Ordering::Relaxed,
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.conn.dev.protocol_features()
    }

    fn reset_device(&self) {
        let report = self.drain_all(Phase::Stopped);
        debug!(
            "device reset: drained {} requests in {:?}",
            report.waited_for, report.duration
        );
        self.conn.writeback.store(true, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.conn.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let writeback = self.conn.writeback.load(Ordering::Relaxed);
        self.conn.dev.config_space(writeback).read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable, and only with CONFIG_WCE negotiated.
        if offset as usize != WRITEBACK_OFFSET || buf.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "config write at offset {offset} of {} bytes: only the writeback byte is writable",
                    buf.len()
                ),
            ));
        }
        if !self.conn.wce_acked.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "config write to writeback without CONFIG_WCE negotiated",
            ));
        }
        let writeback = buf[0] != 0;
        debug!(
            "guest set the cache to {}",
            if writeback {
                "writeback"
            } else {
                "writethrough"
            }
        );
        self.conn.writeback.store(writeback, Ordering::Relaxed);
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // The handler swaps the mapping inside the GuestMemoryAtomic we share with it; the old
        // mapping stays alive as long as a worker still holds a guard on it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.conn.dev.cfg.num_queues)
            .map(|i| 1u64 << i)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, dropping the daemon could not stop (and join) the worker threads.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(ctl) = self.conn.queues.get(queue_index as usize) else {
            return Ok(());
        };
        let report = ctl.drain(
            &self.conn.mem,
            Phase::Stopped,
            self.conn.dev.cfg.drain_timeout,
        );
        self.record_drain(queue_index as usize, &report);
        info!(
            "queue {queue_index} stopped by the frontend: drained {} requests in {:?}{}",
            report.waited_for,
            report.duration,
            if report.abandoned.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} completed with IOERR after the timeout",
                    report.abandoned.len()
                )
            }
        );
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("queue {thread_id}: unexpected event set {evset:?}");
        }
        // One queue per thread: the event is that thread's only vring, and the thread index
        // is the queue index. Never return an error for a guest's mistake: it would end the
        // worker thread.
        if u64::from(device_event) == engine_token(self.conn.queues.len()) {
            if let Some(e) = self.engine(thread_id) {
                e.clear_event();
            }
            if let Some(vring) = vrings.first() {
                self.reap(thread_id, vring, false);
            }
        } else if let Some(vring) = vrings.get(device_event as usize) {
            self.process_queue(thread_id, vring);
        }
        Ok(())
    }
}
