//! A queue's worker, on each event of its thread: takes every available descriptor chain
//! (guest notifications off meanwhile), parses it, hands it to the queue's engine, and
//! completes what the engine finished, in small groups so the guest gets its first buffers back
//! while the rest is under way. After work it keeps watching the ring and the engine for a
//! while before sleeping again (`--poll-us`; how long: `polling`).

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::inflight::{log_used_ring, tracked, Completion, InflightReq, Phase, Pop, QueueCtl};
use super::parked::{Parked, Parking};
use super::polling::PollWindow;
use super::session::Session;
use super::vring::Vring;
use crate::io::{Done, Engine, Job, Reaped, Started};
use crate::stats::QueueStats;
use crate::storage::{Hold, IoKind};
use crate::virtio::request::{self, Rejected, Request, RequestType};
use crate::virtio::ring::chain::TableMap;
use crate::virtio::ring::cursor::Cursor;
use crate::virtio::ring::used::{avail_u16, used_event};
use crate::virtio::{GuestMem, GuestMemView, Status};

/// Requests done at once are completed in groups of at most this many.
const INLINE_GROUP: usize = 8;

/// Queued I/O of this many bytes is submitted at once instead of with the batch.
const EARLY_SUBMIT_BYTES: u64 = 256 << 10;

pub struct Worker<'a> {
    s: &'a Session,
    q: usize,
    ctl: &'a QueueCtl,
    vring: &'a Vring,
    stats: &'a QueueStats,
    parking: &'a Parking,
    window: &'a PollWindow,
}

/// A popped chain.
struct Popped {
    head: u16,
    parsed: Result<Request, Rejected>,
    since: Instant,
    /// The guest memory view it was parsed against.
    mem: GuestMemView,
    /// The guest has taken every used entry and asked to be notified of the next one
    /// (event-idx): it is waiting, so a completion should reach it at once.
    guest_waiting: bool,
    /// The queue's run it was popped in (see `QueueCtl::holds_in`).
    run: u64,
}

/// Requests done at once, completed a few at a time: each group is one used-ring update and
/// one interrupt, yet the guest gets its first buffers back while the worker goes on. The
/// group is completed before anything that may block (the blocking path).
struct Group {
    done: Vec<Completion>,
    /// One clock read per group rather than two per request (they showed in profiles):
    /// requests popped in a group count from the group's start, and the group's requests all
    /// take its latency.
    clock: Instant,
}

