//! The backend driven through a mock split queue in this process: the whole path from avail
//! ring to used ring (parse, execute, status byte, used entry), the counters, and the drain.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::device::{Device, DeviceConfig};
use super::inflight::Phase;
use super::polling::Polling;
use super::session::Session;
use super::vring::Vring;
use super::worker::Worker;
use crate::io::EngineKind;
use crate::latch::Latch;
use crate::stats::QueueStats;
use crate::storage::iov::{gather, scatter};
use crate::storage::{BlockIo, Hold, IoKind};
use crate::virtio::GuestMem;
use crate::virtio::ID_BYTES;

const QSIZE: u16 = 64;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const CAPACITY: u64 = 1 << 20;

/// An image in memory. Reads can be held at a gate to keep a request in flight.
#[derive(Default)]
struct MemTarget {
    data: Mutex<Vec<u8>>,
    flushes: AtomicUsize,
    /// How long a flush takes, in microseconds (a disk's cache flush): keeps requests in flight
    /// long enough for a concurrent drain to meet them, however fast the build.
    flush_us: AtomicU64,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    /// What a read of sector 0 must wait for before it starts, as a fault would say.
    hold_first: Mutex<Option<HoldFirst>>,
}

#[derive(Clone)]
enum HoldFirst {
    For(Duration),
    Behind(Arc<Latch>),
}

#[derive(Default)]
struct Gate {
    closed: bool,
    waiting: usize,
}

impl MemTarget {
    fn new() -> Arc<MemTarget> {
        let t = MemTarget::default();
        *t.data.lock().unwrap() = vec![0; CAPACITY as usize];
        Arc::new(t)
    }
    fn close_gate(&self) {
        self.gate.lock().unwrap().closed = true;
    }
    fn open_gate(&self) {
        self.gate.lock().unwrap().closed = false;
        self.gate_cv.notify_all();
    }
    fn wait_for_waiter(&self) {
        let g = self.gate.lock().unwrap();
        let _g = self
            .gate_cv
            .wait_timeout_while(g, Duration::from_secs(10), |g| g.waiting == 0)
            .unwrap();
    }
}

impl BlockIo for MemTarget {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> std::io::Result<()> {
        {
            let mut g = self.gate.lock().unwrap();
            g.waiting += 1;
            self.gate_cv.notify_all();
            let mut g = self.gate_cv.wait_while(g, |g| g.closed).unwrap();
            g.waiting -= 1;
        }
        // SAFETY: the caller vouches for the iovecs; the image holds the whole range.
        unsafe { scatter(iov, &self.data.lock().unwrap()[offset as usize..]) };
        Ok(())
    }
    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> std::io::Result<()> {
        // SAFETY: the caller vouches for the iovecs; the image holds the whole range.
        unsafe { gather(iov, &mut self.data.lock().unwrap()[offset as usize..]) };
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let took = Duration::from_micros(self.flush_us.load(Ordering::Relaxed));
        let start = std::time::Instant::now();
        while start.elapsed() < took {
            std::hint::spin_loop();
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> std::io::Result<()> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn hold(&self, kind: IoKind, offset: u64, _len: u64) -> Option<Hold> {
        if kind != IoKind::Read || offset != 0 {
            return None;
        }
        match self.hold_first.lock().unwrap().clone()? {
            HoldFirst::For(d) => Some(Hold::Until(Instant::now() + d)),
            HoldFirst::Behind(latch) => Some(Hold::Released(latch.enter())),
        }
    }
}

struct Rig {
    backend: Arc<Session>,
    vring: Vring,
    mock: MockSplitQueue<'static, GuestMem>,
    mem: &'static GuestMem,
    target: Arc<MemTarget>,
    dev: Arc<Device>,
    next_desc: u16,
}

fn rig(readonly: bool, drain_timeout: Duration) -> Rig {
    let gm =
        GuestMemoryAtomic::new(GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
    // The mock borrows the memory for the test's whole life.
    let mem: &'static GuestMem = Box::leak(Box::new(gm.memory()));
    let mock = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
    let target = MemTarget::new();
    let mut serial = [0u8; ID_BYTES];
    serial[..11].copy_from_slice(b"test-serial");
    let dev = Arc::new(Device::new(
        DeviceConfig {
            image: "mem".into(),
            capacity: CAPACITY,
            block_size: 512,
            readonly,
            serial,
            num_queues: 1,
            queue_size: QSIZE,
            drain_timeout,
            engine: EngineKind::Sync,
            poll: Polling::Off,
        },
        target.clone(),
    ));
    let backend = Arc::new(Session::new(dev.clone(), gm).unwrap());
    let vring = backend.vrings[0].clone();
    vring.set_queue_size(QSIZE);
    vring
        .set_queue_info(
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        )
        .unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    Rig {
        backend,
        vring,
        mock,
        mem,
        target,
        dev,
        next_desc: 0,
    }
}

impl Rig {
    /// Puts a chain of (addr, len, device-writable) descriptors in the avail ring.
    fn submit(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < parts.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, first + i as u16 + 1))
            })
            .collect();
        self.mock.add_desc_chains(&descs, first).unwrap();
        self.next_desc += parts.len() as u16;
        first
    }

    fn header(&self, at: u64, type_: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&type_.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// A classic three-descriptor request with its own header/status slots.
    fn request(&mut self, slot: u64, type_: u32, sector: u64, data: Option<(u32, bool)>) -> u16 {
        let hdr = HDR + slot * 0x100;
        self.header(hdr, type_, sector);
        let mut parts = vec![(hdr, 16, false)];
        if let Some((len, w)) = data {
            parts.push((DATA + slot * 0x1_0000, len, w));
        }
        parts.push((STATUS + slot, 1, true));
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + slot))
            .unwrap();
        self.submit(&parts)
    }

    fn kick(&self) {
        Worker::new(&self.backend, 0).unwrap().kicked();
    }

    fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    fn used(&self, i: usize) -> (u32, u32) {
        let e = self.mock.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn status(&self, slot: u64) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + slot)).unwrap()
    }

    fn stats(&self) -> &QueueStats {
        self.dev.stats.queue(0)
    }
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    QueueStats::get(c)
}

