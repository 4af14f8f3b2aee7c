//! The volatile cache and the power switch through the socket: what libblkio wrote and read
//! back across `power-cut` and `power-on`.

mod common;

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use common::raw::*;
use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

/// The `writeback` byte of virtio-blk's config space (CONFIG_WCE).
const WRITEBACK: u32 = 32;

const VOLATILE: &[&str] = &["--cache-model", "volatile"];

fn write_at(c: &mut Client, offset: u64, data: &[u8]) {
    assert_eq!(c.write(0, offset, data), 0, "write at {offset}");
}

fn flush(c: &mut Client) {
    assert_eq!(c.batch(0, &[Op::Flush]), [0]);
}

/// Data at an offset.
type At = (u64, Vec<u8>);

/// Writes A and flushes, writes B: (A, B, the image's bytes at B before it).
fn a_flushed_b_not(c: &mut Client, s: &Server) -> (At, At, Vec<u8>) {
    let a = (0, pattern(1, 0, 64 << 10));
    let b = (1 << 20, pattern(2, 1 << 20, 64 << 10));
    let before_b = c.read(0, b.0, b.1.len()).unwrap();
    write_at(c, a.0, &a.1);
    flush(c);
    write_at(c, b.0, &b.1);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["cache_model"], "volatile");
    assert_eq!(st["unflushed_bytes"], 64 << 10, "{st}");
    assert_eq!(st["powered"], true);
    (a, b, before_b)
}

#[test]
fn drop_all_loses_the_write_no_flush_covered_and_io_fails_until_power_on() {
    let events = tempfile::NamedTempFile::new().unwrap();
    let ev = events.path().display().to_string();
    let s = Server::start(4 * MIB, &["--cache-model", "volatile", "--event-log", &ev]);
    let mut c = s.client(1);
    let (a, b, before_b) = a_flushed_b_not(&mut c, &s);

    let cut = s.ctl_ok("power-cut", &["mode=drop-all"]);
    assert_eq!(cut["counts"]["lost"], 1, "{cut}");
    assert_eq!(cut["lost"][0]["lba"], b.0 / 512, "{cut}");
    assert_eq!(cut["lost"][0]["len"], b.1.len(), "{cut}");
    assert_eq!(cut["plan"]["then"], "fail");
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(
        (st["powered"].clone(), st["unflushed_bytes"].clone()),
        (false.into(), 0.into())
    );

    // then=fail: the queues run, and every request fails.
    assert!(c.read(0, a.0, 4096).is_err());
    assert_ne!(c.write(0, 8192, &[1; 512]), 0);
    let (code, _, err) = s.ctl("power-cut", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("already off"), "{err}");

    let on = s.ctl_ok("power-on", &[]);
    assert_eq!(on["was_off"], true);
    assert_eq!(
        c.read(0, a.0, a.1.len()).unwrap(),
        a.1,
        "the flushed write survives"
    );
    assert_eq!(
        c.read(0, b.0, b.1.len()).unwrap(),
        before_b,
        "the unflushed one is lost"
    );
    assert_eq!(
        read_file_at(&s.image, b.0, b.1.len()),
        before_b,
        "on the image too"
    );

    let log = std::fs::read_to_string(events.path()).unwrap();
    let cut_line = log
        .lines()
        .find(|l| l.contains("\"event\":\"power-cut\""))
        .expect(&log);
    assert!(cut_line.contains("\"lost\":1"), "{cut_line}");
    assert!(log.contains("\"event\":\"power-on\""), "{log}");
}

#[test]
fn keep_all_keeps_the_unflushed_write() {
    let s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    let (a, b, _) = a_flushed_b_not(&mut c, &s);
    let cut = s.ctl_ok("power-cut", &["mode=keep-all", "seed=5"]);
    assert_eq!(cut["counts"]["kept"], 1, "{cut}");
    assert_eq!(cut["plan"]["seed"], 5);
    s.ctl_ok("power-on", &[]);
    assert_eq!(c.read(0, a.0, a.1.len()).unwrap(), a.1);
    assert_eq!(c.read(0, b.0, b.1.len()).unwrap(), b.1);
}

