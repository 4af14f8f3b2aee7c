//! The remap layer end to end: writes through write faults succeed and land in the spare,
//! remaps survive a restart, read errors make blocks pending until the next write, an
//! exhausted spare lets errors through, and damaged metadata is repaired or refused.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::*;

fn spare_of(s: &Server) -> std::path::PathBuf {
    let mut p = s.image.clone().into_os_string();
    p.push(".spare");
    p.into()
}

fn metadata(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_remapblk"))
        .arg("metadata")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn write_through_a_write_fault_is_remapped_and_survives_restart() {
    let mut s = Server::start(4 * MIB, &["--spare-blocks", "64"]);
    s.ctl_ok("fault-add", &["op=write", "lba=100", "count=4"]);
    let mut c = s.client(1);
    // 8 blocks from 96: blocks 100..104 fail on the main image and are remapped.
    let data = pattern(5, 96 * 512, 4096);
    assert_eq!(
        c.write(0, 96 * 512, &data),
        0,
        "the guest must not see the write error"
    );
    assert_eq!(c.read(0, 96 * 512, 4096).unwrap(), data);
    assert_eq!(s.remapped_lbas(), vec![100, 101, 102, 103]);
    let remaps = s.ctl_ok("remap-list", &[]);
    assert!(remaps
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["cause"] == "write-error"));
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["remaps"], 4);
    assert_eq!(st["spare_total"], 64);
    assert_eq!(st["spare_free"], 60);
    // The main image does not hold the remapped blocks' new data; the spare does.
    assert_ne!(
        read_file_at(&s.image, 100 * 512, 512),
        data[4 * 512..5 * 512]
    );
    drop(c);

    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(5)).code(), Some(0));
    let (code, dump) = metadata(&["dump", spare_of(&s).to_str().unwrap()]);
    assert_eq!(code, 0, "{dump}");
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["entries"].as_array().unwrap().len(), 4);
    let e = &dump["entries"][0];
    let off =
        dump["header"]["data_offset"].as_u64().unwrap() + e["spare_block"].as_u64().unwrap() * 512;
    let lba = e["lba"].as_u64().unwrap();
    assert_eq!(
        read_file_at(&spare_of(&s), off, 512),
        data[((lba - 96) * 512) as usize..((lba - 95) * 512) as usize],
        "the spare file holds the data"
    );

    // After a restart (the fault is gone with the old process) the data still reads back.
    s.spawn();
    let mut c = s.client(1);
    assert_eq!(c.read(0, 96 * 512, 4096).unwrap(), data);
    assert_eq!(s.ctl_ok("query-status", &[])["remaps"], 4);
}

#[test]
fn read_error_makes_a_block_pending_until_the_next_write() {
    let s = Server::start(4 * MIB, &[]);
    s.ctl_ok("fault-add", &["op=read", "lba=200"]);
    let mut c = s.client(1);
    assert_eq!(c.read(0, 200 * 512, 512).unwrap_err(), -libc::EIO);
    assert_eq!(s.ctl_ok("pending-list", &[]), serde_json::json!([200]));
    assert_eq!(s.ctl_ok("query-status", &[])["pending"], 1);
    let data = pattern(6, 200 * 512, 512);
    assert_eq!(c.write(0, 200 * 512, &data), 0);
    assert_eq!(s.ctl_ok("pending-list", &[]), serde_json::json!([]));
    assert_eq!(s.ctl_ok("remap-list", &[])[0]["lba"], 200);
    // The read fault is still there, on the main image; the block now lives in the spare.
    assert_eq!(c.read(0, 200 * 512, 512).unwrap(), data);
}

