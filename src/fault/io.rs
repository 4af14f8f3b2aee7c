//! The fault layer as a block target: it decides each request's fate, then hands it to the
//! image underneath (or, for the modes that change data, a changed request).

use std::io;
use std::ops::RangeInclusive;
use std::sync::Arc;

use super::corrupt;
use super::spec::{Corruption, FaultOp, TornReport};
use super::table::{FaultTable, Verdict};
use crate::storage::iov::{gather, sub_iovecs};
use crate::storage::{
    block_span, BlockIo, Dir, Hold, IoKind, MapIo, Mapping, MediaError, NotMediaError, PerIo,
};

/// Torn writes count in sectors of this size, whatever the block size: the unit a disk
/// writes atomically.
const SECTOR: u64 = 512;

pub struct FaultyTarget {
    inner: Arc<dyn BlockIo>,
    table: Arc<FaultTable>,
    block_size: u64,
}

/// A request of `len` bytes at byte `offset` cut where the blocks in `blocks` begin and end:
/// `(at, len, inside)` pieces, `at` counted from the request's start, empty pieces left out.
fn pieces(
    offset: u64,
    len: u64,
    blocks: &RangeInclusive<u64>,
    block_size: u64,
) -> impl Iterator<Item = (u64, u64, bool)> {
    let end = offset + len;
    let from = (blocks.start() * block_size).clamp(offset, end);
    let to = ((blocks.end() + 1) * block_size).clamp(offset, end);
    [(offset, from, false), (from, to, true), (to, end, false)]
        .into_iter()
        .filter(|&(a, b, _)| b > a)
        .map(move |(a, b, inside)| (a - offset, b - a, inside))
}

/// Where the pieces of a misdirected request go: `(at, len, to)`, `len` bytes from byte `at`
/// of the request written at byte address `to`. The request's blocks in `moved` land `shift`
/// blocks away; the rest land where they belong.
fn misdirected(
    offset: u64,
    len: u64,
    moved: RangeInclusive<u64>,
    shift: i64,
    block_size: u64,
) -> Vec<(u64, u64, u64)> {
    let shifted = |a: u64| a.wrapping_add_signed(shift.wrapping_mul(block_size as i64));
    pieces(offset, len, &moved, block_size)
        .map(|(at, n, inside)| {
            let to = offset + at;
            (at, n, if inside { shifted(to) } else { to })
        })
        .collect()
}

/// The pieces of a write that land when the blocks in `lost` are lost: `(at, len)` from the
/// request's start. Only the fault's blocks are lost, however the guest merged its writes.
fn kept(offset: u64, len: u64, lost: RangeInclusive<u64>, block_size: u64) -> Vec<(u64, u64)> {
    pieces(offset, len, &lost, block_size)
        .filter(|&(_, _, inside)| !inside)
        .map(|(at, n, _)| (at, n))
        .collect()
}

/// The bytes of a torn write that land: its first `sectors` sectors, or all of it.
fn torn_len(len: u64, sectors: u32) -> u64 {
    len.min(u64::from(sectors) * SECTOR)
}

fn torn_result(id: u64, report: TornReport) -> io::Result<()> {
    match report {
        TornReport::Ok => Ok(()),
        TornReport::Error => Err(io::Error::other(NotMediaError(format!(
            "injected torn write (fault {id})"
        )))),
    }
}

impl FaultyTarget {
    pub fn new(inner: Arc<dyn BlockIo>, table: Arc<FaultTable>, block_size: u32) -> FaultyTarget {
        FaultyTarget {
            inner,
            table,
            block_size: u64::from(block_size),
        }
    }

