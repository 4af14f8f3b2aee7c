//! `CacheTarget`: the top of the block stack. It gates every request on the power state and,
//! with the volatile model, records each write's pre-image before the write goes down, so a
//! power cut can put back what the cut loses.
//!
//! Ordering rules of this layer:
//! - Overlapping writes (writes, discards, write-zeroes) never interleave their pre-image read
//!   and their write: each holds its byte range from before the read until it is recorded, and
//!   a write waits for any range it overlaps. Disjoint writes run in parallel; the lock that
//!   guards the ranges and the history is never held across I/O.
//! - A write is numbered (its completion order) while it still holds its range, so among
//!   overlapping writes the numbering is the order they reached the layer below: what
//!   `History` relies on.
//! - A flush covers the writes numbered before it started; it covers them only once the layer
//!   below flushed.
//! - A cut holds the whole device as one range: it waits for every write in this layer to be
//!   recorded, and none starts until the power is off.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::history::{CutPlan, CutReport, History, WriteKind};
use super::CacheModel;
use crate::storage::medium::unfaulted;
use crate::storage::{BlockIo, Dir, Hold, IoKind, MapIo, Mapping, PerIo};

/// Why a power cut did not do all it should have.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("the power is already off; send power-on first")]
    AlreadyOff,
    #[error(
        "a write is still running in the layers below after {0:?} (a delay fault?); the power \
         stays on: remove the fault or wait, then cut again"
    )]
    Busy(Duration),
    #[error(
        "the power is off, but putting back what the cut loses failed at byte {offset}: {source}; \
         the image may still hold writes the cut meant to lose (check the image's storage, then \
         power-on)"
    )]
    Revert { offset: u64, source: io::Error },
    #[error(
        "the power is off, but flushing the image after the cut failed: {0}; the image and \
         spare may not be durable (check their storage, then power-on)"
    )]
    Flush(io::Error),
}

/// What every request meets while the power is off.
#[derive(Debug, thiserror::Error)]
#[error("the disk's power is off (power-cut); send power-on")]
pub struct PoweredOff;

fn powered_off() -> io::Error {
    io::Error::other(PoweredOff)
}

/// Whether `e` is only that the power is off: the process's own final flush at exit may
/// ignore it, as the cut flushed the layers below and nothing was written since.
pub fn is_powered_off(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<PoweredOff>())
}

pub struct CacheTarget {
    below: Arc<dyn BlockIo>,
    powered: AtomicBool,
    /// With `--cache-model volatile`.
    volatile: Option<Volatile>,
    /// Power cuts and power-ons one at a time.
    switch: Mutex<()>,
    /// The cut that switched the power off left the queues quiesced (`then=hold`): power-on
    /// resumes them.
    held: AtomicBool,
}

/// What `power-on` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerOn {
    pub was_off: bool,
    /// The cut held the queues: the caller resumes them.
    pub resume: bool,
}

struct Volatile {
    state: Mutex<State>,
    /// A range was released.
    released: Condvar,
    /// `--cache-size`: bytes of pre-images held before the cache flushes by itself.
    limit: u64,
    /// Flushes the cache did by itself (it was full, or a write could not be undone).
    auto_flushes: AtomicU64,
    /// Writes whose pre-image could not be read, made durable at once.
    uncaptured: AtomicU64,
}

struct State {
    history: History,
    /// Byte ranges `[start, end)` of writes between their pre-image read and their record.
    busy: Vec<(u64, u64)>,
    /// Threads waiting for a range: whether a release must wake anyone.
    waiters: usize,
    /// Bytes of pre-images being read for writes not yet recorded.
    reserved: u64,
}

/// Whether a write holds a range overlapping `[start, end)`.
fn overlaps(st: &State, start: u64, end: u64) -> bool {
    st.busy.iter().any(|&(s, e)| s < end && start < e)
}

impl Volatile {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no write holds a range overlapping `[start, end)`, then holds it.
    fn hold(&self, start: u64, end: u64) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        while overlaps(&st, start, end) {
            st.waiters += 1;
            st = self.released.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiters -= 1;
        }
        st.busy.push((start, end));
        st
    }

    /// [`hold`](Self::hold), waiting at most `timeout`: None when a write still holds an
    /// overlapping range then.
    fn hold_within(
        &self,
        start: u64,
        end: u64,
        timeout: Duration,
    ) -> Option<MutexGuard<'_, State>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while overlaps(&st, start, end) {
            let left = deadline.checked_duration_since(Instant::now())?;
            st.waiters += 1;
            st = match self.released.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(p) => p.into_inner().0,
            };
            st.waiters -= 1;
        }
        st.busy.push((start, end));
        Some(st)
    }

    /// Releases `[start, end)`, which [`hold`](Self::hold) gave.
    fn release(&self, st: &mut State, start: u64, end: u64) {
        if let Some(i) = st.busy.iter().position(|&r| r == (start, end)) {
            st.busy.swap_remove(i);
        }
        if st.waiters > 0 {
            self.released.notify_all();
        }
    }

    /// Everything completed is durable now: what a drive does when its cache is full.
    fn auto_flush(&self, st: &mut State) {
        st.history.cover_all();
        self.auto_flushes.fetch_add(1, Ordering::Relaxed);
    }
}

