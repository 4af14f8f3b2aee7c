//! Dirty logging for migration (VHOST_F_LOG_ALL with LOG_SHMFD), through a raw frontend: while
//! LOG_ALL is on, every guest page the backend writes has its bit in the log (read data, status
//! bytes, the used ring), and no page it only reads does; with LOG_ALL off nothing is marked.

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::raw::*;
use common::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const QSIZE: u16 = 64;
const PAGE: u64 = 4096;

/// The log's bytes (a bit per 4 KiB page of guest memory).
fn log_bytes(f: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![0u8; MEM_SIZE / PAGE as usize / 8];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

fn marked(log: &[u8], gpa: u64) -> bool {
    let page = gpa / PAGE;
    log[(page / 8) as usize] & (1 << (page % 8)) != 0
}

/// Reads on slots `0..reads` and a write on slot `reads`, each completed.
fn io(g: &mut RawGuest, reads: u16) {
    let before = g.used_idx(0);
    for slot in 0..reads {
        g.add(0, slot, VIRTIO_BLK_T_IN, u64::from(slot) * 8);
    }
    g.write_buf(0, reads, &pattern(7, 0, BUF));
    g.add(0, reads, VIRTIO_BLK_T_OUT, u64::from(reads) * 8);
    g.publish_and_kick(0);
    g.wait("the requests", Duration::from_secs(10), |g| {
        g.used_idx(0) == before.wrapping_add(reads + 1)
    });
    for slot in 0..=reads {
        assert_eq!(g.status(0, slot), 0);
    }
}

#[test]
fn pages_the_backend_writes_are_logged_while_log_all_is_on() {
    let s = Server::start(4 * MIB, &[]);
    let mut g = RawGuest::new(&s.socket, 1, QSIZE);
    g.negotiate_with(VhostUserProtocolFeatures::LOG_SHMFD);
    g.set_mem_table();
    g.start_ring(0, 0);
    let log = memfd((MEM_SIZE / PAGE as usize / 8).max(4096));
    g.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: (MEM_SIZE as u64 / PAGE / 8),
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .unwrap();
    // Logging is off until LOG_ALL is acked: nothing is marked.
    io(&mut g, 4);
    assert!(
        log_bytes(&log).iter().all(|b| *b == 0),
        "marked with LOG_ALL off"
    );
    assert_eq!(s.ctl_ok("query-status", &[])["dirty_logging"], false);

    g.frontend
        .set_features(g.features | VHOST_F_LOG_ALL)
        .unwrap();
    assert_eq!(s.ctl_ok("query-status", &[])["dirty_logging"], true);
    io(&mut g, 4);
    let bits = log_bytes(&log);
    for slot in 0..4 {
        assert!(
            marked(&bits, g.buf(0, slot).0),
            "read buffer {slot} (page {:#x}) not logged",
            g.buf(0, slot).0
        );
    }
    assert!(
        !marked(&bits, g.buf(0, 4).0),
        "the write's buffer was logged, though the backend only read it"
    );
    for (what, gpa) in RawGuest::ring_layout(0) {
        let want = matches!(what, "used ring" | "statuses");
        assert_eq!(marked(&bits, gpa), want, "{what} at {gpa:#x}");
    }
    let pages = bits.iter().map(|b| b.count_ones()).sum::<u32>();
    assert_eq!(
        pages, 6,
        "exactly the 4 read buffers, the used ring and the statuses"
    );

    // The migration is over: LOG_ALL off, nothing more is marked.
    g.frontend.set_features(g.features).unwrap();
    {
        use std::os::unix::fs::FileExt;
        log.write_all_at(&vec![0u8; bits.len()], 0).unwrap();
    }
    io(&mut g, 2);
    assert!(
        log_bytes(&log).iter().all(|b| *b == 0),
        "marked after LOG_ALL was turned off"
    );
}
