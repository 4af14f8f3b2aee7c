//! `serve --overlay`: guest writes (and remaps) land in the overlay and never in the image;
//! `overlay-reset` brings back the image's data and remap table; `overlay-commit` writes the
//! changes into the image and spare file, where a server without --overlay finds them.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const SIZE: u64 = 4 * MIB;

/// An image holding `pattern(1, ..)`, in a directory of its own that outlives each server
/// (each gets its own directory for its sockets).
struct Lab {
    dir: tempfile::TempDir,
    image: PathBuf,
    overlay: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        Lab::on(tempfile::tempdir().unwrap())
    }

    fn on(dir: tempfile::TempDir) -> Lab {
        let image = dir.path().join("disk.img");
        std::fs::write(&image, pattern(1, 0, SIZE as usize)).unwrap();
        let overlay = dir.path().join("overlay");
        Lab {
            dir,
            image,
            overlay,
        }
    }

    fn spare(&self) -> PathBuf {
        self.dir.path().join("disk.img.spare")
    }

    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec!["--spare-blocks", "64"];
        args.extend_from_slice(extra);
        Server::start_on(tempfile::tempdir().unwrap(), self.image.clone(), &args)
    }

    /// A server with `--overlay`, which must have picked `mode`.
    fn serve_in_mode(&self, mode: &str) -> Server {
        let s = self.serve(&["--overlay", self.overlay.to_str().unwrap()]);
        let st = s.ctl_ok("query-status", &[]);
        assert_eq!(st["overlay"]["mode"], mode, "{st}");
        assert_eq!(st["overlay"]["blocks"], 0, "{st}");
        assert!(
            s.log().contains(&format!("({mode}), spare copy")),
            "the banner says which"
        );
        s
    }

    /// A server with `--overlay` on the test directory's filesystem: tmpfs and ext4, where
    /// the tests run, share no extents (the reflink mode has its test on XFS, below).
    fn serve_overlaid(&self) -> Server {
        self.serve_in_mode("map")
    }
}

