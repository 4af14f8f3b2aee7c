//! Fault injection seen from a libblkio client: exactly the requests that touch a faulty block
//! fail, `times` and seeded flaky faults behave, delays show in the latency statistics, bad
//! arguments are named, and the event log records it all. Auto-remap is off where a test
//! wants write errors to reach the client.

mod common;

use std::time::{Duration, Instant};

use common::*;

const CHUNK: usize = 4096;

/// Results of reading (or writing) every 4 KiB chunk of the first MiB, one request each.
fn sweep(c: &mut Client, write: bool) -> Vec<i32> {
    let mut out = Vec::new();
    for group in (0..MIB).step_by(CHUNK).collect::<Vec<_>>().chunks(32) {
        let ops: Vec<Op> = group
            .iter()
            .map(|&offset| {
                if write {
                    Op::Write { offset, len: CHUNK }
                } else {
                    Op::Read { offset, len: CHUNK }
                }
            })
            .collect();
        out.extend(c.batch(0, &ops));
    }
    out
}

/// Indexes of the failed requests.
fn failed(results: &[i32]) -> Vec<usize> {
    results
        .iter()
        .enumerate()
        .filter(|(_, &r)| r != 0)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn read_fault_fails_exactly_the_reads_that_touch_its_block() {
    let s = Server::start(4 * MIB, &["--auto-remap", "off"]);
    let id = s.ctl_ok("fault-add", &["op=read", "lba=1000"])["id"]
        .as_u64()
        .unwrap();
    let mut c = s.client(1);
    // Block 1000 (512-byte blocks) is bytes 512000..512512: chunk 125.
    let reads = sweep(&mut c, false);
    assert_eq!(failed(&reads), vec![125]);
    assert_eq!(reads[125], -libc::EIO);
    assert!(
        failed(&sweep(&mut c, true)).is_empty(),
        "a read fault must not fail writes"
    );
    // A read that only straddles into the block fails too; its neighbours do not.
    assert_eq!(
        c.batch(
            0,
            &[
                Op::Read {
                    offset: 999 * 512,
                    len: 1024
                },
                Op::Read {
                    offset: 999 * 512,
                    len: 512
                },
                Op::Read {
                    offset: 1001 * 512,
                    len: 512
                },
            ]
        ),
        vec![-libc::EIO, 0, 0]
    );
    let list = s.ctl_ok("fault-list", &[]);
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["op"], "read");
    assert_eq!(list[0]["lba"], 1000);
    assert_eq!(list[0]["count"], 1);
    assert_eq!(list[0]["mode"], "error");
    assert_eq!(list[0]["fired"], 2);
    assert_eq!(s.ctl_ok("query-stats", &[])["totals"]["errors"], 2);
    s.ctl_ok("fault-remove", &[&format!("id={id}")]);
    assert!(failed(&sweep(&mut c, false)).is_empty());
}

#[test]
fn write_fault_fails_exactly_the_writes_that_touch_its_blocks() {
    let s = Server::start(4 * MIB, &["--auto-remap", "off"]);
    s.ctl_ok("fault-add", &["op=write", "lba=1000", "count=16"]);
    let mut c = s.client(1);
    // Blocks 1000..1016 are bytes 512000..520192: chunks 125 and 126 (127 starts at 520192).
    assert_eq!(failed(&sweep(&mut c, true)), vec![125, 126]);
    assert!(failed(&sweep(&mut c, false)).is_empty());
    assert_eq!(s.ctl_ok("fault-clear", &[])["removed"], 1);
    assert!(failed(&sweep(&mut c, true)).is_empty());
}

#[test]
fn times_three_fires_three_times() {
    let s = Server::start(4 * MIB, &[]);
    s.ctl_ok("fault-add", &["lba=8", "times=3"]);
    let mut c = s.client(1);
    let ops: Vec<Op> = (0..10)
        .map(|_| Op::Read {
            offset: 4096,
            len: 4096,
        })
        .collect();
    let mut fails = 0;
    for op in ops {
        if c.batch(0, &[op])[0] != 0 {
            fails += 1;
        }
    }
    assert_eq!(fails, 3);
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(f["fired"], 3);
    assert_eq!(f["times"], 3);
    assert_eq!(f["expired"], true);
}

#[test]
fn flaky_fault_with_seed_7_repeats_its_failures() {
    let run = || {
        let s = Server::start(4 * MIB, &[]);
        s.ctl_ok(
            "fault-add",
            &[
                "op=read",
                "lba=0",
                "mode=flaky",
                "probability=0.4",
                "seed=7",
            ],
        );
        let mut c = s.client(1);
        (0..100)
            .map(|_| {
                c.batch(
                    0,
                    &[Op::Read {
                        offset: 0,
                        len: 512,
                    }],
                )[0] != 0
            })
            .collect::<Vec<bool>>()
    };
    let a = run();
    let b = run();
    assert_eq!(a, b, "the same seed must fail the same requests");
    let n = a.iter().filter(|&&f| f).count();
    assert!((20..60).contains(&n), "{n} failures of 100 at p=0.4");
}