#[test]
fn discard_and_write_zeroes_are_writes_a_cut_loses() {
    let s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    let data = pattern(3, 0, 256 << 10);
    write_at(&mut c, 0, &data);
    flush(&mut c);
    let r = c.batch(
        0,
        &[
            Op::Discard {
                offset: 0,
                len: 64 << 10,
            },
            Op::WriteZeroes {
                offset: 128 << 10,
                len: 64 << 10,
                unmap: false,
            },
        ],
    );
    assert_eq!(r, [0, 0]);
    assert_eq!(c.read(0, 128 << 10, 4096).unwrap(), vec![0; 4096]);
    let cut = s.ctl_ok("power-cut", &[]);
    assert_eq!(cut["counts"]["lost"], 2, "{cut}");
    let kinds: Vec<&str> = cut["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"discard") && kinds.contains(&"write-zeroes"),
        "{cut}"
    );
    s.ctl_ok("power-on", &[]);
    assert_eq!(c.read(0, 0, data.len()).unwrap(), data);
}

#[test]
fn then_hold_keeps_requests_waiting_until_power_on() {
    let s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    write_at(&mut c, 0, &[7; 4096]);
    let cut = s.ctl_ok("power-cut", &["then=hold"]);
    assert_eq!(cut["plan"]["then"], "hold");
    assert_eq!(s.ctl_ok("query-status", &[])["state"], "quiesced");

    // A write submitted while held stays in the ring.
    let data = pattern(4, 8192, 4096);
    c.slot_mut(0, data.len()).copy_from_slice(&data);
    let buf = c.slot(0);
    c.queues[0].write(8192, buf, data.len(), 0, ReqFlags::empty());
    let mut comps: Vec<MaybeUninit<Completion>> = vec![MaybeUninit::uninit()];
    let mut wait = Duration::from_millis(300);
    // A timeout is an error or no completion, depending on libblkio's version.
    let n = c.queues[0]
        .do_io(&mut comps, 1, Some(&mut wait), None)
        .unwrap_or(0);
    assert_eq!(n, 0, "completed while the power was off");

    let on = s.ctl_ok("power-on", &[]);
    assert_eq!(on["resumed"], true);
    let mut wait = Duration::from_secs(10);
    let n = c.queues[0]
        .do_io(&mut comps, 1, Some(&mut wait), None)
        .unwrap();
    assert_eq!(n, 1, "the held write completes after power-on");
    // SAFETY: do_io filled the first completion.
    assert_eq!(unsafe { comps[0].assume_init_ref() }.ret, 0);
    assert_eq!(c.read(0, 8192, 4096).unwrap(), data);
    assert_eq!(
        c.read(0, 0, 4096).unwrap(),
        vec![0; 4096],
        "the cut lost the first write"
    );
}

#[test]
fn a_full_cache_flushes_by_itself_and_what_it_flushed_survives() {
    let s = Server::start(
        4 * MIB,
        &["--cache-model", "volatile", "--cache-size", "64K"],
    );
    let mut c = s.client(1);
    // 40 writes of 4 KiB, one after the other: the 17th and the 33rd find the cache full.
    let data = pattern(6, 0, 40 * 4096);
    for i in 0..40 {
        write_at(
            &mut c,
            i * 4096,
            &data[i as usize * 4096..(i as usize + 1) * 4096],
        );
    }
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["cache_auto_flushes"], 2, "{st}");
    assert_eq!(st["unflushed_bytes"], 8 * 4096, "{st}");
    let cut = s.ctl_ok("power-cut", &[]);
    assert_eq!(cut["counts"]["lost"], 8, "{cut}");
    s.ctl_ok("power-on", &[]);
    assert_eq!(c.read(0, 0, 32 * 4096).unwrap(), data[..32 * 4096]);
    assert_eq!(c.read(0, 32 * 4096, 8 * 4096).unwrap(), vec![0; 8 * 4096]);
}

