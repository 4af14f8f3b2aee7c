//! The write log (`serve --write-log`) and `remapblk log list|replay|check`: what a libblkio
//! client does through the socket is what the log lists, in order, and replaying it onto a
//! copy of the starting image gives back the bytes the client read at each point.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const DISK: u64 = 4 * MIB;

/// Runs `remapblk ARGS...`: (exit code, stdout, stderr).
fn remapblk(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_remapblk"))
        .args(args)
        .output()
        .expect("run remapblk");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `path` is on tmpfs, which refuses O_DIRECT.
fn on_tmpfs(path: &Path) -> bool {
    let c = std::ffi::CString::new(p(path)).expect("no NUL in the path");
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid C string and a buffer statfs fills.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) }, 0);
    // SAFETY: statfs succeeded, so it filled the buffer.
    unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

fn p(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// `log list LOG` as JSON values.
fn list(log: &Path) -> Vec<Value> {
    let (code, out, err) = remapblk(&["log", "list", p(log)]);
    assert_eq!(code, 0, "log list failed: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A server on a copy of a base image full of pattern(1), with a write log; (server, base,
/// log).
fn start(extra: &[&str]) -> (Server, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.img");
    std::fs::write(&base, pattern(1, 0, DISK as usize)).expect("base image");
    let image = dir.path().join("disk.img");
    std::fs::copy(&base, &image).expect("image");
    let log = dir.path().join("run.log");
    let mut args = vec!["--write-log", p(&log)];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Server::start_on(dir, image, &args), base, log)
}

/// The whole disk as the client reads it.
fn read_disk(c: &mut Client) -> Vec<u8> {
    let mut all = Vec::with_capacity(DISK as usize);
    for off in (0..DISK).step_by(SLOT) {
        all.extend(c.read(0, off, SLOT).expect("read"));
    }
    all
}

/// A fresh copy of `base` beside it, replayed with `log replay LOG --image COPY UNTIL...`.
fn replayed(base: &Path, log: &Path, until: &[&str]) -> Vec<u8> {
    let copy = base.with_file_name(format!("copy-{}.img", until.join("-")));
    std::fs::copy(base, &copy).expect("copy");
    let mut args = vec!["log", "replay", p(log), "--image", p(&copy)];
    args.extend_from_slice(until);
    let (code, _, err) = remapblk(&args);
    assert_eq!(code, 0, "log replay {until:?} failed: {err}");
    std::fs::read(&copy).expect("read copy")
}

fn one(c: &mut Client, op: Op) {
    assert_eq!(c.batch(0, &[op]), vec![0], "{op:?}");
}

fn write(c: &mut Client, offset: u64, seed: u64, len: usize) {
    c.slot_mut(0, len)
        .copy_from_slice(&pattern(seed, offset, len));
    one(c, Op::Write { offset, len });
}

#[test]
fn the_log_lists_what_the_client_did_and_replays_to_what_it_read() {
    let (mut s, base, log) = start(&["--num-queues", "2"]);
    let mut c = s.client(2);
    write(&mut c, 0, 2, 4096);
    write(&mut c, 64 << 10, 3, 8192);
    one(&mut c, Op::Flush);
    assert_eq!(s.ctl_ok("log-mark", &["name=one"]), json!({"entry": 3}));
    let at_one = read_disk(&mut c);
    one(
        &mut c,
        Op::Discard {
            offset: 0,
            len: 4096,
        },
    );
    one(
        &mut c,
        Op::WriteZeroes {
            offset: 64 << 10,
            len: 4096,
            unmap: false,
        },
    );
    write(&mut c, 1 << 20, 4, 65536);
    one(&mut c, Op::Flush);
    assert_eq!(s.ctl_ok("log-mark", &["name=two"]), json!({"entry": 8}));
    let at_two = read_disk(&mut c);
    // Unflushed, on both queues: a mark alone makes them durable in the log.
    fill(&mut c, 5, 2 * MIB, 3 * MIB, 16 << 10, 8);
    s.ctl_ok("log-mark", &["name=three"]);
    let at_three = read_disk(&mut c);

    let entries = list(&log);
    let want = [
        json!({"index": 0, "kind": "write", "lba": 0, "len": 4096, "mark": null}),
        json!({"index": 1, "kind": "write", "lba": 128, "len": 8192, "mark": null}),
        json!({"index": 2, "kind": "flush", "lba": 0, "len": 0, "mark": null}),
        json!({"index": 3, "kind": "mark", "lba": 0, "len": 0, "mark": "one"}),
        json!({"index": 4, "kind": "discard", "lba": 0, "len": 4096, "mark": null}),
        json!({"index": 5, "kind": "write-zeroes", "lba": 128, "len": 4096, "mark": null}),
        json!({"index": 6, "kind": "write", "lba": 2048, "len": 65536, "mark": null}),
        json!({"index": 7, "kind": "flush", "lba": 0, "len": 0, "mark": null}),
        json!({"index": 8, "kind": "mark", "lba": 0, "len": 0, "mark": "two"}),
    ];
    assert_eq!(&entries[..9], &want);
    // The load: 64 writes of 16 KiB (any order across the queues), then the mark.
    let load = &entries[9..];
    assert_eq!(load.len(), 65);
    let mut lbas: Vec<u64> = load[..64]
        .iter()
        .map(|e| {
            assert_eq!((&e["kind"], &e["len"]), (&json!("write"), &json!(16384)));
            e["lba"].as_u64().unwrap()
        })
        .collect();
    lbas.sort_unstable();
    assert_eq!(lbas, (0..64).map(|i| 4096 + i * 32).collect::<Vec<u64>>());
    assert_eq!(load[64]["mark"], "three");

    assert!(replayed(&base, &log, &["--to-mark", "one"]) == at_one);
    assert!(replayed(&base, &log, &["--to-flush", "1"]) == at_one);
    assert!(replayed(&base, &log, &["--to-mark", "two"]) == at_two);
    assert!(replayed(&base, &log, &["--to-flush", "2"]) == at_two);
    assert!(replayed(&base, &log, &["--to-entry", "7"]) == at_two);
    assert!(replayed(&base, &log, &["--to-mark", "three"]) == at_three);
    // Entry 5 (write-zeroes) done, entry 6 not: the zeros are there, the 64 KiB write is not.
    let at5 = replayed(&base, &log, &["--to-entry", "5"]);
    assert_eq!(&at5[..4096], &[0u8; 4096][..]);
    assert_eq!(&at5[64 << 10..(64 << 10) + 4096], &[0u8; 4096][..]);
    let original = std::fs::read(&base).unwrap();
    assert!(at5[1 << 20..(1 << 20) + 65536] == original[1 << 20..(1 << 20) + 65536]);

    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["write_log"]["path"], p(&log));
    assert_eq!(st["write_log"]["entries"], 74);
    assert_eq!(st["write_log"]["durable_entries"], 74);
    // The file ends on a page: the log is written in whole pages (O_DIRECT), the last padded.
    let bytes = st["write_log"]["bytes"].as_u64().unwrap();
    let file = std::fs::metadata(&log).unwrap().len();
    assert!(file >= bytes && file - bytes < 4096, "{bytes} {file}");
    assert_eq!(
        st["write_log"]["direct"],
        !on_tmpfs(&log),
        "O_DIRECT wherever the filesystem takes it (tmpfs does not): {st}"
    );

    // A clean exit flushes the image, and the log counts everything, that flush last.
    write(&mut c, 3 * MIB, 6, 4096);
    drop(c);
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(20)).success());
    let entries = list(&log);
    assert_eq!(entries.len(), 76);
    assert_eq!(
        (&entries[74]["kind"], &entries[74]["lba"]),
        (&json!("write"), &json!(6144))
    );
    assert_eq!(entries[75]["kind"], "flush");
}

