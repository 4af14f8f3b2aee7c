//! One virtqueue as the frontend set it up: the split ring (virtio-queue's `Queue`), its kick,
//! call and error eventfds, and whether it may run. The rules of vhost-user.rst ("Starting and
//! stopping rings") live here: a ring runs once it has a kick fd (started) and, with
//! VHOST_USER_F_PROTOCOL_FEATURES, once SET_VRING_ENABLE turned it on, and only while its
//! addresses lie in guest memory; GET_VRING_BASE stops it and forgets its eventfds.
//!
//! A completion that is due an interrupt while the ring has no call fd (QEMU sends
//! SET_VRING_KICK before SET_VRING_CALL, and the ring starts at the kick) is remembered, and
//! the call fd that comes next is signalled at once: an interrupt is never lost to the order
//! of the frontend's messages.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::inflight::Gm;
use crate::virtio::ring::inflight::InflightQueue;

pub struct VringState {
    queue: Queue,
    mem: Gm,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    /// A kick fd arrived since the ring was last stopped.
    started: bool,
    /// SET_VRING_ENABLE's last word (true from the start without protocol features).
    enabled: bool,
    /// An interrupt was due while there was no call fd to signal.
    signal_pending: bool,
    /// The ring's slice of the INFLIGHT_SHMFD region, when the frontend gave one.
    pub(super) inflight: Option<InflightQueue>,
    /// Heads a crashed predecessor left in flight, to run again (in their order) before the
    /// ring's new entries.
    pub(super) resubmit: VecDeque<u16>,
    /// Where the used ring is in guest-physical memory, for the dirty log (SET_VRING_ADDR's
    /// `log` with VHOST_VRING_F_LOG).
    pub(super) log_addr: Option<u64>,
}

impl VringState {
    pub fn get_queue(&self) -> &Queue {
        &self.queue
    }

    pub fn get_queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    pub fn get_kick(&self) -> Option<&File> {
        self.kick.as_ref()
    }

    /// Adds a used entry through the current memory table.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.memory();
        self.queue.add_used(&*mem, head, len)
    }

    /// Signals the guest that used entries are there, or remembers that a signal is due when
    /// the ring has no call fd yet.
    pub fn signal_used_queue(&mut self) -> io::Result<()> {
        match &self.call {
            Some(call) => {
                if let Err(e) = eventfd_write(call) {
                    self.signal_pending = true;
                    return Err(e);
                }
                self.signal_pending = false;
                Ok(())
            }
            None => {
                self.signal_pending = true;
                Ok(())
            }
        }
    }

    /// Takes the kick fd's count, so that a level-triggered poll does not report it again.
    pub fn consume_kick(&self) {
        if let Some(mut kick) = self.kick.as_ref() {
            let mut buf = [0u8; 8];
            // Non-blocking (set when the fd arrived): nothing to read is no error here.
            let _ = kick.read(&mut buf);
        }
    }

    /// Recomputes whether the ring may run: started, enabled, and its three areas in guest
    /// memory as it is now.
    fn update_ready(&mut self) {
        self.queue.set_ready(true);
        let valid = self.started && self.enabled && self.queue.is_valid(&*self.mem.memory());
        self.queue.set_ready(valid);
    }

    pub(super) fn set_kick(&mut self, kick: Option<File>) -> Option<File> {
        let old = std::mem::replace(&mut self.kick, kick);
        self.started = true;
        self.update_ready();
        old
    }

    pub(super) fn set_call(&mut self, call: Option<File>) {
        self.call = call;
        if self.signal_pending && self.call.is_some() {
            if let Err(e) = self.signal_used_queue() {
                log::warn!("cannot signal the guest through its new call fd: {e}");
            }
        }
    }

    pub(super) fn set_err(&mut self, err: Option<File>) {
        self.err = err;
    }

    pub(super) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        self.update_ready();
    }

    /// GET_VRING_BASE, first step: the ring stops running (its worker takes no more chains).
    pub(super) fn halt(&mut self) {
        self.started = false;
        self.update_ready();
    }

    /// GET_VRING_BASE, once the ring's requests are complete: its eventfds are the frontend's
    /// again (the next start brings new ones). Returns the kick fd, which the caller stops
    /// watching.
    pub(super) fn release_fds(&mut self) -> Option<File> {
        self.call = None;
        self.err = None;
        self.kick.take()
    }

    pub(super) fn is_started(&self) -> bool {
        self.started
    }

    /// When the ring starts with an inflight region: what a predecessor left in flight is run
    /// again first, and the ring goes on after what it had taken. Every chain it took is either
    /// in the used ring or still marked, so the next avail entry is the used index plus the
    /// marked ones (vhost-user.rst, "Inflight I/O tracking"; SET_VRING_BASE's value counts for
    /// nothing here: after a crash QEMU sends the used index).
    pub(super) fn recover_inflight(&mut self, q: usize) {
        if self.inflight.is_none() {
            return;
        }
        let Some(used) = self.ring_used_idx() else {
            return;
        };
        let Some(inflight) = &mut self.inflight else {
            return;
        };
        let heads = match inflight.recover(used) {
            Ok(heads) => heads,
            Err(e) => {
                // A region we cannot trust: run nothing from it (a request the guest gave
                // up on would be better than one run from garbage), and track afresh.
                log::error!(
                    "queue {q}: the inflight region is unusable ({e}); requests the previous backend left in flight are not run again"
                );
                inflight.reset();
                if let Err(e) = inflight.recover(used) {
                    log::error!("queue {q}: cannot start inflight tracking afresh: {e}");
                    self.inflight = None;
                }
                Vec::new()
            }
        };
        let size = self.queue.size();
        let heads: Vec<u16> = heads.into_iter().filter(|h| *h < size).collect();
        self.queue.set_next_used(used);
        self.queue
            .set_next_avail(used.wrapping_add(heads.len() as u16));
        if !heads.is_empty() {
            log::info!(
                "queue {q}: {} requests left in flight by the previous backend run again first (descriptors {heads:?})",
                heads.len()
            );
        }
        self.resubmit = heads.into();
    }

    /// Back to the state of a fresh device (RESET_OWNER, RESET_DEVICE). Returns the kick fd.
    pub(super) fn reset(&mut self, enabled: bool) -> Option<File> {
        self.halt();
        let kick = self.release_fds();
        self.queue.reset();
        self.enabled = enabled;
        self.signal_pending = false;
        self.resubmit.clear();
        self.log_addr = None;
        if let Some(inflight) = &mut self.inflight {
            inflight.reset();
        }
        kick
    }

    /// After the memory table changed: the ring's areas may have come or gone.
    pub(super) fn memory_changed(&mut self) {
        self.update_ready();
    }

    pub(super) fn set_size(&mut self, size: u16) -> Result<(), virtio_queue::Error> {
        self.queue.try_set_size(size)?;
        self.update_ready();
        Ok(())
    }

    pub(super) fn set_addresses(
        &mut self,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), virtio_queue::Error> {
        self.queue.try_set_desc_table_address(GuestAddress(desc))?;
        self.queue.try_set_avail_ring_address(GuestAddress(avail))?;
        self.queue.try_set_used_ring_address(GuestAddress(used))?;
        // The used index is the ring's own (SET_VRING_BASE restores the avail side only): a
        // driver that restarted its ring starts from what it wrote there.
        self.queue.set_ready(true);
        let mem = self.mem.memory();
        if let Ok(idx) = self.queue.used_idx(&*mem, Ordering::Acquire) {
            self.queue.set_next_used(idx.0);
        }
        drop(mem);
        self.update_ready();
        Ok(())
    }

    /// The used ring's index as the guest sees it, if the ring's areas are in guest memory.
    pub(super) fn ring_used_idx(&mut self) -> Option<u16> {
        let ready = self.queue.ready();
        self.queue.set_ready(true);
        let mem = self.mem.memory();
        let idx = self
            .queue
            .used_idx(&*mem, Ordering::Acquire)
            .ok()
            .map(|w| w.0);
        drop(mem);
        self.queue.set_ready(ready);
        idx
    }
}

