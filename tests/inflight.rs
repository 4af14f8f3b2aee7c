//! A backend crash with requests in flight, at the protocol level (vhost-user.rst, "Inflight
//! I/O tracking"). A raw frontend puts 64 requests on 2 rings: reads of blocks whose pages the
//! test dropped from the page cache (so io_uring takes them, and they complete late) between
//! writes (done at once, some slowed by a `delay` fault): completions come out of ring order.
//! At a seeded point the backend is SIGKILLed; a new one starts on the same image, and the
//! frontend reconnects as QEMU does (same memory, same inflight region, each ring started at
//! its used index). Every request must then complete exactly once, with the right data.
//!
//! Without INFLIGHT_SHMFD the frontend rewinds the ring to the used index, and with
//! completions out of order that is wrong both ways: entries past it that were complete are
//! taken (run and completed) again, and requests below it that were still in flight are never
//! taken again, so the guest waits for them forever. The second test shows that loss happens,
//! which is what the region prevents.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::load::*;
use common::raw::*;
use common::*;
use serde_json::json;

const QSIZE: u16 = 128;
const QUEUES: usize = 2;
/// Requests per ring per round.
const PER_RING: u16 = 32;

/// Request `slot` of ring `q`: its 4 KiB block, and whether it reads (even) or writes (odd).
fn block(q: usize, slot: u16) -> u64 {
    q as u64 * u64::from(PER_RING) + u64::from(slot)
}

fn is_read(slot: u16) -> bool {
    slot.is_multiple_of(2)
}

/// What the image holds before the round (read blocks) and what a write puts there.
fn data(round: u64, q: usize, slot: u16) -> Vec<u8> {
    let off = block(q, slot) * BUF as u64;
    let seed = if is_read(slot) {
        round
    } else {
        round + 1_000_000
    };
    pattern(seed, off, BUF)
}

/// The image's read blocks hold the round's data, on disk and out of the page cache, so that
/// the reads cannot complete at once.
fn prepare_image(path: &std::path::Path, round: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    for q in 0..QUEUES {
        for slot in (0..PER_RING).filter(|s| is_read(*s)) {
            f.write_all_at(&data(round, q, slot), block(q, slot) * BUF as u64)
                .unwrap();
        }
    }
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise on an open fd, no pointers.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
}

/// Slows every fourth write a little, so that the rings hold requests in flight for a while.
fn add_faults(s: &Server) {
    let mut ctl = Ctl::connect(&s.control());
    for q in 0..QUEUES {
        for slot in (1..PER_RING).step_by(4) {
            ctl.ok(
                "fault-add",
                json!({"op": "write", "lba": block(q, slot) * 8, "count": 8, "mode": "delay", "delay_ms": 3}),
            );
        }
    }
}

/// What one round saw.
#[derive(Default)]
struct Round {
    /// Requests complete when the backend was killed.
    before: usize,
    /// Completions past the used index when the backend was killed (out of order).
    out_of_order: bool,
    /// Used entries for a request that was already complete.
    duplicates: usize,
    /// Requests that never completed (the frontend would wait for them forever).
    lost: usize,
}

