//! The engines' contract, against small stacks made for it: what is done at once, what is
//! handed back for the blocking path, and that `end_io` is asked before a job is called done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::*;
use crate::storage::iov::{gather, scatter};
use crate::storage::{BlockIo, Dir, Extent, MapIo, Mapping, MemoryExtent, PerIo, Source};
use crate::virtio::request::{DataSegment, RequestType, Segments};
use crate::virtio::GuestMem;

const BUF: u64 = 0x1000;

/// A disk of 64 KiB in memory that maps reads to its own bytes as a memory extent (so an engine
/// can copy them without a system call), and whose mapping can be made stale or refused.
#[derive(Default)]
struct Layer {
    data: Mutex<Vec<u8>>,
    /// `end_io` says the bytes moved meanwhile.
    stale: AtomicBool,
    /// `map` refuses (a layer that must see the request itself).
    refuse: AtomicBool,
    flushes: AtomicUsize,
    writes: AtomicUsize,
}

impl Layer {
    fn new() -> Arc<Layer> {
        let l = Layer::default();
        *l.data.lock().unwrap() = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        Arc::new(l)
    }
}

impl MemoryExtent for Layer {
    unsafe fn copy_to(&self, offset: u64, iov: &[libc::iovec]) -> bool {
        // SAFETY: the caller vouches for the iovecs; the tests read inside the disk.
        unsafe { scatter(iov, &self.data.lock().unwrap()[offset as usize..]) };
        true
    }
}

impl BlockIo for Layer {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> std::io::Result<()> {
        // SAFETY: the caller vouches for the iovecs.
        unsafe { self.copy_to(offset, iov) };
        Ok(())
    }
    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the caller vouches for the iovecs; the tests write inside the disk.
        unsafe { gather(iov, &mut self.data.lock().unwrap()[offset as usize..]) };
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        if self.refuse.load(Ordering::SeqCst) {
            return false;
        }
        out.push(Extent {
            at: io.at,
            len: io.len,
            source: match io.dir {
                Dir::Read => Source::Memory {
                    from: self,
                    offset: io.offset,
                },
                Dir::Write => Source::Zeros,
            },
        });
        true
    }
    fn end_io(&self, _io: MapIo, _per_io: &PerIo) -> bool {
        !self.stale.load(Ordering::SeqCst)
    }
}

fn view() -> GuestMemView {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    GuestMemoryAtomic::new(mem).memory()
}

fn job(kind: RequestType, sector: u64, len: u32, writethrough: bool) -> Job {
    let mut data = Segments::default();
    data.push(DataSegment {
        addr: GuestAddress(BUF),
        len,
    });
    Job {
        head: 3,
        req: Request {
            kind,
            sector,
            data,
            data_len: u64::from(len),
            ranges: Vec::new(),
            status_addr: GuestAddress(0x8000),
        },
        mem: view(),
        since: Instant::now(),
        writethrough,
    }
}

fn target(layer: &Arc<Layer>) -> Target {
    Target {
        stack: layer.clone(),
        serial: *b"serial-for-the-test\0",
    }
}

fn guest_bytes(job: &Job, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    job.mem.read_slice(&mut out, GuestAddress(BUF)).unwrap();
    out
}

#[test]
fn a_read_the_stack_holds_in_memory_is_done_at_once() {
    let layer = Layer::new();
    let mut e = EngineKind::Null.build(&target(&layer), 0, 64);
    let Started::Done(d) = e.start(job(RequestType::In, 8, 4096, false)) else {
        panic!("not done at once");
    };
    assert_eq!(d.result.as_ref().ok(), Some(&4096));
    assert_eq!(
        guest_bytes(&d.job, 4096),
        layer.data.lock().unwrap()[4096..8192]
    );
}

#[test]
fn a_moved_mapping_is_redone_a_refused_one_blocks() {
    let layer = Layer::new();
    let mut e = EngineKind::Null.build(&target(&layer), 0, 64);
    layer.stale.store(true, Ordering::SeqCst);
    assert!(matches!(
        e.start(job(RequestType::In, 0, 512, false)),
        Started::Redo(_)
    ));
    layer.stale.store(false, Ordering::SeqCst);
    layer.refuse.store(true, Ordering::SeqCst);
    let Started::Blocking(j) = e.start(job(RequestType::In, 0, 512, false)) else {
        panic!("a refused map must take the blocking path");
    };
    // The blocking path goes through the layer's own readv.
    let d = target(&layer).run(j);
    assert_eq!(d.result.as_ref().ok(), Some(&512));
    assert_eq!(guest_bytes(&d.job, 512), layer.data.lock().unwrap()[..512]);
}