#[test]
fn delay_fault_shows_in_latency_stats() {
    let s = Server::start(4 * MIB, &[]);
    s.ctl_ok("fault-add", &["lba=0", "mode=delay", "delay_ms=200"]);
    let mut c = s.client(1);
    let t0 = Instant::now();
    assert_eq!(
        c.batch(
            0,
            &[Op::Read {
                offset: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    assert!(t0.elapsed() >= Duration::from_millis(200));
    for _ in 0..20 {
        assert_eq!(
            c.batch(
                0,
                &[Op::Read {
                    offset: 65536,
                    len: 4096
                }]
            ),
            vec![0]
        );
    }
    let l = &s.ctl_ok("query-stats", &[])["queues"][0]["latency_us"];
    assert!(l["max"].as_u64().unwrap() >= 200_000, "{l}");
    assert!(l["p50"].as_u64().unwrap() < 200_000, "{l}");
}

#[test]
fn bad_fault_arguments_are_named() {
    let s = Server::start(4 * MIB, &[]);
    for (args, field) in [
        (vec!["op=read"], "lba"),
        (vec!["lba=8192"], "lba"),
        (
            vec!["lba=1", "mode=flaky", "probability=1.5"],
            "probability",
        ),
        (vec!["lba=1", "op=erase"], "op"),
        (vec!["lba=1", "mode=delay"], "delay_ms"),
        (vec!["lba=1", "mode=corrupt", "bits=1"], "op"),
        (vec!["lba=1", "op=read", "mode=corrupt"], "bits"),
        (
            vec!["lba=1", "op=read", "mode=corrupt", "bits=1", "xor=1"],
            "xor",
        ),
        (
            vec!["lba=1", "op=write", "mode=corrupt", "xor=1", "offset=512"],
            "offset",
        ),
        (vec!["lba=1", "mode=lost-write", "op=read"], "op"),
        (vec!["lba=1", "mode=lost-write", "shift=1"], "shift"),
        (vec!["lba=1", "mode=misdirect", "shift=-2"], "shift"),
        (
            vec!["lba=8000", "count=8", "mode=misdirect", "shift=185"],
            "shift",
        ),
        (vec!["lba=1", "mode=torn", "sectors=0"], "sectors"),
        (
            vec!["lba=1", "mode=torn", "sectors=1", "report=later"],
            "report",
        ),
        (
            vec![
                "lba=1",
                "mode=delay",
                "delay_ms=5",
                "jitter_ms=2",
                "distribution=fixed",
            ],
            "jitter_ms",
        ),
        (
            vec!["lba=1", "mode=delay", "delay_ms=5", "distribution=pareto"],
            "jitter_ms",
        ),
        (
            vec!["lba=1", "mode=delay", "delay_ms=5", "distribution=normal"],
            "distribution",
        ),
        (vec!["lba=1", "mode=hang", "delay_ms=5"], "delay_ms"),
    ] {
        let (code, _, err) = s.ctl("fault-add", &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(field), "{args:?}: {err}");
    }
    let (code, _, err) = s.ctl("fault-remove", &["id=99"]);
    assert_eq!(code, 1);
    assert!(err.contains("99"));
    let (code, _, err) = s.ctl("fault-release", &["id=99"]);
    assert_eq!(code, 1);
    assert!(err.contains("id: no fault with id 99"), "{err}");
    let (code, _, err) = s.ctl("fault-release", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("id"), "{err}");
    assert_eq!(s.ctl_ok("fault-list", &[]), serde_json::json!([]));
}

#[test]
fn faults_file_and_event_log() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults.json");
    std::fs::write(
        &faults,
        r#"[{"op": "read", "lba": 16}, {"op": "write", "lba": 32, "count": 8, "times": 1}]"#,
    )
    .unwrap();
    let events = dir.path().join("events.jsonl");
    let image = dir.path().join("d.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let s = Server::start_on(
        dir,
        image,
        &[
            "--faults",
            faults.to_str().unwrap(),
            "--event-log",
            events.to_str().unwrap(),
            "--auto-remap",
            "off",
        ],
    );
    assert_eq!(s.ctl_ok("fault-list", &[]).as_array().unwrap().len(), 2);
    {
        let mut c = s.client(1);
        assert_eq!(
            c.batch(
                0,
                &[Op::Read {
                    offset: 16 * 512,
                    len: 512
                }]
            ),
            vec![-libc::EIO]
        );
        assert_eq!(
            c.batch(
                0,
                &[Op::Write {
                    offset: 32 * 512,
                    len: 4096
                }]
            ),
            vec![-libc::EIO]
        );
        assert_eq!(
            c.batch(
                0,
                &[Op::Write {
                    offset: 32 * 512,
                    len: 4096
                }]
            ),
            vec![0]
        );
        s.ctl_ok("quiesce", &[]);
        s.ctl_ok("resume", &[]);
    }
    // Not just the text "disconnect": the drain event before it has reason "disconnect".
    wait_until("the disconnect event", Duration::from_secs(10), || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["event"] == "disconnect")
    });
    let log = std::fs::read_to_string(&events).unwrap();
    let names: Vec<String> = log
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("one JSON object per line");
            assert!(v["monotonic_ns"].as_u64().unwrap() > 0);
            v["event"].as_str().unwrap().to_string()
        })
        .collect();
    for want in [
        "connect",
        "fault-fired",
        "quiesce",
        "resume",
        "drain",
        "disconnect",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} event in {names:?}"
        );
    }
    assert_eq!(names.iter().filter(|n| *n == "fault-fired").count(), 2);

    // A bad faults file stops the server from starting, naming the entry.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"lba": 1}, {"lba": 1, "probability": 2, "mode": "flaky"}]"#,
    )
    .unwrap();
    let (code, err) = serve_refused(
        &dir.path().join("i.img"),
        &dir.path().join("s.sock"),
        &["--size", "1M", "--faults", bad.to_str().unwrap()],
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("entry 1") && err.contains("probability"),
        "{err}"
    );
}

