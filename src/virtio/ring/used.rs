//! The device's half of a split virtqueue's used ring, written for a batch of completions with
//! one translation of the ring: see [`UsedBatch`].
//!
//! virtio-queue's `add_used` loads the memory table and translates two guest addresses for
//! every entry, and its `needs_notification` loads the table again and walks vm-memory's slice
//! iterator: under the null engine that was a fifth of a worker's instructions when each
//! request was completed on its own. The ring layout (VIRTIO 1.2, 2.7.8): flags and index (two
//! 16-bit fields), then one 8-byte entry (`id`, `len`, 32 bits each) per slot.

use std::marker::PhantomData;
use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::guest::{self, GuestMem};

/// Flags and index, before the entries.
const HEADER: usize = 4;
const ENTRY: usize = 8;

/// Used entries being added, made visible to the driver all at once by [`UsedBatch::publish`].
pub struct UsedBatch<'m> {
    /// The ring's host address: 4-aligned, `HEADER + ENTRY * size` bytes mapped for `'m`.
    ring: *mut u8,
    _mem: PhantomData<&'m GuestMem>,
    size: u16,
    /// The queue's next used index when the batch began.
    start: Wrapping<u16>,
    next: Wrapping<u16>,
}

impl<'m> UsedBatch<'m> {
    /// A batch for `queue`'s used ring in `mem`. None when the ring is not one 4-aligned range of
    /// one memory region (legal across regions, rare, and a broken driver's when misaligned):
    /// the caller then adds entries through virtio-queue, which checks every access.
    pub fn new(queue: &Queue, mem: &'m GuestMem) -> Option<UsedBatch<'m>> {
        let size = queue.size();
        if size == 0 {
            return None;
        }
        let len = HEADER + ENTRY * usize::from(size);
        let ring = guest::host_range(mem, GuestAddress(queue.used_ring()), len as u64)?.as_ptr();
        if !(ring as usize).is_multiple_of(4) {
            return None;
        }
        let next = Wrapping(queue.next_used());
        Some(UsedBatch {
            ring,
            _mem: PhantomData,
            size,
            start: next,
            next,
        })
    }

    /// Writes the used entry for chain `head`, not yet visible to the driver. False (nothing
    /// written) for a head outside the ring, which no chain we popped can have.
    pub fn push(&mut self, head: u16, len: u32) -> bool {
        if head >= self.size {
            return false;
        }
        let at = HEADER + ENTRY * usize::from(self.next.0 % self.size);
        // SAFETY: the entry's 8 bytes lie inside the ring (`at` is the offset of one of its
        // `size` entries), which stays mapped for `'m`; ring and offset are 4-aligned. Atomic
        // stores, as vm-memory's: the driver reads the ring at any time.
        unsafe {
            AtomicU32::from_ptr(self.ring.add(at).cast())
                .store(u32::from(head).to_le(), Ordering::Relaxed);
            AtomicU32::from_ptr(self.ring.add(at + 4).cast()).store(len.to_le(), Ordering::Relaxed);
        }
        self.next += Wrapping(1);
        true
    }

    /// Publishes the pushed entries: the used index, with release ordering, so the driver sees
    /// each entry before the index that covers it; and records it in `queue`.
    pub fn publish(self, queue: &mut Queue) {
        if self.next == self.start {
            return;
        }
        // SAFETY: the index is the 16-bit field at offset 2 of the mapped, 4-aligned ring.
        // Release: the driver sees each entry before the index that covers it.
        unsafe { AtomicU16::from_ptr(self.ring.add(2).cast()) }
            .store(self.next.0.to_le(), Ordering::Release);
        queue.set_next_used(self.next.0);
    }
}

/// Whether the driver wants an interrupt for the used entries from `old` up to `new`: with
/// event-idx, whether its `used_event` lies among them (VIRTIO 1.2, 2.7.10); without, always,
/// like virtio-queue (the avail ring's no-interrupt flag is only a hint). When in doubt, yes: a
/// spurious interrupt costs little, a lost one hangs the driver.
pub fn needs_notification(
    queue: &Queue,
    mem: &GuestMem,
    old: Wrapping<u16>,
    new: Wrapping<u16>,
) -> bool {
    if !queue.event_idx_enabled() {
        return true;
    }
    // The index store before the read of `used_event`; the driver orders the other way round
    // (stores `used_event`, then reads the index), so one of us sees the other's store.
    fence(Ordering::SeqCst);
    match used_event(queue, mem) {
        Some(event) => new - event - Wrapping(1) < new - old,
        None => true,
    }
}

/// The driver's `used_event` (event-idx): it wants a notification once the used index passes
/// it. The field follows the avail ring's entries.
pub fn used_event(queue: &impl QueueT, mem: &GuestMem) -> Option<Wrapping<u16>> {
    avail_u16(queue, mem, u64::from(queue.size())).map(Wrapping)
}

/// The 16-bit field `index` places after the avail ring's flags and index (VIRTIO 1.2, 2.7.6:
/// the ring's entries, then `used_event`).
pub fn avail_u16(queue: &impl QueueT, mem: &GuestMem, index: u64) -> Option<u16> {
    let addr = queue.avail_ring().checked_add(4 + 2 * index)?;
    guest::load_u16(mem, GuestAddress(addr), Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn queue(size: u16, used: u64, event_idx: bool) -> Queue {
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn set_used_event(mem: &GuestMem, size: u16, event: u16) {
        mem.write_obj(event, GuestAddress(AVAIL + 4 + 2 * u64::from(size)))
            .unwrap();
    }

    fn entry(mem: &GuestMem, slot: u64) -> (u32, u32) {
        let at = GuestAddress(USED + 4 + 8 * slot);
        (
            mem.read_obj(at).unwrap(),
            mem.read_obj(GuestAddress(at.0 + 4)).unwrap(),
        )
    }

    fn used_idx(mem: &GuestMem) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The batch writes what virtio-queue's `add_used` writes, slot for slot, and publishes the
    /// index only at the end.
    #[test]
    fn writes_the_entries_add_used_writes() {
        let (fast, generic) = (mem(), mem());
        let (mut qf, mut qg) = (queue(4, USED, true), queue(4, USED, true));
        // Start near the wrap of the 16-bit index and of the ring.
        qf.set_next_used(u16::MAX - 1);
        qg.set_next_used(u16::MAX - 1);
        let entries = [(3u16, 10u32), (0, 4097), (2, 1), (1, 0), (3, 77)];
        let mut batch = UsedBatch::new(&qf, &fast).unwrap();
        for &(head, len) in &entries {
            assert!(batch.push(head, len));
            qg.add_used(&generic, head, len).unwrap();
        }
        assert_eq!(used_idx(&fast), 0, "nothing visible before publish");
        batch.publish(&mut qf);
        assert_eq!(used_idx(&fast), used_idx(&generic));
        assert_eq!(qf.next_used(), qg.next_used());
        for slot in 0..4 {
            assert_eq!(entry(&fast, slot), entry(&generic, slot), "slot {slot}");
        }
    }

    #[test]
    fn refuses_heads_outside_the_ring() {
        let m = mem();
        let mut q = queue(4, USED, true);
        let mut batch = UsedBatch::new(&q, &m).unwrap();
        assert!(!batch.push(4, 1));
        batch.publish(&mut q);
        assert_eq!((q.next_used(), used_idx(&m)), (0, 0), "nothing to publish");
    }

    /// A ring that does not lie inside memory is left to virtio-queue's checked path (which
    /// reports the error). (A misaligned one cannot be set up: virtio-queue refuses it.)
    #[test]
    fn leaves_rings_outside_memory_to_virtio_queue() {
        let m = mem();
        assert!(UsedBatch::new(&queue(4, 0x10000 - 8, true), &m).is_none());
        assert!(UsedBatch::new(&queue(4, 0x10000 - 36, true), &m).is_some());
    }

    /// Notified exactly when `used_event` is among the entries published, as virtio-queue's
    /// `needs_notification` decides after the same `add_used` calls.
    #[test]
    fn notifies_when_virtio_queue_would() {
        for event in [0u16, 9, 10, 11, 12, 13, 14, 200, u16::MAX] {
            for n in 1..=3u16 {
                let (fast, generic) = (mem(), mem());
                let (mut qf, mut qg) = (queue(8, USED, true), queue(8, USED, true));
                qf.set_next_used(10);
                qg.set_next_used(10);
                set_used_event(&fast, 8, event);
                set_used_event(&generic, 8, event);
                // Reset virtio-queue's count of entries added since its last check.
                qg.needs_notification(&generic).unwrap();
                let mut batch = UsedBatch::new(&qf, &fast).unwrap();
                for i in 0..n {
                    batch.push(i, 1);
                    qg.add_used(&generic, i, 1).unwrap();
                }
                let want = qg.needs_notification(&generic).unwrap();
                batch.publish(&mut qf);
                let got = needs_notification(&qf, &fast, Wrapping(10), Wrapping(qf.next_used()));
                assert_eq!(got, want, "used_event {event}, {n} entries from 10");
            }
        }
    }

    #[test]
    fn notifies_always_without_event_idx() {
        let m = mem();
        let mut q = queue(8, USED, false);
        let mut batch = UsedBatch::new(&q, &m).unwrap();
        batch.push(1, 1);
        batch.publish(&mut q);
        assert!(needs_notification(&q, &m, Wrapping(0), Wrapping(1)));
    }
}