#[test]
fn log_check_stops_at_the_first_failing_point_and_keeps_that_copy() {
    let (s, base, log) = start(&[]);
    let mut c = s.client(1);
    write(&mut c, 0, 2, 4096);
    one(&mut c, Op::Flush);
    s.ctl_ok("log-mark", &["name=a"]);
    write(&mut c, 8192, 3, 4096);
    one(&mut c, Op::Flush);
    s.ctl_ok("log-mark", &["name=b"]);
    let at_b = read_disk(&mut c);
    write(&mut c, 16384, 4, 4096);
    one(&mut c, Op::Flush);
    s.ctl_ok("log-mark", &["name=c"]);
    drop(c);

    // Fails once the second write is there: at mark b, the second point.
    let dir = base.parent().unwrap();
    let second = dir.join("second.bin");
    std::fs::write(&second, pattern(3, 8192, 4096)).unwrap();
    let script = "! cmp -s -i 8192:0 -n 4096 \"$1\" \"$2\"";
    let (code, out, err) = remapblk(&[
        "log",
        "check",
        p(&log),
        "--base",
        p(&base),
        "--each",
        "mark",
        "--",
        "sh",
        "-c",
        script,
        "sh",
        "{}",
        p(&second),
    ]);
    assert_eq!(code, 1, "{out}\n{err}");
    let points: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(points.len(), 2, "{out}");
    assert_eq!(points[0]["mark"], "a");
    assert_eq!(points[0]["status"], 0);
    assert_eq!(points[1]["mark"], "b");
    assert_eq!(points[1]["status"], 1);
    assert_eq!(points[1]["ok"], false);
    let kept = err
        .split("kept at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(PathBuf::from)
        .expect("the kept copy's path");
    assert!(kept.starts_with(dir), "{err}");
    assert!(
        std::fs::read(&kept).unwrap() == at_b,
        "the kept copy is the disk at mark b"
    );

    // A command that passes everywhere: one line per flush, exit 0, no copy left.
    std::fs::remove_file(&kept).unwrap();
    let (code, out, err) = remapblk(&[
        "log",
        "check",
        p(&log),
        "--base",
        p(&base),
        "--",
        "test",
        "-s",
        "{}",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.lines().all(|l| l.contains("\"ok\":true")), "{out}");
    let left = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".check-")
        })
        .count();
    assert_eq!(left, 0);

    // Bad usage: no {} in the command, no stop for replay.
    let (code, _, err) = remapblk(&["log", "check", p(&log), "--base", p(&base), "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("{}"), "{err}");
    let (code, _, _) = remapblk(&["log", "replay", p(&log), "--image", p(&base)]);
    assert_eq!(code, 2);
    let (code, _, _) = remapblk(&[
        "log",
        "replay",
        p(&log),
        "--image",
        p(&base),
        "--to-flush",
        "0",
    ]);
    assert_eq!(code, 2);
    // A mark the log lacks: exit 1, the copy untouched.
    let before = std::fs::read(&base).unwrap();
    let (code, _, err) = remapblk(&[
        "log",
        "replay",
        p(&log),
        "--image",
        p(&base),
        "--to-mark",
        "zz",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("its marks: a, b, c"), "{err}");
    assert!(std::fs::read(&base).unwrap() == before);
}

#[test]
fn a_killed_server_leaves_a_log_that_parses_up_to_its_last_flush() {
    let (mut s, base, log) = start(&[]);
    let mut c = s.client(1);
    for round in 0..4u64 {
        fill(
            &mut c,
            10 + round,
            round * (256 << 10),
            (round + 1) * (256 << 10),
            32 << 10,
            8,
        );
        one(&mut c, Op::Flush);
    }
    let flushed = read_disk(&mut c);
    // More writes, never flushed, then the server dies without a word.
    fill(&mut c, 20, MIB, 2 * MIB, 32 << 10, 16);
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(10));

    let entries = list(&log);
    assert_eq!(entries.len(), 4 * 9, "8 writes and a flush, four times");
    assert_eq!(entries.last().unwrap()["kind"], "flush");
    assert!(replayed(&base, &log, &["--to-flush", "4"]) == flushed);

    // The same log cut inside its last counted entry: refused, naming that entry.
    let cut = base.with_file_name("cut.log");
    let bytes = std::fs::read(&log).unwrap();
    let last_write_end = 512 + 4 * (8 * (512 + (32 << 10)) + 512) - 512;
    std::fs::write(&cut, &bytes[..last_write_end - 100]).unwrap();
    let (code, out, err) = remapblk(&["log", "list", p(&cut)]);
    assert_eq!(code, 1);
    assert_eq!(
        out.lines().count(),
        34,
        "the whole entries before it are listed"
    );
    assert!(err.contains("entry 34 runs past the end"), "{err}");
    let (code, _, err) = remapblk(&["log", "list", p(&base)]);
    assert_eq!(code, 1);
    assert!(err.contains("bad magic"), "{err}");
}

/// Rounds of 8 writes of 32 KiB (round r writes pattern(100 + r) over region r % 16 of 256
/// KiB) and a flush, one after the other, until the server stops answering; returns how many
/// rounds it saw flushed.
fn rounds_until_the_server_dies(socket: PathBuf) -> u64 {
    let mut c = Client::connect(&socket, 1, false);
    let patience = Duration::from_secs(5);
    for round in 0u64.. {
        let start = (round % 16) * (256 << 10);
        let ops: Vec<Op> = (0..8u64)
            .map(|i| {
                let offset = start + i * (32 << 10);
                let data = pattern(100 + round, offset, 32 << 10);
                c.slot_mut(i as usize, 32 << 10).copy_from_slice(&data);
                Op::Write {
                    offset,
                    len: 32 << 10,
                }
            })
            .collect();
        let all_done = |r: Option<Vec<i32>>| r.is_some_and(|v| v.iter().all(|&x| x == 0));
        if !all_done(c.try_batch(0, &ops, patience)) {
            return round;
        }
        if !all_done(c.try_batch(0, &[Op::Flush], patience)) {
            return round;
        }
    }
    unreachable!()
}

#[test]
fn a_server_killed_under_load_leaves_a_log_of_whole_flushed_rounds() {
    let (mut s, base, log) = start(&[]);
    let socket = s.socket.clone();
    let load = std::thread::spawn(move || rounds_until_the_server_dies(socket));
    wait_until(
        "20 flushed rounds in the log",
        Duration::from_secs(30),
        || {
            let st = s.ctl_ok("query-status", &[]);
            st["write_log"]["durable_entries"].as_u64().unwrap_or(0) >= 20 * 9
        },
    );
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(10));
    let acked = load.join().expect("the load thread");

    // The super block counts whole rounds only: each flush made its round durable, nothing
    // after the last one counts.
    let entries = list(&log);
    assert_eq!(entries.len() % 9, 0, "whole rounds: {}", entries.len());
    let rounds = entries.len() as u64 / 9;
    // A flush completes only once the log is durable up to it; the last one may have been
    // made durable and then lost its reply to the kill.
    assert!(
        rounds >= 20 && (acked..=acked + 1).contains(&rounds),
        "{rounds} rounds logged, {acked} acknowledged"
    );
    for (i, e) in entries.iter().enumerate() {
        let kind = if i % 9 == 8 { "flush" } else { "write" };
        assert_eq!(e["kind"], kind, "entry {i}");
    }
    // Replayed, the copy holds every logged round's data, the newest of each region.
    let disk = replayed(
        &base,
        &log,
        &["--to-entry", &(entries.len() - 1).to_string()],
    );
    let original = std::fs::read(&base).unwrap();
    for region in 0..16u64 {
        let start = region * (256 << 10);
        let newest = (0..rounds).rev().find(|r| r % 16 == region);
        for i in 0..8u64 {
            let off = start + i * (32 << 10);
            let got = &disk[off as usize..(off + (32 << 10)) as usize];
            let want = match newest {
                Some(r) => pattern(100 + r, off, 32 << 10),
                None => original[off as usize..(off + (32 << 10)) as usize].to_vec(),
            };
            assert!(got == want, "region {region} at {off}");
        }
    }
}