/// A recognisable 4 KiB: every byte differs from its neighbours and from `salt`'s others.
fn pattern(salt: u8) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

/// The image file's bytes at `offset`: what the disk holds, fault layer bypassed.
fn image_at(s: &Server, offset: u64, len: usize) -> Vec<u8> {
    let all = std::fs::read(&s.image).unwrap();
    all[offset as usize..offset as usize + len].to_vec()
}

fn flipped_bits(a: &[u8], b: &[u8]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

#[test]
fn corrupt_reads_flip_exactly_the_bits_and_leave_the_image_intact() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let off = 8 * 512;
    let data = pattern(1);
    assert_eq!(c.write(0, off, &data), 0);
    // Blocks 8..16, the whole 4 KiB: 5 bits in each of 8 blocks.
    s.ctl_ok(
        "fault-add",
        &[
            "op=read",
            "lba=8",
            "count=8",
            "mode=corrupt",
            "bits=5",
            "seed=3",
        ],
    );
    let got = c.read(0, off, CHUNK).unwrap();
    assert_eq!(flipped_bits(&got, &data), 40);
    for block in 0..8 {
        let r = block * 512..(block + 1) * 512;
        assert_eq!(flipped_bits(&got[r.clone()], &data[r]), 5, "block {block}");
    }
    assert_eq!(
        c.read(0, off, CHUNK).unwrap(),
        got,
        "a seed corrupts the same bits"
    );
    assert_eq!(image_at(&s, off, CHUNK), data, "the image must stay intact");
    // Outside the fault, reads are clean.
    assert_eq!(
        c.read(0, off + CHUNK as u64, CHUNK).unwrap(),
        vec![0; CHUNK]
    );
    // Writes pass a read-only corrupt fault untouched.
    assert_eq!(c.write(0, off, &pattern(2)), 0);
    assert_eq!(image_at(&s, off, CHUNK), pattern(2));

    s.ctl_ok("fault-clear", &[]);
    s.ctl_ok(
        "fault-add",
        &["op=read", "lba=9", "mode=corrupt", "xor=255", "offset=7"],
    );
    let got = c.read(0, off, CHUNK).unwrap();
    let want = pattern(2);
    let differ: Vec<usize> = (0..CHUNK).filter(|&i| got[i] != want[i]).collect();
    assert_eq!(differ, vec![512 + 7]);
    assert_eq!(got[519], want[519] ^ 0xff);
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(
        (f["mode"].as_str(), f["xor"].as_u64(), f["offset"].as_u64()),
        (Some("corrupt"), Some(255), Some(7))
    );
    assert_eq!(f["fired"], 1);
    assert!(s.remapped_lbas().is_empty(), "corrupt is not a media error");
}

#[test]
fn corrupt_writes_store_corrupted_data_and_spare_the_guests_buffer() {
    let s = Server::start(4 * MIB, &[]);
    s.ctl_ok(
        "fault-add",
        &[
            "op=write",
            "lba=16",
            "count=8",
            "mode=corrupt",
            "bits=2",
            "seed=1",
        ],
    );
    let mut c = s.client(1);
    let off = 16 * 512;
    let data = pattern(3);
    assert_eq!(c.write(0, off, &data), 0);
    assert_eq!(
        c.slot_mut(0, CHUNK),
        &data[..],
        "guest memory must not change"
    );
    let stored = image_at(&s, off, CHUNK);
    assert_eq!(flipped_bits(&stored, &data), 16);
    // A read fault it is not: reading gives back what was stored.
    assert_eq!(c.read(0, off, CHUNK).unwrap(), stored);
    assert!(s.remapped_lbas().is_empty());
}

#[test]
fn a_lost_write_completes_ok_and_its_block_reads_back_the_old_data() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let off = 24 * 512;
    assert_eq!(c.write(0, off, &pattern(4)), 0);
    s.ctl_ok("fault-add", &["lba=24", "mode=lost-write", "times=1"]);
    assert_eq!(
        c.write(0, off, &pattern(5)),
        0,
        "a lost write reports success"
    );
    // Only the fault's block (the first of the write's eight) keeps its old data.
    let want = [&pattern(4)[..512], &pattern(5)[512..]].concat();
    assert_eq!(c.read(0, off, CHUNK).unwrap(), want);
    assert_eq!(image_at(&s, off, CHUNK), want);
    // Its one firing spent, the next write lands.
    assert_eq!(c.write(0, off, &pattern(5)), 0);
    assert_eq!(c.read(0, off, CHUNK).unwrap(), pattern(5));
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(
        (f["fired"].as_u64(), f["expired"].as_bool()),
        (Some(1), Some(true))
    );
    assert!(
        s.remapped_lbas().is_empty(),
        "a lost write is not a media error"
    );
}

