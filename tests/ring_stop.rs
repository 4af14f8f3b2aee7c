//! Ring stop under load, at the protocol level: a raw vhost-user frontend (the `vhost` crate's
//! `Frontend`) with its guest memory in a memfd and a split virtqueue laid out here by hand
//! puts 64 virtio-blk writes in the avail ring (some of them slowed by a `delay` fault), kicks,
//! and sends GET_VRING_BASE at a seeded random point. The reply must come only after every
//! request the backend took has its status byte and used entry written: right after the
//! reply, used.idx equals the returned base, exactly the first `base` requests are complete
//! with status OK, the rest untouched, nothing is in flight, and nothing completes afterwards.
//! The ring is then started again (SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK) and the rest
//! completes. 200 cycles on one connection.

mod common;

use std::time::{Duration, Instant};

use common::load::*;
use common::raw::*;
use common::*;
use serde_json::json;
use vhost::VhostBackend;

const QSIZE: u16 = 256;
/// Requests per cycle; request `i` uses descriptors 3i..3i+2 and writes 4 KiB at sector 8i.
const REQS: u16 = 64;
const DELAY_MS: u64 = 2;
const CYCLES: u64 = 200;

/// Puts request `i` (a 4 KiB write of `data` at sector 8i) in the avail ring.
fn add_write(g: &mut RawGuest, i: u16, data: &[u8]) {
    g.write_buf(0, i, data);
    g.add(0, i, VIRTIO_BLK_T_OUT, 8 * u64::from(i));
}

fn wait_used(g: &RawGuest, at_least: u16, what: &str) {
    g.wait(what, Duration::from_secs(20), |g| {
        g.used_idx(0).wrapping_sub(at_least) <= QSIZE
    });
}

#[test]
fn get_vring_base_returns_only_after_every_accepted_request_is_used() {
    let seed = seed(6002);
    let _guard = SeedGuard(seed);
    let mut rng = Rng::new(seed);
    let s = Server::start(4 * MIB, &["--queue-size", "256"]);
    let mut ctl = Ctl::connect(&s.control());
    // Every fourth request is slow, so a drain usually has one to wait for.
    for i in (0..REQS).step_by(4) {
        ctl.ok(
            "fault-add",
            json!({"op": "write", "lba": 8 * i, "count": 8, "mode": "delay", "delay_ms": DELAY_MS}),
        );
    }
    let mut g = RawGuest::connect(&s.socket, 1, QSIZE, false);
    let (mut waited, mut left_behind) = (0, 0);
    let t0 = Instant::now();
    for cycle in 1..=CYCLES {
        let start = g.rings[0].avail;
        assert_eq!(g.used_idx(0), start, "cycle {cycle}: completions left over");
        for i in 0..REQS {
            add_write(
                &mut g,
                i,
                &pattern(cycle, u64::from(i) * CHUNK as u64, CHUNK),
            );
        }
        g.publish_and_kick(0);
        // Stop the ring after a seeded number of completions (0: at once).
        let k = rng.range(0, u64::from(REQS)) as u16;
        wait_used(&g, start.wrapping_add(k), "completions before the stop");
        let used_before = g.used_idx(0);
        let base = g.frontend.get_vring_base(0).unwrap() as u16;
        let used_at_reply = g.used_idx(0);
        let done = base.wrapping_sub(start);
        assert_eq!(
            used_at_reply, base,
            "cycle {cycle}: GET_VRING_BASE answered {base} with used.idx {used_at_reply}"
        );
        assert!(
            done <= REQS,
            "cycle {cycle}: base {base} past what was offered"
        );
        // Requests are taken in ring order: the first `done` are complete, the rest untouched.
        let mut heads: Vec<u32> = (0..done)
            .map(|n| u32::from(g.used_id(0, start.wrapping_add(n))))
            .collect();
        heads.sort_unstable();
        let want: Vec<u32> = (0..u32::from(done)).map(|i| 3 * i).collect();
        assert_eq!(heads, want, "cycle {cycle}: used entries");
        for i in 0..REQS {
            let st = g.status(0, i);
            if i < done {
                assert_eq!(st, 0, "cycle {cycle}: request {i} used but status {st}");
            } else {
                assert_eq!(
                    st, 0xff,
                    "cycle {cycle}: request {i} not used but status written"
                );
            }
        }
        assert_eq!(
            ctl.ok("query-status", json!({}))["inflight"],
            0,
            "cycle {cycle}: in flight after the ring stopped"
        );
        // Nothing completes once the ring is stopped, not even after the slow requests' delay.
        let quiet_until = Instant::now() + Duration::from_millis(3 * DELAY_MS);
        while Instant::now() < quiet_until {
            assert_eq!(
                g.used_idx(0),
                base,
                "cycle {cycle}: completion after the stop"
            );
            std::thread::yield_now();
        }
        waited += usize::from(used_at_reply != used_before);
        left_behind += usize::from(done < REQS);

        // Start the ring again where it stopped; the rest completes.
        g.start_ring(0, base);
        g.rings[0].kick.write(1).unwrap();
        wait_used(&g, start.wrapping_add(REQS), "the rest after the restart");
        assert!(
            (0..REQS).all(|i| g.status(0, i) == 0),
            "cycle {cycle}: statuses"
        );
    }
    let took = t0.elapsed();
    eprintln!(
        "{CYCLES} cycles in {took:?}: the reply waited for a completion in {waited}, requests were left in the ring in {left_behind}"
    );
    assert!(
        waited >= 20,
        "the stop rarely caught a request in flight ({waited})"
    );
    assert!(
        left_behind >= 20,
        "the stop rarely left requests behind ({left_behind})"
    );
    let stats = ctl.ok("query-stats", json!({}));
    assert_eq!(stats["totals"]["abandoned"], 0);
    assert_eq!(stats["totals"]["writes"], CYCLES * u64::from(REQS));
    // The last cycle's data is in the image.
    for i in 0..u64::from(REQS) {
        assert!(
            read_file_at(&s.image, i * CHUNK as u64, CHUNK)
                == pattern(CYCLES, i * CHUNK as u64, CHUNK),
            "request {i}'s data is not in the image"
        );
    }
}
