//! Teardown under load. A storm client (a child process: libblkio on 4 queues, 64 writes in
//! flight on each) writes over a region holding 1,000 remaps and an active write fault, and
//! reports every submission and acknowledgement on stdout before it goes on. The tests then
//! end the storm the hard way:
//!
//! - the client is SIGKILLed at a seeded random moment, 200 times: each time the server stays
//!   up, its in-flight count drops to 0 within the drain timeout, the next client connects
//!   and every acknowledged write reads back;
//! - the server gets SIGTERM with everything busy (the storm, remap-add/remap-remove churn, the
//!   write fault): it exits 0 within the drain timeout + 1 s, and after a restart on the same
//!   image and spare every acknowledged write and every acknowledged remap is there.
//!
//! The seed comes from `REMAPBLK_SEED` (printed when a test fails).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::load::*;
use common::*;
use serde_json::json;

const QUEUES: usize = 4;
const DEPTH: usize = 64;
/// The storm's region: the first 8 MiB, 16,384 blocks.
const CHUNKS: u64 = 2048;
const REGION_BLOCKS: u64 = CHUNKS * 8;
const REMAPS: usize = 1000;
const HELPER_ENV: &str = "REMAPBLK_TEST_STORM_CLIENT";

/// The storm client: rounds of 4 x 64 writes to distinct random chunks, all queues in flight
/// together. Prints `S chunk gen` for a round before submitting it and `A chunk gen` (or `E
/// chunk gen ret`) for each completion, flushed after every batch of completions. Runs until
/// killed or the server goes away.
#[test]
#[ignore]
fn helper_storm_client() {
    let Ok(sock) = std::env::var(HELPER_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("STORM_SEED").unwrap().parse().unwrap();
    let mut gen: u64 = std::env::var("STORM_GEN").unwrap().parse().unwrap();
    let mut rng = Rng::new(seed);
    let out = std::io::stdout();
    // The test harness has printed "test helper_storm_client ... " without a newline.
    writeln!(out.lock()).unwrap();
    let Ok(mut c) = Client::try_connect(std::path::Path::new(&sock), QUEUES, false) else {
        writeln!(out.lock(), "CONNECT-FAILED").unwrap();
        return;
    };
    writeln!(out.lock(), "READY").unwrap();
    out.lock().flush().unwrap();
    loop {
        let mut picked = BTreeSet::new();
        let mut order = Vec::new();
        while order.len() < QUEUES * DEPTH {
            let k = rng.next() % CHUNKS;
            if picked.insert(k) {
                order.push(k);
            }
        }
        let mut gens = Vec::new();
        let mut ops = vec![Vec::new(); QUEUES];
        {
            let mut o = out.lock();
            for (j, &k) in order.iter().enumerate() {
                gen += 1;
                gens.push(gen);
                let (q, i) = (j / DEPTH, j % DEPTH);
                let off = k * CHUNK as u64;
                buf_mut(&mut c, q * DEPTH + i).copy_from_slice(&pattern(gen, off, CHUNK));
                ops[q].push(Op::Write {
                    offset: off,
                    len: CHUNK,
                });
                writeln!(o, "S {k} {gen}").unwrap();
            }
            o.flush().unwrap();
        }
        let ok = round(
            &mut c,
            &ops,
            DEPTH,
            Duration::from_secs(30),
            |q, i, ret| {
                let j = q * DEPTH + i;
                if ret == 0 {
                    writeln!(out.lock(), "A {} {}", order[j], gens[j]).unwrap();
                } else {
                    writeln!(out.lock(), "E {} {} {ret}", order[j], gens[j]).unwrap();
                }
            },
            || out.lock().flush().unwrap(),
        );
        if !ok {
            writeln!(out.lock(), "GAVE-UP").unwrap();
            out.lock().flush().unwrap();
            return;
        }
    }
}

/// Starts the storm client; its stdout lines arrive on the channel, which disconnects when the
/// process is gone.
fn storm_client(s: &Server, seed: u64, gen: u64) -> (ChildGuard, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_storm_client",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, &s.socket)
        .env("STORM_SEED", seed.to_string())
        .env("STORM_GEN", gen.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (ChildGuard(child), rx)
}

/// Feeds the client's lines to the tracker until `stop` says so; returns the chunks they
/// touched.
fn follow(
    lines: &mpsc::Receiver<String>,
    t: &mut Tracker,
    touched: &mut BTreeSet<u64>,
    mut stop: impl FnMut(&str, &Tracker) -> bool,
) {
    loop {
        let l = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the storm client said nothing for 30 s");
        record(&l, t, touched);
        if stop(&l, t) {
            return;
        }
    }
}

fn record(l: &str, t: &mut Tracker, touched: &mut BTreeSet<u64>) {
    t.apply(l).unwrap();
    if l.starts_with("S ") {
        touched.insert(l.split_whitespace().nth(1).unwrap().parse().unwrap());
    }
}

/// The rest of a dead client's lines.
fn drain_lines(lines: &mpsc::Receiver<String>, t: &mut Tracker, touched: &mut BTreeSet<u64>) {
    while let Ok(l) = lines.recv() {
        record(&l, t, touched);
    }
}

fn storm_server(drain_ms: u64, extra: &[&str]) -> Server {
    let drain_ms = drain_ms.to_string();
    let mut args = vec![
        "--num-queues",
        "4",
        "--spare-blocks",
        "16384",
        "--drain-timeout-ms",
        &drain_ms,
    ];
    args.extend_from_slice(extra);
    Server::start(16 * MIB, &args)
}

fn check_spare_accounting(ctl: &mut Ctl) {
    let st = ctl.ok("query-status", json!({}));
    assert_eq!(
        st["spare_free"].as_u64().unwrap() + st["remaps"].as_u64().unwrap(),
        st["spare_total"].as_u64().unwrap(),
        "spare blocks leaked: {st}"
    );
}

#[test]
fn client_killed_mid_storm_200_times() {
    const CYCLES: u64 = 200;
    const DRAIN_MS: u64 = 5000;
    let seed = seed(6001);
    let _guard = SeedGuard(seed);
    let mut rng = Rng::new(seed);
    let mut s = storm_server(DRAIN_MS, &[]);
    let mut ctl = Ctl::connect(&s.control());
    let t0 = Instant::now();
    let initial = scatter_remaps(&mut ctl, &mut rng, 0, REGION_BLOCKS, REMAPS);
    eprintln!("{REMAPS} remaps in {:?}", t0.elapsed());
    let t0 = Instant::now();
    let mut t = Tracker::default();
    let mut worst_drain = Duration::ZERO;
    for cycle in 1..=CYCLES {
        // A write fault over 16 blocks, moved every cycle, so writes remap during the storm.
        let fault = rng.range(0, REGION_BLOCKS - 16);
        ctl.ok("fault-clear", json!({}));
        ctl.ok(
            "fault-add",
            json!({"op": "write", "lba": fault, "count": 16}),
        );
        let (mut child, lines) = storm_client(&s, seed ^ cycle, cycle * 10_000_000);
        let mut touched = BTreeSet::new();
        // Kill after a seeded number of acknowledgements: anywhere from before the first
        // request to the middle of the third round.
        let kill_after = rng.range(0, (3 * QUEUES * DEPTH) as u64);
        let acked_before = t.acked_writes;
        follow(&lines, &mut t, &mut touched, |l, t| {
            assert!(
                !l.starts_with("CONNECT-FAILED") && !l.starts_with("GAVE-UP"),
                "cycle {cycle}: {l}"
            );
            t.acked_writes - acked_before >= kill_after && (kill_after > 0 || l == "READY")
        });
        child.kill();
        drain_lines(&lines, &mut t, &mut touched);

        assert!(s.is_alive(), "cycle {cycle}: the server died");
        let took = ctl.wait_idle(Duration::from_millis(DRAIN_MS + 1000));
        worst_drain = worst_drain.max(took);
        let mut c = s.client(QUEUES);
        t.verify(&mut c, &touched, DEPTH)
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        drop(c);
    }
    let storm_time = t0.elapsed();
    ctl.ok("fault-clear", json!({}));
    ctl.wait_idle(Duration::from_millis(DRAIN_MS + 1000));

    // Everything ever written, once more, and the remap layer's books.
    let mut c = s.client(QUEUES);
    let all = t.chunks();
    t.verify(&mut c, &all, DEPTH).unwrap();
    drop(c);
    let remapped = ctl.remapped();
    assert!(initial.is_subset(&remapped), "manual remaps went missing");
    let auto = remapped.len() - initial.len();
    assert!(auto >= 100, "only {auto} write-error remaps in the storm");
    check_spare_accounting(&mut ctl);
    let stats = ctl.ok("query-stats", json!({}));
    assert_eq!(stats["totals"]["abandoned"], 0, "a drain gave up: {stats}");
    assert!(s.is_alive());
    eprintln!(
        "{CYCLES} cycles in {storm_time:?}: {} acknowledged writes, {auto} write-error remaps, slowest return to idle {worst_drain:?}",
        t.acked_writes
    );
}

/// One remap-add or remap-remove of the churn, and whether it was acknowledged.
struct ChurnOp {
    add: bool,
    lba: u64,
    count: u64,
    acked: bool,
}

/// remap-add / remap-remove of random runs in `[first, end)` until `stop` or the server goes
/// away; returns every command and whether it was acknowledged.
fn churn(
    control: &std::path::Path,
    seed: u64,
    first: u64,
    end: u64,
    stop: Arc<AtomicBool>,
    churned: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<ChurnOp>> {
    let mut ctl = Ctl::connect(control);
    let mut rng = Rng::new(seed);
    std::thread::spawn(move || {
        let mut log = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let count = rng.range(1, 17);
            let lba = rng.range(first, end - count);
            let add = rng.next().is_multiple_of(2);
            let name = if add { "remap-add" } else { "remap-remove" };
            let acked = ctl.call(name, json!({"lba": lba, "count": count})).is_ok();
            log.push(ChurnOp {
                add,
                lba,
                count,
                acked,
            });
            churned.fetch_add(1, Ordering::Relaxed);
            if !acked {
                break;
            }
        }
        log
    })
}

#[test]
fn sigterm_with_everything_busy_exits_in_time_and_loses_nothing() {
    const ROUNDS: u64 = 10;
    const DRAIN_MS: u64 = 2000;
    // Blocks [0, 8192) carry the write fault, [8192, 16384) the remap churn: a block's remap
    // state then follows from one of the two alone.
    const CHURN_FIRST: u64 = REGION_BLOCKS / 2;
    let seed = seed(6006);
    let _guard = SeedGuard(seed);
    let mut rng = Rng::new(seed);
    let events = tempfile::NamedTempFile::new().unwrap();
    let mut s = storm_server(DRAIN_MS, &["--event-log", events.path().to_str().unwrap()]);
    let mut ctl = Ctl::connect(&s.control());
    let mut remapped = scatter_remaps(&mut ctl, &mut rng, 0, REGION_BLOCKS, REMAPS);
    let mut t = Tracker::default();
    let mut slowest = Duration::ZERO;
    for round in 1..=ROUNDS {
        // Faults live in the process: new ones every round. A write fault that remaps, and a
        // slow area (300 ms per write, well inside the drain timeout) so that requests are
        // surely in flight when the signal comes.
        let fault = rng.range(0, CHURN_FIRST / 2 - 256);
        ctl.ok(
            "fault-add",
            json!({"op": "write", "lba": fault, "count": 256}),
        );
        let fault_blocks = fault..fault + 256;
        // Four whole chunks without remapped blocks: a write there takes the fast path and
        // so one delay, not one per block.
        let slow = loop {
            let lba = rng.range(CHURN_FIRST / 16, CHURN_FIRST / 8 - 4) * 8;
            if remapped.range(lba..lba + 32).next().is_none() {
                break lba;
            }
        };
        let slow_id = ctl.ok(
            "fault-add",
            json!({"op": "write", "lba": slow, "count": 32, "mode": "delay", "delay_ms": 300}),
        )["id"]
            .clone();
        let stop = Arc::new(AtomicBool::new(false));
        let churned = Arc::new(AtomicUsize::new(0));
        let churn = churn(
            &s.control(),
            seed ^ round,
            CHURN_FIRST,
            REGION_BLOCKS,
            stop.clone(),
            churned.clone(),
        );
        let mut touched = BTreeSet::new();
        let (mut child, lines) = storm_client(&s, seed ^ round, round * 10_000_000);
        let want = rng.range(QUEUES as u64 * DEPTH as u64, 4 * (QUEUES * DEPTH) as u64);
        let acked_before = t.acked_writes;
        follow(&lines, &mut t, &mut touched, |l, t| {
            assert!(
                !l.starts_with("CONNECT-FAILED") && !l.starts_with("GAVE-UP"),
                "round {round}: {l}"
            );
            t.acked_writes - acked_before >= want
        });
        wait_until("remap churn", Duration::from_secs(30), || {
            churned.load(Ordering::Relaxed) >= 10
        });
        // SIGTERM the moment a write has entered the slow area (it stays in flight 300 ms).
        let fired = |ctl: &mut Ctl| {
            ctl.ok("fault-list", json!({}))
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["id"] == slow_id)
                .map_or(0, |f| f["fired"].as_u64().unwrap())
        };
        let before = fired(&mut ctl);
        wait_until("a write in the slow area", Duration::from_secs(30), || {
            fired(&mut ctl) > before
        });
        let busy = ctl.ok("query-status", json!({}));
        let t0 = Instant::now();
        s.signal(libc::SIGTERM);
        let status = s.wait_exit(Duration::from_millis(DRAIN_MS + 5000));
        let took = t0.elapsed();
        slowest = slowest.max(took);
        assert_eq!(status.code(), Some(0), "round {round}");
        assert!(
            took < Duration::from_millis(DRAIN_MS + 1000),
            "round {round}: exit took {took:?}"
        );
        // The exit drain waited for what was in flight and gave up on nothing.
        let drain: serde_json::Value = std::fs::read_to_string(events.path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["event"] == "drain" && v["reason"] == "exit")
            .nth(round as usize - 1)
            .expect("a drain event for the exit");
        assert!(
            drain["waited_for"].as_u64().unwrap() >= 1,
            "round {round}: {drain}"
        );
        assert_eq!(drain["abandoned"], 0, "round {round}: {drain}");
        child.kill();
        drain_lines(&lines, &mut t, &mut touched);
        stop.store(true, Ordering::Relaxed);
        let log = churn.join().unwrap();

        // Which blocks must be remapped now, and which may be either way.
        let mut may: BTreeSet<u64> = BTreeSet::new();
        for op in &log {
            let blocks = op.lba..op.lba + op.count;
            if !op.acked {
                may.extend(blocks);
            } else if op.add {
                remapped.extend(blocks);
            } else {
                for b in blocks {
                    remapped.remove(&b);
                }
            }
        }
        // A write acknowledged over the fault got there by remapping its blocks; one that was
        // not acknowledged may have remapped some.
        for (&b, st) in &t.blocks {
            if fault_blocks.contains(&b) && st.acked != 0 {
                remapped.insert(b);
            }
        }
        may.extend(fault_blocks);

        s.spawn();
        ctl = Ctl::connect(&s.control());
        let now = ctl.remapped();
        let missing: Vec<_> = remapped
            .difference(&now)
            .filter(|b| !may.contains(b))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged remaps missing after the restart: {missing:?}"
        );
        let extra: Vec<_> = now
            .difference(&remapped)
            .filter(|b| !may.contains(b))
            .collect();
        assert!(
            extra.is_empty(),
            "round {round}: removed remaps came back after the restart: {extra:?}"
        );
        check_spare_accounting(&mut ctl);
        let mut c = s.client(QUEUES);
        t.verify(&mut c, &touched, DEPTH)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        drop(c);
        ctl.wait_idle(Duration::from_millis(DRAIN_MS + 1000));
        remapped = now;
        eprintln!(
            "round {round}: SIGTERM with {} in flight, exit in {took:?}; {} churn commands",
            busy["inflight"],
            log.len()
        );
    }
    let mut c = s.client(QUEUES);
    let all = t.chunks();
    t.verify(&mut c, &all, DEPTH).unwrap();
    eprintln!(
        "{ROUNDS} rounds: {} writes acknowledged, slowest exit {slowest:?}",
        t.acked_writes
    );
}
