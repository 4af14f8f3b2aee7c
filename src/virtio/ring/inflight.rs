//! The shared inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split rings
//! (vhost-user.rst, "Inflight I/O tracking"): what lets a restarted backend resubmit the
//! requests its predecessor had popped but not completed, which neither the avail ring (its
//! slots are reused) nor the used ring (completions come out of order) can tell.
//!
//! The backend creates the region (GET_INFLIGHT_FD: [`InflightRegion::create`]); the frontend
//! keeps its fd across backend crashes and hands it back on every start (SET_INFLIGHT_FD:
//! [`InflightRegion::open`]). The frontend never reads it: only the next backend does, so the
//! format is the spec's, shared with libvhost-user and DPDK/SPDK, whose regions we may inherit.
//!
//! Layout, little endian: `num_queues` regions one after the other, each
//! [`queue_region_size`] bytes:
//!
//! ```text
//! header (16 bytes): features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
//! desc_num entries (16 bytes each): inflight u8 | padding [u8; 5] | next u16 | counter u64
//! ```
//!
//! # The caller's contract, per queue (one [`InflightQueue`] per queue, used by one thread)
//! 1. At every ring start (SET_VRING_KICK), before anything else: [`InflightQueue::recover`]
//!    with the used ring's `idx` as guest memory has it. Resubmit the heads it returns, in
//!    that order, without calling `begin` for them (they are marked already). The avail
//!    ring's next index is `ring_used_idx + returned.len()` (wrapping): every head popped is
//!    either used or marked, and marking follows pop order (after a crash the frontend's
//!    SET_VRING_BASE says the used index; after a clean stop nothing is marked).
//! 2. For each head popped from the avail ring: [`InflightQueue::begin`], before the request
//!    can have any effect. A head already marked is refused: the driver made it available
//!    twice.
//! 3. To complete a batch of heads, strictly in this order, with no `begin` and no other
//!    batch in between:
//!    a. [`InflightQueue::batch_add`] for each head of the batch;
//!    b. the caller writes the used entries and then the used ring's `idx` (guest memory);
//!    c. [`InflightQueue::batch_done`] with the same heads and that new `idx`.
//!
//!    Every used entry the caller publishes must belong to such a batch: recovery counts
//!    the batch by the used index's advance.
//! 4. On device reset: [`InflightQueue::reset`], then `recover` again at the next start.
//!
//! A process killed between any two stores of these steps leaves a region from which
//! `recover` returns exactly the heads that were begun and not yet published in the used
//! ring, each once, in pop order (the crash-consistency test below cuts at every store).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::shm::{sealed_memfd, MapError, SharedMap};

/// Each queue's region starts on a multiple of this many bytes (libvhost-user's and DPDK's
/// INFLIGHT_ALIGNMENT).
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// The region format this backend writes and reads; 0 means "never initialised".
pub const INFLIGHT_VERSION: u16 = 1;
/// Largest split ring (VIRTIO 1.2, 2.7: a power of two up to 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Header fields' offsets in a queue's region (QueueRegionSplit).
const HEADER_SIZE: usize = 16;
const FEATURES: usize = 0;
const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
/// An entry's fields' offsets (DescStateSplit).
const DESC_SIZE: usize = 16;
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

/// Bytes of one queue's region for a ring of `queue_size` entries: the entries and a 16-bit
/// field, rounded up to [`INFLIGHT_ALIGNMENT`] (libvhost-user's `vu_inflight_queue_size`;
/// DPDK counts the whole 16-byte header instead, which rounds up to the same size for every
/// power of two). 2112 bytes for 128 entries.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (DESC_SIZE as u64 * u64::from(queue_size) + 2).next_multiple_of(INFLIGHT_ALIGNMENT)
}

/// Bytes of the whole region for `num_queues` rings of `queue_size` entries.
pub fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_region_size(queue_size)
}

/// What is wrong with a region the frontend handed back; recovery then writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("version {0}, but this backend knows version {INFLIGHT_VERSION} only")]
    Version(u16),
    #[error("desc_num is {found}, but the queue has {expected} entries")]
    DescNum { found: u16, expected: u16 },
    #[error(
        "the used ring is {pending} entries past the region's used_idx, more than the \
         {queue_size} one batch can hold"
    )]
    BatchTooLong { pending: u16, queue_size: u16 },
    #[error("the last batch's list reaches head {head}, outside the queue's {queue_size} entries")]
    BatchHead { head: u16, queue_size: u16 },
    #[error("the last batch's list visits head {head} twice")]
    BatchLoop { head: u16 },
    #[error("entry {head}'s inflight byte is {value}, neither 0 nor 1")]
    InflightByte { head: u16, value: u8 },
    #[error("entry {head}'s counter is {counter}, which no later counter can follow")]
    Counter { head: u16, counter: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region: the number of queues is 0")]
    NoQueues,
    #[error(
        "inflight region: queue size {0} is not a power of two between 1 and {MAX_QUEUE_SIZE}"
    )]
    QueueSize(u16),
    #[error(
        "inflight region: mmap_size {size} is less than the {need} bytes that {num_queues} \
         queues of {queue_size} entries take"
    )]
    TooSmall {
        size: u64,
        need: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("inflight region: {0}")]
    Map(#[from] MapError),
    #[error("inflight region: queue {index} does not exist (the region has {num_queues})")]
    NoSuchQueue { index: u16, num_queues: u16 },
    #[error(
        "inflight region, queue {queue}: head {head} is outside the ring's {queue_size} entries"
    )]
    HeadOutOfRange {
        queue: u16,
        head: u16,
        queue_size: u16,
    },
    #[error(
        "inflight region, queue {queue}: head {head} is already in flight (made available twice?)"
    )]
    AlreadyInflight { queue: u16, head: u16 },
    #[error("inflight region, queue {queue}: used before recover() at ring start")]
    NotStarted { queue: u16 },
    #[error("inflight region, queue {queue}: {what}; the region is left as found")]
    Corrupt { queue: u16, what: Corruption },
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 {
        return Err(InflightError::NoQueues);
    }
    if !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    Ok(())
}