#[test]
fn a_remap_by_an_unflushed_write_stays_and_the_block_reads_its_old_data() {
    let mut s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    let old = pattern(7, 100 * 512, 512);
    write_at(&mut c, 100 * 512, &old);
    flush(&mut c);
    s.ctl_ok("fault-add", &["op=write", "lba=100", "mode=error"]);
    write_at(&mut c, 100 * 512, &[0x55; 512]);
    assert_eq!(
        s.remapped_lbas(),
        [100],
        "the failed write remapped its block"
    );
    assert_eq!(c.read(0, 100 * 512, 512).unwrap(), vec![0x55; 512]);

    s.ctl_ok("power-cut", &["mode=drop-all"]);
    s.ctl_ok("power-on", &[]);
    assert_eq!(s.remapped_lbas(), [100], "the remap is durable by itself");
    assert_eq!(c.read(0, 100 * 512, 512).unwrap(), old, "the data is not");

    drop(c);
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(15)).success());
    s.spawn();
    let mut c = s.client(1);
    assert_eq!(s.remapped_lbas(), [100]);
    assert_eq!(
        c.read(0, 100 * 512, 512).unwrap(),
        old,
        "after a restart too"
    );
}

#[test]
fn cache_model_none_loses_nothing_but_the_power_still_switches() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    assert_eq!(s.ctl_ok("query-status", &[])["cache_model"], "none");
    let data = pattern(8, 4096, 8192);
    write_at(&mut c, 4096, &data);
    let cut = s.ctl_ok("power-cut", &[]);
    assert_eq!(cut["counts"]["lost"], 0, "{cut}");
    assert!(c.read(0, 4096, 512).is_err());
    s.ctl_ok("power-on", &[]);
    assert_eq!(c.read(0, 4096, data.len()).unwrap(), data);
}