impl CacheTarget {
    /// The layer over `below`, for a device of `block_size`-byte blocks; `limit` is
    /// `--cache-size` (used by the volatile model only).
    pub fn new(
        below: Arc<dyn BlockIo>,
        model: CacheModel,
        block_size: u32,
        limit: u64,
    ) -> CacheTarget {
        let volatile = (model == CacheModel::Volatile).then(|| Volatile {
            state: Mutex::new(State {
                history: History::new(u64::from(block_size)),
                busy: Vec::new(),
                waiters: 0,
                reserved: 0,
            }),
            released: Condvar::new(),
            limit,
            auto_flushes: AtomicU64::new(0),
            uncaptured: AtomicU64::new(0),
        });
        CacheTarget {
            below,
            powered: AtomicBool::new(true),
            volatile,
            switch: Mutex::new(()),
            held: AtomicBool::new(false),
        }
    }

    pub fn model(&self) -> CacheModel {
        if self.volatile.is_some() {
            CacheModel::Volatile
        } else {
            CacheModel::None
        }
    }

    pub fn powered(&self) -> bool {
        self.powered.load(Ordering::Acquire)
    }

    /// Bytes of completed writes no completed flush covers (what a cut may lose).
    pub fn unflushed_bytes(&self) -> u64 {
        self.volatile
            .as_ref()
            .map_or(0, |v| v.lock().history.held())
    }

    /// Flushes the cache did by itself.
    pub fn auto_flushes(&self) -> u64 {
        self.volatile
            .as_ref()
            .map_or(0, |v| v.auto_flushes.load(Ordering::Relaxed))
    }

    /// Writes made durable at once because what they overwrote could not be read.
    pub fn uncaptured_writes(&self) -> u64 {
        self.volatile
            .as_ref()
            .map_or(0, |v| v.uncaptured.load(Ordering::Relaxed))
    }

    fn gate(&self) -> io::Result<()> {
        if self.powered() {
            Ok(())
        } else {
            Err(powered_off())
        }
    }

    /// `power-cut`, once the caller quiesced the queues: loses what `plan` picks of the
    /// unflushed writes (writing their blocks' earlier content through the layers below),
    /// flushes the layers below, and switches the power off. `hold`: the caller leaves the
    /// queues quiesced until power-on. A write the drain gave up on that still runs below
    /// this layer is waited for at most `wait` (the drain timeout): nothing hangs for good.
    /// The power is off after any error but [`PowerError::AlreadyOff`] and
    /// [`PowerError::Busy`].
    pub fn power_cut(
        &self,
        plan: &CutPlan,
        hold: bool,
        wait: Duration,
    ) -> Result<CutReport, PowerError> {
        let _switch = self.switch.lock().unwrap_or_else(|p| p.into_inner());
        if !self.powered() {
            return Err(PowerError::AlreadyOff);
        }
        let Some(v) = &self.volatile else {
            self.held.store(hold, Ordering::Relaxed);
            self.powered.store(false, Ordering::Release);
            // The medium's own flush, like the reverts below: no injected flush fault fails it.
            unfaulted(|| self.below.flush()).map_err(PowerError::Flush)?;
            return Ok(CutReport::default());
        };
        // The whole device: waits for writes still between their read and their record (a
        // request the drain gave up on may still run here).
        let mut st = v
            .hold_within(0, u64::MAX, wait)
            .ok_or(PowerError::Busy(wait))?;
        self.held.store(hold, Ordering::Relaxed);
        let (reverts, report) = st.history.cut(plan);
        drop(st);
        let mut result = Ok(report);
        for r in &reverts {
            let iov = [libc::iovec {
                iov_base: r.data.as_ptr() as *mut libc::c_void,
                iov_len: r.data.len(),
            }];
            // The medium's old data back, beneath any injected fault.
            let put_back = || {
                // SAFETY: the iovec points to `r.data`, which lives until the call returns and
                // is only read.
                unsafe { self.below.writev(r.offset, &iov) }
            };
            if let Err(source) = unfaulted(put_back) {
                result = Err(PowerError::Revert {
                    offset: r.offset,
                    source,
                });
                break;
            }
        }
        if result.is_ok() {
            // What makes the reverts durable stands for the medium too.
            if let Err(e) = unfaulted(|| self.below.flush()) {
                result = Err(PowerError::Flush(e));
            }
        }
        self.powered.store(false, Ordering::Release);
        let mut st = v.lock();
        v.release(&mut st, 0, u64::MAX);
        result
    }