#[test]
fn write_then_read_round_trip() {
    let mut r = rig(false, Duration::from_secs(5));
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let h0 = r.request(0, VIRTIO_BLK_T_OUT, 16, Some((4096, false)));
    let h1 = r.request(1, VIRTIO_BLK_T_IN, 16, Some((4096, true)));
    r.kick();
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.used(0), (u32::from(h0), 1));
    assert_eq!(r.used(1), (u32::from(h1), 4097));
    assert_eq!((r.status(0), r.status(1)), (0, 0));
    let mut back = vec![0u8; 4096];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x1_0000))
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(
        &r.target.data.lock().unwrap()[16 * 512..16 * 512 + 4096],
        &data[..]
    );
    assert_eq!(get(&r.stats().writes), 1);
    assert_eq!(get(&r.stats().reads), 1);
    assert_eq!(get(&r.stats().bytes_written), 4096);
    assert_eq!(get(&r.stats().bytes_read), 4096);
    assert_eq!(get(&r.stats().errors), 0);
    assert_eq!(r.backend.inflight(), 0);
}

/// A ring the frontend has not made ready (or stopped) is not read, whatever its avail
/// index says; once ready, the request is served.
#[test]
fn ring_not_ready_is_not_popped() {
    let mut r = rig(false, Duration::from_secs(5));
    r.request(0, VIRTIO_BLK_T_GET_ID, 0, Some((ID_BYTES as u32, true)));
    r.vring.set_queue_ready(false);
    r.kick();
    assert_eq!(r.used_idx(), 0);
    assert_eq!(r.status(0), 0xff, "untouched");
    r.vring.set_queue_ready(true);
    r.kick();
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.status(0), 0);
}

/// A driver whose avail index runs more than a ring's worth ahead is broken: nothing is
/// taken (rather than entries served twice), and nothing panics.
#[test]
fn avail_index_beyond_the_ring_takes_nothing() {
    let mut r = rig(false, Duration::from_secs(5));
    r.request(0, VIRTIO_BLK_T_GET_ID, 0, Some((ID_BYTES as u32, true)));
    r.mock.avail().idx().store(u16::to_le(QSIZE + 1));
    r.kick();
    assert_eq!(r.used_idx(), 0);
    assert_eq!(r.status(0), 0xff, "untouched");
    assert_eq!(r.backend.inflight(), 0);
}

#[test]
fn get_id_returns_the_serial() {
    let mut r = rig(false, Duration::from_secs(5));
    r.request(0, VIRTIO_BLK_T_GET_ID, 0, Some((ID_BYTES as u32, true)));
    r.kick();
    assert_eq!(r.status(0), 0);
    let mut id = [0u8; ID_BYTES];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"test-serial");
    assert!(id[11..].iter().all(|&b| b == 0));
    assert_eq!(r.used(0).1, ID_BYTES as u32 + 1);
}