#[test]
fn exhausted_spare_lets_write_errors_through_and_warns_once() {
    let s = Server::start(4 * MIB, &["--spare-blocks", "2"]);
    s.ctl_ok("fault-add", &["op=write", "lba=0", "count=8"]);
    let mut c = s.client(1);
    assert_eq!(
        c.write(0, 0, &[1u8; 1024]),
        0,
        "two blocks fit in the spare"
    );
    assert_eq!(c.write(0, 1024, &[2u8; 512]), -libc::EIO);
    assert_eq!(c.write(0, 2048, &[3u8; 512]), -libc::EIO);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["spare_free"], 0);
    assert_eq!(st["remaps"], 2);
    assert_eq!(s.log().matches("is exhausted").count(), 1);
}

#[test]
fn damaged_metadata_is_repaired_or_refused() {
    let mut s = Server::start(4 * MIB, &["--spare-blocks", "16"]);
    s.ctl_ok("fault-add", &["op=write", "lba=10"]);
    let mut c = s.client(1);
    assert_eq!(c.write(0, 10 * 512, &[7u8; 512]), 0);
    drop(c);
    s.signal(libc::SIGTERM);
    s.wait_exit(Duration::from_secs(5));
    let spare = spare_of(&s);
    let path = spare.to_str().unwrap();
    assert_eq!(metadata(&["check", path]).0, 0);

    // Corrupt slot A: start-up uses slot B, which holds the same newest table (every commit
    // writes both), and rewrites A from it. `metadata check` names the bad slot first.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&spare)
        .unwrap();
    f.write_all_at(&[0xee; 16], 4096 + 16).unwrap();
    drop(f);
    let (code, out) = metadata(&["check", path]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("slot A"), "{out}");
    s.spawn();
    assert!(s.log().contains("was bad and has been rewritten"));
    assert_eq!(metadata(&["check", path]).0, 0);
    assert_eq!(s.ctl_ok("query-status", &[])["remaps"], 1, "no remap lost");
    assert_eq!(s.client(1).read(0, 10 * 512, 512).unwrap(), vec![7u8; 512]);
    s.signal(libc::SIGTERM);
    s.wait_exit(Duration::from_secs(5));

    // Both slots bad: refuse to start.
    let slot = {
        let dump: serde_json::Value = serde_json::from_str(&metadata(&["dump", path]).1).unwrap();
        dump["header"]["slot_size"].as_u64().unwrap()
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&spare)
        .unwrap();
    f.write_all_at(&[0xee; 16], 4096 + 16).unwrap();
    f.write_all_at(&[0xee; 16], 4096 + slot + 16).unwrap();
    drop(f);
    assert_eq!(metadata(&["check", path]).0, 2);
    let (code, err) = serve_refused(&s.image, &s.dir.path().join("other.sock"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("both metadata slots are bad"), "{err}");
}

#[test]
fn spare_made_for_another_block_size_is_refused() {
    let mut s = Server::start(4 * MIB, &[]);
    s.signal(libc::SIGTERM);
    s.wait_exit(Duration::from_secs(5));
    let (code, err) = serve_refused(
        &s.image,
        &s.dir.path().join("other.sock"),
        &["--block-size", "4096"],
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("block_size") && err.contains("--block-size 512"),
        "{err}"
    );
}

#[test]
fn remap_add_and_remove_move_data_both_ways() {
    let s = Server::start(4 * MIB, &["--spare-blocks", "64"]);
    let mut c = s.client(1);
    let data = pattern(9, 100 * 512, 4096);
    assert_eq!(c.write(0, 100 * 512, &data), 0);
    let added = s.ctl_ok("remap-add", &["lba=100", "count=8"]);
    assert_eq!(added.as_array().unwrap().len(), 8);
    assert!(added
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["cause"] == "manual"));
    assert_eq!(s.ctl_ok("query-status", &[])["remaps"], 8);
    assert_eq!(c.read(0, 100 * 512, 4096).unwrap(), data);
    // New data goes to the spare while the blocks are remapped...
    let data2 = pattern(10, 100 * 512, 4096);
    assert_eq!(c.write(0, 100 * 512, &data2), 0);
    assert_eq!(
        read_file_at(&s.image, 100 * 512, 4096),
        data,
        "the main image keeps the old data"
    );
    // ...and comes back to the main image with remap-remove.
    assert_eq!(
        s.ctl_ok("remap-remove", &["lba=100", "count=8"])
            .as_array()
            .unwrap()
            .len(),
        8
    );
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(
        (st["remaps"].as_u64(), st["spare_free"].as_u64()),
        (Some(0), Some(64))
    );
    assert_eq!(read_file_at(&s.image, 100 * 512, 4096), data2);
    assert_eq!(c.read(0, 100 * 512, 4096).unwrap(), data2);
    for (args, field) in [
        (vec!["count=2"], "lba"),
        (vec!["lba=8192"], "lba"),
        (vec!["lba=8190", "count=4"], "count"),
        (vec!["lba=0", "count=3", "stride=4096"], "count"),
        (vec!["lba=0", "stride=0"], "stride"),
        (
            vec!["lba=0", "count=65", "stride=2"],
            "the spare file has 64 free blocks",
        ),
    ] {
        let (code, _, err) = s.ctl("remap-add", &args);
        assert_eq!(code, 1);
        assert!(
            err.starts_with(&format!("remapblk ctl: {field}")),
            "{args:?}: {err}"
        );
    }
}

