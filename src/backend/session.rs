//! One frontend session's state on top of the process-wide [`Device`]: its memory table, its
//! rings, each queue's in-flight accounting, engine and worker thread, the guest's cache mode,
//! and the dirty log while a migration runs. Each queue has its own [`QueueCtl`], engine and
//! thread, so the I/O path shares no lock between queues.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use log::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::Device;
use super::inflight::{DrainReport, Gm, Phase, QueueCtl};
use super::parked::Parking;
use super::polling::PollWindow;
use super::vring::Vring;
use super::worker::Worker;
use crate::io::Engine;
use crate::stats::QueueStats;
use crate::virtio::ring::dirty_log::DirtyLog;

/// What woke a queue's thread (the epoll token).
const TOKEN_WAKE: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_ENGINE: u64 = 2;

pub struct Session {
    pub(super) dev: Arc<Device>,
    pub(super) mem: Gm,
    pub(super) queues: Vec<QueueCtl>,
    pub(super) vrings: Vec<Vring>,
    /// CONFIG_WCE: the guest may switch the cache to writethrough; a new session starts in
    /// writeback, as a fresh device would.
    pub(super) writeback: AtomicBool,
    pub(super) wce_acked: AtomicBool,
    /// Each queue's engine. Only the queue's worker takes the lock, except a drain that
    /// cancels what it gave up on.
    engines: Vec<Mutex<Box<dyn Engine>>>,
    /// Each queue thread's event loop: its wake eventfd, the ring's kick fd, the engine's
    /// notifier. A wake eventfd is shared with the wakers of the latches its queue's held
    /// requests wait behind.
    polls: Vec<Epoll>,
    pub(super) wakes: Vec<Arc<EventFd>>,
    /// Each queue's requests that wait before they start (delay and hang faults).
    pub(super) parked: Vec<Parking>,
    /// Each queue's polling window (`--poll-us`), which its worker adapts.
    pub(super) windows: Vec<PollWindow>,
    /// The threads are to end (the session is over).
    exit: AtomicBool,
    /// The dirty log (SET_LOG_BASE), and whether the frontend turned logging on (LOG_ALL).
    pub(super) log: ArcSwapOption<DirtyLog>,
    pub(super) logging: AtomicBool,
    /// This process may not write the image (another took it over): requests fail.
    fenced: AtomicBool,
}