#[test]
fn writethrough_writes_and_other_kinds_take_the_blocking_path_which_flushes() {
    let layer = Layer::new();
    for kind in [EngineKind::Null, EngineKind::Sync] {
        let mut e = kind.build(&target(&layer), 0, 64);
        for j in [
            job(RequestType::Out, 0, 512, true),
            job(RequestType::Flush, 0, 0, false),
            job(RequestType::GetId, 0, 20, false),
        ] {
            assert!(
                matches!(e.start(j), Started::Blocking(_)),
                "{kind:?} moved a job only the blocking path may run"
            );
        }
    }
    let before = layer.flushes.load(Ordering::SeqCst);
    let d = target(&layer).run(job(RequestType::Out, 0, 512, true));
    assert!(d.result.is_ok());
    assert_eq!(layer.writes.load(Ordering::SeqCst), 1);
    assert_eq!(
        layer.flushes.load(Ordering::SeqCst),
        before + 1,
        "writethrough"
    );
    let d = target(&layer).run(job(RequestType::GetId, 0, 20, false));
    assert_eq!(d.result.as_ref().ok(), Some(&20));
    assert_eq!(guest_bytes(&d.job, 20), b"serial-for-the-test\0");
}

#[test]
fn a_writeback_write_the_stack_drops_is_done_at_once() {
    let layer = Layer::new();
    let mut e = EngineKind::Null.build(&target(&layer), 0, 64);
    let Started::Done(d) = e.start(job(RequestType::Out, 0, 512, false)) else {
        panic!("not done at once");
    };
    assert_eq!(d.result.as_ref().ok(), Some(&0));
    assert_eq!(
        layer.writes.load(Ordering::SeqCst),
        0,
        "zeros: nothing written"
    );
}

/// A stack whose plain reads come from a pipe nobody writes: on a ring, such a read stays in
/// the kernel until it is cancelled.
struct PipeLayer {
    read_end: std::fs::File,
    _write_end: std::fs::File,
}

impl BlockIo for PipeLayer {
    unsafe fn readv(&self, _: u64, _: &[libc::iovec]) -> std::io::Result<()> {
        Err(std::io::Error::other("not on the blocking path"))
    }
    unsafe fn writev(&self, _: u64, _: &[libc::iovec]) -> std::io::Result<()> {
        Err(std::io::Error::other("not on the blocking path"))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        use std::os::fd::AsFd;
        out.push(Extent {
            at: io.at,
            len: io.len,
            source: Source::File {
                fd: self.read_end.as_fd(),
                offset: 0,
                align: 1,
            },
        });
        true
    }
}

/// Found by the vhost-user fuzz target (an io_uring fd left open after a session ended): the
/// cancel request a drain or a drop submits was counted as an I/O in the kernel but its
/// completion was not, so the engine, once dropped, waited 5 s for an I/O that was over, then
/// leaked its ring. A cancelled engine now drops at once.
#[test]
fn a_cancelled_uring_engine_drops_at_once() {
    if EngineKind::IoUring.probe().is_err() {
        eprintln!("no io_uring here; skipped");
        return;
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills the two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptors pipe2 just returned, owned by nobody else.
    let (read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let layer = Arc::new(PipeLayer {
        read_end,
        _write_end: write_end,
    });
    let target = Target {
        stack: layer,
        serial: *b"serial-for-the-test\0",
    };
    let mut e = EngineKind::IoUring.build(&target, 0, 64);
    assert!(matches!(
        e.start(job(RequestType::In, 0, 512, false)),
        Started::Queued
    ));
    e.submit().unwrap();
    e.cancel_all();
    // The cancelled read completes (failed): it comes back to be redone.
    let start = Instant::now();
    let mut reaped = Vec::new();
    while reaped.is_empty() && start.elapsed() < std::time::Duration::from_secs(5) {
        e.reap(&mut reaped);
    }
    assert!(matches!(reaped.as_slice(), [Reaped::Redo(_)]));
    let start = Instant::now();
    drop(e);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(1),
        "dropping the engine took {:?}",
        start.elapsed()
    );
}

/// With the volatile cache on top, a writeback write is unflushed once it completes, and a
/// writethrough one (WCE off) is not: the blocking path's flush after it covers it before the
/// request completes. Neither is moved by an engine (the cache must read what it overwrites).
#[test]
fn under_a_volatile_cache_only_writeback_writes_stay_unflushed() {
    use crate::cache::{CacheModel, CacheTarget};
    let layer = Layer::new();
    let cache = Arc::new(CacheTarget::new(
        layer.clone(),
        CacheModel::Volatile,
        512,
        1 << 20,
    ));
    let t = Target {
        stack: cache.clone(),
        serial: *b"serial-for-the-test\0",
    };
    let mut e = EngineKind::Null.build(&t, 0, 64);
    let Started::Blocking(j) = e.start(job(RequestType::Out, 0, 512, false)) else {
        panic!("a volatile write must take the blocking path");
    };
    assert!(t.run(j).result.is_ok());
    assert_eq!(cache.unflushed_bytes(), 512);
    assert!(t.run(job(RequestType::Flush, 0, 0, false)).result.is_ok());
    assert_eq!(cache.unflushed_bytes(), 0);
    assert!(t.run(job(RequestType::Out, 8, 512, true)).result.is_ok());
    assert_eq!(
        cache.unflushed_bytes(),
        0,
        "writethrough leaves nothing unflushed"
    );
}