/// `stride` scatters one command's remaps; they take one table change and read back right.
#[test]
fn remap_add_with_stride_scatters_blocks() {
    let s = Server::start(4 * MIB, &["--spare-blocks", "1024"]);
    let mut c = s.client(1);
    fill(&mut c, 4, 0, 4 * MIB, 64 << 10, 16);
    let added = s.ctl_ok("remap-add", &["lba=5", "count=1000", "stride=7"]);
    let lbas: Vec<u64> = added
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["lba"].as_u64().unwrap())
        .collect();
    assert_eq!(lbas, (0..1000).map(|i| 5 + 7 * i).collect::<Vec<_>>());
    assert!(s.log().contains("1000 blocks remapped in one table change"));
    assert_eq!(s.ctl_ok("query-status", &[])["spare_free"], 24);
    // Spoil the main image under the remapped blocks: reads must come from the spare.
    spoil_blocks(&s.image, (0..1000).map(|i| 5 + 7 * i));
    verify(&mut c, 4, 0, 4 * MIB, 64 << 10, 16);
    assert_eq!(
        s.ctl_ok("remap-remove", &["lba=5", "count=1000", "stride=7"])
            .as_array()
            .unwrap()
            .len(),
        1000
    );
    verify(&mut c, 4, 0, 4 * MIB, 64 << 10, 16);
}

