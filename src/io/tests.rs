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