/// The whole shared region: its file and our mapping of it.
pub struct InflightRegion {
    map: Arc<SharedMap>,
    file: File,
    mmap_size: u64,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A fresh region for GET_INFLIGHT_FD: a sealed memfd of [`region_size`] zero bytes (every
    /// queue uninitialised), mapped. Reply with [`Self::file`], [`Self::mmap_size`], offset 0,
    /// and the queue count and size asked for.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<InflightRegion, InflightError> {
        check_shape(num_queues, queue_size)?;
        let size = region_size(num_queues, queue_size);
        const NAME: &CStr = c"remapblk-inflight";
        let file = sealed_memfd(NAME, size)?;
        let map = SharedMap::map(&file, 0, size, 8)?;
        Ok(InflightRegion {
            map: Arc::new(map),
            file,
            mmap_size: size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        })
    }

    /// The region SET_INFLIGHT_FD hands back. Refused unless the file holds `mmap_size` bytes
    /// from `mmap_offset` (a mapping past its end would fault on access), those bytes hold
    /// `num_queues` regions for rings of `queue_size` entries, and the offset is 8-aligned.
    /// The contents are checked by each queue's `recover`.
    pub fn open(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        check_shape(num_queues, queue_size)?;
        let need = region_size(num_queues, queue_size);
        if mmap_size < need {
            return Err(InflightError::TooSmall {
                size: mmap_size,
                need,
                num_queues,
                queue_size,
            });
        }
        let map = SharedMap::map(&file, mmap_offset, mmap_size, 8)?;
        Ok(InflightRegion {
            map: Arc::new(map),
            file,
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        })
    }

    /// The file to send the frontend (dup it with `try_clone` to hand over an owned one).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn mmap_size(&self) -> u64 {
        self.mmap_size
    }

    pub fn mmap_offset(&self) -> u64 {
        self.mmap_offset
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The handle for queue `index`. It keeps the mapping alive on its own. One handle per
    /// queue: two would interleave their batches.
    pub fn queue(&self, index: u16) -> Result<InflightQueue, InflightError> {
        if index >= self.num_queues {
            return Err(InflightError::NoSuchQueue {
                index,
                num_queues: self.num_queues,
            });
        }
        Ok(InflightQueue {
            map: Arc::clone(&self.map),
            index,
            base: usize::from(index) * queue_region_size(self.queue_size) as usize,
            size: self.queue_size,
            counter: 0,
            last_batch_head: 0,
            used_idx: 0,
            batch: 0,
            started: false,
            #[cfg(test)]
            crash: None,
        })
    }
}

/// One queue's part of the region, and what this process remembers of it.
pub struct InflightQueue {
    map: Arc<SharedMap>,
    index: u16,
    /// Offset of the queue's region in the mapping.
    base: usize,
    size: u16,
    /// The counter the next begun head gets: pop order, kept across crashes by the region.
    counter: u64,
    /// Our copies of what we last stored, so that the hot path never reads the region back.
    last_batch_head: u16,
    used_idx: u16,
    /// Heads added to the current batch (for a debug check of the caller's contract).
    batch: u16,
    /// Whether `recover` ran since the handle was made or reset.
    started: bool,
    /// Test-only: a budget of stores after which every store is skipped, as if the process
    /// had been killed there.
    #[cfg(test)]
    crash: Option<Arc<tests::CrashPoint>>,
}

impl InflightQueue {
    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn queue_size(&self) -> u16 {
        self.size
    }

