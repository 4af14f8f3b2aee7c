//! A migration between two remapblk processes on one image and spare, at the protocol level:
//! what QEMU's source and destination do to their backends, with raw frontends. The source
//! serves and remaps; the destination (`serve --incoming`) is set up while the source still
//! runs; the source's rings stop (GET_VRING_BASE), then the destination's start, and it takes
//! over: it serves the source's data and remaps, and the source no longer writes (its requests
//! fail with IOERR). Then the migration goes back: the source takes over again once the
//! destination's rings stopped, and sees what the destination wrote.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const QSIZE: u16 = 64;

/// A 4 KiB request on ring 0 as chain `3 * slot`; waits for it and returns its status.
fn one(g: &mut RawGuest, slot: u16, kind: u32, sector: u64) -> u8 {
    let before = g.used_idx(0);
    g.add(0, slot, kind, sector);
    g.publish_and_kick(0);
    g.wait("the request", Duration::from_secs(30), |g| {
        g.used_idx(0) != before
    });
    g.status(0, slot)
}

fn write(g: &mut RawGuest, slot: u16, sector: u64, seed: u64) -> u8 {
    g.write_buf(0, slot, &pattern(seed, sector, BUF));
    one(g, slot, VIRTIO_BLK_T_OUT, sector)
}

/// Reads 4 KiB at `sector`; its status, and whether it holds `pattern(seed, sector)`.
fn read_back(g: &mut RawGuest, slot: u16, sector: u64, seed: u64) -> (u8, bool) {
    g.write_buf(0, slot, &[0xa5; BUF]);
    let st = one(g, slot, VIRTIO_BLK_T_IN, sector);
    (st, g.read_buf(0, slot) == pattern(seed, sector, BUF))
}

/// What QEMU's destination does before the migration's end: everything but starting rings.
fn prepare(socket: &std::path::Path) -> RawGuest {
    let mut g = RawGuest::new(socket, 1, QSIZE);
    g.negotiate(false);
    g.set_mem_table();
    g.set_ring(0, 0);
    g
}

/// Starts ring 0 at avail index `base`.
fn start(g: &mut RawGuest, base: u16) {
    g.start_ring(0, base);
}

#[test]
fn the_incoming_process_takes_over_when_the_sources_rings_stop_and_back() {
    let src = Server::start(8 * MIB, &["--spare-blocks", "64"]);
    let mut a = RawGuest::connect(&src.socket, 1, QSIZE, false);
    assert_eq!(write(&mut a, 0, 0, 1), 0);
    src.ctl_ok("remap-add", &["lba=8", "count=8"]);
    assert_eq!(write(&mut a, 1, 8, 1), 0, "a write to remapped blocks");

    let dir = tempfile::tempdir().expect("tempdir");
    let dst = Server::start_on(dir, src.image.clone(), &["--incoming"]);
    let mut b = prepare(&dst.socket);
    assert_eq!(
        dst.ctl_ok("query-status", &[])["handover"]["state"],
        "incoming"
    );

    // The source writes on while the destination waits, including a remap made meanwhile.
    src.ctl_ok("remap-add", &["lba=16", "count=8"]);
    assert_eq!(write(&mut a, 2, 16, 2), 0);

    // The end of the migration: the source's rings stop, then the destination's start. (Each
    // raw frontend has guest memory of its own, so the destination's ring starts at its own
    // index 0, where a migrated ring would start at the source's.)
    let base = a.frontend.get_vring_base(0).unwrap() as u16;
    // QEMU may touch the stopped ring again (SET_VRING_ENABLE comes around the stop): a wake
    // of a stopped ring must not take the files back from the process waiting for them.
    a.frontend.set_vring_enable(0, true).unwrap();
    start(&mut b, 0);
    for (slot, sector, seed) in [(0, 0, 1), (1, 8, 1), (2, 16, 2)] {
        assert_eq!(
            read_back(&mut b, slot, sector, seed),
            (0, true),
            "the destination reads what the source wrote at sector {sector}"
        );
    }
    assert_eq!(
        dst.ctl_ok("query-status", &[])["handover"]["state"],
        "writer"
    );
    assert_eq!(
        dst.remapped_lbas(),
        (8..24).collect::<Vec<_>>(),
        "the source's remaps"
    );
    assert_eq!(write(&mut b, 3, 24, 3), 0);
    assert_eq!(
        write(&mut b, 4, 8, 4),
        0,
        "a write to a block the source remapped"
    );

    // The source's frontend starts its ring again (a migration that the source's QEMU thinks
    // failed): it may not write any more, so its requests fail rather than hang.
    start(&mut a, base);
    assert_ne!(
        write(&mut a, 5, 32, 5),
        0,
        "the old source wrote after the handover"
    );
    assert_eq!(
        src.ctl_ok("query-status", &[])["handover"]["state"],
        "handed-over"
    );
    drop(a);

    // Back: a fresh frontend on the source waits while the destination still runs, and takes
    // over once the destination's ring stopped; it sees the destination's writes.
    let mut a = prepare(&src.socket);
    b.frontend.get_vring_base(0).unwrap();
    start(&mut a, 0);
    assert_eq!(
        read_back(&mut a, 0, 24, 3),
        (0, true),
        "the destination's write"
    );
    assert_eq!(
        read_back(&mut a, 1, 8, 4),
        (0, true),
        "its write to a remapped block"
    );
    assert_eq!(
        src.ctl_ok("query-status", &[])["handover"]["state"],
        "writer"
    );
}
