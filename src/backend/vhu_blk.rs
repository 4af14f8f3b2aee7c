//! The vhost-user glue: one `BlkBackend` per frontend connection, on top of the process-wide
//! [`Device`]. Each queue has its own worker thread (one bit per `queues_per_thread` entry) and
//! its own [`QueueCtl`], so the I/O path shares no lock between queues.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::Device;
use super::exec::{execute, ExecCtx};
use super::inflight::{DrainReport, Gm, InflightReq, Phase, Pop, QueueCtl, Vring};
use crate::stats::QueueStats;
use crate::virtio::config::WRITEBACK_OFFSET;
use crate::virtio::request::{self, GuestMem, Rejected, Request, RequestError, RequestType};
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
}

#[derive(Clone)]
pub struct BlkBackend {
    conn: Arc<Conn>,
}

impl BlkBackend {
    pub fn new(dev: Arc<Device>, mem: Gm) -> BlkBackend {
        let queues = (0..dev.cfg.num_queues as usize)
            .map(QueueCtl::new)
            .collect();
        BlkBackend {
            conn: Arc::new(Conn {
                dev,
                mem,
                queues,
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(true),
                wce_acked: AtomicBool::new(false),
            }),
        }
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
        let event_idx = conn.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            loop {
                match self.pop(ctl, vring) {
                    Pop::Popped((head, parsed, popped, mem)) => {
                        self.run(q, ctl, vring, &mem, head, parsed);
                        self.conn
                            .dev
                            .stats
                            .queue(q)
                            .latency
                            .record(popped.elapsed());
                    }
                    Pop::Empty => break,
                    // Stopping: leave the rest in the avail ring for whoever starts it again.
                    Pop::NotRunning => return,
                }
            }
            if !event_idx {
                break;
            }
            // Re-enabling notification tells us whether the guest added more meanwhile.
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("queue {q}: cannot re-enable notifications: {e}");
                    break;
                }
            }
        }
    }

    /// Pops one request: (head, parsed request, when, the memory table it was parsed against).
    ///
    /// The memory table can change while a worker runs: a frontend adds a region (it is
    /// acknowledged once the table holds it), then publishes requests with buffers in it. So
    /// the table is loaded after the avail index that shows the request has been read, never
    /// before: a table loaded earlier could predate the region and reject the request.
    #[allow(clippy::type_complexity)]
    fn pop(
        &self,
        ctl: &QueueCtl,
        vring: &Vring,
    ) -> Pop<(
        u16,
        Result<Request, Rejected>,
        Instant,
        GuestMemoryLoadGuard<GuestMem>,
    )> {
        let limits = self.conn.dev.limits();
        ctl.pop(
            vring,
            |state| {
                let queue = state.get_queue_mut();
                let published = queue
                    .avail_idx(&*self.conn.mem.memory(), Ordering::Acquire)
                    .ok()?;
                if published.0 == queue.next_avail() {
                    return None;
                }
                let mem = self.conn.mem.memory();
                let chain = queue.iter(mem.clone()).ok()?.next()?;
                Some((chain, mem))
            },
            |(chain, mem)| {
                let now = Instant::now();
                let head = chain.head_index();
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
                ((head, parsed, now, mem), entry)
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
                let ctx = ExecCtx {
                    writeback: self.conn.writeback.load(Ordering::Relaxed),
                    serial: &dev.cfg.serial,
                };
                let result = execute(&req, mem, dev.target.as_ref(), &ctx);
                count(stats, &req, result.is_ok());
                match result {
                    Ok(n) => (Some((req.status_addr, Status::Ok)), n + 1),
                    Err(e) => {
                        warn!(
                            "queue {q}: {} at sector {} ({} bytes) failed: {e}",
                            req.kind.name(),
                            req.sector,
                            req.data_len
                        );
                        (Some((req.status_addr, Status::IoErr)), 1)
                    }
                }
            }
        };
        ctl.complete(vring, mem, head, status, used_len);
    }
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
        if let Some(vring) = vrings.get(device_event as usize) {
            self.process_queue(thread_id, vring);
        }
        Ok(())
    }
}