    /// The disk below was replaced (`overlay-reset`, quiesced): what was unflushed on the old
    /// one can no longer be lost, and its pre-images must never be written on the new one.
    pub fn forget_unflushed(&self) {
        let _switch = self.switch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = &self.volatile {
            v.lock().history.cover_all();
        }
    }

    /// `power-on`: the disk takes requests again, with nothing unflushed.
    pub fn power_on(&self) -> PowerOn {
        let _switch = self.switch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = &self.volatile {
            v.lock().history.cover_all();
        }
        let was_off = !self.powered.swap(true, Ordering::AcqRel);
        PowerOn {
            was_off,
            resume: was_off && self.held.swap(false, Ordering::Relaxed),
        }
    }

    /// Carries out a write, discard or write-zeroes (`apply`) of `len` bytes at `offset`
    /// under the volatile model: holds the range, reads what it overwrites, applies it, and
    /// records it. A write that cannot be undone (larger than the whole cache, or its
    /// pre-image unreadable) is made durable at once instead, with everything before it: a
    /// drive that must write through does so in order.
    fn change(
        &self,
        v: &Volatile,
        offset: u64,
        len: u64,
        kind: WriteKind,
        apply: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset.saturating_add(len);
        let mut st = v.hold(offset, end);
        // Checked holding the range: a cut that ran while this write waited switched it off.
        if !self.powered() {
            v.release(&mut st, offset, end);
            return Err(powered_off());
        }
        let mut buf = None;
        if len <= v.limit {
            if st.history.held() + st.reserved + len > v.limit {
                v.auto_flush(&mut st);
            }
            st.reserved += len;
            buf = Some(st.history.buffer(len as usize));
        }
        drop(st);
        let pre = buf.and_then(|mut b| {
            let room = &mut b.spare_capacity_mut()[..len as usize];
            let iov = [libc::iovec {
                iov_base: room.as_mut_ptr() as *mut libc::c_void,
                iov_len: room.len(),
            }];
            let read_old = || {
                // SAFETY: the iovec points to `len` bytes of `b`'s spare capacity, owned here
                // until the call returns.
                unsafe { self.below.readv(offset, &iov) }
            };
            // What the medium holds, beneath any injected fault.
            match unfaulted(read_old) {
                Ok(()) => {
                    // SAFETY: a layer's readv fills the whole of its iovecs or fails, so the
                    // first `len` bytes of the capacity are initialised now.
                    unsafe { b.set_len(len as usize) };
                    Some(b)
                }
                Err(e) => {
                    log::warn!(
                        "cache: cannot read the {len} bytes at {offset} a write overwrites ({e}); \
                         the write is durable at once"
                    );
                    v.uncaptured.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        });
        let result = apply();
        let mut st = v.lock();
        if len <= v.limit {
            st.reserved -= len;
        }
        // A failed write is recorded too: it may have changed part of its range, and a cut
        // may lose that as well.
        match pre {
            Some(b) => {
                st.history.record(offset, kind, b);
            }
            None => {
                v.auto_flush(&mut st);
                st.history.record_durable();
            }
        }
        v.release(&mut st, offset, end);
        result
    }
}

impl BlockIo for CacheTarget {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        self.gate()?;
        // SAFETY: the caller vouches for `iov`.
        unsafe { self.below.readv(offset, iov) }
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        self.gate()?;
        let Some(v) = &self.volatile else {
            // SAFETY: the caller vouches for `iov`.
            return unsafe { self.below.writev(offset, iov) };
        };
        let len: usize = iov.iter().map(|i| i.iov_len).sum();
        self.change(v, offset, len as u64, WriteKind::Write, || {
            // SAFETY: the caller vouches for `iov`.
            unsafe { self.below.writev(offset, iov) }
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.gate()?;
        let Some(v) = &self.volatile else {
            return self.below.flush();
        };
        // virtio-blk: a flush covers what completed before it was submitted; what completed
        // before it got here includes all of that.
        let upto = v.lock().history.completed();
        self.below.flush()?;
        v.lock().history.cover(upto);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.gate()?;
        match &self.volatile {
            None => self.below.discard(offset, len),
            Some(v) => self.change(v, offset, len, WriteKind::Discard, || {
                self.below.discard(offset, len)
            }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.gate()?;
        match &self.volatile {
            None => self.below.write_zeroes(offset, len, unmap),
            Some(v) => self.change(v, offset, len, WriteKind::WriteZeroes, || {
                self.below.write_zeroes(offset, len, unmap)
            }),
        }
    }

    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        // Refused while off, so the request reaches readv/writev and fails there; a volatile
        // write must be seen here (its pre-image first).
        self.powered()
            && (io.dir == Dir::Read || self.volatile.is_none())
            && self.below.map(io, out)
    }

    fn end_io(&self, io: MapIo, per_io: &PerIo) -> bool {
        self.below.end_io(io, per_io)
    }

    fn hold(&self, kind: IoKind, offset: u64, len: u64) -> Option<Hold> {
        self.below.hold(kind, offset, len)
    }
}

#[cfg(test)]
mod tests;