#[test]
fn bad_requests_complete_with_ioerr_and_count() {
    let mut r = rig(false, Duration::from_secs(5));
    r.request(0, VIRTIO_BLK_T_IN, CAPACITY / 512, Some((512, true))); // past the end
    r.request(1, VIRTIO_BLK_T_OUT, CAPACITY / 512 - 1, Some((1024, false))); // straddles
    r.request(2, VIRTIO_BLK_T_IN, 0, Some((100, true))); // not a multiple of 512
    r.request(3, VIRTIO_BLK_T_IN, 0, None); // no data
    r.request(4, 0x42, 0, Some((512, true))); // unknown type
    r.kick();
    assert_eq!(r.used_idx(), 5);
    assert_eq!(
        [
            r.status(0),
            r.status(1),
            r.status(2),
            r.status(3),
            r.status(4)
        ],
        [1, 1, 1, 1, 2]
    );
    assert_eq!(get(&r.stats().malformed), 4);
    assert_eq!(get(&r.stats().unsupported), 1);
    assert_eq!(get(&r.stats().errors), 5);
    // Nothing reached the image.
    assert!(r.target.data.lock().unwrap().iter().all(|&b| b == 0));
}

#[test]
fn write_on_read_only_device_is_refused_by_the_server() {
    let mut r = rig(true, Duration::from_secs(5));
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    r.request(0, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    r.request(1, VIRTIO_BLK_T_IN, 0, Some((512, true)));
    r.kick();
    assert_eq!((r.status(0), r.status(1)), (1, 0));
    assert!(r.target.data.lock().unwrap().iter().all(|&b| b == 0));
    assert_eq!(get(&r.stats().malformed), 1);
}

#[test]
fn chain_without_writable_status_returns_with_length_zero_and_queue_goes_on() {
    let mut r = rig(false, Duration::from_secs(5));
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let h = r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
    r.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    r.kick();
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.used(0), (u32::from(h), 0));
    assert_eq!(r.status(1), 0);
    assert_eq!(get(&r.stats().malformed), 1);
}

#[test]
fn short_header_gets_ioerr() {
    let mut r = rig(false, Duration::from_secs(5));
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    r.submit(&[(HDR, 8, false), (STATUS, 1, true)]);
    r.kick();
    assert_eq!(r.status(0), 1);
    assert_eq!(r.used(0).1, 1);
}

#[test]
fn descriptor_outside_guest_memory_gets_ioerr() {
    let mut r = rig(false, Duration::from_secs(5));
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    r.submit(&[
        (HDR, 16, false),
        (0x7fff_0000_0000, 512, true),
        (STATUS, 1, true),
    ]);
    r.kick();
    assert_eq!(r.status(0), 1);
    assert_eq!(get(&r.stats().malformed), 1);
}

#[test]
fn descriptor_loop_is_returned_without_status() {
    let mut r = rig(false, Duration::from_secs(5));
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...: the iterator gives up after QSIZE descriptors.
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
    ];
    r.mock.add_desc_chains(&descs, 0).unwrap();
    r.next_desc = 2;
    r.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    r.kick();
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.used(0), (0, 0));
    assert_eq!(r.status(1), 0, "the queue keeps working after a loop");
    assert_eq!(get(&r.stats().malformed), 1);
}