impl<'a> Worker<'a> {
    /// The worker of queue `q` of session `s`.
    pub fn new(s: &'a Session, q: usize) -> Option<Worker<'a>> {
        Some(Worker {
            ctl: s.queues.get(q)?,
            vring: s.vrings.get(q)?,
            parking: s.parked.get(q)?,
            stats: s.dev.stats.queue(q),
            window: s.windows.get(q)?,
            s,
            q,
        })
    }

    /// The guest kicked the queue (or a resume poked it).
    pub fn kicked(&self) {
        let window = self.window.woke();
        if !self
            .ctl
            .start_if_ready(self.vring, || !self.s.dev.is_quiesced())
        {
            return;
        }
        QueueStats::inc(&self.stats.wakeups);
        // Only a queue that runs claims the files: a late wake of a ring the frontend stopped
        // must not take them back from the process they were just handed to.
        self.check_writer();
        if !self.pop_all() {
            self.reap(true);
            return;
        }
        // One system call for the whole kick's batch; completions that the kernel finished
        // inline (page-cache hits) are reaped right away rather than on the next wakeup.
        self.reap(true);
        self.poll(window);
    }

    /// The engine's notifier fired: some queued I/O is over.
    pub fn engine_event(&self) {
        self.s.engine(self.q).clear_notifier();
        if self.reap(false) == 0 {
            return;
        }
        QueueStats::inc(&self.stats.wakeups);
        // The guest got buffers back and is about to send more: the same reason to poll as
        // after a kick (and, for `auto`, the same measure of how soon work came).
        let window = self.window.woke();
        if self.ctl.phase() == Phase::Running {
            self.poll(window);
        }
    }

    /// Polling (`--poll-us`): keeps watching the ring (guest notifications off, so it need
    /// not kick) and the engine's completions until nothing has happened for `window`, then
    /// goes back to sleeping on the kick eventfd. Trades CPU time for the wakeups it saves.
    /// With `auto`, work found after a quiet spell adapts the window as it goes, and the
    /// quiet spell that ends the loop is where the next wakeup's gap counts from.
    fn poll(&self, mut window: Duration) {
        if window.is_zero() {
            self.window.went_idle();
            return;
        }
        let _ = self.vring.disable_notification();
        self.log_used_ring();
        // When the ring last went idle: the clock is read on idle rounds only, not on each
        // busy one (under load those reads showed in profiles).
        let mut idle_since: Option<Instant> = None;
        loop {
            let (popped, running) = self.pop_available();
            let popped = popped + self.start_parked();
            let reaped = self.reap(popped > 0);
            // The frontend may take the ring away, or a quiesce begin, while we spin.
            let ready = self.vring.get_ref().get_queue().ready() && !self.s.dev.is_quiesced();
            if !running || !ready {
                self.window.went_idle();
                break;
            }
            if popped + reaped > 0 {
                if idle_since.take().is_some() {
                    QueueStats::inc(&self.stats.poll_hits);
                    window = self.window.work_at(Instant::now());
                }
            } else {
                let since = *idle_since.get_or_insert_with(|| {
                    let now = Instant::now();
                    self.window.idle_from(now);
                    now
                });
                if since.elapsed() >= window {
                    break;
                }
            }
            std::hint::spin_loop();
        }
        // Notifications back on, and whatever slipped in before they were is taken now. (Such
        // a late request leaves the next gap counted from before it: at worst one shrink.)
        if self.pop_all() {
            self.reap(true);
        }
    }

    /// Takes every available descriptor chain, with guest notifications off while it does;
    /// returns false when the queue stopped running meanwhile.
    fn pop_all(&self) -> bool {
        let mut empty_rounds = 0;
        loop {
            // The guest need not kick for what it adds while we are taking chains anyway.
            let _ = self.vring.disable_notification();
            let (popped, running) = self.pop_available();
            if !running {
                return false;
            }
            // Re-enabling notification tells us whether the guest added more meanwhile.
            let enabled = self.vring.enable_notification();
            self.log_used_ring();
            match enabled {
                // Once, that is a driver that added entries just now; twice in a row with
                // nothing taken, a ring whose entries cannot be taken: spinning on it would
                // burn this core forever.
                Ok(true) if popped == 0 && empty_rounds > 0 => {
                    if self.vring.get_ref().get_queue().ready() {
                        self.ctl.ring_broken();
                    }
                    return true;
                }
                Ok(true) => {
                    empty_rounds = if popped == 0 { empty_rounds + 1 } else { 0 };
                    continue;
                }
                Ok(false) => return true,
                Err(e) => {
                    warn!("queue {}: cannot re-enable notifications: {e}", self.q);
                    return true;
                }
            }
        }
    }

    /// Pops and starts every chain in the avail ring. Returns how many, and false when the
    /// queue is not running (stopping: the rest stays in the ring for whoever starts it again).
    fn pop_available(&self) -> (usize, bool) {
        let mut n = 0;
        let mut group = Group {
            done: Vec::new(),
            clock: Instant::now(),
        };
        let mut cursor = Cursor::default();
        let running = loop {
            let popped = match self.pop(group.clock, &mut cursor) {
                Pop::Popped(p) => p,
                Pop::Empty => break true,
                Pop::NotRunning => break false,
            };
            n += 1;
            // Fenced when the queue last looked; the files may have come back since (a
            // migration back: the other process yielded while this one waited for a kick).
            if self.s.fenced() && {
                self.check_writer();
                self.s.fenced()
            } {
                self.complete_group(&mut group);
                self.fail_fenced(popped);
                group.clock = Instant::now();
                continue;
            }
            let req = match popped.parsed {
                Ok(req) => req,
                Err(rej) => {
                    self.complete_group(&mut group);
                    self.reject(popped.head, rej);
                    group.clock = Instant::now();
                    self.stats
                        .latency
                        .record(group.clock.saturating_duration_since(popped.since));
                    continue;
                }
            };
            let job = Job {
                head: popped.head,
                req,
                mem: popped.mem,
                since: popped.since,
                writethrough: self.s.writethrough(),
            };
            if let Some(hold) = self.hold(&job.req) {
                self.park(job, hold, popped.run);
                continue;
            }
            self.start(job, &mut group, popped.guest_waiting);
        };
        self.complete_group(&mut group);
        (n, running)
    }

    /// Hands a job to the engine: done at once (it joins `group`, completed with it), queued,
    /// or run here on the blocking path (after `group` is completed: that may take a while).
    fn start(&self, job: Job, group: &mut Group, guest_waiting: bool) {
        let mut engine = self.s.engine(self.q);
        let blocking = match engine.start(job) {
            Started::Done(done) => {
                drop(engine);
                QueueStats::inc(&self.stats.ring_io);
                QueueStats::inc(&self.stats.ring_inline);
                group.done.push(self.outcome(done));
                if group.done.len() >= INLINE_GROUP || guest_waiting {
                    self.complete_group(group);
                }
                return;
            }
            Started::Queued => {
                QueueStats::inc(&self.stats.ring_io);
                // Large transfers: start them (and complete those the kernel finishes
                // inline) now rather than after the whole batch, so the guest gets its
                // first buffers back while we copy the rest.
                let big = engine.unsubmitted_bytes() >= EARLY_SUBMIT_BYTES;
                drop(engine);
                if big {
                    self.reap(true);
                }
                return;
            }
            Started::Redo(job) => {
                QueueStats::inc(&self.stats.ring_io);
                QueueStats::inc(&self.stats.ring_redone);
                job
            }
            Started::Blocking(job) => job,
        };
        // About to block: let the kernel start on what is queued first, and hand back
        // what is done.
        self.submit(&mut **engine);
        drop(engine);
        self.complete_group(group);
        let since = blocking.since;
        let done = self.s.dev.target.run(blocking);
        let c = self.outcome(done);
        self.ctl.complete(
            self.vring,
            &self.s.mem.memory(),
            self.s.dirty_log().as_deref(),
            c.head,
            c.status,
            c.used_len,
        );
        group.clock = Instant::now();
        self.stats
            .latency
            .record(group.clock.saturating_duration_since(since));
    }

    /// Whether the block stack says `req` must wait before it starts (a delay or hang fault).
    fn hold(&self, req: &Request) -> Option<Hold> {
        let stack = &self.s.dev.target.stack;
        let (kind, ranged) = match req.kind {
            RequestType::In => return stack.hold(IoKind::Read, req.offset(), req.data_len),
            RequestType::Out => return stack.hold(IoKind::Write, req.offset(), req.data_len),
            RequestType::Flush => return stack.hold(IoKind::Flush, 0, 0),
            RequestType::GetId => return None,
            RequestType::Discard => (IoKind::Discard, &req.ranges),
            RequestType::WriteZeroes => (IoKind::WriteZeroes, &req.ranges),
        };
        ranged
            .iter()
            .find_map(|r| stack.hold(kind, r.offset(), r.len()))
    }

    /// Sets an accepted job aside until its hold is over; it stays in flight meanwhile.
    fn park(&self, job: Job, hold: Hold, run: u64) {
        if let Hold::Released(ticket) = &hold {
            // Weak: a latch that outlives the session (the fault stays) must not keep its
            // eventfd open.
            let wake = self.s.wakes.get(self.q).map(Arc::downgrade);
            let q = self.q;
            ticket.latch().on_release(Box::new(move || {
                if let Some(w) = wake.as_ref().and_then(|w| w.upgrade()) {
                    if let Err(e) = w.write(1) {
                        warn!("queue {q}: cannot wake its thread for released requests: {e}");
                    }
                }
            }));
        }
        debug!(
            "queue {}: {} at sector {} held by a fault",
            self.q,
            job.req.kind.name(),
            job.req.sector
        );
        self.parking.park(Parked { job, run, hold });
    }

    /// Starts the parked jobs that are due or released, as fresh ones (without asking the
    /// stack to hold them again). One a drain gave up on is dropped: the drain completed it.
    /// Returns how many left the list.
    pub fn start_parked(&self) -> usize {
        // Called on every wakeup and every polling round: nothing parked costs one atomic
        // load, not a clock read.
        if self.parking.is_empty() {
            return 0;
        }
        let ready = self.parking.take_ready(Instant::now());
        let n = ready.len();
        for Parked { job, run, hold } in ready {
            // The request is no longer held: out of its latch's count.
            drop(hold);
            if !self.ctl.holds_in(job.head, run) {
                continue;
            }
            // Its latency counts from when it was popped, the wait included.
            let mut group = Group {
                done: Vec::new(),
                clock: job.since,
            };
            self.start(job, &mut group, true);
            self.complete_group(&mut group);
        }
        if n > 0 {
            self.reap(true);
        }
        n
    }

    /// Completes a group of requests done at once, with one used-ring update and one signal.
    fn complete_group(&self, group: &mut Group) {
        if group.done.is_empty() {
            return;
        }
        self.ctl.complete_many(
            self.vring,
            &self.s.mem.memory(),
            self.s.dirty_log().as_deref(),
            &group.done,
        );
        let now = Instant::now();
        let took = now.saturating_duration_since(group.clock);
        for _ in 0..group.done.len() {
            self.stats.latency.record(took);
        }
        group.clock = now;
        group.done.clear();
    }

    fn submit(&self, engine: &mut dyn Engine) {
        if let Err(err) = engine.submit() {
            // The requests stay queued; the next kick or completion retries.
            error!("queue {}: submitting queued I/O failed: {err}", self.q);
        }
    }

    /// Submits what is queued (when `submit`) and completes every request whose queued I/O is
    /// over. Returns how many were.
    fn reap(&self, submit: bool) -> usize {
        let mut reaped = Vec::new();
        {
            let mut engine = self.s.engine(self.q);
            if submit {
                self.submit(&mut **engine);
            }
            engine.reap(&mut reaped);
        }
        if reaped.is_empty() {
            return 0;
        }
        let n = reaped.len();
        let mut completions = Vec::with_capacity(n);
        let mut since = Vec::with_capacity(n);
        for r in reaped {
            let done = match r {
                Reaped::Done(done) => done,
                Reaped::Redo(job) => {
                    if !self.ctl.holds(job.head) {
                        // A drain gave up on it and completed it already: doing it again now
                        // could land after whatever the guest wrote since it saw the error.
                        continue;
                    }
                    QueueStats::inc(&self.stats.ring_redone);
                    self.s.dev.target.run(job)
                }
            };
            since.push(done.job.since);
            completions.push(self.outcome(done));
        }
        // One used-ring update and one interrupt for the whole batch.
        self.ctl.complete_many(
            self.vring,
            &self.s.mem.memory(),
            self.s.dirty_log().as_deref(),
            &completions,
        );
        for t in since {
            self.stats.latency.record(t.elapsed());
        }
        n
    }

    /// Pops one chain, with a view of guest memory loaded after the chain was seen available
    /// (so it holds every region the frontend added before); the request keeps that view.
    /// Chains a crashed predecessor left in flight (INFLIGHT_SHMFD) come first, in the order
    /// it took them; a chain taken from the avail ring is marked in the inflight region before
    /// anything else happens to it.
    fn pop(&self, now: Instant, cursor: &mut Cursor) -> Pop<Popped> {
        let q = self.q;
        let limits = self.s.dev.limits();
        let mem = &self.s.mem;
        self.ctl.pop(self.vring, |state, run| {
            if !state.get_queue().ready() || state.get_queue().avail_ring() == 0 {
                // A ring stopped or reset and not set up again has nothing to take (the check
                // virtio-queue's iterator makes).
                return None;
            }
            if let Some(head) = state.resubmit.pop_front() {
                let queue = state.get_queue();
                let view = mem.memory();
                let table =
                    TableMap::new(view.clone(), GuestAddress(queue.desc_table()), queue.size());
                let parsed = request::parse(table.chain(head), &view, &limits);
                return Some(popped(head, parsed, now, view, false, run));
            }
            let queue = state.get_queue_mut();
            let next = Wrapping(queue.next_avail());
            let view = match cursor.ahead(run, next) {
                Some(view) => view,
                None => {
                    // See an entry first, then load the memory table. A load that began
                    // before the frontend added a region may linearise before that change
                    // even if it returns after it (ArcSwap); a load that begins after we
                    // saw an entry the frontend made available once the region was
                    // acknowledged cannot miss it, nor any entry before that one.
                    let avail = queue.avail_idx(&*mem.memory(), Ordering::Acquire).ok()?;
                    // More entries than the ring holds: a broken driver; take nothing (as
                    // virtio-queue's iterator does) rather than process entries twice.
                    if avail == next || (avail - next).0 > queue.size() {
                        return None;
                    }
                    cursor.saw(run, avail, next, mem.memory())
                }
            };
            let guest_waiting = queue.event_idx_enabled()
                && used_event(queue, &view) == Some(Wrapping(queue.next_used()));
            let head = avail_entry(queue, &view, next)?;
            let table = cursor.table(GuestAddress(queue.desc_table()), queue.size())?;
            let parsed = request::parse(table.chain(head), &view, &limits);
            queue.set_next_avail(next.0.wrapping_add(1));
            cursor.took(next);
            if let Some(i) = &mut state.inflight {
                tracked(i.begin(head), q);
            }
            Some(popped(head, parsed, now, view, guest_waiting, run))
        })
    }

    /// Completes a chain the parser refused: IOERR or UNSUPP in its status byte when it has
    /// one, else just its used entry.
    fn reject(&self, head: u16, rej: Rejected) {
        self.stats.count_rejected(&rej);
        debug!(
            "queue {}: rejected descriptor {head}: {}",
            self.q, rej.error
        );
        let status = rej.status_addr.map(|a| (a, rej.error.status()));
        let used_len = u32::from(status.is_some());
        self.ctl.complete(
            self.vring,
            &self.s.mem.memory(),
            self.s.dirty_log().as_deref(),
            head,
            status,
            used_len,
        );
    }

    /// Makes sure this process may write the image before its queue runs (a migration may have
    /// handed it to another process); when it may not, the session fails requests with IOERR
    /// (said once) rather than leave them waiting for a disk this process no longer owns.
    fn check_writer(&self) {
        match self.s.dev.claim_writer() {
            Ok(()) => self.s.set_fenced(None),
            Err(e) => self.s.set_fenced(Some(e.to_string())),
        }
    }

    /// Completes a request of a session that may not write the image: IOERR, no I/O.
    fn fail_fenced(&self, popped: Popped) {
        let (status, kind, len) = match &popped.parsed {
            Ok(r) => (Some(r.status_addr), Some(r.kind), r.data_len),
            Err(rej) => (rej.status_addr, rej.kind, 0),
        };
        match kind {
            Some(kind) => self.stats.count(kind, len, false),
            None => QueueStats::inc(&self.stats.errors),
        }
        self.ctl.complete(
            self.vring,
            &self.s.mem.memory(),
            self.s.dirty_log().as_deref(),
            popped.head,
            status.map(|a| (a, Status::IoErr)),
            u32::from(status.is_some()),
        );
    }

    /// While a migration runs: the device changed the used ring's notification fields.
    fn log_used_ring(&self) {
        if let Some(log) = self.s.dirty_log() {
            log_used_ring(&self.vring.get_ref(), &log);
        }
    }

    /// Counts (and logs, when it failed) a request's outcome, and what completes it.
    fn outcome(&self, done: Done) -> Completion {
        let Done { job, result } = done;
        let req = &job.req;
        if matches!(req.kind, RequestType::In | RequestType::GetId) {
            // The device wrote these guest pages (read data, the serial; part of them even
            // when the request failed): a migration must carry them.
            if let Some(log) = self.s.dirty_log() {
                for seg in req.data.iter() {
                    log.mark(seg.addr.0, u64::from(seg.len));
                }
            }
        }
        self.stats.count(req.kind, req.data_len, result.is_ok());
        let (status, used_len) = match result {
            Ok(n) => (Status::Ok, n + 1),
            Err(e) => {
                warn!(
                    "queue {}: {} at sector {} ({} bytes) failed: {e}",
                    self.q,
                    req.kind.name(),
                    req.sector,
                    req.data_len
                );
                (Status::IoErr, 1)
            }
        };
        Completion {
            head: job.head,
            status: Some((req.status_addr, status)),
            used_len,
        }
    }
}

/// A popped chain and its entry in the in-flight table.
fn popped(
    head: u16,
    parsed: Result<Request, Rejected>,
    now: Instant,
    mem: GuestMemView,
    guest_waiting: bool,
    run: u64,
) -> (Popped, InflightReq) {
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
        run,
    };
    (popped, entry)
}

/// The head of the chain in avail ring slot `at`.
fn avail_entry(queue: &impl QueueT, mem: &GuestMem, at: Wrapping<u16>) -> Option<u16> {
    avail_u16(queue, mem, u64::from(at.0.checked_rem(queue.size())?))
}
