//! `remapblk serve` driven by libblkio: data, flush, discard, write-zeroes, capacity, block
//! size, read-only, bad requests, and the command line's own errors.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::*;

const CHUNK: usize = 64 << 10;

#[test]
fn whole_disk_verify_one_queue_depth_32() {
    let s = Server::start(32 * MIB, &[]);
    let mut c = s.client(1);
    assert_eq!(c.capacity, 32 * MIB);
    fill(&mut c, 11, 0, 32 * MIB, CHUNK, 32);
    verify(&mut c, 11, 0, 32 * MIB, CHUNK, 32);
    drop(c);
    verify_file(&s.image, 11, 0, 32 * MIB, CHUNK);
}

#[test]
fn whole_disk_verify_four_queues_depth_32() {
    let s = Server::start(32 * MIB, &["--num-queues", "4"]);
    let mut c = s.client(4);
    fill(&mut c, 12, 0, 32 * MIB, CHUNK, 32);
    verify(&mut c, 12, 0, 32 * MIB, CHUNK, 32);
    drop(c);
    verify_file(&s.image, 12, 0, 32 * MIB, CHUNK);
}

#[test]
fn small_and_unaligned_buffers_round_trip() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    for (i, len) in [512usize, 1024, 4096 + 512, 131072].into_iter().enumerate() {
        let off = (i as u64) * 256 * 1024 + 512;
        let data = pattern(40 + i as u64, off, len);
        assert_eq!(c.write(0, off, &data), 0);
        assert_eq!(c.read(0, off, len).unwrap(), data);
    }
}

#[test]
fn flush_succeeds_and_data_is_in_the_image() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let data = pattern(3, MIB, CHUNK);
    assert_eq!(c.write(0, MIB, &data), 0);
    assert_eq!(c.batch(0, &[Op::Flush]), vec![0]);
    assert_eq!(read_file_at(&s.image, MIB, CHUNK), data);
}

#[test]
fn discard_and_write_zeroes_read_back_zeros_and_punch_holes() {
    let s = Server::start(8 * MIB, &[]);
    let mut c = s.client(1);
    fill(&mut c, 5, 0, 8 * MIB, CHUNK, 32);
    assert_eq!(c.batch(0, &[Op::Flush]), vec![0]);
    let blocks_before = std::fs::metadata(&s.image).unwrap().blocks();

    let res = c.batch(
        0,
        &[
            Op::Discard {
                offset: MIB,
                len: MIB,
            },
            Op::WriteZeroes {
                offset: 2 * MIB,
                len: MIB,
                unmap: true,
            },
            Op::WriteZeroes {
                offset: 3 * MIB,
                len: MIB,
                unmap: false,
            },
        ],
    );
    assert_eq!(res, vec![0, 0, 0]);
    for off in (MIB..4 * MIB).step_by(CHUNK) {
        let got = c.read(0, off, CHUNK).unwrap();
        assert!(
            got.iter().all(|&b| b == 0),
            "non-zero data at {off} after discard/zeroes"
        );
    }
    // Data around the zeroed ranges is untouched.
    verify(&mut c, 5, 0, MIB, CHUNK, 32);
    verify(&mut c, 5, 4 * MIB, 8 * MIB, CHUNK, 32);
    // Discard and write-zeroes with unmap punched holes in the host file.
    let blocks_after = std::fs::metadata(&s.image).unwrap().blocks();
    assert!(
        blocks_after * 512 <= blocks_before * 512 - 2 * MIB,
        "expected at least 2 MiB of holes: {blocks_before} -> {blocks_after} blocks"
    );
}

#[test]
fn capacity_and_block_size_as_the_client_sees_them() {
    let s = Server::start(16 * MIB, &["--block-size", "4096"]);
    let mut c = s.client(1);
    assert_eq!(c.capacity, 16 * MIB);
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 4096);
    let data = pattern(9, 8192, 8192);
    assert_eq!(c.write(0, 8192, &data), 0);
    assert_eq!(c.read(0, 8192, 8192).unwrap(), data);
}

#[test]
fn requests_past_the_end_fail_with_eio() {
    let s = Server::start(4 * MIB, &[]);
    let mut c = s.client(1);
    let res = c.batch(
        0,
        &[
            Op::Read {
                offset: 4 * MIB,
                len: 4096,
            },
            Op::Write {
                offset: 4 * MIB - 512,
                len: 1024,
            },
            Op::Read {
                offset: 4 * MIB - 4096,
                len: 4096,
            },
        ],
    );
    assert_eq!(res, vec![-libc::EIO, -libc::EIO, 0]);
    // The image did not grow.
    assert_eq!(std::fs::metadata(&s.image).unwrap().len(), 4 * MIB);
}

#[test]
fn read_only_device() {
    let s = Server::start(4 * MIB, &["--readonly"]);
    // A client that wants to write is told the device is read-only (RO feature offered).
    let err = Client::try_connect(&s.socket, 1, false)
        .err()
        .expect("must refuse");
    assert!(
        err.to_string().to_lowercase().contains("read-only"),
        "{err}"
    );
    let mut c = Client::connect(&s.socket, 1, true);
    assert!(c.read(0, 0, 4096).is_ok());
    let r = c.write(0, 0, &[1u8; 4096]);
    assert_ne!(r, 0, "write on a read-only device must fail");
}

#[test]
fn size_creates_a_missing_image_and_refuses_to_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("new.img");
    let s = Server::start_on(dir, image.clone(), &["--size", "24M"]);
    let c = s.client(1);
    assert_eq!(c.capacity, 24 * MIB);
    drop(c);
    let (code, err) = serve_refused(&image, &s.dir.path().join("other.sock"), &["--size", "8M"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("shrink") && err.contains("--size"), "{err}");
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        vec!["serve", "--num-queues", "17"],
        vec!["serve", "--queue-size", "2048"],
        vec!["serve", "--block-size", "1000"],
        vec!["serve", "--size", "12Q"],
        vec!["serve", "--serial", "a-serial-that-is-far-too-long"],
        vec!["frobnicate"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_remapblk"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_remapblk"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--image",
        "--size",
        "--socket",
        "--num-queues",
        "--queue-size",
        "--block-size",
        "--readonly",
        "--direct",
        "--serial",
        "--drain-timeout-ms",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

/// A loop device stands in for a real disk: the size comes from BLKGETSIZE64.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup (this test needs root and util-linux)");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_as_image() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let lo = Loop::attach(&backing);
    let dev = std::path::PathBuf::from(&lo.0);

    // A block device cannot be resized: a different --size is refused.
    let (code, err) = serve_refused(&dev, &dir.path().join("x.sock"), &["--size", "32M"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("block device"), "{err}");

    // The spare file would default to /dev/loopN.spare; keep it in the test's directory.
    let spare = dir.path().join("loop.spare");
    let s = Server::start_on(dir, dev, &["--spare", spare.to_str().unwrap()]);
    let mut c = s.client(1);
    assert_eq!(c.capacity, 16 * MIB);
    fill(&mut c, 21, 0, 4 * MIB, CHUNK, 32);
    verify(&mut c, 21, 0, 4 * MIB, CHUNK, 32);
    assert_eq!(
        c.batch(
            0,
            &[
                Op::Flush,
                Op::WriteZeroes {
                    offset: MIB,
                    len: MIB,
                    unmap: false
                }
            ]
        ),
        vec![0, 0]
    );
    assert!(c.read(0, MIB, CHUNK).unwrap().iter().all(|&b| b == 0));
    drop(c);
    verify_file(&backing, 21, 0, MIB, CHUNK);
}