#[test]
fn log_mark_says_what_is_wrong() {
    let edir = tempfile::tempdir().unwrap();
    let events = edir.path().join("events.log");
    let (s, _base, log) = start(&["--event-log", p(&events)]);
    for (args, field) in [
        (vec![], "name: missing"),
        (vec!["name="], "name: empty"),
        (vec!["name=a", "b=1"], "b: unknown argument"),
    ] {
        let (code, _, err) = s.ctl("log-mark", &args);
        assert_eq!(code, 1);
        assert!(err.contains(field), "{args:?}: {err}");
    }
    let long = format!("name={}", "x".repeat(480));
    let (code, _, err) = s.ctl("log-mark", &[&long]);
    assert_eq!(code, 1);
    assert!(err.contains("name: 480 bytes"), "{err}");
    // A number is a name too.
    assert_eq!(s.ctl_ok("log-mark", &["name=42"]), json!({"entry": 0}));
    assert_eq!(list(&log)[0]["mark"], "42");

    let events = std::fs::read_to_string(&events).unwrap();
    let marks: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "log-mark")
        .collect();
    assert_eq!(marks.len(), 1, "{events}");
    assert_eq!(
        (&marks[0]["name"], &marks[0]["entry"]),
        (&json!("42"), &json!(0))
    );

    // A second server on the same log (a migration's destination given the source's command
    // line) is refused, and the log is left whole.
    let other = s.dir.path().join("other.img");
    std::fs::write(&other, vec![0u8; MIB as usize]).unwrap();
    let (code, err) = serve_refused(
        &other,
        &s.dir.path().join("other.sock"),
        &["--write-log", p(&log)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("being written by another process"), "{err}");
    assert_eq!(list(&log).len(), 1);

    let plain = Server::start(MIB, &[]);
    assert_eq!(plain.ctl_ok("query-status", &[])["write_log"], Value::Null);
    let (code, _, err) = plain.ctl("log-mark", &["name=x"]);
    assert_eq!(code, 1);
    assert!(err.contains("--write-log"), "{err}");
}