#[test]
fn a_misdirected_write_lands_at_the_shifted_block() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let (off, shifted) = (32 * 512, (32 + 64) * 512);
    assert_eq!(c.write(0, off, &pattern(6)), 0);
    s.ctl_ok(
        "fault-add",
        &[
            "op=write",
            "lba=32",
            "count=8",
            "mode=misdirect",
            "shift=64",
        ],
    );
    assert_eq!(c.write(0, off, &pattern(7)), 0);
    assert_eq!(
        c.read(0, off, CHUNK).unwrap(),
        pattern(6),
        "the target keeps old data"
    );
    assert_eq!(c.read(0, shifted, CHUNK).unwrap(), pattern(7));
    // Backwards too, and only the fault's blocks move: blocks 40..48 of a write over 32..48.
    s.ctl_ok("fault-clear", &[]);
    s.ctl_ok(
        "fault-add",
        &[
            "op=write",
            "lba=40",
            "count=8",
            "mode=misdirect",
            "shift=-40",
        ],
    );
    let two: Vec<u8> = [pattern(8), pattern(9)].concat();
    assert_eq!(c.write(0, off, &two), 0);
    assert_eq!(c.read(0, off, CHUNK).unwrap(), pattern(8));
    assert_eq!(
        c.read(0, off + CHUNK as u64, CHUNK).unwrap(),
        vec![0; CHUNK]
    );
    assert_eq!(c.read(0, 0, CHUNK).unwrap(), pattern(9));
}

#[test]
fn a_torn_write_lands_its_first_sectors_only() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let off = 40 * 512;
    assert_eq!(c.write(0, off, &pattern(10)), 0);
    s.ctl_ok(
        "fault-add",
        &[
            "op=write",
            "lba=40",
            "count=8",
            "mode=torn",
            "sectors=3",
            "times=1",
        ],
    );
    assert_eq!(c.write(0, off, &pattern(11)), 0, "report=ok is silent");
    let got = c.read(0, off, CHUNK).unwrap();
    assert_eq!(got[..1536], pattern(11)[..1536]);
    assert_eq!(got[1536..], pattern(10)[1536..], "the tail is old data");

    // report=error fails the write, which still tore, and remaps nothing (auto-remap is on).
    s.ctl_ok(
        "fault-add",
        &[
            "op=write",
            "lba=40",
            "count=8",
            "mode=torn",
            "sectors=2",
            "report=error",
        ],
    );
    assert_eq!(c.write(0, off, &pattern(12)), -libc::EIO);
    let got = c.read(0, off, CHUNK).unwrap();
    assert_eq!(got[..1024], pattern(12)[..1024]);
    assert_eq!(got[1024..1536], pattern(11)[1024..1536]);
    assert_eq!(got[1536..], pattern(10)[1536..]);
    assert!(
        s.remapped_lbas().is_empty(),
        "a torn write is not a media error"
    );
}

/// A server over a 4 MiB image with an event log, and the log's path (in the server's
/// directory, so it lives as long as the server).
fn logged_server() -> (Server, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let image = dir.path().join("d.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let s = Server::start_on(dir, image, &["--event-log", events.to_str().unwrap()]);
    (s, events)
}

#[test]
fn data_mode_firings_are_logged_with_the_request_and_counted_per_mode() {
    let (s, events) = logged_server();
    s.ctl_ok(
        "fault-add",
        &["lba=8", "count=8", "mode=misdirect", "shift=8"],
    );
    s.ctl_ok(
        "fault-add",
        &["op=read", "lba=64", "mode=corrupt", "bits=1"],
    );
    let mut c = s.client(1);
    assert_eq!(c.write(0, 8 * 512, &pattern(13)), 0);
    assert_eq!(c.read(0, 16 * 512, CHUNK).unwrap(), pattern(13));
    let _ = c.read(0, 64 * 512, 512).unwrap();
    let _ = c.read(0, 64 * 512, 512).unwrap();
    let fired = &s.ctl_ok("query-stats", &[])["faults_fired"];
    assert_eq!(
        (&fired["misdirect"], &fired["corrupt"], &fired["torn"]),
        (
            &serde_json::json!(1),
            &serde_json::json!(2),
            &serde_json::json!(0)
        ),
        "{fired}"
    );
    let firings = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "fault-fired")
            .collect()
    };
    wait_until("three fault-fired events", Duration::from_secs(10), || {
        firings().len() == 3
    });
    let f = firings();
    assert_eq!(
        (
            &f[0]["mode"],
            &f[0]["op"],
            &f[0]["first_block"],
            &f[0]["last_block"]
        ),
        (
            &serde_json::json!("misdirect"),
            &serde_json::json!("write"),
            &serde_json::json!(8),
            &serde_json::json!(15)
        )
    );
    assert_eq!(
        (&f[2]["mode"], &f[2]["first_block"]),
        (&serde_json::json!("corrupt"), &serde_json::json!(64))
    );
}

