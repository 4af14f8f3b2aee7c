//! The drain contract: which requests a queue has accepted and not yet completed, and the
//! state machine `running -> stopping -> stopped` that every way of stopping a queue goes
//! through.
//!
//! A chain is registered in the same critical section (vring lock, then this queue's lock) in
//! which it is popped, and only while the queue is running. So once a drain has moved the queue
//! to `stopping`, nothing new is popped, and everything popped before is in the table. An entry
//! leaves the table only after its status byte and used entry are written and the guest has
//! been signalled. A drain that runs past its deadline completes what is left itself (IOERR),
//! under the vring lock; a worker that later finishes such a request finds its entry gone and
//! does not complete it a second time.

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, warn};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::vring::{Vring, VringState};
use crate::virtio::ring::dirty_log::DirtyLog;
use crate::virtio::ring::guest;
use crate::virtio::ring::inflight::InflightError;
use crate::virtio::ring::used::{needs_notification, UsedBatch};
use crate::virtio::GuestMem;
use crate::virtio::Status;

pub type Gm = GuestMemoryAtomic<GuestMem>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Descriptors are popped.
    Running,
    /// A drain is waiting for in-flight requests; nothing is popped.
    Stopping,
    /// The frontend stopped the ring (GET_VRING_BASE) or reset the device; the next kick on a
    /// ready ring starts it again.
    Stopped,
    /// The connection is going away; the queue never runs again.
    Closed,
}

/// What a drain remembers of a request, to name it if it gets stuck.
#[derive(Debug, Clone)]
pub struct InflightReq {
    pub head: u16,
    pub kind: &'static str,
    pub sector: u64,
    pub len: u64,
    pub since: Instant,
    pub status_addr: Option<GuestAddress>,
}

#[derive(Debug, Clone, Default)]
pub struct DrainReport {
    /// Requests that were in flight when the drain began.
    pub waited_for: usize,
    /// Requests still in flight at the deadline, completed with IOERR by the drain.
    pub abandoned: Vec<InflightReq>,
    pub duration: Duration,
}

impl DrainReport {
    /// Says in the log what the drain on `why` did: an error when it gave up on requests
    /// (each was named when it was given up on), else a line of information.
    pub fn log(&self, why: &str) {
        if self.abandoned.is_empty() {
            log::info!(
                "drain on {why}: waited for {} requests, {:?}",
                self.waited_for,
                self.duration
            );
        } else {
            log::error!(
                "drain on {why}: gave up on {} of {} requests after {:?} (completed with IOERR)",
                self.abandoned.len(),
                self.waited_for,
                self.duration
            );
        }
    }
}

struct Inner {
    phase: Phase,
    /// How many times the queue started running: what a worker learned of the ring in one
    /// run (its avail index, the memory table) does not carry into the next.
    runs: u64,
    inflight: Table,
}

/// In-flight requests by head descriptor index: a slot per index (heads are below the queue
/// size), so the I/O path neither hashes nor allocates once the queue has been used.
#[derive(Default)]
struct Table {
    slots: Vec<Option<InflightReq>>,
    len: usize,
}

impl Table {
    fn insert(&mut self, head: u16, req: InflightReq) {
        let i = usize::from(head);
        if i >= self.slots.len() {
            self.slots.resize(i + 1, None);
        }
        if self.slots[i].replace(req).is_none() {
            self.len += 1;
        }
    }

    fn contains_key(&self, head: &u16) -> bool {
        matches!(self.slots.get(usize::from(*head)), Some(Some(_)))
    }

    fn remove(&mut self, head: &u16) -> Option<InflightReq> {
        let r = self.slots.get_mut(usize::from(*head))?.take();
        if r.is_some() {
            self.len -= 1;
        }
        r
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn drain(&mut self) -> impl Iterator<Item = (u16, InflightReq)> + '_ {
        self.len = 0;
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.take().map(|r| (i as u16, r)))
    }
}