/// One round: fill both rings, kill the backend after `kill_after` completions, restart it,
/// reconnect, and collect every completion. Panics when a request never completes (within 20
/// s) or, with `strict`, when one completes twice or with wrong data.
fn round(s: &mut Server, round: u64, kill_after: usize, inflight: bool, strict: bool) -> Round {
    prepare_image(&s.image, round);
    add_faults(s);
    let mut g = RawGuest::connect(&s.socket, QUEUES, QSIZE, inflight);
    if round == 0 {
        assert_eq!(
            s.ctl_ok("query-status", &[])["inflight_tracking"],
            inflight,
            "query-status"
        );
    }
    for q in 0..QUEUES {
        for slot in 0..PER_RING {
            let kind = if is_read(slot) {
                g.write_buf(q, slot, &[0xa5; BUF]);
                VIRTIO_BLK_T_IN
            } else {
                g.write_buf(q, slot, &data(round, q, slot));
                VIRTIO_BLK_T_OUT
            };
            g.add(q, slot, kind, block(q, slot) * 8);
        }
    }
    for q in 0..QUEUES {
        g.publish_and_kick(q);
    }
    let total = QUEUES * usize::from(PER_RING);
    let done = |g: &RawGuest| {
        (0..QUEUES)
            .map(|q| usize::from(g.used_idx(q)))
            .sum::<usize>()
    };
    g.wait(
        "completions before the crash",
        Duration::from_secs(20),
        |g| done(g) >= kill_after,
    );
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(10));
    let mut r = Round {
        before: done(&g),
        ..Default::default()
    };
    // Completions out of ring order: a used entry for a chain past one still in flight.
    for q in 0..QUEUES {
        let used = g.used_idx(q);
        let heads: HashSet<u16> = (0..used).map(|n| g.used_id(q, n)).collect();
        r.out_of_order |= heads.iter().any(|h| h / 3 >= used);
    }
    s.spawn();
    g.reconnect(&s.socket);
    // Every request once: watch the used rings until each chain has its entry.
    let mut seen: Vec<HashSet<u16>> = vec![HashSet::new(); QUEUES];
    let mut read_to = [0u16; QUEUES];
    // Strict: everything completes, so wait as long as a loaded machine may need. Otherwise a
    // few seconds without the last completions is a loss (the restarted backend finishes the
    // rest in well under a second).
    let wait = Duration::from_secs(if strict { 20 } else { 5 });
    let deadline = std::time::Instant::now() + wait;
    while seen.iter().map(HashSet::len).sum::<usize>() < total {
        for q in 0..QUEUES {
            let used = g.used_idx(q);
            while read_to[q] != used {
                let head = g.used_id(q, read_to[q]);
                if !seen[q].insert(head) {
                    r.duplicates += 1;
                    assert!(
                        !strict,
                        "round {round}: ring {q}: chain {head} completed twice (used entry {})",
                        read_to[q]
                    );
                }
                read_to[q] = read_to[q].wrapping_add(1);
            }
        }
        if std::time::Instant::now() > deadline {
            r.lost = total - seen.iter().map(HashSet::len).sum::<usize>();
            assert!(
                !strict,
                "round {round}: requests never completed: {:?} of {total} seen, {} before the crash",
                seen.iter().map(HashSet::len).collect::<Vec<_>>(),
                r.before
            );
            break;
        }
        std::thread::yield_now();
    }
    if strict {
        for q in 0..QUEUES {
            for slot in 0..PER_RING {
                assert_eq!(g.status(q, slot), 0, "round {round}: ring {q} slot {slot}");
                let want = data(round, q, slot);
                if is_read(slot) {
                    assert!(
                        g.read_buf(q, slot) == want,
                        "round {round}: ring {q}: read {slot} returned wrong data"
                    );
                } else {
                    assert!(
                        read_file_at(&s.image, block(q, slot) * BUF as u64, BUF) == want,
                        "round {round}: ring {q}: write {slot} is not in the image"
                    );
                }
            }
        }
    }
    r
}

#[test]
fn requests_in_flight_at_a_crash_complete_exactly_once_after_the_restart() {
    let seed = seed(2101);
    let _guard = SeedGuard(seed);
    let mut rng = Rng::new(seed);
    let rounds: u64 = std::env::var("REMAPBLK_INFLIGHT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut s = Server::start(4 * MIB, &["--num-queues", "2", "--queue-size", "128"]);
    let (mut caught, mut out_of_order) = (0, 0);
    let total = QUEUES * usize::from(PER_RING);
    for n in 0..rounds {
        let kill_after = rng.range(0, total as u64) as usize;
        let r = round(&mut s, n, kill_after, true, true);
        caught += usize::from(r.before < total);
        out_of_order += usize::from(r.out_of_order);
    }
    eprintln!(
        "{rounds} rounds: the crash caught requests in flight in {caught}, completions out of order in {out_of_order}"
    );
    assert!(
        caught >= rounds as usize / 2,
        "the crash rarely caught requests in flight ({caught} of {rounds})"
    );
}

#[test]
fn without_inflight_tracking_a_crash_loses_requests_or_completes_them_twice() {
    let seed = seed(2102);
    let _guard = SeedGuard(seed);
    let mut rng = Rng::new(seed);
    // io_uring: what completes requests out of ring order (the sync engine completes them in
    // order, and a rewind to the used index then loses nothing).
    let mut s = Server::start(
        4 * MIB,
        &[
            "--num-queues",
            "2",
            "--queue-size",
            "128",
            "--engine",
            "io_uring",
        ],
    );
    let total = QUEUES * usize::from(PER_RING);
    let (mut duplicates, mut lost, mut out_of_order) = (0, 0, 0);
    for n in 0..30 {
        let kill_after = rng.range(total as u64 / 4, total as u64 * 3 / 4) as usize;
        let r = round(&mut s, n, kill_after, false, false);
        duplicates += r.duplicates;
        lost += r.lost;
        out_of_order += usize::from(r.out_of_order);
        if duplicates + lost > 0 {
            break;
        }
    }
    eprintln!(
        "out of order in {out_of_order} rounds: {lost} requests never completed, {duplicates} completed twice"
    );
    assert!(
        duplicates + lost > 0,
        "no request was lost or completed twice in 30 crashes ({out_of_order} with completions out of order)"
    );
}
