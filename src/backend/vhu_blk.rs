//! The vhost-user glue: what the vhost-user-backend crate asks of a device, answered from the
//! session's state ([`Session`]) and its workers ([`Worker`]). One `BlkBackend` per frontend
//! session; each queue has its own worker thread (one bit per `queues_per_thread` entry).

use std::io;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::Device;
use super::inflight::{Gm, Phase, Vring};
use super::session::{engine_token, Session};
use super::worker::Worker;
use crate::virtio::config::WRITEBACK_OFFSET;
use crate::virtio::GuestMem;

#[derive(Clone)]
pub struct BlkBackend {
    s: Arc<Session>,
}

impl BlkBackend {
    pub fn new(dev: Arc<Device>, mem: Gm) -> BlkBackend {
        BlkBackend {
            s: Arc::new(Session::new(dev, mem)),
        }
    }
}

impl Deref for BlkBackend {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.s
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.s.dev.cfg.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.s.dev.cfg.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.s.dev.features()
    }

    fn acked_features(&self, features: u64) {
        self.s.wce_acked.store(
            features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0,
            Ordering::Relaxed,
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.s.dev.protocol_features()
    }

    fn reset_device(&self) {
        self.s.drain_all(Phase::Stopped).log("device reset");
        self.s.writeback.store(true, Ordering::Relaxed);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queue itself knows (virtio-queue keeps it per ring).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let writeback = self.s.writeback.load(Ordering::Relaxed);
        self.s.dev.config_space(writeback).read(offset, size)
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
        if !self.s.wce_acked.load(Ordering::Relaxed) {
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
        self.s.writeback.store(writeback, Ordering::Relaxed);
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // The handler swaps the mapping inside the GuestMemoryAtomic we share with it; the old
        // mapping stays alive as long as a worker still holds a guard on it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.s.dev.cfg.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, dropping the daemon could not stop (and join) the worker threads.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(report) = self.s.drain_queue(queue_index as usize) {
            report.log(&format!("queue {queue_index} stopped by the frontend"));
        }
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
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let Some(worker) = Worker::new(&self.s, thread_id, vring) else {
            return Ok(());
        };
        if u64::from(device_event) == engine_token(self.s.queues.len()) {
            worker.engine_event();
        } else if usize::from(device_event) < vrings.len() {
            worker.kicked();
        }
        Ok(())
    }
}
