//! The I/O engines end to end: io_uring carries plain reads and writes (also reads that span
//! remapped blocks, split between the image and the spare file), falls back to the
//! synchronous path where a fault or a repair needs it, and the null engine stores nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn stat(s: &Server, name: &str) -> u64 {
    s.ctl_ok("query-stats", &[])["totals"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("query-stats has no totals.{name}"))
}

/// Bytes 0..REGION hold one pattern per 512-byte block.
const REGION: u64 = 1100 * 512;

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset / 512..(offset + len as u64) / 512)
        .flat_map(|b| pattern(7, b * 512, 512))
        .collect()
}

#[test]
fn io_uring_reads_span_image_and_spare_and_return_the_right_bytes() {
    let s = Server::start(4 * MIB, &["--engine", "io_uring"]);
    assert_eq!(s.ctl_ok("query-status", &[])["engine"], "io_uring");
    let mut c = s.client(1);
    // One pattern per 512-byte block, so that reads of any shape know what to expect.
    fill(&mut c, 7, 0, REGION, 512, 32);
    assert!(stat(&s, "ring_io") > 0, "writes went through the ring");

    // Remap scattered single blocks and runs, then spoil those blocks in the image file: a
    // read that still went to the image would see the junk.
    for (lba, count) in [(3, 1), (9, 2), (40, 1), (41, 1), (300, 5), (1000, 1)] {
        s.ctl_ok(
            "remap-add",
            &[&format!("lba={lba}"), &format!("count={count}")],
        );
    }
    spoil_blocks(&s.image, [3, 9, 10, 40, 41, 300, 301, 302, 303, 304, 1000]);

    let before = stat(&s, "ring_io");
    // Reads of every shape across the remapped blocks: single blocks, whole runs, straddling.
    verify(&mut c, 7, 0, REGION, 512, 32);
    for len in [1024, 4096, 65536] {
        for offset in (0..REGION - len as u64).step_by(len / 2 + 512) {
            assert!(
                c.read(0, offset, len).unwrap() == expected(offset, len),
                "read at {offset}+{len}"
            );
        }
    }
    assert!(
        stat(&s, "ring_io") > before,
        "the reads went through the ring"
    );
    assert_eq!(stat(&s, "ring_redone"), 0);

    // Writes to remapped blocks take the synchronous path and land in the spare.
    let data = pattern(8, 296 * 512, 8192);
    assert_eq!(c.write(0, 296 * 512, &data), 0);
    assert_eq!(c.read(0, 296 * 512, 8192).unwrap(), data);
    assert_eq!(read_file_at(&s.image, 300 * 512, 512), vec![0xee; 512]);
}

/// With O_DIRECT nothing is served from the page cache inline: reads and writes go through
/// the ring itself.
#[test]
fn io_uring_ring_path_with_o_direct() {
    let s = Server::start(4 * MIB, &["--engine", "io_uring", "--direct"]);
    let mut c = s.client(1);
    fill(&mut c, 5, 0, 2 * MIB, 4096, 32);
    verify(&mut c, 5, 0, 2 * MIB, 4096, 32);
    // Remapped blocks inside aligned reads: runs of image and spare through the ring. The
    // image's copies of the remapped blocks are spoiled, so a read that lets the image's data
    // land over the spare's (the ring runs pieces in any order) returns junk.
    s.ctl_ok("remap-add", &["lba=9", "count=100", "stride=37"]);
    spoil_blocks(&s.image, (0..100).map(|k| 9 + 37 * k));
    verify(&mut c, 5, 0, 2 * MIB, 4096, 32);
    // Whole remapped pages inside larger reads: the image's runs stay aligned and go through
    // the ring, the spare's (held in memory) are copied beside them.
    s.ctl_ok("remap-add", &["lba=1024", "count=8"]);
    s.ctl_ok("remap-add", &["lba=2064", "count=16"]);
    fill(&mut c, 6, 0, 2 * MIB, 16384, 8);
    spoil_blocks(&s.image, (1024..1032).chain(2064..2080));
    let before = stat(&s, "ring_io") - stat(&s, "ring_inline");
    verify(&mut c, 6, 0, 2 * MIB, 16384, 8);
    assert!(stat(&s, "ring_io") - stat(&s, "ring_inline") >= before + 16);
    assert_eq!(read_file_at(&s.image, 0, 4096), pattern(6, 0, 4096));
    let totals = s.ctl_ok("query-stats", &[])["totals"].clone();
    let on_ring = stat(&s, "ring_io") - stat(&s, "ring_inline");
    assert!(
        on_ring >= 1024,
        "aligned O_DIRECT requests went through the ring: {totals}"
    );
    assert_eq!(stat(&s, "ring_redone"), 0, "{totals}");
}