#[test]
fn writethrough_flushes_every_write() {
    let mut r = rig(false, Duration::from_secs(5));
    r.request(0, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    r.kick();
    assert_eq!(r.target.flushes.load(Ordering::SeqCst), 0);
    // What SET_CONFIG on the writeback byte does (the handler's own test covers the message).
    r.backend.writeback.store(false, Ordering::Relaxed);
    r.request(1, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    r.kick();
    assert_eq!(r.target.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn discard_and_write_zeroes_reach_the_target() {
    let mut r = rig(false, Duration::from_secs(5));
    r.target.data.lock().unwrap().fill(0xee);
    let mut raw = Vec::new();
    raw.extend_from_slice(&8u64.to_le_bytes());
    raw.extend_from_slice(&8u32.to_le_bytes());
    raw.extend_from_slice(&0u32.to_le_bytes());
    r.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
    r.request(0, VIRTIO_BLK_T_DISCARD, 0, Some((16, false)));
    r.kick();
    assert_eq!(r.status(0), 0);
    let d = r.target.data.lock().unwrap();
    assert!(d[8 * 512..16 * 512].iter().all(|&b| b == 0));
    assert!(d[..8 * 512].iter().all(|&b| b == 0xee));
    assert!(d[16 * 512..].iter().all(|&b| b == 0xee));
}

/// What another thread needs to kick the queue and watch the used ring.
#[derive(Clone)]
struct Handle {
    backend: Arc<Session>,
    vring: Vring,
    mem: &'static GuestMem,
    used_idx_addr: GuestAddress,
}

impl Handle {
    fn kick(&self) {
        Worker::new(&self.backend, 0).unwrap().kicked();
    }
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used_idx_addr).unwrap()
    }
}

impl Rig {
    fn handle(&self) -> Handle {
        Handle {
            backend: self.backend.clone(),
            vring: self.vring.clone(),
            mem: self.mem,
            used_idx_addr: GuestAddress(self.mock.used_addr().0 + 2),
        }
    }
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < end, "condition not met in 10 s");
        std::thread::yield_now();
    }
}

/// The drain returns only after the in-flight request's used entry is written.
#[test]
fn drain_waits_for_the_request_in_flight() {
    let mut r = rig(false, Duration::from_secs(20));
    r.target.close_gate();
    r.request(0, VIRTIO_BLK_T_IN, 0, Some((512, true)));
    let h = r.handle();
    let target = r.target.clone();
    std::thread::scope(|s| {
        let hw = h.clone();
        let worker = s.spawn(move || hw.kick());
        target.wait_for_waiter();
        let hd = h.clone();
        let drain = s.spawn(move || {
            let report = hd.backend.drain_all(Phase::Stopped);
            (report, hd.used_idx())
        });
        // Let the request finish only once the drain is waiting for it.
        wait_until(|| h.backend.phases().iter().all(|p| *p == Phase::Stopping));
        assert_eq!(h.backend.inflight(), 1);
        target.open_gate();
        let (report, used_at_return) = drain.join().unwrap();
        worker.join().unwrap();
        assert_eq!(
            used_at_return, 1,
            "drain returned before the used entry was written"
        );
        assert_eq!(report.waited_for, 1);
        assert!(report.abandoned.is_empty());
    });
    assert_eq!(r.status(0), 0);
}

/// A request stuck past the drain timeout is completed with IOERR by the drain, exactly once.
#[test]
fn drain_timeout_completes_stuck_request_once() {
    let mut r = rig(false, Duration::from_millis(100));
    r.target.close_gate();
    r.request(0, VIRTIO_BLK_T_IN, 0, Some((512, true)));
    let h = r.handle();
    let target = r.target.clone();
    std::thread::scope(|s| {
        let hw = h.clone();
        let worker = s.spawn(move || hw.kick());
        target.wait_for_waiter();
        let report = h.backend.drain_all(Phase::Closed);
        assert_eq!(report.abandoned.len(), 1);
        assert!(report.duration >= Duration::from_millis(100));
        assert_eq!(h.used_idx(), 1);
        assert_eq!(h.backend.inflight(), 0);
        // The stuck I/O finally returns: it must not complete the request again.
        target.open_gate();
        worker.join().unwrap();
    });
    assert_eq!(r.status(0), 1);
    assert_eq!(r.used_idx(), 1);
    assert_eq!(get(&r.stats().abandoned), 1);
}

#[test]
fn stopped_ring_restarts_on_kick_but_closed_one_does_not() {
    let mut r = rig(false, Duration::from_secs(5));
    r.request(0, VIRTIO_BLK_T_FLUSH, 0, None);
    r.kick();
    assert_eq!(r.used_idx(), 1);
    r.backend.drain_queue(0);
    r.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    r.kick();
    assert_eq!(
        r.used_idx(),
        2,
        "a stopped ring that is ready again runs on the next kick"
    );
    r.backend.drain_all(Phase::Closed);
    r.request(2, VIRTIO_BLK_T_FLUSH, 0, None);
    r.kick();
    assert_eq!(r.used_idx(), 2, "a closed queue takes no more descriptors");
}