    /// The request's fate: failures come back as the error, stalls are served here (on the
    /// queue's worker, on purpose); what is left is for the caller to carry out (`Pass` or a
    /// mode that changes data). Delays and hangs are not served here but before the request
    /// starts, off the worker ([`BlockIo::hold`]). A flush has no blocks: `offset` and `len`
    /// are 0.
    fn decide(&self, op: FaultOp, offset: u64, len: u64) -> io::Result<Verdict> {
        // The cache model's own reads and reverts stand for the medium: no fault hits them.
        if crate::storage::medium::is_unfaulted() || (len == 0 && op != FaultOp::Flush) {
            return Ok(Verdict::Pass);
        }
        let (first, last) = block_span(offset, len, self.block_size);
        match self.table.check(op, first, last) {
            Verdict::Delay(d) => {
                std::thread::sleep(d);
                Ok(Verdict::Pass)
            }
            // A failed flush is no bad block: nothing above may remap for it.
            Verdict::Fail(id, _) if op == FaultOp::Flush => Err(io::Error::other(NotMediaError(
                format!("injected flush failure (fault {id}; fault-remove id={id} ends it)"),
            ))),
            Verdict::Fail(id, bad) => Err(io::Error::other(MediaError {
                cause: format!("injected media error (fault {id})"),
                bad,
            })),
            other => Ok(other),
        }
    }

    /// XORs the read data in `iov` (bytes from `offset`) as `how` corrupts `blocks`.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads and writes of its length.
    unsafe fn corrupt_read(
        &self,
        offset: u64,
        iov: &[libc::iovec],
        how: Corruption,
        blocks: RangeInclusive<u64>,
    ) {
        let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        let mut byte = Vec::with_capacity(1);
        corrupt::for_each_flip(offset, len, how, blocks, self.block_size, |at, m| {
            sub_iovecs(iov, at as u64, 1, &mut byte);
            if let Some(v) = byte.first() {
                let p = v.iov_base.cast::<u8>();
                // SAFETY: `p` is one byte inside an iovec the caller vouches for.
                unsafe { *p ^= m };
            }
        });
    }
}

impl BlockIo for FaultyTarget {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let verdict = self.decide(FaultOp::Read, offset, len as u64)?;
        // SAFETY: the caller vouches for `iov`.
        unsafe { self.inner.readv(offset, iov)? };
        if let Verdict::Corrupt(_, how, blocks) = verdict {
            // The guest's buffer, never the image, gets the damage: the image stays intact.
            // SAFETY: the caller vouches for `iov`, which the read just filled.
            unsafe { self.corrupt_read(offset, iov, how, blocks) };
        }
        Ok(())
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        match self.decide(FaultOp::Write, offset, len as u64)? {
            Verdict::Corrupt(_, how, blocks) => {
                // A copy of the guest's data is corrupted, never guest memory itself.
                let mut buf = vec![0u8; len];
                // SAFETY: the caller vouches for `iov`; `buf` holds their total length.
                unsafe { gather(iov, &mut buf) };
                corrupt::apply(&mut buf, offset, how, blocks, self.block_size);
                let one = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: `one` describes `buf`, live for the call.
                unsafe { self.inner.writev(offset, &one) }
            }
            Verdict::Lose(_, lost) => {
                let mut part = Vec::new();
                for (at, n) in kept(offset, len as u64, lost, self.block_size) {
                    sub_iovecs(iov, at, n, &mut part);
                    // SAFETY: pieces of the caller's `iov`.
                    unsafe { self.inner.writev(offset + at, &part)? };
                }
                Ok(())
            }
            Verdict::Misdirect(_, shift, moved) => {
                let mut part = Vec::new();
                for (at, n, to) in misdirected(offset, len as u64, moved, shift, self.block_size) {
                    sub_iovecs(iov, at, n, &mut part);
                    // SAFETY: pieces of the caller's `iov`.
                    unsafe { self.inner.writev(to, &part)? };
                }
                Ok(())
            }
            Verdict::Torn(id, sectors, report) => {
                let mut part = Vec::new();
                sub_iovecs(iov, 0, torn_len(len as u64, sectors), &mut part);
                // SAFETY: the front of the caller's `iov`.
                unsafe { self.inner.writev(offset, &part)? };
                torn_result(id, report)
            }
            // SAFETY: the caller vouches for `iov`.
            _ => unsafe { self.inner.writev(offset, iov) },
        }
    }

    fn flush(&self) -> io::Result<()> {
        // Only error, flaky and delay take op=flush: no verdict is left to carry out.
        self.decide(FaultOp::Flush, 0, 0)?;
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ranged(FaultOp::Discard, offset, len, |o, l| {
            self.inner.discard(o, l)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.ranged(FaultOp::WriteZeroes, offset, len, |o, l| {
            self.inner.write_zeroes(o, l, unmap)
        })
    }

    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        let op = match io.dir {
            Dir::Read => FaultOp::Read,
            Dir::Write => FaultOp::Write,
        };
        let (first, last) = block_span(io.offset, io.len, self.block_size);
        // A fault that could fire must see the request: only readv/writev consult it.
        !self.table.may_apply(op, first, last) && self.inner.map(io, out)
    }

    fn end_io(&self, io: MapIo, per_io: &PerIo) -> bool {
        self.inner.end_io(io, per_io)
    }

    fn hold(&self, kind: IoKind, offset: u64, len: u64) -> Option<Hold> {
        if crate::storage::medium::is_unfaulted() {
            return None;
        }
        // Each kind as itself: `FaultOp::covers` decides which faults see it, as on the data
        // path (a flush asks with no blocks, and only flush faults match it).
        let op = match kind {
            IoKind::Read => FaultOp::Read,
            IoKind::Write => FaultOp::Write,
            IoKind::Discard => FaultOp::Discard,
            IoKind::WriteZeroes => FaultOp::WriteZeroes,
            IoKind::Flush => FaultOp::Flush,
        };
        let (first, last) = block_span(offset, len, self.block_size);
        self.table.hold(op, first, last)
    }
}