impl Session {
    pub fn new(dev: Arc<Device>, mem: Gm) -> io::Result<Session> {
        let n = usize::from(dev.cfg.num_queues);
        let engines = (0..n)
            .map(|q| Mutex::new(dev.cfg.engine.build(&dev.target, q, dev.cfg.queue_size)))
            .collect();
        let vrings = (0..n)
            .map(|_| Vring::new(mem.clone(), dev.cfg.queue_size))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::other(format!("cannot set up a virtqueue: {e}")))?;
        let mut polls = Vec::with_capacity(n);
        let mut wakes = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Epoll::new()?;
            let wake = EventFd::new(EFD_NONBLOCK)?;
            watch(&poll, wake.as_raw_fd(), TOKEN_WAKE)?;
            polls.push(poll);
            wakes.push(Arc::new(wake));
        }
        let windows = (0..n).map(|_| PollWindow::new(dev.cfg.poll)).collect();
        let s = Session {
            queues: (0..n).map(QueueCtl::new).collect(),
            vrings,
            dev,
            mem,
            writeback: AtomicBool::new(true),
            wce_acked: AtomicBool::new(false),
            engines,
            polls,
            wakes,
            windows,
            parked: (0..n).map(|_| Parking::default()).collect(),
            exit: AtomicBool::new(false),
            log: ArcSwapOption::empty(),
            logging: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
        };
        for q in 0..n {
            if let Some(fd) = s.engine(q).notifier() {
                watch(&s.polls[q], fd, TOKEN_ENGINE)?;
            }
        }
        Ok(s)
    }

    /// Starts one thread per queue. They run until [`Session::stop_threads`]. When one cannot
    /// be started, those that were are ended again: nothing is left holding the session.
    pub fn spawn_threads(self: &Arc<Self>) -> io::Result<Vec<JoinHandle<()>>> {
        let mut threads = Vec::with_capacity(self.queues.len());
        for q in 0..self.queues.len() {
            let s = self.clone();
            match std::thread::Builder::new()
                .name(format!("queue{q}"))
                .spawn(move || s.run(q))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.stop_threads();
                    threads.into_iter().for_each(|t| drop(t.join()));
                    return Err(e);
                }
            }
        }
        Ok(threads)
    }

    /// Asks every queue thread to end (after its current event).
    pub fn stop_threads(&self) {
        self.exit.store(true, Ordering::Release);
        for q in 0..self.wakes.len() {
            self.wake(q);
        }
    }

    /// Queue `q`'s thread: waits for a kick, a wake-up, engine completions or the earliest
    /// parked request's deadline, hands each event to the queue's worker, and starts the
    /// parked requests that are due or released.
    fn run(&self, q: usize) {
        crate::sandbox::enter(crate::sandbox::Role::Worker);
        let mut events = [EpollEvent::default(); 4];
        let (Some(worker), Some(parked)) = (Worker::new(self, q), self.parked.get(q)) else {
            return;
        };
        loop {
            // -1 (no deadline) unless something is parked: the usual path reads one atomic,
            // not the clock.
            let timeout = if parked.is_empty() {
                -1
            } else {
                parked.timeout_ms(Instant::now())
            };
            let n = match self.polls[q].wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Nothing to wait on any more: the queue could never complete anything.
                    error!("queue {q}: waiting for events failed: {e}; the queue stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.wakes[q].read();
                        if self.exit.load(Ordering::Acquire) {
                            return;
                        }
                        worker.kicked();
                    }
                    TOKEN_KICK => {
                        self.vrings[q].get_ref().consume_kick();
                        worker.kicked();
                    }
                    _ => worker.engine_event(),
                }
            }
            worker.start_parked();
        }
    }

    /// Makes queue `q`'s thread look at its ring (as a kick would).
    pub fn wake(&self, q: usize) {
        if let Some(w) = self.wakes.get(q) {
            if let Err(e) = w.write(1) {
                warn!("queue {q}: cannot wake its thread: {e}");
            }
        }
    }

    /// Moves queue `q`'s kick fd watch from `old` to `new` (either may be absent).
    pub(super) fn rewatch_kick(&self, q: usize, old: Option<RawFd>, new: Option<RawFd>) {
        let Some(poll) = self.polls.get(q) else {
            return;
        };
        if let Some(fd) = old {
            let _ = poll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if let Some(fd) = new {
            if let Err(e) = watch(poll, fd, TOKEN_KICK) {
                error!("queue {q}: cannot watch the new kick fd: {e}");
            }
        }
    }

    /// Queue `q`'s engine (`q` is below the number of queues).
    pub(super) fn engine(&self, q: usize) -> MutexGuard<'_, Box<dyn Engine>> {
        // A worker that panicked left the engine as consistent as any reap leaves it.
        self.engines[q].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the guest's cache is in writethrough mode.
    pub(super) fn writethrough(&self) -> bool {
        !self.writeback.load(Ordering::Relaxed)
    }

    /// The dirty log, while the frontend asks for pages to be logged (a migration runs).
    pub(super) fn dirty_log(&self) -> Option<Arc<DirtyLog>> {
        if !self.logging.load(Ordering::Acquire) {
            return None;
        }
        self.log.load_full()
    }

    /// Whether requests must fail because this process may not write the image.
    pub(super) fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Records whether this process may write the image (`why` not, when it may not); says so
    /// in the log when that changes.
    pub(super) fn set_fenced(&self, why: Option<String>) {
        let on = why.is_some();
        if self.fenced.swap(on, Ordering::AcqRel) != on {
            match why {
                Some(why) => error!("{why}; this frontend's requests fail with IOERR until this process may write the image again"),
                None => log::info!("this process may write the image again; requests are served"),
            }
        }
    }

    /// Whether written guest pages are being logged now.
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Acquire) && self.log.load().is_some()
    }

    /// Whether the frontend gave an INFLIGHT_SHMFD region that rings record their requests in.
    pub fn inflight_tracking(&self) -> bool {
        self.vrings.iter().any(|v| v.get_ref().inflight.is_some())
    }

    /// Requests accepted and not yet completed, over all queues.
    pub fn inflight(&self) -> usize {
        self.queues.iter().map(QueueCtl::inflight).sum()
    }

    /// How long queue `q`'s worker polls after its next work (`None`: no such queue).
    pub fn poll_window(&self, q: usize) -> Option<std::time::Duration> {
        self.windows.get(q).map(PollWindow::window)
    }

    /// Requests accepted and not yet completed on queue `q`.
    pub fn queue_inflight(&self, q: usize) -> usize {
        self.queues.get(q).map_or(0, QueueCtl::inflight)
    }

    #[cfg(test)]
    pub fn phases(&self) -> Vec<Phase> {
        self.queues.iter().map(QueueCtl::phase).collect()
    }

    /// Drains every queue (concurrently: the deadline is one bound for all of them, not one
    /// per queue) and leaves them in `until`.
    pub fn drain_all(&self, until: Phase) -> DrainReport {
        let timeout = self.dev.cfg.drain_timeout;
        let log = self.dirty_log();
        let log = log.as_deref();
        let start = Instant::now();
        let reports: Vec<DrainReport> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .queues
                .iter()
                .zip(&self.vrings)
                .map(|(q, v)| s.spawn(move || q.drain(v, &self.mem, log, until, timeout)))
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

    /// Drains queue `q` (the frontend stopped or changed its ring) and leaves it stopped.
    pub fn drain_queue(&self, q: usize) -> Option<DrainReport> {
        let ctl = self.queues.get(q)?;
        let report = ctl.drain(
            &self.vrings[q],
            &self.mem,
            self.dirty_log().as_deref(),
            Phase::Stopped,
            self.dev.cfg.drain_timeout,
        );
        self.record_drain(q, &report);
        Some(report)
    }

    /// Requests a drain gave up on count as errors of their queue, and what the engine still
    /// holds for them is of no use to anyone now.
    fn record_drain(&self, q: usize, report: &DrainReport) {
        let stats = self.dev.stats.queue(q);
        let n = report.abandoned.len() as u64;
        QueueStats::add(&stats.abandoned, n);
        QueueStats::add(&stats.errors, n);
        if n > 0 {
            self.engine(q).cancel_all();
            // Completed by the drain: what of them waits to start never will.
            if let Some(p) = self.parked.get(q) {
                p.clear();
            }
        }
    }

    /// Makes every queue's worker look at its ring again (after a resume): a kick that came
    /// while the queue was quiesced was consumed without popping anything.
    pub fn poke(&self) {
        for q in 0..self.queues.len() {
            self.wake(q);
        }
    }

    /// Whether every queue is stopped (none runs or drains).
    pub fn all_stopped(&self) -> bool {
        self.queues.iter().all(QueueCtl::is_stopped)
    }

    /// Whether any drain of this session gave up on a request (so a worker may still be
    /// inside it, and joining the workers could wait as long as that request takes).
    pub fn abandoned_any(&self) -> bool {
        self.queues.iter().any(QueueCtl::gave_up)
    }
}

fn watch(poll: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    poll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}