/// One request's completion, for [`QueueCtl::complete_many`].
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub head: u16,
    pub status: Option<(GuestAddress, Status)>,
    pub used_len: u32,
}

pub enum Pop<T> {
    Popped(T),
    Empty,
    NotRunning,
}

pub struct QueueCtl {
    index: usize,
    inner: Mutex<Inner>,
    drained: Condvar,
    /// A drain gave up on a request of this queue: its worker may still be stuck in it. Set
    /// before the stuck requests are completed, so whoever sees their completion (the frontend,
    /// then the teardown it triggers) also sees this.
    gave_up: AtomicBool,
    /// The driver's avail ring was found broken (see [`QueueCtl::ring_broken`]); said once.
    ring_broken_said: AtomicBool,
}

impl QueueCtl {
    /// The avail ring announces entries that cannot be taken (an index more than a ring's
    /// worth ahead, an unreadable entry): a driver bug no retry fixes. Logs it once per queue,
    /// so a driver that keeps kicking does not flood the log.
    pub fn ring_broken(&self) {
        if !self.ring_broken_said.swap(true, Ordering::Relaxed) {
            error!(
                "queue {}: the driver's avail ring announces entries that cannot be taken (index out of range or unreadable); the queue is stalled until the driver resets it",
                self.index
            );
        }
    }