impl FaultyTarget {
    /// Discard and write-zeroes (`op`), which carry no data: faults of op write see them too;
    /// they are lost, misdirected or torn like a write, and `corrupt` has nothing to corrupt
    /// in them (it never matches them).
    fn ranged(
        &self,
        op: FaultOp,
        offset: u64,
        len: u64,
        run: impl Fn(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        match self.decide(op, offset, len)? {
            Verdict::Lose(_, lost) => {
                for (at, n) in kept(offset, len, lost, self.block_size) {
                    run(offset + at, n)?;
                }
                Ok(())
            }
            Verdict::Misdirect(_, shift, moved) => {
                for (_, n, to) in misdirected(offset, len, moved, shift, self.block_size) {
                    run(to, n)?;
                }
                Ok(())
            }
            Verdict::Torn(id, sectors, report) => {
                run(offset, torn_len(len, sectors))?;
                torn_result(id, report)
            }
            _ => run(offset, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use crate::fault::spec::Blocks;
    use crate::fault::trigger::Trigger;
    use crate::fault::{FaultMode, FaultSpec};
    use std::sync::Mutex;

    /// A disk in memory: what the fault layer hands down is what it holds.
    struct Mem(Mutex<Vec<u8>>);

    impl BlockIo for Mem {
        unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
            let bytes = self.0.lock().unwrap();
            let mut at = offset as usize;
            for v in iov {
                // SAFETY: the caller vouches for `iov`.
                let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast(), v.iov_len) };
                dst.copy_from_slice(&bytes[at..at + v.iov_len]);
                at += v.iov_len;
            }
            Ok(())
        }

        unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
            let mut bytes = self.0.lock().unwrap();
            let mut at = offset as usize;
            for v in iov {
                // SAFETY: the caller vouches for `iov`.
                let src = unsafe { std::slice::from_raw_parts(v.iov_base.cast(), v.iov_len) };
                bytes[at..at + v.iov_len].copy_from_slice(src);
                at += v.iov_len;
            }
            Ok(())
        }

        fn flush(&self) -> io::Result<()> {
            Ok(())
        }

        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.write_zeroes(offset, len, true)
        }

        fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
            self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    /// A target over 16 blocks of 512 bytes holding `i as u8` at byte `i`, with one fault.
    fn target(lba: u64, count: u64, mode: FaultMode) -> (FaultyTarget, Arc<Mem>) {
        let mem = Arc::new(Mem(Mutex::new((0..8192).map(|i| i as u8).collect())));
        let table = Arc::new(FaultTable::new(Arc::new(EventLog::disabled())));
        table.add(FaultSpec {
            op: FaultOp::Any,
            blocks: Some(Blocks { lba, count }),
            mode,
            times: None,
            trigger: Trigger::default(),
        });
        (FaultyTarget::new(mem.clone(), table, 512), mem)
    }

    /// Two iovecs over `a` and `b`, split off-block as a guest's buffers may be.
    fn split(a: &mut [u8], b: &mut [u8]) -> [libc::iovec; 2] {
        [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ]
    }

    #[test]
    fn a_corrupt_read_damages_the_buffers_across_iovecs_and_not_the_disk() {
        let how = Corruption::Xor {
            xor: 0xff,
            offset: 100,
        };
        let (t, mem) = target(2, 2, FaultMode::Corrupt(how));
        let before = mem.0.lock().unwrap().clone();
        // Blocks 1..=3; the buffers split at byte 700 of the request (block 2's byte 188).
        let (mut a, mut b) = (vec![0u8; 700], vec![0u8; 836]);
        // SAFETY: the iovecs point to `a` and `b`, live for the call.
        unsafe { t.readv(512, &split(&mut a, &mut b)).unwrap() };
        let got = [a, b].concat();
        let changed: Vec<usize> = (0..got.len())
            .filter(|&i| got[i] != before[512 + i])
            .collect();
        // Block 2's byte 100 is byte 612 of the request; block 3's, 1124.
        assert_eq!(changed, vec![612, 1124]);
        assert_eq!(*mem.0.lock().unwrap(), before);
    }

    #[test]
    fn a_corrupt_write_stores_damage_and_leaves_the_guests_buffers() {
        let how = Corruption::Bits { bits: 3, seed: 5 };
        let (t, mem) = target(0, 16, FaultMode::Corrupt(how));
        let (mut a, mut b) = (vec![0x5au8; 300], vec![0xa5u8; 724]);
        let (a0, b0) = (a.clone(), b.clone());
        // SAFETY: as above.
        unsafe { t.writev(1024, &split(&mut a, &mut b)).unwrap() };
        assert_eq!((a, b), (a0.clone(), b0.clone()));
        let stored = mem.0.lock().unwrap()[1024..2048].to_vec();
        let flipped: u32 = stored
            .iter()
            .zip([a0, b0].concat())
            .map(|(x, y)| (x ^ y).count_ones())
            .sum();
        assert_eq!(flipped, 6);
    }

    #[test]
    fn misdirected_and_torn_writes_through_split_iovecs() {
        let (t, mem) = target(4, 2, FaultMode::Misdirect { shift: 6 });
        let before = mem.0.lock().unwrap().clone();
        let (mut a, mut b) = (vec![1u8; 700], vec![2u8; 836]);
        let data = [a.clone(), b.clone()].concat();
        // SAFETY: as above.
        unsafe { t.writev(3 * 512, &split(&mut a, &mut b)).unwrap() };
        let now = mem.0.lock().unwrap().clone();
        // Block 3 lands in place, blocks 4..=5 at 10..=11, blocks 4..=5 keep old data.
        assert_eq!(now[1536..2048], data[..512]);
        assert_eq!(now[2048..3072], before[2048..3072]);
        assert_eq!(now[5120..6144], data[512..]);

        let (t, mem) = target(
            0,
            16,
            FaultMode::Torn {
                sectors: 2,
                report: TornReport::Error,
            },
        );
        let before = mem.0.lock().unwrap().clone();
        let (mut a, mut b) = (vec![7u8; 600], vec![8u8; 1448]);
        let data = [a.clone(), b.clone()].concat();
        // SAFETY: as above.
        let e = unsafe { t.writev(0, &split(&mut a, &mut b)) }.unwrap_err();
        assert!(NotMediaError::is(&e));
        let now = mem.0.lock().unwrap().clone();
        assert_eq!(now[..1024], data[..1024]);
        assert_eq!(now[1024..2048], before[1024..2048]);
    }