    /// At ring start: makes the region consistent with the used ring and returns the heads
    /// still in flight, in pop order, to resubmit. `ring_used_idx` is the used ring's `idx`
    /// as guest memory holds it now.
    ///
    /// A fresh region (version 0) is initialised and has nothing in flight. Otherwise, if the
    /// used index moved past the region's `used_idx`, the previous process died between
    /// publishing a batch and clearing it: the batch's heads (the list from
    /// `last_batch_head`, as many as the index moved) are cleared. Then every head marked in
    /// flight is returned, by counter. A region that does not make sense is refused with
    /// nothing written: every walk is bounded by the ring size.
    pub fn recover(&mut self, ring_used_idx: u16) -> Result<Vec<u16>, InflightError> {
        self.batch = 0;
        match self.get16(self.hdr(VERSION)) {
            0 => {
                self.init(ring_used_idx);
                return Ok(Vec::new());
            }
            INFLIGHT_VERSION => {}
            v => return Err(self.corrupt(Corruption::Version(v))),
        }
        let desc_num = self.get16(self.hdr(DESC_NUM));
        if desc_num != self.size {
            return Err(self.corrupt(Corruption::DescNum {
                found: desc_num,
                expected: self.size,
            }));
        }
        let n = usize::from(self.size);
        // Check everything before writing anything: a refused region stays as it was.
        let mut in_last_batch = vec![false; n];
        let last_batch_head = self.get16(self.hdr(LAST_BATCH_HEAD));
        let pending = ring_used_idx.wrapping_sub(self.get16(self.hdr(USED_IDX)));
        if pending > self.size {
            return Err(self.corrupt(Corruption::BatchTooLong {
                pending,
                queue_size: self.size,
            }));
        }
        let mut head = last_batch_head;
        for _ in 0..pending {
            if head >= self.size {
                return Err(self.corrupt(Corruption::BatchHead {
                    head,
                    queue_size: self.size,
                }));
            }
            if std::mem::replace(&mut in_last_batch[usize::from(head)], true) {
                return Err(self.corrupt(Corruption::BatchLoop { head }));
            }
            head = self.get16(self.desc(head) + D_NEXT);
        }
        let mut found = Vec::new();
        for head in 0..self.size {
            let at = self.desc(head);
            match self.map.bytes()[at + D_INFLIGHT].load(Ordering::Acquire) {
                0 => {}
                1 if in_last_batch[usize::from(head)] => {}
                1 => {
                    let counter =
                        u64::from_le(self.map.u64(at + D_COUNTER).load(Ordering::Acquire));
                    if counter == u64::MAX {
                        return Err(self.corrupt(Corruption::Counter { head, counter }));
                    }
                    found.push((counter, head));
                }
                value => return Err(self.corrupt(Corruption::InflightByte { head, value })),
            }
        }
        // The fix-up, in the spec's order: clear the published batch, then record the used
        // index that covers it. A crash in between just repeats it next time.
        if pending != 0 {
            for head in (0..self.size).filter(|&h| in_last_batch[usize::from(h)]) {
                self.put8(self.desc(head) + D_INFLIGHT, 0);
            }
            self.put16(self.hdr(USED_IDX), ring_used_idx);
        }
        found.sort_unstable();
        if let Some(&(max, _)) = found.last() {
            self.counter = self.counter.max(max + 1);
        }
        self.last_batch_head = last_batch_head;
        self.used_idx = ring_used_idx;
        self.started = true;
        Ok(found.into_iter().map(|(_, head)| head).collect())
    }

    /// Initialises the queue's region: nothing in flight, the used index the ring's. The
    /// version goes last, so a crash half-way leaves a region that is still "fresh".
    fn init(&mut self, ring_used_idx: u16) {
        for head in 0..self.size {
            let at = self.desc(head);
            self.put8(at + D_INFLIGHT, 0);
            self.put16(at + D_NEXT, 0);
            self.put64(at + D_COUNTER, 0);
        }
        self.put64(self.hdr(FEATURES), 0);
        self.put16(self.hdr(DESC_NUM), self.size);
        self.put16(self.hdr(LAST_BATCH_HEAD), 0);
        self.put16(self.hdr(USED_IDX), ring_used_idx);
        self.put16(self.hdr(VERSION), INFLIGHT_VERSION);
        self.counter = 0;
        self.last_batch_head = 0;
        self.used_idx = ring_used_idx;
        self.started = true;
    }

    /// Marks `head`, just popped from the avail ring, in flight: its counter (pop order),
    /// then its inflight byte (the spec's order: the mark is what counts, so it goes last).
    pub fn begin(&mut self, head: u16) -> Result<(), InflightError> {
        self.check(head)?;
        if self.is_inflight(head) {
            return Err(InflightError::AlreadyInflight {
                queue: self.index,
                head,
            });
        }
        let at = self.desc(head);
        self.put64(at + D_COUNTER, self.counter);
        self.put8(at + D_INFLIGHT, 1);
        self.counter += 1;
        Ok(())
    }

    /// Adds `head` to the batch about to be published: links it to the list of the last
    /// batch, then makes it the list's head. Call it for each head of the batch before
    /// writing the used ring's `idx`.
    pub fn batch_add(&mut self, head: u16) -> Result<(), InflightError> {
        self.check(head)?;
        self.put16(self.desc(head) + D_NEXT, self.last_batch_head);
        self.put16(self.hdr(LAST_BATCH_HEAD), head);
        self.last_batch_head = head;
        self.batch = self.batch.wrapping_add(1);
        Ok(())
    }

    /// The batch is published (the used ring's `idx` is now `ring_used_idx`): clears each
    /// head's mark, then records the used index. Call it right after the `idx` store, with the
    /// heads given to `batch_add`. A head outside the ring is skipped (nothing is written
    /// for it) and reported once the used index is recorded.
    pub fn batch_done(
        &mut self,
        heads: impl IntoIterator<Item = u16>,
        ring_used_idx: u16,
    ) -> Result<(), InflightError> {
        debug_assert_eq!(
            ring_used_idx.wrapping_sub(self.used_idx),
            self.batch,
            "the used index must move by the size of the batch"
        );
        let mut bad = None;
        for head in heads {
            match self.check(head) {
                Ok(()) => self.put8(self.desc(head) + D_INFLIGHT, 0),
                Err(e) => bad = bad.or(Some(e)),
            }
        }
        self.put16(self.hdr(USED_IDX), ring_used_idx);
        self.used_idx = ring_used_idx;
        self.batch = 0;
        bad.map_or(Ok(()), Err)
    }