    pub fn new(index: usize) -> QueueCtl {
        QueueCtl {
            index,
            inner: Mutex::new(Inner {
                phase: Phase::Stopped,
                runs: 0,
                inflight: Table::default(),
            }),
            drained: Condvar::new(),
            gave_up: AtomicBool::new(false),
            ring_broken_said: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a worker panicked; the table itself is still consistent
        // (every mutation is a single insert or remove), so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Whether a drain ever gave up on a request of this queue, so its worker may still be
    /// stuck in it (and joining the worker could take as long as that request).
    pub fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
    }

    pub fn inflight(&self) -> usize {
        self.lock().inflight.len()
    }

    /// Whether the queue is stopped or closed: no descriptor is taken, none is in flight.
    pub fn is_stopped(&self) -> bool {
        let inner = self.lock();
        matches!(inner.phase, Phase::Stopped | Phase::Closed) && inner.inflight.is_empty()
    }

    /// Called by the worker on each kick. A stopped queue whose ring the frontend has made
    /// ready again starts running (unless `may_run` says no: the device is quiesced); a
    /// stopping or closed one stays as it is.
    ///
    /// Both conditions are read inside the critical section, not before it: a stop
    /// (GET_VRING_BASE makes the ring not ready, then drains; quiesce sets its flag, then
    /// drains) that completed between a worker's look at them and this call would otherwise
    /// be undone, and the worker would pop descriptors after the stop had returned.
    pub fn start_if_ready(&self, vring: &Vring, may_run: impl FnOnce() -> bool) -> bool {
        // Lock order: vring, then table. Holding the vring lock keeps the ready flag as read.
        let state = vring.get_ref();
        let mut inner = self.lock();
        if inner.phase == Phase::Stopped && state.get_queue().ready() && may_run() {
            inner.phase = Phase::Running;
            inner.runs += 1;
        }
        inner.phase == Phase::Running
    }

    /// Pops one chain if the queue is running: `take` gets the ring and the number of the
    /// current run (see `Inner::runs`), and turns the next chain into the worker's request and
    /// its description for the in-flight table, inside the critical section.
    pub fn pop<T>(
        &self,
        vring: &Vring,
        take: impl FnOnce(&mut VringState, u64) -> Option<(T, InflightReq)>,
    ) -> Pop<T> {
        let mut state = vring.get_mut();
        let mut inner = self.lock();
        if inner.phase != Phase::Running {
            return Pop::NotRunning;
        }
        let Some((item, req)) = take(&mut state, inner.runs) else {
            return Pop::Empty;
        };
        inner.inflight.insert(req.head, req);
        Pop::Popped(item)
    }

    /// Whether request `head` is still in flight (a drain may have completed it already).
    pub fn holds(&self, head: u16) -> bool {
        self.lock().inflight.contains_key(&head)
    }

    /// Whether request `head` popped in run `run` is still in flight: the queue has not been
    /// stopped and started again since (which would make `head` another request), and no drain
    /// completed it.
    pub fn holds_in(&self, head: u16, run: u64) -> bool {
        let inner = self.lock();
        inner.runs == run && inner.inflight.contains_key(&head)
    }

    /// Completes a request: status byte, used entry, signal, then it leaves the table. Returns
    /// false if a drain already completed it.
    pub fn complete(
        &self,
        vring: &Vring,
        mem: &GuestMem,
        log: Option<&DirtyLog>,
        head: u16,
        status: Option<(GuestAddress, Status)>,
        used_len: u32,
    ) -> bool {
        let one = Completion {
            head,
            status,
            used_len,
        };
        self.complete_many(vring, mem, log, std::slice::from_ref(&one)) == 1
    }

    /// Completes a batch of requests with one signal to the guest: each status byte and used
    /// entry is written, then the guest is signalled, and only then (the table's lock held
    /// throughout, so no drain looks in between) do they leave the table. Requests a drain
    /// already completed are skipped. Returns how many were completed. `mem` is a current
    /// memory table: the status bytes and the used ring are written through it. With a dirty
    /// `log`, every byte written is logged before the used index that reveals it.
    ///
    /// With an inflight region, the spec's order: each head joins the region's last batch,
    /// the used index is published in one store, then the heads are cleared and the region
    /// records the new index. A crash anywhere in between leaves a region whose last batch
    /// the next process can fix up.
    pub fn complete_many(
        &self,
        vring: &Vring,
        mem: &GuestMem,
        log: Option<&DirtyLog>,
        done: &[Completion],
    ) -> usize {
        if done.is_empty() {
            return 0;
        }
        let mut state = vring.get_mut();
        let mut inner = self.lock();
        let from = Wrapping(state.get_queue().next_used());
        // One translation of the used ring for the batch; virtio-queue's checked path for a
        // ring the batch does not cover (entry by entry, each its own inflight batch).
        let mut batch = UsedBatch::new(state.get_queue(), mem);
        let mut n = 0;
        for c in done {
            if !inner.inflight.contains_key(&c.head) {
                continue;
            }
            if let Some((addr, st)) = c.status {
                if !guest::store_u8(mem, addr, st as u8) {
                    // Checked at parse time; only a memory table change could get here.
                    warn!(
                        "queue {}: cannot write status byte at {:#x}: not guest memory",
                        self.index, addr.0
                    );
                }
                if let Some(log) = log {
                    log.mark(addr.0, 1);
                }
            }
            let added = match &mut batch {
                Some(b) => {
                    if let Some(i) = &mut state.inflight {
                        tracked(i.batch_add(c.head), self.index);
                    }
                    b.push(c.head, c.used_len)
                }
                None => add_used_one(&mut state, self.index, c.head, c.used_len),
            };
            if !added {
                error!(
                    "queue {}: cannot add used entry for descriptor {}",
                    self.index, c.head
                );
            }
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        if let Some(b) = batch {
            b.publish(state.get_queue_mut());
            let used = state.get_queue().next_used();
            if let Some(i) = &mut state.inflight {
                let heads = done
                    .iter()
                    .filter(|c| inner.inflight.contains_key(&c.head))
                    .map(|c| c.head);
                tracked(i.batch_done(heads, used), self.index);
            }
        }
        if let Some(log) = log {
            log_used_ring(&state, log);
        }
        let queue = state.get_queue();
        if needs_notification(queue, mem, from, Wrapping(queue.next_used())) {
            signal(&mut state, self.index);
        }
        for c in done {
            inner.inflight.remove(&c.head);
        }
        if inner.inflight.is_empty() && inner.phase != Phase::Running {
            self.drained.notify_all();
        }
        n
    }

    /// Stops taking descriptors and waits until every accepted request is complete, at most
    /// `timeout`; past it, completes the rest with IOERR. Leaves the queue in `until`
    /// (`Stopped` or `Closed`).
    pub fn drain(
        &self,
        vring: &Vring,
        mem: &Gm,
        log: Option<&DirtyLog>,
        until: Phase,
        timeout: Duration,
    ) -> DrainReport {
        let start = Instant::now();
        let mut inner = self.lock();
        if inner.phase == Phase::Running {
            inner.phase = Phase::Stopping;
        }
        let waited_for = inner.inflight.len();
        let (mut inner, wait) = self
            .drained
            .wait_timeout_while(inner, timeout, |i| !i.inflight.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        let mut abandoned = Vec::new();
        if wait.timed_out() && !inner.inflight.is_empty() {
            // Lock order is vring, then table: let go of the table first.
            drop(inner);
            abandoned = self.abandon(vring, mem, log);
            inner = self.lock();
        }
        if inner.phase != Phase::Closed {
            inner.phase = until;
        }
        DrainReport {
            waited_for,
            abandoned,
            duration: start.elapsed(),
        }
    }

    fn abandon(&self, vring: &Vring, mem: &Gm, log: Option<&DirtyLog>) -> Vec<InflightReq> {
        self.gave_up.store(true, Ordering::Release);
        let mem = mem.memory();
        let mut state = vring.get_mut();
        let stuck: Vec<InflightReq> = self.lock().inflight.drain().map(|(_, r)| r).collect();
        for r in &stuck {
            error!(
                "queue {}: {} of {} bytes at sector {} (descriptor {}) still in flight after {:?}; completing it with IOERR",
                self.index,
                r.kind,
                r.len,
                r.sector,
                r.head,
                r.since.elapsed()
            );
            let used = match r.status_addr {
                Some(addr) if mem.write_obj(Status::IoErr as u8, addr).is_ok() => {
                    if let Some(log) = log {
                        log.mark(addr.0, 1);
                    }
                    1
                }
                _ => 0,
            };
            if !add_used_one(&mut state, self.index, r.head, used) {
                error!(
                    "queue {}: cannot add used entry for descriptor {}",
                    self.index, r.head
                );
            }
        }
        if let Some(log) = log {
            log_used_ring(&state, log);
        }
        // Unconditionally: a rare path, and a spurious interrupt costs little where a lost one
        // hangs the guest.
        signal(&mut state, self.index);
        stuck
    }
}

/// Adds one used entry through virtio-queue's checked path; with an inflight region, as a
/// batch of one.
fn add_used_one(state: &mut VringState, index: usize, head: u16, len: u32) -> bool {
    if let Some(i) = &mut state.inflight {
        tracked(i.batch_add(head), index);
    }
    if state.add_used(head, len).is_err() {
        return false;
    }
    let used = state.get_queue().next_used();
    if let Some(i) = &mut state.inflight {
        tracked(i.batch_done([head], used), index);
    }
    true
}

/// Logs what the inflight region refused: a broken driver (a head made available twice) or
/// a region someone else wrote; the request itself goes on.
pub(super) fn tracked(r: Result<(), InflightError>, queue: usize) {
    if let Err(e) = r {
        warn!("queue {queue}: inflight tracking: {e}");
    }
}

/// Logs the whole used ring (flags, index, entries, `avail_event`): a few pages at most, and
/// every field of it the device writes.
pub fn log_used_ring(state: &VringState, log: &DirtyLog) {
    let queue = state.get_queue();
    let at = state.log_addr.unwrap_or(queue.used_ring());
    log.mark(at, 6 + 8 * u64::from(queue.size()));
}

fn signal(state: &mut VringState, index: usize) {
    if let Err(e) = state.signal_used_queue() {
        warn!("queue {index}: cannot signal the guest: {e}");
    }
}