/// The log sits above remap and faults: it records what the guest asked for and got. A write
/// that failed is not logged; one that auto-remap saved, or that went to remapped blocks, is,
/// at the guest's address; a replay onto the starting image gives what the client reads.
#[test]
fn remaps_and_faults_under_the_log_leave_the_guests_view_in_it() {
    let (s, base, log) = start(&[]);
    let mut c = s.client(1);
    // Blocks 100..104 fail writes on the image: auto-remap moves them to the spare.
    s.ctl_ok("fault-add", &["op=write", "lba=100", "count=4"]);
    write(&mut c, 100 * 512, 2, 2048);
    assert_eq!(s.remapped_lbas(), vec![100, 101, 102, 103]);
    // Blocks 300..308 remapped by hand, then written.
    s.ctl_ok("remap-add", &["lba=300", "count=8"]);
    write(&mut c, 300 * 512, 3, 4096);
    one(&mut c, Op::Flush);
    s.ctl_ok("log-mark", &["name=end"]);
    let at_end = read_disk(&mut c);
    let entries = list(&log);
    let kinds: Vec<(&str, u64)> = entries
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["lba"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("write", 100), ("write", 300), ("flush", 0), ("mark", 0)]
    );
    assert!(replayed(&base, &log, &["--to-mark", "end"]) == at_end);

    // Without auto-remap the faulted write fails, and the log has nothing of it.
    let (s2, _base2, log2) = start(&["--auto-remap", "off"]);
    let mut c2 = s2.client(1);
    s2.ctl_ok("fault-add", &["op=write", "lba=100", "count=4"]);
    c2.slot_mut(0, 2048)
        .copy_from_slice(&pattern(2, 100 * 512, 2048));
    assert_eq!(
        c2.batch(
            0,
            &[Op::Write {
                offset: 100 * 512,
                len: 2048
            }]
        ),
        vec![-libc::EIO]
    );
    write(&mut c2, 0, 4, 512);
    s2.ctl_ok("log-mark", &["name=end"]);
    let kinds: Vec<String> = list(&log2)
        .iter()
        .map(|e| format!("{} {}", e["kind"].as_str().unwrap(), e["lba"]))
        .collect();
    assert_eq!(kinds, ["write 0", "mark 0"]);
}