/// Remaps move blocks back and forth (random runs, seeded: `REMAPBLK_SEED`) while four queues
/// have writes in flight to the same blocks at once, and a write fault in the middle keeps
/// auto-remapping blocks the churn moved back; at the end of every round each chunk holds the
/// last value whose write was acknowledged.
#[test]
fn remap_churn_under_writes_loses_no_write() {
    use common::load::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    const CHUNKS: u64 = 256; // the first 1 MiB: blocks 0..2048
    const QUEUES: usize = 4;
    const DEPTH: usize = 16;
    const GENS: u64 = 60;
    let seed = seed(6003);
    let _guard = SeedGuard(seed);
    let s = Server::start(4 * MIB, &["--num-queues", "4", "--spare-blocks", "4096"]);
    let mut ctl = Ctl::connect(&s.control());
    const FAULT: u64 = 1000;
    const FAULT_COUNT: u64 = 48;
    let fault = serde_json::json!({"op": "write", "lba": FAULT, "count": FAULT_COUNT});
    ctl.ok("fault-add", fault.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let mut ctl = Ctl::connect(&s.control());
        let mut rng = Rng::new(seed ^ 0xc4);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let count = rng.range(1, 65);
                let lba = rng.range(0, CHUNKS * 8 - count);
                let args = serde_json::json!({"lba": lba, "count": count});
                ctl.ok("remap-add", args.clone());
                // A faulty block cannot be copied back to the main image: lift the fault for
                // the move, then put it back, so writes remap those blocks again.
                let faulty = lba < FAULT + FAULT_COUNT && FAULT < lba + count;
                if faulty {
                    ctl.ok("fault-clear", serde_json::json!({}));
                }
                ctl.ok("remap-remove", args);
                if faulty {
                    ctl.ok("fault-add", fault.clone());
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut c = s.client(QUEUES);
    let mut t = Tracker::default();
    let all: BTreeSet<u64> = (0..CHUNKS).collect();
    for gen in 1..=GENS {
        // Each queue writes its own 16 of the 64 chunks of this round; chunks move between
        // queues from round to round.
        let first = (gen * 64) % CHUNKS;
        let ops: Vec<Vec<Op>> = (0..QUEUES)
            .map(|q| {
                (0..DEPTH)
                    .map(|i| {
                        let k = (first + (q * DEPTH + i) as u64) % CHUNKS;
                        let off = k * CHUNK as u64;
                        buf_mut(&mut c, q * DEPTH + i).copy_from_slice(&pattern(gen, off, CHUNK));
                        t.submitted(k, gen);
                        Op::Write {
                            offset: off,
                            len: CHUNK,
                        }
                    })
                    .collect()
            })
            .collect();
        let mut acks = Vec::new();
        assert!(round(
            &mut c,
            &ops,
            DEPTH,
            Duration::from_secs(30),
            |q, i, ret| acks.push((q, i, ret)),
            || {}
        ));
        for (q, i, ret) in acks {
            assert_eq!(ret, 0, "gen {gen}: write failed");
            t.acked((first + (q * DEPTH + i) as u64) % CHUNKS, gen);
        }
        t.verify(&mut c, &all, DEPTH)
            .unwrap_or_else(|e| panic!("gen {gen}: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let rounds = rounds.load(Ordering::Relaxed);
    assert!(rounds >= 10, "only {rounds} churn rounds");
    t.verify(&mut c, &all, DEPTH).unwrap();
    let st = ctl.ok("query-status", serde_json::json!({}));
    assert_eq!(
        st["spare_free"].as_u64().unwrap() + st["remaps"].as_u64().unwrap(),
        st["spare_total"].as_u64().unwrap(),
        "{st}"
    );
    eprintln!("{GENS} rounds of writes, {rounds} churn rounds");
}

/// A guest write that took its view of the table before a remap-remove freed a spare block
/// must not write into that block once a remap-add has given it to another block. Block 11
/// lives in spare block 0; a write of blocks 10..12 is held (a stall fault on block 10: it
/// holds the request inside the stack, below the remap layer) after it has looked the mapping
/// up; meanwhile block 11 is moved back and block 100 is remapped into the freed spare block
/// 0. Block 100 must keep its data.
#[test]
fn write_racing_remap_remove_does_not_land_in_a_reused_spare_block() {
    let s = Server::start(4 * MIB, &["--spare-blocks", "64"]);
    let mut c = s.client(1);
    let other = pattern(1, 100 * 512, 512);
    assert_eq!(c.write(0, 100 * 512, &other), 0);
    let e = s.ctl_ok("remap-add", &["lba=11"]);
    assert_eq!(e[0]["spare_block"], 0);
    s.ctl_ok(
        "fault-add",
        &[
            "op=write",
            "lba=10",
            "mode=stall",
            "delay_ms=300",
            "times=1",
        ],
    );
    let data = pattern(2, 10 * 512, 1024);
    c.slot_mut(0, 1024).copy_from_slice(&data);
    let buf = c.slot(0);
    c.queues[0].write(10 * 512, buf, 1024, 0, blkio::ReqFlags::empty());
    let mut comps = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
    c.queues[0].do_io(&mut comps, 0, None, None).unwrap();
    wait_until("the write to be held", Duration::from_secs(10), || {
        s.ctl_ok("fault-list", &[])[0]["fired"] == 1
    });
    s.ctl_ok("remap-remove", &["lba=11"]);
    let e = s.ctl_ok("remap-add", &["lba=100"]);
    assert_eq!(
        e[0]["spare_block"], 0,
        "the scenario needs the freed block reused"
    );
    let mut left = Duration::from_secs(10);
    assert_eq!(
        c.queues[0]
            .do_io(&mut comps, 1, Some(&mut left), None)
            .unwrap(),
        1
    );
    // SAFETY: the wait above returned one completion, so the first is filled.
    assert_eq!(unsafe { comps[0].assume_init_ref() }.ret, 0);
    assert_eq!(c.read(0, 10 * 512, 1024).unwrap(), data);
    assert!(
        c.read(0, 100 * 512, 512).unwrap() == other,
        "block 100 got another block's write"
    );
}

/// The read side of the same race: a read that looked up block 11 in spare block 0 before a
/// remap-remove and a remap-add gave that block to block 100 must return block 11's data.
#[test]
fn read_racing_remap_remove_does_not_return_another_blocks_data() {
    let s = Server::start(4 * MIB, &["--spare-blocks", "64"]);
    let mut c = s.client(1);
    let mine = pattern(3, 10 * 512, 1024);
    assert_eq!(c.write(0, 10 * 512, &mine), 0);
    assert_eq!(c.write(0, 100 * 512, &pattern(4, 100 * 512, 512)), 0);
    s.ctl_ok("remap-add", &["lba=11"]);
    s.ctl_ok(
        "fault-add",
        &["op=read", "lba=10", "mode=stall", "delay_ms=300", "times=1"],
    );
    let buf = c.slot(0);
    c.queues[0].read(10 * 512, buf, 1024, 0, blkio::ReqFlags::empty());
    let mut comps = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
    c.queues[0].do_io(&mut comps, 0, None, None).unwrap();
    wait_until("the read to be held", Duration::from_secs(10), || {
        s.ctl_ok("fault-list", &[])[0]["fired"] == 1
    });
    s.ctl_ok("remap-remove", &["lba=11"]);
    let e = s.ctl_ok("remap-add", &["lba=100"]);
    assert_eq!(
        e[0]["spare_block"], 0,
        "the scenario needs the freed block reused"
    );
    let mut left = Duration::from_secs(10);
    assert_eq!(
        c.queues[0]
            .do_io(&mut comps, 1, Some(&mut left), None)
            .unwrap(),
        1
    );
    // SAFETY: the wait above returned one completion, so the first is filled.
    assert_eq!(unsafe { comps[0].assume_init_ref() }.ret, 0);
    assert!(
        c.slot_mut(0, 1024).to_vec() == mine,
        "the read returned another block's data"
    );
}

/// A slow write (a 500 ms stall fault, served inside the stack so that the write's attempt
/// overlaps the moves) completes while remap-add/remap-remove churn runs on
/// other blocks: only a move of its own blocks makes a write run again, or every attempt would
/// overlap some move and it would never finish.
#[test]
fn slow_write_completes_under_remap_churn_elsewhere() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let s = Server::start(4 * MIB, &["--spare-blocks", "1024"]);
    s.ctl_ok(
        "fault-add",
        &["op=write", "lba=10", "mode=stall", "delay_ms=500"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let mut ctl = common::load::Ctl::connect(&s.control());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let args = serde_json::json!({"lba": 1000 + n % 64});
                ctl.ok("remap-add", args.clone());
                ctl.ok("remap-remove", args);
                n += 1;
            }
            n
        })
    };
    let mut c = s.client(1);
    let data = pattern(7, 10 * 512, 512);
    c.slot_mut(0, 512).copy_from_slice(&data);
    let t0 = std::time::Instant::now();
    let res = c.try_batch(
        0,
        &[Op::Write {
            offset: 10 * 512,
            len: 512,
        }],
        Duration::from_secs(10),
    );
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let moves = churn.join().unwrap();
    assert_eq!(res, Some(vec![0]), "the write did not complete in {took:?}");
    assert!(moves >= 1, "no churn round");
    assert_eq!(c.read(0, 10 * 512, 512).unwrap(), data);
}