/// Stress of the in-flight accounting (QueueCtl): four threads kick one queue at once, so
/// several requests are popped and completed concurrently and out of order, while another
/// thread stops the ring at a random moment the way GET_VRING_BASE does (ring not ready, then
/// a drain with a 30 s bound). Every drain must return long before its bound (a lost wake-up
/// would sit there until it), with nothing in flight, every popped request's used entry
/// written, and no pop after it; after a restart the counts balance.
///
/// Plain threads rather than loom: the state worth exploring is a Mutex + Condvar pair plus the
/// vring lock and the vhost-user-backend types around them, which loom cannot model without
/// replacing std's primitives in the crate under test; many seeded cycles on real threads
/// exercise the real code.
#[test]
fn inflight_accounting_under_concurrent_pops_completions_and_drains() {
    use virtio_queue::QueueT;
    const CYCLES: u64 = 1500;
    let seed = std::env::var("REMAPBLK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6004u64);
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let r = rig(false, Duration::from_secs(30));
    r.target.flush_us.store(50, Ordering::Relaxed);
    // A ring laid out here: the mock's used ring overlaps the second half of its avail ring,
    // which only the few requests of the other tests never reach.
    let (desc_table, avail, used) = (0x40_0000, 0x41_0000, 0x42_0000);
    r.vring.set_queue_info(desc_table, avail, used).unwrap();
    let mut h = r.handle();
    h.used_idx_addr = GuestAddress(used + 2);
    let next_avail = |h: &Handle| h.vring.get_ref().get_queue().next_avail();
    let mut offered: u16 = 0;
    let mut total: u64 = 0;
    let mut slowest = Duration::ZERO;
    let mut caught_in_flight = 0;
    for cycle in 0..CYCLES {
        let ctx = format!("seed {seed}, cycle {cycle}");
        // Up to 21 requests (three descriptors each at most, in a 64-entry table): flushes and
        // 512-byte writes.
        let n = 1 + (next() % 21) as u16;
        for i in 0..n {
            let (d, slot) = (2 * i, u64::from(i));
            let write = next() % 2 == 0;
            let hdr = HDR + slot * 0x100;
            r.header(
                hdr,
                if write {
                    VIRTIO_BLK_T_OUT
                } else {
                    VIRTIO_BLK_T_FLUSH
                },
                slot,
            );
            let descs = if write {
                vec![
                    (hdr, 16, VRING_DESC_F_NEXT as u16, d + 1),
                    (DATA + slot * 0x1000, 512, VRING_DESC_F_NEXT as u16, d + 2),
                    (STATUS + slot, 1, VRING_DESC_F_WRITE as u16, 0),
                ]
            } else {
                vec![
                    (hdr, 16, VRING_DESC_F_NEXT as u16, d + 1),
                    (STATUS + slot, 1, VRING_DESC_F_WRITE as u16, 0),
                ]
            };
            let base = 3 * i;
            for (j, (addr, len, flags, _)) in descs.iter().enumerate() {
                let j = j as u16;
                let nxt = base + j + 1;
                let at = GuestAddress(desc_table + 16 * u64::from(base + j));
                let raw = RawDescriptor::from(Descriptor::new(*addr, *len, *flags, nxt));
                r.mem.write_obj(raw, at).unwrap();
            }
            let pos = offered.wrapping_add(i) % QSIZE;
            r.mem
                .write_obj(base, GuestAddress(avail + 4 + 2 * u64::from(pos)))
                .unwrap();
        }
        offered = offered.wrapping_add(n);
        total += u64::from(n);
        r.mem
            .store(
                offered,
                GuestAddress(avail + 2),
                std::sync::atomic::Ordering::Release,
            )
            .unwrap();
        let spins = next() % 2000;
        let (report, popped_at_stop, used_at_stop, inflight_at_stop) = std::thread::scope(|s| {
            for _ in 0..4 {
                let hk = h.clone();
                s.spawn(move || {
                    for _ in 0..3 {
                        hk.kick();
                    }
                });
            }
            let hd = h.clone();
            s.spawn(move || {
                for _ in 0..spins {
                    std::hint::spin_loop();
                }
                // What GET_VRING_BASE does: the ring is not ready, then stop_vring drains.
                hd.vring.set_queue_ready(false);
                let report = hd.backend.drain_all(Phase::Stopped);
                (
                    report,
                    next_avail(&hd),
                    hd.used_idx(),
                    hd.backend.inflight(),
                )
            })
            .join()
            .unwrap()
        });
        // The kickers are done: whatever they did after the drain is visible now.
        assert!(report.abandoned.is_empty(), "{ctx}: drain gave up");
        assert!(
            report.duration < Duration::from_secs(5),
            "{ctx}: drain took {:?}: a lost wake-up",
            report.duration
        );
        slowest = slowest.max(report.duration);
        caught_in_flight += usize::from(report.waited_for > 0);
        assert_eq!(inflight_at_stop, 0, "{ctx}: in flight after the drain");
        assert_eq!(
            used_at_stop, popped_at_stop,
            "{ctx}: drain returned before every popped request was used"
        );
        assert_eq!(
            next_avail(&h),
            popped_at_stop,
            "{ctx}: a descriptor was popped after the ring was stopped"
        );
        assert_eq!(
            h.used_idx(),
            popped_at_stop,
            "{ctx}: completion after the stop"
        );

        // Restart the ring (as SET_VRING_KICK does) and let the rest complete.
        h.vring.set_queue_ready(true);
        h.kick();
        assert_eq!(h.used_idx(), offered, "{ctx}: after the restart");
        assert_eq!(h.backend.inflight(), 0);
    }
    let st = r.stats();
    assert_eq!(
        get(&st.writes) + get(&st.flushes),
        total,
        "every request counted once"
    );
    assert_eq!(get(&st.errors), 0);
    eprintln!(
        "{CYCLES} cycles: a drain waited for requests in {caught_in_flight}, slowest {slowest:?}"
    );
    assert!(
        caught_in_flight > 0,
        "no drain ever caught a request in flight"
    );
}

/// A request the stack says to delay is parked, not run: the worker goes on, and starts it
/// once it is due, with its data and status as any other.
#[test]
fn a_delayed_request_is_parked_and_started_when_due() {
    let mut r = rig(false, Duration::from_secs(5));
    r.target.data.lock().unwrap()[..512].fill(0x5a);
    *r.target.hold_first.lock().unwrap() = Some(HoldFirst::For(Duration::from_millis(50)));
    let t0 = Instant::now();
    r.request(0, VIRTIO_BLK_T_IN, 0, Some((512, true)));
    r.request(1, VIRTIO_BLK_T_IN, 8, Some((512, true)));
    r.kick();
    // The second read is done; the first waits, in flight.
    assert_eq!(r.used_idx(), 1);
    assert_eq!(
        r.used(0).0,
        3,
        "the read of sector 8 (head 3) completed first"
    );
    assert_eq!(r.backend.inflight(), 1);
    let worker = Worker::new(&r.backend, 0).unwrap();
    assert!(r.backend.parked[0].timeout_ms(Instant::now()) <= 50);
    while r.used_idx() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never started");
        worker.start_parked();
        std::thread::yield_now();
    }
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert_eq!(r.used(1), (0, 513));
    assert_eq!(r.status(0), 0);
    let mut got = [0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0x5a; 512]);
    assert_eq!(r.backend.parked[0].timeout_ms(Instant::now()), -1);
}