#[test]
fn a_power_cut_is_in_the_log_marked_before_its_own_writes() {
    let (mut s, base, log) = start(&["--cache-model", "volatile"]);
    let mut c = s.client(1);
    write(&mut c, 0, 2, 8192);
    one(&mut c, Op::Flush);
    write(&mut c, 65536, 3, 8192);
    let before_cut = read_disk(&mut c);

    let cut = s.ctl_ok("power-cut", &["mode=drop-all"]);
    assert_eq!(cut["counts"]["lost"], 1, "{cut}");
    let mark = cut["log_mark_entry"].as_u64().expect("the mark's entry");
    s.ctl_ok("power-on", &[]);
    let after_cut = read_disk(&mut c);
    assert_ne!(before_cut, after_cut, "the cut lost the unflushed write");
    drop(c);
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(20)).success());

    let entries = list(&log);
    let kinds: Vec<&str> = entries.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(
        &kinds[..6],
        ["write", "flush", "write", "mark", "write", "flush"],
        "the guest's writes, the mark, then the cut's revert and its flush: {entries:?}"
    );
    assert_eq!(entries[3]["mark"], "power-cut");
    assert_eq!(entries[3]["index"], mark);
    assert_eq!(entries[4]["lba"], 65536 / 512, "the revert is at B");
    assert_eq!(
        replayed(&base, &log, &["--to-entry", &mark.to_string()]),
        before_cut,
        "replayed to the mark: the disk just before the cut"
    );
    let last = entries.len() - 1;
    assert_eq!(
        replayed(&base, &log, &["--to-entry", &last.to_string()]),
        after_cut,
        "replayed whole: the disk the cut left"
    );
}