#[test]
fn write_zeroes_are_lost_and_torn_like_writes() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let off = 128 * 512;
    assert_eq!(c.write(0, off, &pattern(14)), 0);
    s.ctl_ok(
        "fault-add",
        &["lba=128", "count=8", "mode=lost-write", "times=1"],
    );
    let zeroes = Op::WriteZeroes {
        offset: off,
        len: CHUNK as u64,
        unmap: false,
    };
    assert_eq!(c.batch(0, &[zeroes]), vec![0]);
    assert_eq!(
        c.read(0, off, CHUNK).unwrap(),
        pattern(14),
        "the zeroes were lost"
    );
    s.ctl_ok(
        "fault-add",
        &["lba=128", "count=8", "mode=torn", "sectors=1", "times=1"],
    );
    assert_eq!(c.batch(0, &[zeroes]), vec![0]);
    let got = c.read(0, off, CHUNK).unwrap();
    assert_eq!(got[..512], [0; 512]);
    assert_eq!(got[512..], pattern(14)[512..]);
}

/// `n` reads of block 7 (of 512 bytes), one request each: which failed, counting from 1.
fn failing_reads(c: &mut Client, n: u64) -> Vec<u64> {
    (1..=n)
        .filter(|_| {
            c.batch(
                0,
                &[Op::Read {
                    offset: 7 * 512,
                    len: 512,
                }],
            )[0] != 0
        })
        .collect()
}

#[test]
fn a_flush_fault_fails_the_flush_and_nothing_else() {
    let (mut s, events) = logged_server();
    let mut c = s.client(1);
    let off = 48 * 512;
    assert_eq!(c.write(0, off, &pattern(20)), 0);
    let id = s.ctl_ok("fault-add", &["op=flush"])["id"].as_u64().unwrap();
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!((&f["op"], &f["mode"]), (&"flush".into(), &"error".into()));
    assert!(f.get("lba").is_none() && f.get("count").is_none(), "{f}");
    assert_eq!(c.batch(0, &[Op::Flush]), vec![-libc::EIO]);
    // The write before the failed flush is still there, and writes, reads, discards and
    // write-zeroes after it go on as before.
    assert_eq!(c.read(0, off, CHUNK).unwrap(), pattern(20));
    assert_eq!(c.write(0, off + CHUNK as u64, &pattern(21)), 0);
    assert_eq!(
        c.batch(
            0,
            &[
                Op::Discard {
                    offset: 0,
                    len: 4096
                },
                Op::WriteZeroes {
                    offset: 4096,
                    len: 4096,
                    unmap: false
                },
                Op::Flush,
            ]
        ),
        vec![0, 0, -libc::EIO]
    );
    assert_eq!(c.read(0, off + CHUNK as u64, CHUNK).unwrap(), pattern(21));
    assert!(
        s.remapped_lbas().is_empty(),
        "a failed flush is no bad block"
    );
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!((&f["fired"], &f["matched"]), (&2.into(), &2.into()));
    assert_eq!(s.ctl_ok("query-stats", &[])["faults_fired"]["error"], 2);
    let firings: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "fault-fired")
        .collect();
    assert_eq!(firings.len(), 2);
    assert_eq!(firings[0]["op"], "flush");
    assert!(firings[0].get("first_block").is_none());
    s.ctl_ok("fault-remove", &[&format!("id={id}")]);
    assert_eq!(c.batch(0, &[Op::Flush]), vec![0]);

    // Left in place, it fails the guest's flushes only: the server's own flush at exit
    // flushes the real image, and the server exits 0.
    s.ctl_ok("fault-add", &["op=flush"]);
    assert_eq!(c.batch(0, &[Op::Flush]), vec![-libc::EIO]);
    drop(c);
    s.signal(libc::SIGTERM);
    let status = s.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", s.log());
    assert!(s.log().contains("image flushed; bye"), "{}", s.log());
}

#[test]
fn a_discard_fault_fails_discards_and_not_writes() {
    let s = Server::start(4 * MIB, &["--auto-remap", "off"]);
    let mut c = s.client(1);
    let off = 56 * 512;
    assert_eq!(c.write(0, off, &pattern(22)), 0);
    s.ctl_ok("fault-add", &["op=discard", "lba=56", "count=8"]);
    let discard = Op::Discard {
        offset: off,
        len: CHUNK as u64,
    };
    assert_eq!(c.batch(0, &[discard]), vec![-libc::EIO]);
    assert_eq!(
        c.read(0, off, CHUNK).unwrap(),
        pattern(22),
        "the failed discard left the data"
    );
    assert_eq!(c.write(0, off, &pattern(23)), 0);
    assert_eq!(
        c.batch(
            0,
            &[Op::WriteZeroes {
                offset: off,
                len: 512,
                unmap: false
            }]
        ),
        vec![0]
    );
    let got = c.read(0, off, CHUNK).unwrap();
    assert_eq!(got[..512], [0; 512]);
    assert_eq!(got[512..], pattern(23)[512..]);
    // Another block's discard goes through.
    assert_eq!(
        c.batch(
            0,
            &[Op::Discard {
                offset: off + CHUNK as u64,
                len: CHUNK as u64
            }]
        ),
        vec![0]
    );
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!((&f["op"], &f["fired"]), (&"discard".into(), &1.into()));
}

