//! One frontend session's state on top of the process-wide [`Device`]: its memory table, each
//! queue's in-flight accounting and engine, and the guest's cache mode. Each queue has its own
//! [`QueueCtl`] and engine, so the I/O path shares no lock between queues.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::device::Device;
use super::inflight::{DrainReport, Gm, Phase, QueueCtl};
use crate::io::Engine;
use crate::stats::QueueStats;

pub struct Session {
    pub(super) dev: Arc<Device>,
    pub(super) mem: Gm,
    pub(super) queues: Vec<QueueCtl>,
    /// CONFIG_WCE: the guest may switch the cache to writethrough; a new session starts in
    /// writeback, as a fresh device would.
    pub(super) writeback: AtomicBool,
    pub(super) wce_acked: AtomicBool,
    /// Each queue's engine. Only the queue's worker takes the lock, except a drain that
    /// cancels what it gave up on.
    engines: Vec<Mutex<Box<dyn Engine>>>,
}

/// The epoll token of a queue's engine notifier in its worker's loop (the vhost-user-backend
/// crate reserves `0..=num_queues`; with one queue per worker the same token serves every
/// worker).
pub(super) fn engine_token(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

impl Session {
    pub fn new(dev: Arc<Device>, mem: Gm) -> Session {
        let n = usize::from(dev.cfg.num_queues);
        let engines = (0..n)
            .map(|q| Mutex::new(dev.cfg.engine.build(&dev.target, q, dev.cfg.queue_size)))
            .collect();
        Session {
            queues: (0..n).map(QueueCtl::new).collect(),
            dev,
            mem,
            writeback: AtomicBool::new(true),
            wce_acked: AtomicBool::new(false),
            engines,
        }
    }

    /// Queue `q`'s engine (`q` is below the number of queues).
    pub(super) fn engine(&self, q: usize) -> MutexGuard<'_, Box<dyn Engine>> {
        // A worker that panicked left the engine as consistent as any reap leaves it.
        self.engines[q].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The notifiers the workers must watch for engine completions, by queue, with the epoll
    /// token the workers know them by.
    pub fn engine_fds(&self) -> Vec<(usize, RawFd, u64)> {
        let token = engine_token(self.queues.len());
        (0..self.engines.len())
            .filter_map(|q| self.engine(q).notifier().map(|fd| (q, fd, token)))
            .collect()
    }

    /// Whether the guest's cache is in writethrough mode.
    pub(super) fn writethrough(&self) -> bool {
        !self.writeback.load(Ordering::Relaxed)
    }

    /// Requests accepted and not yet completed, over all queues.
    pub fn inflight(&self) -> usize {
        self.queues.iter().map(QueueCtl::inflight).sum()
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
        let start = Instant::now();
        let reports: Vec<DrainReport> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .queues
                .iter()
                .map(|q| s.spawn(move || q.drain(&self.mem, until, timeout)))
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

    /// Drains queue `q` (the frontend stopped its ring) and leaves it stopped.
    pub fn drain_queue(&self, q: usize) -> Option<DrainReport> {
        let ctl = self.queues.get(q)?;
        let report = ctl.drain(&self.mem, Phase::Stopped, self.dev.cfg.drain_timeout);
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
        }
    }

    /// Makes every queue's worker look at its ring again (after a resume): a kick that came
    /// while the queue was quiesced was consumed without popping anything.
    pub fn poke(&self) {
        for q in &self.queues {
            q.poke();
        }
    }

    /// Whether any drain of this session gave up on a request (so a worker may still be
    /// inside it, and joining the workers could wait as long as that request takes).
    pub fn abandoned_any(&self) -> bool {
        self.queues.iter().any(QueueCtl::gave_up)
    }
}
