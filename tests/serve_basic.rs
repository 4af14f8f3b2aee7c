//! `remapblk serve` driven by libblkio: data, flush, discard, write-zeroes, capacity, block
//! size, read-only, bad requests, and the command line's own errors.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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
            .expect("run losetup (this test needs util-linux)");
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

/// The block device the test serves, and where to check what reached it.
enum Device {
    /// A loop device of the test's own over the file `backing`: needs root.
    Own {
        _lo: Loop,
        dev: PathBuf,
        backing: PathBuf,
    },
    /// `REMAPBLK_TEST_BLOCK_DEVICE`: a device this user may read and write (its contents are
    /// lost), which is how the unprivileged run (`ci/unprivileged.sh`) gets one.
    Given(PathBuf),
}

const BLOCK_DEVICE_ENV: &str = "REMAPBLK_TEST_BLOCK_DEVICE";

impl Device {
    fn get(dir: &Path, size: u64) -> Option<Device> {
        if let Some(dev) = std::env::var_os(BLOCK_DEVICE_ENV) {
            return Some(Device::Given(dev.into()));
        }
        if !privilege::is_root() {
            return None;
        }
        let backing = dir.join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let lo = Loop::attach(&backing);
        Some(Device::Own {
            dev: PathBuf::from(&lo.0),
            _lo: lo,
            backing,
        })
    }

    fn path(&self) -> &Path {
        match self {
            Device::Own { dev, .. } => dev,
            Device::Given(dev) => dev,
        }
    }

    /// Where the data the server wrote must be found: under our own loop device, the file
    /// beneath it (so the test sees it went through the device); else the device node.
    fn contents(&self) -> &Path {
        match self {
            Device::Own { backing, .. } => backing,
            Device::Given(dev) => dev,
        }
    }
}

#[test]
fn block_device_as_image() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = Device::get(dir.path(), 16 * MIB) else {
        privilege::skip(
            "block_device_as_image",
            &format!("attaching a loop device needs root; as another user, set {BLOCK_DEVICE_ENV} to a block device of at least 4 MiB this user may read and write (and whose contents may be lost)"),
        );
        return;
    };
    let dev = device.path().to_path_buf();
    // The size as the device node itself says (lseek to its end), not as remapblk asks it.
    let size = {
        use std::io::{Seek, SeekFrom};
        let mut f =
            std::fs::File::open(&dev).unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
        f.seek(SeekFrom::End(0)).unwrap()
    };
    assert!(
        size >= 4 * MIB,
        "{} holds {size} bytes; the test needs 4 MiB",
        dev.display()
    );

    // A block device cannot be resized: a different --size is refused.
    let other = format!("{}M", size / MIB + 16);
    let (code, err) = serve_refused(&dev, &dir.path().join("x.sock"), &["--size", &other]);
    assert_eq!(code, Some(1));
    assert!(err.contains("block device"), "{err}");

    // The spare file would default to /dev/loopN.spare; keep it in the test's directory.
    let spare = dir.path().join("loop.spare");
    let s = Server::start_on(dir, dev, &["--spare", spare.to_str().unwrap()]);
    let mut c = s.client(1);
    assert_eq!(c.capacity, size);
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
    verify_file(device.contents(), 21, 0, MIB, CHUNK);
}