#[test]
fn power_cut_arguments_are_named_when_wrong() {
    let s = Server::start(4 * MIB, VOLATILE);
    for (args, field) in [
        (
            &["probability=2"][..],
            "probability: must be a number from 0 to 1",
        ),
        (&["mode=some"][..], "mode: "),
        (&["torn=half"][..], "torn: "),
        (&["then=later"][..], "then: "),
        (&["seed=-1"][..], "seed: "),
        (&["colour=red"][..], "colour: unknown argument"),
    ] {
        let (code, _, err) = s.ctl("power-cut", args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
    }
    assert_eq!(
        s.ctl_ok("query-status", &[])["powered"],
        true,
        "no bad cut switched it off"
    );
    let (code, _, err) = s.ctl("power-on", &["now=1"]);
    assert_eq!(code, 1);
    assert!(err.contains("now: unknown argument"), "{err}");
}

/// The guest's cache in writethrough mode (CONFIG_WCE, as Linux sets it through sysfs
/// `cache_type`): every write is flushed before it completes, so a drop-all cut loses nothing.
/// power-on puts the cache back to writeback, as on a fresh disk.
#[test]
fn writethrough_loses_nothing_and_power_on_restores_writeback() {
    let s = Server::start(4 * MIB, VOLATILE);
    let mut g = RawGuest::connect(&s.socket, 1, 16, false);
    let writeback = |g: &mut RawGuest| {
        let (_, payload) = g
            .frontend
            .get_config(WRITEBACK, 1, VhostUserConfigFlags::WRITABLE, &[0])
            .unwrap();
        payload[0]
    };
    assert_eq!(writeback(&mut g), 1, "a fresh disk starts in writeback");
    g.frontend
        .set_config(WRITEBACK, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(writeback(&mut g), 0);

    let data: Vec<Vec<u8>> = (0..4u64).map(|i| pattern(10 + i, i * 4096, BUF)).collect();
    for (slot, d) in data.iter().enumerate() {
        g.write_buf(0, slot as u16, d);
        g.add(0, slot as u16, VIRTIO_BLK_T_OUT, slot as u64 * 8);
    }
    g.publish_and_kick(0);
    g.wait("the writes to complete", Duration::from_secs(20), |g| {
        g.used_idx(0) == 4
    });
    for slot in 0..4 {
        assert_eq!(g.status(0, slot), 0, "write {slot}");
    }
    assert_eq!(s.ctl_ok("query-status", &[])["unflushed_bytes"], 0);

    let cut = s.ctl_ok("power-cut", &["mode=drop-all"]);
    assert_eq!(cut["counts"]["lost"], 0, "{cut}");
    for (i, d) in data.iter().enumerate() {
        assert_eq!(&read_file_at(&s.image, i as u64 * 4096, BUF), d);
    }
    let on = s.ctl_ok("power-on", &[]);
    assert_eq!(on["cache_mode_reset"], true, "{on}");
    assert_eq!(writeback(&mut g), 1, "back to writeback");
}

/// An injected read error on a block does not stop the cache from keeping what a write over it
/// overwrites: its read stands for the medium, beneath the fault. So the write is unflushed like
/// any other, a cut puts the old data back, and nothing goes on the pending list or is remapped.
/// (A real read error there makes the write durable at once: the cache's unit tests.)
#[test]
fn a_write_over_a_block_with_a_read_fault_is_unflushed_like_any_other() {
    let s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    let old = pattern(12, 200 * 512, 512);
    write_at(&mut c, 200 * 512, &old);
    flush(&mut c);
    s.ctl_ok("fault-add", &["op=read", "lba=200", "mode=error"]);
    write_at(&mut c, 200 * 512, &pattern(11, 200 * 512, 512));
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["cache_auto_flushes"], 0, "{st}");
    assert_eq!(st["unflushed_bytes"], 512, "{st}");
    assert_eq!(st["pending"], 0, "{st}");
    assert!(s.remapped_lbas().is_empty());

    let cut = s.ctl_ok("power-cut", &[]);
    assert_eq!(cut["counts"]["lost"], 1, "{cut}");
    s.ctl_ok("power-on", &[]);
    assert!(c.read(0, 200 * 512, 512).is_err(), "the fault still fires");
    s.ctl_ok("fault-clear", &[]);
    assert_eq!(c.read(0, 200 * 512, 512).unwrap(), old);
}

/// A server whose power was cut still exits cleanly on SIGTERM, and its image holds what the
/// cut left.
#[test]
fn a_server_with_the_power_off_exits_cleanly() {
    let mut s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    write_at(&mut c, 0, &[3; 4096]);
    s.ctl_ok("power-cut", &[]);
    drop(c);
    s.signal(libc::SIGTERM);
    assert!(
        s.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        s.log()
    );
    assert_eq!(read_file_at(&s.image, 0, 4096), vec![0; 4096]);
}

/// A random cut with torn writes, through the socket: the image holds, block by block, what
/// the reply says (kept writes whole, lost ones not at all, torn ones exactly their surviving
/// blocks), and nothing flushed is lost.
#[test]
fn a_random_torn_cut_leaves_what_its_reply_says() {
    let seed = std::env::var("REMAPBLK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(23u64);
    let s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    const W: usize = 4096;
    let flushed = pattern(seed, 0, 8 * W);
    write_at(&mut c, 0, &flushed);
    flush(&mut c);
    let old = c.read(0, 0, 40 * W).unwrap();
    let new: Vec<Vec<u8>> = (0..32)
        .map(|i| pattern(seed + 1 + i, i * W as u64, W))
        .collect();
    for (i, d) in new.iter().enumerate() {
        write_at(&mut c, (8 + i) as u64 * W as u64, d);
    }
    let seed_arg = format!("seed={seed}");
    let cut = s.ctl_ok(
        "power-cut",
        &["mode=random", "probability=0.5", "torn=sector", &seed_arg],
    );
    s.ctl_ok("power-on", &[]);
    let after = c.read(0, 0, 40 * W).unwrap();
    assert_eq!(
        after[..8 * W],
        flushed[..],
        "seed {seed}: flushed data lost"
    );
    let counts = &cut["counts"];
    assert_eq!(
        counts["lost"].as_u64().unwrap()
            + counts["kept"].as_u64().unwrap()
            + counts["torn"].as_u64().unwrap(),
        32,
        "seed {seed}: {cut}"
    );
    assert!(
        counts["torn"].as_u64().unwrap() > 0,
        "seed {seed}: nothing tore: {cut}"
    );
    let mut expect = old.clone();
    for w in cut["kept"].as_array().unwrap() {
        let (at, len) = (
            w["lba"].as_u64().unwrap() as usize * 512,
            w["len"].as_u64().unwrap() as usize,
        );
        expect[at..at + len].copy_from_slice(&new[at / W - 8]);
    }
    for t in cut["torn"].as_array().unwrap() {
        let first = t["lba"].as_u64().unwrap() as usize;
        let survived = t["survived"].as_array().unwrap();
        assert!(
            !survived.is_empty() && survived.len() < W / 512,
            "seed {seed}: {t}"
        );
        for b in survived {
            let b = b.as_u64().unwrap() as usize;
            let off = (b - first) * 512;
            expect[b * 512..b * 512 + 512]
                .copy_from_slice(&new[first * 512 / W - 8][off..off + 512]);
        }
    }
    assert!(
        after == expect,
        "seed {seed}: the image is not what the cut's reply says"
    );
}

/// An overlay-reset replaces the disk under the cache: what was unflushed on the old one is
/// forgotten (a cut must not write its pre-images onto the reset disk), and the write log
/// marks where the reset happened.
#[test]
fn an_overlay_reset_leaves_nothing_for_a_cut_to_undo_and_is_marked_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern(1, 0, 4 * MIB as usize)).unwrap();
    let overlay = dir.path().join("overlay");
    let log = dir.path().join("run.log");
    let s = Server::start_on(
        tempfile::tempdir().unwrap(),
        image.clone(),
        &[
            "--cache-model",
            "volatile",
            "--overlay",
            overlay.to_str().unwrap(),
            "--write-log",
            log.to_str().unwrap(),
        ],
    );
    let mut c = s.client(1);
    write_at(&mut c, 8192, &pattern(2, 8192, 65536));
    assert_eq!(s.ctl_ok("query-status", &[])["unflushed_bytes"], 65536);
    s.ctl_ok("overlay-reset", &[]);
    assert_eq!(s.ctl_ok("query-status", &[])["unflushed_bytes"], 0);
    // Written after the reset, unflushed: the only write a cut may lose now.
    write_at(&mut c, 1 << 20, &pattern(3, 1 << 20, 4096));
    let cut = s.ctl_ok("power-cut", &["mode=drop-all"]);
    assert_eq!(cut["counts"]["lost"], 1, "{cut}");
    s.ctl_ok("power-on", &[]);
    let base = pattern(1, 0, 4 * MIB as usize);
    for off in (0..4 * MIB).step_by(256 << 10) {
        assert!(
            c.read(0, off, 256 << 10).unwrap() == base[off as usize..(off + (256 << 10)) as usize],
            "the disk reads as the base at {off}: nothing of before the reset came back"
        );
    }
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["write_log"]["error"], serde_json::Value::Null, "{st}");
    let (_, out, _) = remapblk_log_list(&log);
    assert!(
        out.lines()
            .any(|l| l.contains("\"mark\":\"overlay-reset\"")),
        "{out}"
    );
}