    /// Device reset: nothing is in flight any more. The version goes to 0 first, so a crash
    /// at any point leaves a region the next `recover` initialises afresh (with the ring's
    /// used index, which a reset restarts); the marks are then cleared for tidiness.
    pub fn reset(&mut self) {
        self.put16(self.hdr(VERSION), 0);
        for head in 0..self.size {
            self.put8(self.desc(head) + D_INFLIGHT, 0);
        }
        self.counter = 0;
        self.last_batch_head = 0;
        self.used_idx = 0;
        self.batch = 0;
        self.started = false;
    }

    /// Whether the region marks `head` in flight (false outside the ring).
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.size
            && self.map.bytes()[self.desc(head) + D_INFLIGHT].load(Ordering::Acquire) != 0
    }

    fn check(&self, head: u16) -> Result<(), InflightError> {
        if !self.started {
            return Err(InflightError::NotStarted { queue: self.index });
        }
        if head >= self.size {
            return Err(InflightError::HeadOutOfRange {
                queue: self.index,
                head,
                queue_size: self.size,
            });
        }
        Ok(())
    }

    fn corrupt(&self, what: Corruption) -> InflightError {
        InflightError::Corrupt {
            queue: self.index,
            what,
        }
    }

    /// Offset in the mapping of entry `head` (< size) of this queue.
    fn desc(&self, head: u16) -> usize {
        self.base + HEADER_SIZE + DESC_SIZE * usize::from(head)
    }

    /// Offset in the mapping of this queue's header field `field`.
    fn hdr(&self, field: usize) -> usize {
        self.base + field
    }

    fn get16(&self, at: usize) -> u16 {
        u16::from_le(self.map.u16(at).load(Ordering::Acquire))
    }

    // Stores are Release: none moves above an earlier store (ours, or the caller's used-ring
    // stores), which is the order the recovery relies on when the process dies between two.

    fn put8(&self, at: usize, v: u8) {
        if self.may_store() {
            self.map.bytes()[at].store(v, Ordering::Release);
        }
    }

    fn put16(&self, at: usize, v: u16) {
        if self.may_store() {
            self.map.u16(at).store(v.to_le(), Ordering::Release);
        }
    }

    fn put64(&self, at: usize, v: u64) {
        if self.may_store() {
            self.map.u64(at).store(v.to_le(), Ordering::Release);
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn may_store(&self) -> bool {
        true
    }

    #[cfg(test)]
    fn may_store(&self) -> bool {
        self.crash.as_ref().is_none_or(|c| c.allow())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use proptest::prelude::*;
    use proptest::sample::Index;

    /// A simulated kill: allows `budget` stores, then refuses every later one.
    pub(super) struct CrashPoint {
        left: AtomicU64,
        used: AtomicU64,
        crashed: AtomicBool,
    }

    impl CrashPoint {
        fn new(budget: u64) -> Arc<CrashPoint> {
            Arc::new(CrashPoint {
                left: AtomicU64::new(budget),
                used: AtomicU64::new(0),
                crashed: AtomicBool::new(false),
            })
        }

        /// Whether the next store happens; once one is refused, none happens.
        pub(super) fn allow(&self) -> bool {
            if self.crashed.load(Ordering::Relaxed) {
                return false;
            }
            if self.left.load(Ordering::Relaxed) == 0 {
                self.crashed.store(true, Ordering::Relaxed);
                return false;
            }
            self.left.fetch_sub(1, Ordering::Relaxed);
            self.used.fetch_add(1, Ordering::Relaxed);
            true
        }

        fn crashed(&self) -> bool {
            self.crashed.load(Ordering::Relaxed)
        }

        fn used(&self) -> u64 {
            self.used.load(Ordering::Relaxed)
        }
    }

    fn bytes_at(file: &File, off: u64, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        file.read_exact_at(&mut buf, off).unwrap();
        buf
    }

    fn u16_at(file: &File, off: u64) -> u16 {
        u16::from_le_bytes(bytes_at(file, off, 2).try_into().unwrap())
    }

    fn u64_at(file: &File, off: u64) -> u64 {
        u64::from_le_bytes(bytes_at(file, off, 8).try_into().unwrap())
    }

    fn file_of(size: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn sizes_follow_libvhost_user_and_dpdk() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(queue_region_size(32768), 524_352);
        assert_eq!(region_size(4, 128), 4 * 2112);
        for shift in 0..=15 {
            let q = 1u16 << shift;
            let size = queue_region_size(q);
            // DPDK's formula counts the whole header; both agree for every ring size.
            assert_eq!(size, (16 * u64::from(q) + 16).next_multiple_of(64), "{q}");
            assert!(HEADER_SIZE as u64 + DESC_SIZE as u64 * u64::from(q) <= size);
            assert!(size.is_multiple_of(INFLIGHT_ALIGNMENT));
        }
    }

    #[test]
    fn fields_sit_where_the_spec_puts_them() {
        let region = InflightRegion::create(2, 8).unwrap();
        let f = region.file();
        let base = queue_region_size(8); // queue 1's region
        assert_eq!(base, 192);
        let mut q = region.queue(1).unwrap();
        q.recover(0x1234).unwrap();
        assert_eq!(u64_at(f, base), 0, "features");
        assert_eq!(u16_at(f, base + 8), INFLIGHT_VERSION, "version");
        assert_eq!(u16_at(f, base + 10), 8, "desc_num");
        assert_eq!(u16_at(f, base + 14), 0x1234, "used_idx");

        let entry = |head: u64| base + 16 + 16 * head;
        q.begin(5).unwrap();
        q.begin(3).unwrap();
        assert_eq!(bytes_at(f, entry(5), 1), [1], "inflight");
        assert_eq!(u64_at(f, entry(5) + 8), 0, "counter");
        assert_eq!(u64_at(f, entry(3) + 8), 1, "counter");
        assert_eq!(bytes_at(f, entry(5) + 1, 5), [0; 5], "padding");

        q.batch_add(5).unwrap();
        assert_eq!(u16_at(f, base + 12), 5, "last_batch_head");
        q.batch_add(3).unwrap();
        assert_eq!(u16_at(f, base + 12), 3, "last_batch_head");
        assert_eq!(u16_at(f, entry(3) + 6), 5, "next");
        q.batch_done([5, 3], 0x1236).unwrap();
        assert_eq!(bytes_at(f, entry(5), 1), [0]);
        assert_eq!(bytes_at(f, entry(3), 1), [0]);
        assert_eq!(u16_at(f, base + 14), 0x1236, "used_idx");

        // Queue 0 is another region: untouched.
        assert!(bytes_at(f, 0, base as usize).iter().all(|&b| b == 0));
    }

    #[test]
    fn create_makes_a_sealed_zeroed_memfd() {
        let region = InflightRegion::create(3, 256).unwrap();
        assert_eq!(region.mmap_size(), 3 * 4160);
        assert_eq!(region.mmap_offset(), 0);
        assert_eq!((region.num_queues(), region.queue_size()), (3, 256));
        let f = region.file();
        assert_eq!(f.metadata().unwrap().len(), 3 * 4160);
        assert!(bytes_at(f, 0, 3 * 4160).iter().all(|&b| b == 0));
        // The frontend cannot shrink it under our mapping.
        assert!(f.set_len(100).is_err());
        assert!(f.set_len(1 << 20).is_err());
        // SAFETY: F_GET_SEALS on a descriptor we own.
        let seals = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&region.fd()),
                libc::F_GET_SEALS,
            )
        };
        assert_eq!(seals & libc::F_SEAL_SHRINK, libc::F_SEAL_SHRINK);
    }

    #[test]
    fn open_refuses_what_the_file_does_not_hold() {
        let need = region_size(2, 128);
        let err = |r: Result<InflightRegion, InflightError>| r.err().unwrap().to_string();

        // A file shorter than the region: mapping it would fault past EOF.
        let e = InflightRegion::open(file_of(need - 1), need, 0, 2, 128)
            .err()
            .unwrap();
        assert!(
            matches!(e, InflightError::Map(MapError::PastEnd { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("past the end of the file"), "{e}");
        // The right size, but the offset pushes it past the end.
        let e = InflightRegion::open(file_of(need), need, 64, 2, 128)
            .err()
            .unwrap();
        assert!(
            matches!(e, InflightError::Map(MapError::PastEnd { .. })),
            "{e}"
        );
        let e = InflightRegion::open(file_of(need), need, u64::MAX - 7, 2, 128)
            .err()
            .unwrap();
        assert!(
            matches!(e, InflightError::Map(MapError::PastEnd { .. })),
            "{e}"
        );
        // A size too small for the queues it claims to hold.
        let e = InflightRegion::open(file_of(need), need - 1, 0, 2, 128)
            .err()
            .unwrap();
        assert!(
            matches!(e, InflightError::TooSmall { need: 4224, .. }),
            "{e}"
        );
        let e = InflightRegion::open(file_of(need), 0, 0, 2, 128)
            .err()
            .unwrap();
        assert!(matches!(e, InflightError::TooSmall { .. }), "{e}");
        // Shapes no ring has.
        for qs in [0, 3, 100, 65535] {
            let e = InflightRegion::open(file_of(need), need, 0, 2, qs)
                .err()
                .unwrap();
            assert!(matches!(e, InflightError::QueueSize(q) if q == qs), "{e}");
        }
        assert!(matches!(
            InflightRegion::open(file_of(need), need, 0, 0, 128),
            Err(InflightError::NoQueues)
        ));
        // An offset that would misalign the 64-bit counters.
        let e = InflightRegion::open(file_of(need + 8), need, 4, 2, 128)
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                InflightError::Map(MapError::Misaligned {
                    offset: 4,
                    align: 8
                })
            ),
            "{e}"
        );
        // Not a file whose size means anything.
        let devnull = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let e = InflightRegion::open(devnull, need, 0, 2, 128)
            .err()
            .unwrap();
        assert!(matches!(e, InflightError::Map(MapError::NotRegular)), "{e}");
        assert!(err(InflightRegion::create(1, 48)).contains("power of two"));
    }

    #[test]
    fn open_maps_at_an_offset_inside_a_page() {
        // Not page-aligned: mmap takes the page below, the region starts at the offset.
        let need = region_size(1, 4);
        let region = InflightRegion::open(file_of(64 + need), need, 64, 1, 4).unwrap();
        let mut q = region.queue(0).unwrap();
        q.recover(9).unwrap();
        q.begin(2).unwrap();
        let f = region.file();
        assert_eq!(u16_at(f, 64 + 8), 1);
        assert_eq!(u16_at(f, 64 + 14), 9);
        assert_eq!(bytes_at(f, 64 + 16 + 2 * 16, 1), [1]);
        assert!(bytes_at(f, 0, 64).iter().all(|&b| b == 0));
        assert!(matches!(
            region.queue(1),
            Err(InflightError::NoSuchQueue {
                index: 1,
                num_queues: 1
            })
        ));
    }

    /// The region SET_INFLIGHT_FD would hand a new process: the same bytes, a new mapping.
    fn reopen(region: &InflightRegion) -> InflightRegion {
        InflightRegion::open(
            region.file().try_clone().unwrap(),
            region.mmap_size(),
            region.mmap_offset(),
            region.num_queues(),
            region.queue_size(),
        )
        .unwrap()
    }

    #[test]
    fn a_new_process_resubmits_in_pop_order_and_counts_on() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        assert_eq!(q.recover(40).unwrap(), Vec::<u16>::new());
        for head in [6, 1, 4, 7] {
            q.begin(head).unwrap();
        }
        q.batch_add(4).unwrap();
        q.batch_done([4], 41).unwrap();
        drop(q);

        let again = reopen(&region);
        let mut q = again.queue(0).unwrap();
        assert_eq!(q.recover(41).unwrap(), vec![6, 1, 7]);
        // Resubmitted heads are marked already; new pops count after them.
        assert!(q.is_inflight(6) && q.is_inflight(1) && q.is_inflight(7) && !q.is_inflight(4));
        q.begin(4).unwrap();
        assert_eq!(u64_at(again.file(), 16 + 4 * 16 + 8), 4);
        drop(q);
        let mut q = reopen(&region).queue(0).unwrap();
        assert_eq!(q.recover(41).unwrap(), vec![6, 1, 7, 4]);
    }

    #[test]
    fn a_batch_published_but_not_cleared_is_cleared_on_recovery() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        q.recover(65534).unwrap();
        for head in [0, 1, 2, 3] {
            q.begin(head).unwrap();
        }
        q.batch_add(2).unwrap();
        q.batch_add(0).unwrap();
        q.batch_add(3).unwrap();
        // The used idx moves (wrapping) to 65534 + 3 = 1, then the process dies before
        // batch_done: the region still marks 0, 2, 3 and says used_idx 65534.
        drop(q);
        let mut q = reopen(&region).queue(0).unwrap();
        assert_eq!(q.recover(1).unwrap(), vec![1]);
        assert_eq!(u16_at(region.file(), 14), 1);
        for head in [0, 2, 3] {
            assert!(!q.is_inflight(head));
        }
        // Recovering again finds the same: the fix-up is done and recorded.
        let mut q = reopen(&region).queue(0).unwrap();
        assert_eq!(q.recover(1).unwrap(), vec![1]);
    }

    #[test]
    fn misuse_and_bad_heads_are_refused() {
        let region = InflightRegion::create(1, 4).unwrap();
        let mut q = region.queue(0).unwrap();
        assert!(matches!(
            q.begin(0),
            Err(InflightError::NotStarted { queue: 0 })
        ));
        q.recover(0).unwrap();
        assert!(matches!(
            q.begin(4),
            Err(InflightError::HeadOutOfRange {
                head: 4,
                queue_size: 4,
                ..
            })
        ));
        assert!(matches!(
            q.batch_add(9),
            Err(InflightError::HeadOutOfRange { .. })
        ));
        q.begin(1).unwrap();
        // The driver made head 1 available again while it is in flight.
        assert!(matches!(
            q.begin(1),
            Err(InflightError::AlreadyInflight { head: 1, .. })
        ));
        q.batch_add(1).unwrap();
        // A bad head in batch_done is reported, and the used index is still recorded.
        let e = q.batch_done([1, 77], 1).err().unwrap();
        assert!(
            matches!(e, InflightError::HeadOutOfRange { head: 77, .. }),
            "{e}"
        );
        assert!(!q.is_inflight(1));
        assert_eq!(u16_at(region.file(), 14), 1);
        assert!(!q.is_inflight(77));
    }

    #[test]
    fn reset_forgets_everything_even_when_cut_short() {
        for budget in [0, 1, 2, 3, u64::MAX] {
            let region = InflightRegion::create(1, 4).unwrap();
            let mut q = region.queue(0).unwrap();
            q.recover(7).unwrap();
            q.begin(2).unwrap();
            q.begin(3).unwrap();
            q.crash = Some(CrashPoint::new(budget));
            q.reset();
            assert!(matches!(q.begin(0), Err(InflightError::NotStarted { .. })));
            if budget > 0 {
                assert_eq!(u16_at(region.file(), 8), 0, "version 0 goes first");
            }
            // A new process after a reset: the ring restarted at 0, nothing to resubmit.
            let mut q = reopen(&region).queue(0).unwrap();
            let expect: Vec<u16> = if budget == 0 { vec![2, 3] } else { vec![] };
            assert_eq!(q.recover(if budget == 0 { 7 } else { 0 }).unwrap(), expect);
            assert_eq!(u16_at(region.file(), 14), if budget == 0 { 7 } else { 0 });
        }
    }

    /// Writes a version-1 header for queue 0 of a 4-entry region.
    fn header(f: &File, desc_num: u16, last_batch_head: u16, used_idx: u16) {
        let mut h = [0u8; 16];
        h[8..10].copy_from_slice(&1u16.to_le_bytes());
        h[10..12].copy_from_slice(&desc_num.to_le_bytes());
        h[12..14].copy_from_slice(&last_batch_head.to_le_bytes());
        h[14..16].copy_from_slice(&used_idx.to_le_bytes());
        f.write_all_at(&h, 0).unwrap();
    }

    fn entry(f: &File, head: u64, inflight: u8, next: u16, counter: u64) {
        let mut e = [0u8; 16];
        e[0] = inflight;
        e[6..8].copy_from_slice(&next.to_le_bytes());
        e[8..].copy_from_slice(&counter.to_le_bytes());
        f.write_all_at(&e, 16 + 16 * head).unwrap();
    }

    /// What `recover(ring_used_idx)` says of a 4-entry region written by `write`, checking
    /// that a refused region is left exactly as it was.
    fn recover_crafted(
        write: impl Fn(&File),
        ring_used_idx: u16,
    ) -> Result<Vec<u16>, InflightError> {
        let region = InflightRegion::create(1, 4).unwrap();
        write(region.file());
        let before = bytes_at(region.file(), 0, region.mmap_size() as usize);
        let got = region.queue(0).unwrap().recover(ring_used_idx);
        if got.is_err() {
            assert_eq!(bytes_at(region.file(), 0, before.len()), before);
        }
        got
    }

    #[test]
    fn corrupt_regions_are_refused_without_hanging() {
        let corrupt = |r: Result<Vec<u16>, InflightError>| match r {
            Err(InflightError::Corrupt { what, .. }) => what,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(
            corrupt(recover_crafted(
                |f| f.write_all_at(&7u16.to_le_bytes(), 8).unwrap(),
                0
            )),
            Corruption::Version(7)
        );
        assert_eq!(
            corrupt(recover_crafted(|f| header(f, 8, 0, 0), 0)),
            Corruption::DescNum {
                found: 8,
                expected: 4
            }
        );
        // More published since used_idx than a ring can hold.
        assert_eq!(
            corrupt(recover_crafted(|f| header(f, 4, 0, 10), 15)),
            Corruption::BatchTooLong {
                pending: 5,
                queue_size: 4
            }
        );
        // The last batch's list leads out of the ring...
        assert_eq!(
            corrupt(recover_crafted(|f| header(f, 4, 9, 0), 1)),
            Corruption::BatchHead {
                head: 9,
                queue_size: 4
            }
        );
        assert_eq!(
            corrupt(recover_crafted(
                |f| {
                    header(f, 4, 1, 0);
                    entry(f, 1, 1, 6, 0);
                },
                2
            )),
            Corruption::BatchHead {
                head: 6,
                queue_size: 4
            }
        );
        // ...or round in a loop: 1 -> 2 -> 1.
        assert_eq!(
            corrupt(recover_crafted(
                |f| {
                    header(f, 4, 1, 0);
                    entry(f, 1, 1, 2, 0);
                    entry(f, 2, 1, 1, 1);
                },
                3
            )),
            Corruption::BatchLoop { head: 1 }
        );
        assert_eq!(
            corrupt(recover_crafted(
                |f| {
                    header(f, 4, 0, 0);
                    entry(f, 3, 2, 0, 0);
                },
                0
            )),
            Corruption::InflightByte { head: 3, value: 2 }
        );
        assert_eq!(
            corrupt(recover_crafted(
                |f| {
                    header(f, 4, 0, 0);
                    entry(f, 2, 1, 0, u64::MAX);
                },
                0
            )),
            Corruption::Counter {
                head: 2,
                counter: u64::MAX
            }
        );
        // The same loop is fine when the batch is short enough not to go round it.
        let ok = recover_crafted(
            |f| {
                header(f, 4, 1, 0);
                entry(f, 1, 1, 2, 5);
                entry(f, 2, 1, 1, 3);
            },
            1,
        );
        assert_eq!(ok.unwrap(), vec![2]);
    }

    #[test]
    fn heads_come_back_by_counter_and_counting_goes_on() {
        let region = InflightRegion::create(1, 8).unwrap();
        let f = region.file();
        header(f, 8, 0, 3);
        entry(f, 5, 1, 0, 10);
        entry(f, 2, 1, 0, 3);
        entry(f, 7, 1, 0, 8);
        entry(f, 4, 0, 0, 99); // not in flight: its counter means nothing
        let mut q = region.queue(0).unwrap();
        assert_eq!(q.recover(3).unwrap(), vec![2, 7, 5]);
        q.begin(0).unwrap();
        assert_eq!(u64_at(f, 16 + 8), 11);
    }

    // The crash-consistency model: a driver that makes free heads available, a backend that
    // pops them and completes any of them in batches, killed after any number of stores to
    // the region or to the used ring; then a new process recovers.

    #[derive(Debug, Clone)]
    enum Op {
        Pop,
        /// Complete a batch: each index picks one of the heads in flight.
        Complete(Vec<Index>),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            3 => Just(Op::Pop),
            2 => proptest::collection::vec(any::<Index>(), 1..6).prop_map(Op::Complete),
        ];
        proptest::collection::vec(op, 0..32)
    }

    /// Guest memory: survives the backend.
    #[derive(Clone)]
    struct Guest {
        used_idx: u16,
        used: Vec<u16>,
        /// Heads the driver may make available next, in order.
        free: Vec<u16>,
    }

    impl Guest {
        fn new(size: u16, used_idx: u16) -> Guest {
            Guest {
                used_idx,
                used: vec![u16::MAX; usize::from(size)],
                free: (0..size).collect(),
            }
        }
    }

    /// Runs `ops` until the crash point refuses a store. `inflight`: the heads begun (their
    /// mark stored) and not published (the used idx covering them not stored), in pop order.
    fn run(
        q: &mut InflightQueue,
        guest: &mut Guest,
        inflight: &mut Vec<u16>,
        ops: &[Op],
        cp: &CrashPoint,
    ) {
        let size = guest.used.len();
        for op in ops {
            if cp.crashed() {
                return;
            }
            match op {
                Op::Pop => {
                    let Some(&head) = guest.free.first() else {
                        continue;
                    };
                    q.begin(head).unwrap();
                    if cp.crashed() {
                        // Killed before the mark: this pop never happened, the avail ring
                        // still offers the head at the index recovery computes.
                        return;
                    }
                    guest.free.remove(0);
                    inflight.push(head);
                }
                Op::Complete(picks) => {
                    let mut batch: Vec<u16> = Vec::new();
                    for pick in picks {
                        if !inflight.is_empty() {
                            let head = inflight[pick.index(inflight.len())];
                            if !batch.contains(&head) {
                                batch.push(head);
                            }
                        }
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    for &head in &batch {
                        q.batch_add(head).unwrap();
                    }
                    for (i, &head) in batch.iter().enumerate() {
                        if cp.allow() {
                            guest.used[(usize::from(guest.used_idx) + i) % size] = head;
                        }
                    }
                    let idx = guest.used_idx.wrapping_add(batch.len() as u16);
                    if cp.allow() {
                        guest.used_idx = idx;
                        inflight.retain(|h| !batch.contains(h));
                        guest.free.extend(&batch);
                    }
                    q.batch_done(batch.iter().copied(), idx).unwrap();
                }
            }
        }
    }

    /// A new process over the same region recovers exactly `inflight`, in order; a recovery
    /// itself killed after any number of stores changes nothing of that.
    fn recovered(region: &InflightRegion, guest: &Guest, inflight: &[u16]) -> InflightQueue {
        let snapshot = bytes_at(region.file(), 0, region.mmap_size() as usize);
        for budget in 0.. {
            region.file().write_all_at(&snapshot, 0).unwrap();
            let mut q = region.queue(1).unwrap();
            let cp = CrashPoint::new(budget);
            q.crash = Some(Arc::clone(&cp));
            let first = q.recover(guest.used_idx).unwrap();
            if !cp.crashed() {
                assert_eq!(first, inflight);
                break;
            }
            let mut q = region.queue(1).unwrap();
            assert_eq!(
                q.recover(guest.used_idx).unwrap(),
                inflight,
                "recovery cut after {budget} stores"
            );
        }
        let mut q = reopen(region).queue(1).unwrap();
        assert_eq!(q.recover(guest.used_idx).unwrap(), inflight);
        for head in 0..region.queue_size() {
            assert_eq!(q.is_inflight(head), inflight.contains(&head), "head {head}");
        }
        // The used entries the driver reads are the heads that left the model.
        q
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Killed after every possible number of stores, a backend's successor resubmits
        /// exactly the heads popped and not published, each once, in pop order; and so does
        /// its successor after it runs on from there and is killed too.
        #[test]
        fn recovery_is_exact_after_a_kill_at_any_store(
            size in proptest::sample::select(vec![1u16, 2, 4, 8, 16]),
            start in any::<u16>(),
            first in ops(),
            then in ops(),
            second_budget in 0u64..300,
        ) {
            let stores = {
                let region = InflightRegion::create(2, size).unwrap();
                let mut q = region.queue(1).unwrap();
                let cp = CrashPoint::new(u64::MAX);
                q.crash = Some(Arc::clone(&cp));
                q.recover(start).unwrap();
                run(&mut q, &mut Guest::new(size, start), &mut Vec::new(), &first, &cp);
                cp.used()
            };
            for budget in 0..=stores {
                let region = InflightRegion::create(2, size).unwrap();
                let mut guest = Guest::new(size, start);
                let mut inflight = Vec::new();
                let mut q = region.queue(1).unwrap();
                let cp = CrashPoint::new(budget);
                q.crash = Some(Arc::clone(&cp));
                q.recover(start).unwrap();
                run(&mut q, &mut guest, &mut inflight, &first, &cp);
                drop(q);

                let mut q = recovered(&region, &guest, &inflight);
                let cp = CrashPoint::new(second_budget);
                q.crash = Some(Arc::clone(&cp));
                run(&mut q, &mut guest, &mut inflight, &then, &cp);
                drop(q);
                recovered(&region, &guest, &inflight);

                // Queue 0's region is nobody's business here.
                let q0 = bytes_at(region.file(), 0, queue_region_size(size) as usize);
                prop_assert!(q0.iter().all(|&b| b == 0));
                // Every head is in exactly one place: in flight, or free for the driver.
                let mut all: Vec<u16> = inflight.iter().chain(&guest.free).copied().collect();
                all.sort_unstable();
                prop_assert_eq!(all, (0..size).collect::<Vec<_>>());
            }
        }
    }
}