#[test]
fn io_uring_leaves_faulty_blocks_to_the_fault_layer() {
    let s = Server::start(4 * MIB, &["--engine", "io_uring", "--auto-remap", "off"]);
    let mut c = s.client(1);
    fill(&mut c, 3, 0, 64 << 10, 4096, 16);
    s.ctl_ok("fault-add", &["op=read", "lba=16", "count=1"]);
    s.ctl_ok("fault-add", &["op=write", "lba=64", "count=1"]);
    assert!(
        c.read(0, 12 * 512, 4096).is_err(),
        "read over the fault fails"
    );
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(3, 0, 4096));
    assert_ne!(
        c.write(0, 64 * 512, &[1; 512]),
        0,
        "write over the fault fails"
    );
    assert_eq!(c.write(0, 72 * 512, &[1; 512]), 0);
}

#[test]
fn null_engine_reads_zeros_and_drops_writes() {
    let s = Server::start(4 * MIB, &["--engine", "null"]);
    assert_eq!(s.ctl_ok("query-status", &[])["engine"], "null");
    let mut c = s.client(1);
    assert_eq!(c.write(0, 0, &pattern(1, 0, 8192)), 0);
    assert_eq!(c.read(0, 0, 8192).unwrap(), vec![0; 8192]);
    assert!(
        read_file_at(&s.image, 0, 8192).iter().all(|&b| b == 0),
        "nothing reached the image"
    );
}

#[test]
fn sync_engine_does_not_use_the_ring() {
    let s = Server::start(4 * MIB, &["--engine", "sync"]);
    assert_eq!(s.ctl_ok("query-status", &[])["engine"], "sync");
    let mut c = s.client(1);
    fill(&mut c, 2, 0, 256 << 10, 4096, 16);
    verify(&mut c, 2, 0, 256 << 10, 4096, 16);
    assert_eq!(stat(&s, "ring_io"), 0);
}

#[test]
fn unknown_engine_is_bad_usage() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = serve_refused(
        &dir.path().join("d.img"),
        &dir.path().join("d.sock"),
        &["--engine", "aio"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("io_uring"), "{err}");
}

/// A worker that keeps polling its ring still lets every way of stopping it through: the
/// client leaves, the next one is served, and SIGTERM ends the process in time.
#[test]
fn polling_workers_serve_and_stop_cleanly() {
    for engine in ["io_uring", "sync"] {
        let mut s = Server::start(
            4 * MIB,
            &[
                "--engine",
                engine,
                "--poll-us",
                "100000",
                "--num-queues",
                "2",
            ],
        );
        let mut c = s.client(2);
        fill(&mut c, 11, 0, MIB, 16 << 10, 32);
        verify(&mut c, 11, 0, MIB, 16 << 10, 64);
        drop(c);
        wait_until("the client to be gone", Duration::from_secs(10), || {
            s.ctl_ok("query-status", &[])["connected"] == false
        });
        let mut c = s.client(2);
        verify(&mut c, 11, 0, MIB, 16 << 10, 16);
        let t0 = Instant::now();
        s.signal(libc::SIGTERM);
        assert_eq!(s.wait_exit(Duration::from_secs(5)).code(), Some(0));
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{engine}: exit took {:?}",
            t0.elapsed()
        );
    }
}