#[test]
fn after_three_lets_three_reads_through_and_fails_the_fourth() {
    let s = Server::start(4 * MIB, &[]);
    s.ctl_ok("fault-add", &["op=read", "lba=7", "after=3"]);
    let mut c = s.client(1);
    assert_eq!(failing_reads(&mut c, 3), Vec::<u64>::new());
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(
        (&f["matched"], &f["armed"], &f["fired"], &f["after"]),
        (&3.into(), &true.into(), &0.into(), &3.into())
    );
    assert_eq!(failing_reads(&mut c, 2), [1, 2]);
    // Reads of other blocks are no matches.
    assert_eq!(c.read(0, 0, 512).map(|_| ()), Ok(()));
    assert_eq!(s.ctl_ok("fault-list", &[])[0]["matched"], 5);
}

#[test]
fn every_two_fails_exactly_the_even_reads() {
    let s = Server::start(4 * MIB, &[]);
    s.ctl_ok("fault-add", &["op=read", "lba=7", "every=2", "times=4"]);
    let mut c = s.client(1);
    assert_eq!(
        failing_reads(&mut c, 6),
        [2, 4, 6],
        "the even reads fail, the odd pass"
    );
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(
        (&f["matched"], &f["fired"], &f["armed"], &f["every"]),
        (&6.into(), &3.into(), &true.into(), &2.into())
    );
    // times=4: the 8th fires, then it expires and fails nothing more.
    assert_eq!(failing_reads(&mut c, 6), [2]);
    assert_eq!(s.ctl_ok("fault-list", &[])[0]["expired"], true);
}

#[test]
fn a_window_fails_reads_in_its_up_phases_only() {
    let s = Server::start(4 * MIB, &[]);
    s.ctl_ok("fault-add", &["op=read", "lba=7", "window=300:300"]);
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(f["window"], "300:300");
    assert!(f["window_up"].is_boolean(), "{f}");
    let mut c = s.client(1);
    // Read until both phases have shown; each read is one match, each failure one firing.
    let (mut reads, mut failures) = (0u64, 0u64);
    let mut saw = (false, false);
    wait_until(
        "a failed and a successful read of block 7",
        Duration::from_secs(20),
        || {
            let r = c.batch(
                0,
                &[Op::Read {
                    offset: 7 * 512,
                    len: 512,
                }],
            )[0];
            reads += 1;
            if r == 0 {
                saw.1 = true;
            } else {
                assert_eq!(r, -libc::EIO);
                failures += 1;
                saw.0 = true;
            }
            saw.0 && saw.1
        },
    );
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(
        (f["matched"].as_u64(), f["fired"].as_u64()),
        (Some(reads), Some(failures))
    );
    // Writes to the block are never failed, up or down.
    for _ in 0..5 {
        assert_eq!(c.write(0, 7 * 512, &[1u8; 512]), 0);
    }
}

#[test]
fn bad_trigger_and_op_arguments_are_named() {
    let s = Server::start(4 * MIB, &[]);
    for (args, field) in [
        (vec!["op=flush", "lba=1"], "lba"),
        (vec!["op=flush", "count=1"], "count"),
        (vec!["op=flush", "mode=lost-write"], "op"),
        (vec!["op=flush", "mode=torn", "sectors=1"], "op"),
        (vec!["op=discard", "lba=1", "mode=corrupt", "bits=1"], "op"),
        (vec!["lba=1", "after=0"], "after"),
        (vec!["lba=1", "every=0"], "every"),
        (vec!["lba=1", "window=300"], "window"),
        (vec!["lba=1", "window=0:300"], "window"),
        (vec!["lba=1", "window=up:down"], "window"),
        (vec!["lba=1", "mode=error", "shift=1"], "shift"),
        (vec!["lba=1", "mode=delay", "delay_ms=1", "bits=1"], "bits"),
    ] {
        let (code, _, err) = s.ctl("fault-add", &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(&format!("{field}:")), "{args:?}: {err}");
    }
    assert_eq!(s.ctl_ok("fault-list", &[]), serde_json::json!([]));
}

#[test]
fn a_failed_flush_makes_nothing_durable_under_the_cache_model() {
    let s = Server::start(4 * MIB, &["--cache-model", "volatile"]);
    let mut c = s.client(1);
    let (a, b) = (64 * 512, 72 * 512);
    assert_eq!(c.write(0, a, &pattern(24)), 0);
    assert_eq!(c.batch(0, &[Op::Flush]), vec![0]);
    let id = s.ctl_ok("fault-add", &["op=flush", "times=1"])["id"]
        .as_u64()
        .unwrap();
    assert_eq!(c.write(0, b, &pattern(25)), 0);
    assert_eq!(c.batch(0, &[Op::Flush]), vec![-libc::EIO]);
    assert_eq!(
        c.read(0, b, CHUNK).unwrap(),
        pattern(25),
        "the write before the failed flush reads back"
    );
    assert_eq!(s.ctl_ok("fault-list", &[])[0]["expired"], true);
    s.ctl_ok("fault-remove", &[&format!("id={id}")]);
    // A flush fault in place does not fail the cut's own flush, which stands for the medium.
    s.ctl_ok("fault-add", &["op=flush"]);
    // The cut loses the write the failed flush did not cover, and only it.
    let cut = s.ctl_ok("power-cut", &["mode=drop-all"]);
    assert_eq!(cut["counts"]["lost"], 1, "{cut}");
    assert_eq!(cut["lost"][0]["lba"], 72, "{cut}");
    s.ctl_ok("power-on", &[]);
    assert_eq!(c.read(0, a, CHUNK).unwrap(), pattern(24));
    assert_eq!(c.read(0, b, CHUNK).unwrap(), vec![0; CHUNK]);
}

