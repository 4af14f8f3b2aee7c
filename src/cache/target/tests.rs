//! The layer over an in-memory disk: what a cut keeps and loses, the power gate, the cache's
//! own flushes, and writes from several threads at once.

use std::sync::{mpsc, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::cache::{CutMode, Tearing};

const BS: u32 = 512;
const WAIT: Duration = Duration::from_secs(10);

/// A disk in memory; reads of the bytes in `bad` fail (an injected media error); a write
/// with `stall` set says it entered, then waits to be released.
struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    bad: Mutex<Option<std::ops::Range<u64>>>,
    flushes: AtomicU64,
    stall: Mutex<Option<Arc<Stall>>>,
}

struct Stall {
    entered: mpsc::Sender<()>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl MemDisk {
    fn new(len: usize) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            bytes: Mutex::new((0..len).map(|i| (i % 251) as u8).collect()),
            bad: Mutex::new(None),
            flushes: AtomicU64::new(0),
            stall: Mutex::new(None),
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

impl BlockIo for MemDisk {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        if let Some(bad) = &*self.bad.lock().unwrap() {
            if bad.start < offset + len && offset < bad.end {
                return Err(io::Error::other("injected media error"));
            }
        }
        let bytes = self.bytes.lock().unwrap();
        let mut at = offset as usize;
        for v in iov {
            // SAFETY: the caller vouches for `iov`.
            let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
            dst.copy_from_slice(&bytes[at..at + v.iov_len]);
            at += v.iov_len;
        }
        Ok(())
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let stall = self.stall.lock().unwrap().clone();
        if let Some(s) = stall {
            s.entered.send(()).unwrap();
            s.release.lock().unwrap().recv().unwrap();
        }
        let mut bytes = self.bytes.lock().unwrap();
        let mut at = offset as usize;
        for v in iov {
            // SAFETY: the caller vouches for `iov`.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            bytes[at..at + v.iov_len].copy_from_slice(src);
            at += v.iov_len;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap();
        bytes[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn write(t: &CacheTarget, offset: u64, data: &[u8]) -> io::Result<()> {
    let iov = [libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }];
    // SAFETY: the iovec points to `data`, only read, alive for the call.
    unsafe { t.writev(offset, &iov) }
}

fn read(t: &CacheTarget, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: len,
    }];
    // SAFETY: the iovec points to `buf`, alive for the call.
    unsafe { t.readv(offset, &iov) }?;
    Ok(buf)
}

fn plan(mode: CutMode) -> CutPlan {
    CutPlan {
        mode,
        probability: 0.5,
        seed: 1,
        torn: Tearing::Off,
    }
}

fn volatile(disk: &Arc<MemDisk>, limit: u64) -> CacheTarget {
    CacheTarget::new(disk.clone(), CacheModel::Volatile, BS, limit)
}

#[test]
fn drop_all_keeps_what_a_flush_covered_and_loses_the_rest() {
    let disk = MemDisk::new(64 * 1024);
    let t = volatile(&disk, 1 << 20);
    let base = disk.snapshot();
    write(&t, 0, &[0xaa; 4096]).unwrap();
    t.flush().unwrap();
    write(&t, 4096, &[0xbb; 4096]).unwrap();
    write(&t, 0, &[0xcc; 512]).unwrap();
    t.discard(8192, 1024).unwrap();
    t.write_zeroes(16384, 512, false).unwrap();
    assert_eq!(t.unflushed_bytes(), 4096 + 512 + 1024 + 512);
    let report = t.power_cut(&plan(CutMode::DropAll), false, WAIT).unwrap();
    assert_eq!(report.counts.lost, 4);
    let after = disk.snapshot();
    assert_eq!(&after[..4096], &[0xaa; 4096][..], "the flushed write stays");
    assert_eq!(&after[4096..], &base[4096..], "the rest is as before");
    assert!(!t.powered());
    assert_eq!(t.unflushed_bytes(), 0);
}

#[test]
fn keep_all_keeps_every_write() {
    let disk = MemDisk::new(16 * 1024);
    let t = volatile(&disk, 1 << 20);
    write(&t, 512, &[7; 1024]).unwrap();
    let before = disk.snapshot();
    let report = t.power_cut(&plan(CutMode::KeepAll), false, WAIT).unwrap();
    assert_eq!((report.counts.kept, report.counts.reverted_bytes), (1, 0));
    assert_eq!(disk.snapshot(), before);
}

#[test]
fn while_off_every_request_fails_until_power_on() {
    let disk = MemDisk::new(16 * 1024);
    for model in [CacheModel::None, CacheModel::Volatile] {
        let t = CacheTarget::new(disk.clone(), model, BS, 1 << 20);
        t.power_cut(&plan(CutMode::DropAll), false, WAIT).unwrap();
        assert!(read(&t, 0, 512).is_err());
        assert!(write(&t, 0, &[1; 512]).is_err());
        assert!(t.flush().is_err());
        assert!(t.discard(0, 512).is_err());
        assert!(t.write_zeroes(0, 512, false).is_err());
        let mut m = Mapping::default();
        assert!(!t.map(
            MapIo::new(Dir::Read, 0, 512, crate::storage::Pass::Queued),
            &mut m
        ));
        assert!(matches!(
            t.power_cut(&plan(CutMode::DropAll), false, WAIT),
            Err(PowerError::AlreadyOff)
        ));
        assert_eq!(
            t.power_on(),
            PowerOn {
                was_off: true,
                resume: false
            }
        );
        assert!(!t.power_on().was_off, "already on");
        write(&t, 0, &[1; 512]).unwrap();
        assert_eq!(read(&t, 0, 512).unwrap(), vec![1; 512]);
    }
}

#[test]
fn a_cut_waits_for_a_running_write_at_most_the_drain_timeout() {
    let disk = MemDisk::new(16 * 1024);
    let t = volatile(&disk, 1 << 20);
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *disk.stall.lock().unwrap() = Some(Arc::new(Stall {
        entered: entered_tx,
        release: Mutex::new(release_rx),
    }));
    std::thread::scope(|s| {
        let w = s.spawn(|| write(&t, 0, &[9; 512]));
        entered.recv().unwrap();
        let r = t.power_cut(&plan(CutMode::DropAll), false, Duration::from_millis(50));
        assert!(matches!(r, Err(PowerError::Busy(_))), "{r:?}");
        assert!(t.powered(), "a refused cut leaves the power on");
        *disk.stall.lock().unwrap() = None;
        release.send(()).unwrap();
        w.join().unwrap().unwrap();
    });
    let report = t.power_cut(&plan(CutMode::DropAll), false, WAIT).unwrap();
    assert_eq!(
        report.counts.lost, 1,
        "the write that ran is lost with the next cut"
    );
}

#[test]
fn a_write_flushed_before_it_completes_is_never_lost() {
    // Writethrough (WCE off): the blocking path flushes after every write before the request
    // completes, so a cut (after the drain) finds nothing unflushed.
    let disk = MemDisk::new(16 * 1024);
    let t = volatile(&disk, 1 << 20);
    for i in 0..8u8 {
        write(&t, u64::from(i) * 512, &[i + 1; 512]).unwrap();
        t.flush().unwrap();
    }
    assert_eq!(t.unflushed_bytes(), 0);
    let before = disk.snapshot();
    let report = t.power_cut(&plan(CutMode::DropAll), false, WAIT).unwrap();
    assert_eq!(report.counts.lost, 0);
    assert_eq!(disk.snapshot(), before);
}

#[test]
fn a_full_cache_flushes_by_itself_and_counts_it() {
    let disk = MemDisk::new(64 * 1024);
    let t = volatile(&disk, 4096);
    for i in 0..12u8 {
        write(&t, u64::from(i) * 1024, &[i + 1; 1024]).unwrap();
    }
    assert!(t.unflushed_bytes() <= 4096);
    assert_eq!(
        t.auto_flushes(),
        2,
        "4 writes fit; the 5th and the 9th flush"
    );
    // Larger than the whole cache: durable at once, with everything before it.
    write(&t, 32 * 1024, &[0xee; 8192]).unwrap();
    assert_eq!((t.unflushed_bytes(), t.auto_flushes()), (0, 3));
    let before = disk.snapshot();
    t.power_cut(&plan(CutMode::DropAll), false, WAIT).unwrap();
    assert_eq!(disk.snapshot(), before);
}

#[test]
fn a_write_whose_old_data_cannot_be_read_is_durable_at_once() {
    let disk = MemDisk::new(16 * 1024);
    let t = volatile(&disk, 1 << 20);
    write(&t, 0, &[1; 512]).unwrap();
    *disk.bad.lock().unwrap() = Some(1024..1536);
    write(&t, 1024, &[2; 512]).unwrap();
    *disk.bad.lock().unwrap() = None;
    write(&t, 2048, &[3; 512]).unwrap();
    assert_eq!(t.uncaptured_writes(), 1);
    let base = disk.snapshot();
    let report = t.power_cut(&plan(CutMode::DropAll), false, WAIT).unwrap();
    assert_eq!(report.counts.lost, 1, "only the write after it");
    let after = disk.snapshot();
    assert_eq!(&after[..512], &[1; 512][..]);
    assert_eq!(&after[1024..1536], &[2; 512][..]);
    assert_ne!(&after[2048..2560], &base[2048..2560]);
}

#[test]
fn reads_map_through_and_volatile_writes_do_not() {
    let disk = MemDisk::new(16 * 1024);
    // MemDisk maps nothing: the layer must not claim more than the layer below.
    let t = volatile(&disk, 1 << 20);
    let mut m = Mapping::default();
    assert!(!t.map(
        MapIo::new(Dir::Write, 0, 512, crate::storage::Pass::Queued),
        &mut m
    ));
}

proptest! {
    /// Writes from four threads at once, some overlapping, some flushed: a drop-all cut
    /// leaves exactly the state every flush that completed covered.
    #[test]
    fn concurrent_writes_and_flushes_then_drop_all(
        plans in prop::collection::vec(prop::collection::vec((0..32u64, 1..4u64, any::<bool>()), 1..12), 4),
    ) {
        let disk = MemDisk::new(64 * 512);
        let t = Arc::new(volatile(&disk, 1 << 20));
        // Each thread writes its own byte, flushing now and then.
        std::thread::scope(|s| {
            for (n, p) in plans.iter().enumerate() {
                let t = t.clone();
                s.spawn(move || {
                    for &(at, len, flush) in p {
                        let len = len.min(32 - at) * 512;
                        write(&t, at * 512, &vec![n as u8 + 1; len as usize]).unwrap();
                        if flush {
                            t.flush().unwrap();
                        }
                    }
                });
            }
        });
        // Flush everything once, then overwrite: drop-all must bring back the flushed image.
        t.flush().unwrap();
        let flushed = disk.snapshot();
        std::thread::scope(|s| {
            for (n, p) in plans.iter().enumerate() {
                let t = t.clone();
                s.spawn(move || {
                    for &(at, len, _) in p {
                        let len = len.min(32 - at) * 512;
                        write(&t, at * 512, &vec![0x80 | n as u8; len as usize]).unwrap();
                    }
                });
            }
        });
        t.power_cut(&plan(CutMode::DropAll), false, WAIT).unwrap();
        prop_assert_eq!(disk.snapshot(), flushed);
    }
}