/// A ring shared between the handler and the queue's worker. Lock order: a ring's lock before
/// its queue's in-flight table (see inflight.rs).
#[derive(Clone)]
pub struct Vring(Arc<RwLock<VringState>>);

impl Vring {
    pub fn new(mem: Gm, max_size: u16) -> Result<Vring, virtio_queue::Error> {
        Ok(Vring(Arc::new(RwLock::new(VringState {
            queue: Queue::new(max_size)?,
            mem,
            kick: None,
            call: None,
            err: None,
            started: false,
            enabled: true,
            signal_pending: false,
            inflight: None,
            resubmit: VecDeque::new(),
            log_addr: None,
        }))))
    }

    pub fn get_ref(&self) -> RwLockReadGuard<'_, VringState> {
        // Nothing leaves the state half-changed across a panic: every change is one field.
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get_mut(&self) -> RwLockWriteGuard<'_, VringState> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enable_notification(&self) -> Result<bool, virtio_queue::Error> {
        let mut state = self.get_mut();
        let mem = state.mem.memory();
        let r = state.queue.enable_notification(&*mem);
        drop(mem);
        r
    }

    pub fn disable_notification(&self) -> Result<(), virtio_queue::Error> {
        let mut state = self.get_mut();
        let mem = state.mem.memory();
        let r = state.queue.disable_notification(&*mem);
        drop(mem);
        r
    }

    // What the in-process tests set up by hand, as a frontend's messages would.

    #[cfg(test)]
    pub fn set_queue_size(&self, size: u16) {
        let _ = self.get_mut().set_size(size);
    }

    #[cfg(test)]
    pub fn set_queue_info(
        &self,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), virtio_queue::Error> {
        self.get_mut().set_addresses(desc, avail, used)
    }

    #[cfg(test)]
    pub fn set_queue_ready(&self, ready: bool) {
        let mut state = self.get_mut();
        state.started = ready;
        state.update_ready();
    }

    #[cfg(test)]
    pub fn set_enabled(&self, on: bool) {
        self.get_mut().set_enabled(on);
    }
}

fn eventfd_write(fd: &File) -> io::Result<()> {
    let mut f = fd;
    f.write_all(&1u64.to_ne_bytes())
}