/// `remapblk log list LOG`: (exit code, stdout, stderr).
fn remapblk_log_list(log: &std::path::Path) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_remapblk"))
        .args(["log", "list"])
        .arg(log)
        .output()
        .expect("run remapblk log list");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_cut_reads_and_restores_the_medium_beneath_injected_faults() {
    let s = Server::start(4 * MIB, VOLATILE);
    let mut c = s.client(1);
    let at = 64 << 10;
    let a = pattern(5, at, 4096);
    write_at(&mut c, at, &a);
    flush(&mut c);
    // A corrupt read fault would damage what the cache keeps of A, were its read a request.
    let lba = (at / 512).to_string();
    let r = s.ctl_ok(
        "fault-add",
        &[
            &format!("lba={lba}"),
            "count=8",
            "op=read",
            "mode=corrupt",
            "xor=255",
        ],
    );
    write_at(&mut c, at, &pattern(6, at, 4096));
    s.ctl_ok("fault-remove", &[&format!("id={}", r["id"])]);
    // And a lost-write fault would lose the cut's revert, were it a request.
    s.ctl_ok(
        "fault-add",
        &[
            &format!("lba={lba}"),
            "count=8",
            "op=write",
            "mode=lost-write",
        ],
    );
    let cut = s.ctl_ok("power-cut", &["mode=drop-all"]);
    assert_eq!(cut["counts"]["lost"], 1, "{cut}");
    s.ctl_ok("fault-clear", &[]);
    s.ctl_ok("power-on", &[]);
    assert_eq!(c.read(0, at, a.len()).unwrap(), a);
    assert_eq!(read_file_at(&s.image, at, a.len()), a);
}

#[test]
fn cache_size_without_the_volatile_model_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let sock = dir.path().join("x.sock");
    for extra in [
        &["--cache-size", "1M"][..],
        &["--cache-model", "none", "--cache-size", "1M"],
    ] {
        let (code, err) = serve_refused(&image, &sock, extra);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.contains("--cache-model volatile"), "{extra:?}: {err}");
    }
}