fn stop(mut s: Server) {
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

fn file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Writes `pattern(seed, ..)` at whole blocks, at a 4 KiB-unaligned offset and across the
/// 1 MiB mark, discards 8 blocks and write-zeroes 4: what the disk must then read.
fn scribble(c: &mut Client, seed: u64, before: &[u8]) -> Vec<u8> {
    let mut want = before.to_vec();
    for (off, len) in [(0u64, 4096usize), (MIB - 1536, 8192), (3 * MIB + 512, 512)] {
        let data = pattern(seed, off, len);
        assert_eq!(c.write(0, off, &data), 0);
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let r = c.batch(
        0,
        &[
            Op::Discard {
                offset: 2 * MIB,
                len: 4096,
            },
            Op::WriteZeroes {
                offset: 2 * MIB + 8192,
                len: 2048,
                unmap: false,
            },
        ],
    );
    assert_eq!(r, [0, 0]);
    want[2 * MIB as usize..2 * MIB as usize + 4096].fill(0);
    want[2 * MIB as usize + 8192..2 * MIB as usize + 8192 + 2048].fill(0);
    want
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(SLOT) {
        out.extend(c.read(0, off, SLOT).unwrap());
    }
    out
}

#[test]
fn writes_go_to_the_overlay_and_reset_brings_the_image_back() {
    let lab = Lab::new();
    let base = file(&lab.image);
    let s = lab.serve_overlaid();
    let mut c = s.client(1);
    let want = scribble(&mut c, 2, &base);
    assert!(read_all(&mut c) == want, "reads return what was written");
    assert!(file(&lab.image) == base, "the image is untouched");
    let st = s.ctl_ok("query-status", &[]);
    // 8 + 16 + 1 written, 8 discarded, 4 zeroed.
    assert_eq!(st["overlay"]["blocks"], 37, "{st}");

    let r = s.ctl_ok("overlay-reset", &[]);
    assert_eq!(r["blocks"], 37, "{r}");
    assert!(
        read_all(&mut c) == base,
        "reads return the image's data again"
    );
    assert!(file(&lab.image) == base, "the image is still untouched");
    assert_eq!(s.ctl_ok("query-status", &[])["overlay"]["blocks"], 0);
    assert_eq!(s.ctl_ok("query-status", &[])["state"], "running", "resumed");
    // A device quiesced by hand stays quiesced across a reset.
    s.ctl_ok("quiesce", &[]);
    s.ctl_ok("overlay-reset", &[]);
    assert_eq!(s.ctl_ok("query-status", &[])["state"], "quiesced");
    s.ctl_ok("resume", &[]);

    // Again, with other data: a reset is not a one-off.
    let want = scribble(&mut c, 3, &base);
    assert!(read_all(&mut c) == want);
    s.ctl_ok("overlay-reset", &[]);
    assert!(read_all(&mut c) == base);
    drop(c);
    stop(s);
    assert!(file(&lab.image) == base, "nor did the exit write it");
}

#[test]
fn a_remap_made_in_the_overlay_is_gone_after_reset() {
    let lab = Lab::new();
    let base = file(&lab.image);
    let s = lab.serve_overlaid();
    let spare = file(&lab.spare());
    let mut c = s.client(1);
    // A manual remap, and one a write fault makes (auto-remap).
    s.ctl_ok("remap-add", &["lba=10", "count=3"]);
    s.ctl_ok("fault-add", &["op=write", "lba=200", "count=2"]);
    let data = pattern(4, 8 * 512, 4096);
    assert_eq!(c.write(0, 8 * 512, &data), 0);
    let data2 = pattern(5, 199 * 512, 2048);
    assert_eq!(c.write(0, 199 * 512, &data2), 0);
    assert_eq!(s.remapped_lbas(), [10, 11, 12, 200, 201]);
    assert_eq!(c.read(0, 8 * 512, 4096).unwrap(), data);
    assert_eq!(c.read(0, 199 * 512, 2048).unwrap(), data2);
    assert!(file(&lab.spare()) == spare, "the spare file is untouched");
    s.ctl_ok("fault-clear", &[]);

    let r = s.ctl_ok("overlay-reset", &[]);
    assert_eq!(
        (&r["remaps_before"], &r["remaps_after"]),
        (&5.into(), &0.into()),
        "{r}"
    );
    assert!(s.remapped_lbas().is_empty());
    assert_eq!(s.ctl_ok("query-status", &[])["spare_free"], 64);
    assert!(read_all(&mut c) == base);
    assert!(file(&lab.spare()) == spare && file(&lab.image) == base);
    // The remap layer works on after the reset: the spare blocks it hands out are free again.
    s.ctl_ok("remap-add", &["lba=7"]);
    assert_eq!(c.write(0, 7 * 512, &data[..512]), 0);
    assert_eq!(c.read(0, 7 * 512, 512).unwrap(), &data[..512]);
    assert_eq!(s.remapped_lbas(), [7]);
}

#[test]
fn commit_writes_the_overlay_into_the_image_and_a_restart_without_it_reads_it() {
    let lab = Lab::new();
    let base = file(&lab.image);
    let s = lab.serve_overlaid();
    let mut c = s.client(1);
    s.ctl_ok("remap-add", &["lba=20", "count=2"]);
    let want = scribble(&mut c, 6, &base);
    let remapped = pattern(7, 20 * 512, 1024);
    assert_eq!(c.write(0, 20 * 512, &remapped), 0);
    let mut want = want;
    want[20 * 512..22 * 512].copy_from_slice(&remapped);
    assert!(file(&lab.image) == base);

    let r = s.ctl_ok("overlay-commit", &[]);
    assert!(r["blocks"].as_u64().unwrap() >= 37, "{r}");
    assert_eq!(s.ctl_ok("query-status", &[])["overlay"]["blocks"], 0);
    // Everything but the remapped blocks is in the image now; those are in the spare file.
    let img = file(&lab.image);
    for (i, (a, b)) in img.chunks(512).zip(want.chunks(512)).enumerate() {
        if !(20..22).contains(&i) {
            assert!(a == b, "block {i} of the image");
        }
    }
    assert!(
        read_all(&mut c) == want,
        "the committed overlay reads the same"
    );
    // A reset now goes back to the committed state, not to the first one.
    assert_eq!(c.write(0, 0, &[9u8; 512]), 0);
    s.ctl_ok("overlay-reset", &[]);
    assert!(read_all(&mut c) == want);
    assert_eq!(
        s.remapped_lbas(),
        [20, 21],
        "committed remaps survive a reset"
    );
    drop(c);
    stop(s);

    let s = lab.serve(&[]);
    assert_eq!(
        s.remapped_lbas(),
        [20, 21],
        "committed remaps survive a restart"
    );
    let mut c = s.client(1);
    assert!(
        read_all(&mut c) == want,
        "a server without --overlay reads the commit"
    );
}

#[test]
fn overlay_commands_and_combinations_that_make_no_sense_are_refused() {
    let lab = Lab::new();
    let s = lab.serve(&[]);
    assert_eq!(
        s.ctl_ok("query-status", &[])["overlay"],
        serde_json::Value::Null
    );
    for cmd in ["overlay-reset", "overlay-commit"] {
        let (code, _, err) = s.ctl(cmd, &[]);
        assert_eq!(code, 1);
        assert!(err.contains("without --overlay"), "{err}");
    }
    stop(s);

    let s = lab.serve_overlaid();
    let (code, _, err) = s.ctl("overlay-reset", &["now=1"]);
    assert_eq!(code, 1);
    assert!(err.contains("now: unknown argument"), "{err}");
    stop(s);

    let sock = lab.dir.path().join("x.sock");
    let ov = lab.overlay.to_str().unwrap();
    for flag in ["--readonly", "--incoming", "--direct"] {
        let (code, err) = serve_refused(&lab.image, &sock, &["--overlay", ov, flag]);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(err.contains("--overlay"), "{flag}: {err}");
    }
    let base = file(&lab.image);
    let img = lab.image.to_str().unwrap();
    let (code, err) = serve_refused(&lab.image, &sock, &["--overlay", img]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the image itself"), "{err}");
    let spare = lab.spare();
    let (code, err) = serve_refused(&lab.image, &sock, &["--overlay", spare.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the spare file itself"), "{err}");
    assert!(file(&lab.image) == base, "a refused start changed nothing");
}

/// A second server on the image an --overlay server serves is refused: the image stays
/// locked though it is served from a read-only descriptor.
#[test]
fn the_image_stays_locked_under_an_overlay() {
    let lab = Lab::new();
    let s = lab.serve_overlaid();
    let sock = lab.dir.path().join("second.sock");
    let (code, err) = serve_refused(&lab.image, &sock, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("in use by process"), "{err}");
    let other = lab.dir.path().join("overlay2");
    let (code, err) = serve_refused(&lab.image, &sock, &["--overlay", other.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("in use by process"), "{err}");
    stop(s);
}

/// Many writes at once on several queues (mapped writes on io_uring, marked at `end_io`),
/// every one read back, then a reset under a connected client.
#[test]
fn parallel_writes_read_back_and_reset_drops_them_all() {
    let lab = Lab::new();
    let base = file(&lab.image);
    let events = lab.dir.path().join("events");
    let s = lab.serve(&[
        "--overlay",
        lab.overlay.to_str().unwrap(),
        "--num-queues",
        "2",
        "--event-log",
        events.to_str().unwrap(),
    ]);
    let mut c = s.client(2);
    fill(&mut c, 8, 0, SIZE, 64 << 10, 16);
    verify(&mut c, 8, 0, SIZE, 64 << 10, 16);
    assert!(file(&lab.image) == base);
    let r = s.ctl_ok("overlay-reset", &[]);
    assert_eq!(r["blocks"], SIZE / 512, "{r}");
    assert!(read_all(&mut c) == base);
    let log = std::fs::read_to_string(&events).unwrap();
    let ev: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "overlay-reset")
        .unwrap_or_else(|| panic!("no overlay-reset event in {log}"));
    assert_eq!(
        (&ev["ok"], &ev["blocks"]),
        (&true.into(), &(SIZE / 512).into()),
        "{ev}"
    );
}

/// A loop-mounted XFS with reflinks, unmounted when dropped; None (the reason printed) where
/// one cannot be made: not root, no mkfs.xfs (Debian's xfsprogs), no loop device.
struct Xfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Xfs {
    fn mount() -> Option<Xfs> {
        use std::process::Command;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting an XFS image needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(320 * MIB)
            .unwrap();
        let run = |cmd: &mut Command| match cmd.output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img))
        {
            eprintln!("skipped: mkfs.xfs -m reflink=1 failed (install xfsprogs): {e}");
            return None;
        }
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        if let Err(e) = run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))
        {
            eprintln!("skipped: cannot loop-mount the XFS image: {e}");
            return None;
        }
        Some(Xfs { _dir: dir, mnt })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

#[test]
fn on_a_filesystem_with_reflinks_the_overlay_is_a_clone() {
    let Some(xfs) = Xfs::mount() else { return };
    {
        let lab = Lab::on(tempfile::tempdir_in(&xfs.mnt).unwrap());
        let base = file(&lab.image);
        let s = lab.serve_in_mode("reflink");
        let mut c = s.client(1);
        s.ctl_ok("remap-add", &["lba=30"]);
        let want = scribble(&mut c, 11, &base);
        assert!(read_all(&mut c) == want);
        assert!(file(&lab.image) == base);
        let r = s.ctl_ok("overlay-reset", &[]);
        assert_eq!(
            (&r["remaps_before"], &r["remaps_after"]),
            (&1.into(), &0.into()),
            "{r}"
        );
        assert!(read_all(&mut c) == base);
        let want = scribble(&mut c, 12, &base);
        s.ctl_ok("overlay-commit", &[]);
        assert!(
            file(&lab.image) == want,
            "the commit cloned the overlay onto the image"
        );
        drop(c);
        stop(s);
        let s = lab.serve(&[]);
        let mut c = s.client(1);
        assert!(read_all(&mut c) == want);
        drop(c);
        stop(s);
    }
    drop(xfs);
}

/// A reset while the guest writes: the queues quiesce around it (the writes wait, none
/// fails), every block then reads as the image's or as written, and every write that started
/// after the reset had returned is there.
#[test]
fn a_reset_under_writes_fails_none_and_keeps_those_after_it() {
    use std::time::Instant;
    let lab = Lab::new();
    let base = file(&lab.image);
    let s = lab.serve_overlaid();
    let mut c = s.client(1);
    let blocks = SIZE / 4096;
    let mut started = Vec::new();
    let written = std::sync::atomic::AtomicU64::new(0);
    let reset_done = std::thread::scope(|scope| {
        let t = scope.spawn(|| {
            // Into the stream of writes, not before it.
            wait_until("writes under way", Duration::from_secs(10), || {
                written.load(std::sync::atomic::Ordering::Relaxed) >= 100
            });
            s.ctl_ok("overlay-reset", &[]);
            Instant::now()
        });
        let mut i = 0u64;
        // Writes go on until the reset is over, and a while after it.
        let mut after = 0;
        while after < 200 {
            let off = (i % blocks) * 4096;
            started.push((off, Instant::now()));
            assert_eq!(
                c.write(0, off, &pattern(21, off, 4096)),
                0,
                "write {i} failed"
            );
            written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if t.is_finished() {
                after += 1;
            }
            i += 1;
        }
        t.join().unwrap()
    });
    let now = read_all(&mut c);
    let mut last_start = vec![None; blocks as usize];
    for (off, at) in &started {
        last_start[(off / 4096) as usize] = Some(*at);
    }
    for (b, last) in last_start.iter().enumerate() {
        let range = b * 4096..(b + 1) * 4096;
        let written = pattern(21, range.start as u64, 4096);
        let got = &now[range.clone()];
        match *last {
            Some(at) if at > reset_done => {
                assert!(got == written, "block {b}: a write after the reset is lost")
            }
            Some(_) => assert!(got == written || got == &base[range], "block {b}: neither"),
            None => assert!(got == &base[range], "block {b} was never written"),
        }
    }
    assert!(file(&lab.image) == base);
}

/// What an overlay held when its server stopped is gone at the next start, remaps too.
#[test]
fn every_start_begins_with_an_empty_overlay() {
    let lab = Lab::new();
    let base = file(&lab.image);
    let s = lab.serve_overlaid();
    let mut c = s.client(1);
    s.ctl_ok("remap-add", &["lba=3"]);
    scribble(&mut c, 13, &base);
    drop(c);
    stop(s);
    let s = lab.serve_overlaid();
    assert!(s.remapped_lbas().is_empty());
    let mut c = s.client(1);
    assert!(read_all(&mut c) == base);
}