    #[test]
    fn a_lost_write_loses_only_the_faults_blocks() {
        // Blocks 10..=13 of 512 bytes, the fault on 11..=12: blocks 10 and 13 land.
        assert_eq!(
            kept(10 * 512, 4 * 512, 11..=12, 512),
            vec![(0, 512), (1536, 512)]
        );
        assert_eq!(kept(11 * 512, 1024, 11..=12, 512), vec![]);
        let (t, mem) = target(4, 2, FaultMode::LostWrite);
        let before = mem.0.lock().unwrap().clone();
        // Blocks 3..=6: 3 and 6 land, 4..=5 keep their old data.
        let (mut a, mut b) = (vec![1u8; 700], vec![2u8; 1348]);
        let data = [a.clone(), b.clone()].concat();
        // SAFETY: the iovecs point to `a` and `b`, live for the call.
        unsafe { t.writev(3 * 512, &split(&mut a, &mut b)).unwrap() };
        let now = mem.0.lock().unwrap().clone();
        assert_eq!(now[1536..2048], data[..512]);
        assert_eq!(now[2048..3072], before[2048..3072]);
        assert_eq!(now[3072..3584], data[1536..]);
    }

    #[test]
    fn a_misdirected_write_moves_only_the_faults_blocks() {
        // Blocks 10..=13 of 512 bytes, the fault on 11..=12, shifted by +100.
        assert_eq!(
            misdirected(10 * 512, 4 * 512, 11..=12, 100, 512),
            vec![
                (0, 512, 10 * 512),
                (512, 1024, 111 * 512),
                (1536, 512, 13 * 512)
            ]
        );
        // The whole write inside the fault, shifted back.
        assert_eq!(
            misdirected(20 * 512, 1024, 20..=21, -5, 512),
            vec![(0, 1024, 15 * 512)]
        );
    }

    #[test]
    fn a_torn_write_keeps_its_first_sectors_and_reports_as_told() {
        assert_eq!(torn_len(4096, 3), 1536);
        assert_eq!(torn_len(1024, 3), 1024);
        assert!(torn_result(1, TornReport::Ok).is_ok());
        let e = torn_result(1, TornReport::Error).unwrap_err();
        assert!(NotMediaError::is(&e) && MediaError::of(&e).is_none());
    }
    #[test]
    fn a_flush_fault_fails_flushes_as_no_media_error_and_leaves_data_alone() {
        let mem = Arc::new(Mem(Mutex::new(vec![0u8; 8192])));
        let table = Arc::new(FaultTable::new(Arc::new(EventLog::disabled())));
        let t = FaultyTarget::new(mem.clone(), table.clone(), 512);
        assert!(t.flush().is_ok());
        table.add(FaultSpec {
            op: FaultOp::Flush,
            blocks: None,
            mode: FaultMode::Error,
            times: Some(1),
            trigger: Trigger::default(),
        });
        let mut a = vec![9u8; 512];
        let one = [libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        }];
        // SAFETY: `one` points to `a`, live for the call.
        unsafe { t.writev(512, &one).unwrap() };
        t.discard(1024, 512).unwrap();
        let e = t.flush().unwrap_err();
        assert!(NotMediaError::is(&e) && MediaError::of(&e).is_none(), "{e}");
        assert!(t.flush().is_ok(), "times=1 spent");
        assert_eq!(mem.0.lock().unwrap()[512..1024], [9u8; 512]);
    }
}