/// One queue driven request by request: reads submitted into chosen buffer slots, their
/// completions collected as they come (the batch helpers wait for a whole batch, which a held
/// request would never let finish).
struct Driver<'a> {
    c: &'a mut Client,
}

impl Driver<'_> {
    /// Submits a read of `len` bytes at `offset` into slot `slot` (user data = the slot).
    fn read(&mut self, slot: usize, offset: u64, len: usize) {
        let buf = self.c.slot(slot);
        poison(buf, len);
        self.c.queues[0].read(offset, buf, len, slot, blkio::ReqFlags::empty());
    }

    /// Hands what is queued to the server without waiting for anything.
    fn submit(&mut self) {
        let mut none: [std::mem::MaybeUninit<blkio::Completion>; 0] = [];
        self.c.queues[0]
            .do_io(&mut none, 0, None, None)
            .expect("submit");
    }

    /// Submits what is queued and returns the completions that come within `wait` (at least
    /// one unless the time runs out), as (slot, result).
    fn reap(&mut self, wait: Duration) -> Vec<(usize, i32)> {
        let mut comps: Vec<std::mem::MaybeUninit<blkio::Completion>> = (0..SLOTS)
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();
        let mut left = wait;
        let n = self.c.queues[0]
            .do_io(&mut comps, 1, Some(&mut left), None)
            .unwrap_or(0);
        comps[..n]
            .iter()
            // SAFETY: the client filled the first `n` completions.
            .map(|c| unsafe { c.assume_init_ref() })
            .map(|c| (c.user_data, c.ret))
            .collect()
    }

    /// Keeps `depth` reads of blocks away from the first 64 KiB in flight in slots
    /// 1..=depth until `stop` (given how many completed, and the results of slot 0 so far)
    /// says so after a round of completions; returns how many of them
    /// completed (each must succeed) and the completions of slot 0 seen meanwhile.
    fn others_until(
        &mut self,
        depth: usize,
        mut stop: impl FnMut(usize, &[i32]) -> bool,
    ) -> (usize, Vec<i32>) {
        let mut free: Vec<usize> = (1..=depth).collect();
        let (mut done, mut slow, mut next) = (0, Vec::new(), 0u64);
        loop {
            for slot in free.drain(..) {
                // 4 KiB chunks from 64 KiB to 1 MiB, round and round.
                let offset = 65536 + (next % 240) * 4096;
                next += 1;
                self.read(slot, offset, 4096);
            }
            let got = self.reap(Duration::from_secs(10));
            assert!(!got.is_empty(), "nothing completed within 10 s");
            for &(slot, ret) in &got {
                if slot == 0 {
                    slow.push(ret);
                } else {
                    assert_eq!(ret, 0, "a read of a healthy block failed");
                    done += 1;
                    free.push(slot);
                }
            }
            if stop(done, &slow[..]) {
                // Let the others finish so the queue is idle again.
                let mut out = depth - free.len();
                while out > 0 {
                    for (slot, ret) in self.reap(Duration::from_secs(10)) {
                        if slot == 0 {
                            slow.push(ret);
                        } else {
                            out -= 1;
                        }
                    }
                }
                return (done, slow);
            }
        }
    }
}

#[test]
fn a_delayed_block_stalls_nothing_else_on_its_queue() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let data = pattern(11);
    assert_eq!(c.write(0, 0, &data), 0);
    s.ctl_ok(
        "fault-add",
        &["op=read", "lba=0", "mode=delay", "delay_ms=500"],
    );
    let mut d = Driver { c: &mut c };
    let t0 = Instant::now();
    d.read(0, 0, 4096);
    let mut slow_after = None;
    let (others, slow) = d.others_until(31, |_, slow| {
        if slow.is_empty() {
            return false;
        }
        slow_after.get_or_insert(t0.elapsed());
        true
    });
    let slow_after = slow_after.unwrap();
    assert_eq!(slow, vec![0]);
    assert!(
        slow_after >= Duration::from_millis(500),
        "the delayed read completed after {slow_after:?}"
    );
    // The point: while the delayed read waited, the queue kept serving. At a few thousand
    // reads a second even in a debug build, 500 ms is hundreds of them; a queue stalled
    // behind the delay would complete none.
    assert!(
        others >= 100,
        "only {others} other reads completed during the 500 ms delay"
    );
    assert_eq!(c.slot_mut(0, 4096).to_vec(), data);
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(f["fired"], 1);
    assert_eq!(s.ctl_ok("query-stats", &[])["faults_fired"]["delay"], 1);
}

/// Waits until fault `id` holds `n` requests (`fault-list`'s `held`).
fn wait_held(s: &Server, id: u64, n: u64) {
    wait_until(
        &format!("fault {id} to hold {n}"),
        Duration::from_secs(10),
        || {
            s.ctl_ok("fault-list", &[])
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["id"] == id && f["held"] == n)
        },
    );
}