/// A held request a drain gave up on is completed once, by the drain, and dropped: releasing
/// its latch later starts nothing, and the latch no longer counts it.
#[test]
fn a_held_request_a_drain_gave_up_on_never_starts() {
    let mut r = rig(false, Duration::from_millis(100));
    let latch = Latch::new();
    *r.target.hold_first.lock().unwrap() = Some(HoldFirst::Behind(latch.clone()));
    r.request(0, VIRTIO_BLK_T_IN, 0, Some((512, true)));
    r.kick();
    assert_eq!(
        (r.used_idx(), r.backend.inflight(), latch.held()),
        (0, 1, 1)
    );
    let report = r.backend.drain_queue(0).unwrap();
    assert_eq!(report.abandoned.len(), 1);
    assert_eq!(
        (r.used_idx(), r.status(0)),
        (1, 1),
        "completed once, with IOERR"
    );
    assert!(r.backend.parked[0].is_empty());
    assert_eq!(latch.held(), 0);
    assert_eq!(latch.release(), 0);
    assert_eq!(Worker::new(&r.backend, 0).unwrap().start_parked(), 0);
    assert_eq!(r.used_idx(), 1);
    // The ring runs again, and its head 0 is another request now: served as itself.
    *r.target.hold_first.lock().unwrap() = None;
    r.next_desc = 0;
    r.request(1, VIRTIO_BLK_T_IN, 0, Some((512, true)));
    r.kick();
    assert_eq!(r.used_idx(), 2);
    assert_eq!((r.used(1), r.status(1)), ((0, 513), 0));
}