#[test]
fn a_hung_read_waits_for_fault_release_and_reads_the_right_data() {
    let (s, events) = logged_server();
    let mut c = s.client(1);
    let data = pattern(12);
    assert_eq!(c.write(0, 4096, &data), 0);
    let id = s.ctl_ok("fault-add", &["op=read", "lba=8", "mode=hang"])["id"]
        .as_u64()
        .unwrap();
    let mut d = Driver { c: &mut c };
    d.read(0, 4096, 4096);
    // Other reads keep completing while the held one does not.
    let (others, slow) = d.others_until(16, |done, _| done >= 300);
    assert!(slow.is_empty(), "the held read completed: {slow:?}");
    assert!(others >= 300);
    wait_held(&s, id, 1);
    assert_eq!(s.ctl_ok("query-status", &[])["inflight"], 1);
    assert_eq!(
        s.ctl_ok("fault-release", &[&format!("id={id}")])["released"],
        1
    );
    let got = d.reap(Duration::from_secs(10));
    assert_eq!(got, vec![(0, 0)], "the released read completes, and OK");
    assert_eq!(c.slot_mut(0, 4096).to_vec(), data);
    wait_held(&s, id, 0);
    // The fault stays: the next read of the block is held again, until the fault goes.
    let mut d = Driver { c: &mut c };
    d.read(0, 4096, 4096);
    assert!(d.reap(Duration::from_millis(300)).is_empty());
    wait_held(&s, id, 1);
    s.ctl_ok("fault-remove", &[&format!("id={id}")]);
    assert_eq!(d.reap(Duration::from_secs(10)), vec![(0, 0)]);
    assert_eq!(c.slot_mut(0, 4096).to_vec(), data);
    assert_eq!(s.ctl_ok("query-stats", &[])["faults_fired"]["hang"], 2);
    let fired = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "fault-fired" && v["mode"] == "hang" && v["first_block"] == 8)
        .count();
    assert_eq!(fired, 2, "the event log names each firing");
    let (code, _, err) = s.ctl("fault-release", &[&format!("id={id}")]);
    assert_eq!(code, 1);
    assert!(err.contains("id"), "{err}");
}

#[test]
fn a_hung_request_at_disconnect_is_given_up_at_the_drain_timeout() {
    let s = Server::start(4 * MIB, &["--drain-timeout-ms", "300"]);
    let id = s.ctl_ok("fault-add", &["lba=8", "mode=hang"])["id"]
        .as_u64()
        .unwrap();
    let mut c = s.client(1);
    let mut d = Driver { c: &mut c };
    d.read(0, 4096, 4096);
    assert!(d.reap(Duration::from_millis(100)).is_empty());
    wait_held(&s, id, 1);
    let t0 = Instant::now();
    drop(c);
    wait_until("the drain to give up", Duration::from_secs(10), || {
        s.ctl_ok("query-status", &[])["connected"] == false
    });
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "the drain gave up after {took:?}, before its timeout"
    );
    assert!(took < Duration::from_secs(5), "the drain took {took:?}");
    assert_eq!(s.ctl_ok("query-stats", &[])["totals"]["abandoned"], 1);
    assert!(
        s.log().contains("still in flight"),
        "the held request is named"
    );
    // Given up on: no longer held, and never started later.
    wait_held(&s, id, 0);
    let mut c = s.client(1);
    let data = pattern(13);
    assert_eq!(c.write(0, MIB, &data), 0);
    assert_eq!(c.read(0, MIB, 4096).unwrap(), data);
    // The block held before is held again for the new client, until released.
    let mut d = Driver { c: &mut c };
    d.read(0, 4096, 4096);
    d.submit();
    wait_held(&s, id, 1);
    assert_eq!(
        s.ctl_ok("fault-release", &[&format!("id={id}")])["released"],
        1
    );
    assert_eq!(d.reap(Duration::from_secs(10)), vec![(0, 0)]);
}

#[test]
fn a_jittered_delay_spreads_each_request_within_its_bounds() {
    let s = Server::start(4 * MIB, &[]);
    let args = [
        "op=read",
        "lba=0",
        "mode=delay",
        "delay_ms=60",
        "jitter_ms=40",
        "distribution=uniform",
        "seed=5",
    ];
    s.ctl_ok("fault-add", &args);
    let f = &s.ctl_ok("fault-list", &[])[0];
    assert_eq!(
        (&f["distribution"], &f["jitter_ms"], &f["seed"]),
        (&"uniform".into(), &40.into(), &5.into())
    );
    let mut c = s.client(1);
    let took: Vec<Duration> = (0..12)
        .map(|_| {
            let t0 = Instant::now();
            assert_eq!(c.read(0, 0, 4096).map(|_| ()), Ok(()));
            t0.elapsed()
        })
        .collect();
    // Uniform in [20, 100] ms; a loaded machine may add to a wait, never take from it.
    for t in &took {
        assert!(*t >= Duration::from_millis(20), "{took:?}");
        assert!(*t < Duration::from_millis(100 + 400), "{took:?}");
    }
    let (lo, hi) = (took.iter().min().unwrap(), took.iter().max().unwrap());
    assert!(
        *hi - *lo >= Duration::from_millis(10),
        "twelve draws from a 80 ms range all within 10 ms: {took:?}"
    );
    assert_eq!(s.ctl_ok("fault-list", &[])[0]["fired"], 12);
}
