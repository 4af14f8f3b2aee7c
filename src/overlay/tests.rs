//! The overlay layer over real files: where each block is read from, copy-up, discards,
//! engines' maps, reset and commit.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::*;
use crate::storage::{BlockIo, Dir, MapIo, Mapping, Pass, Source};

const BS: u64 = 4096;
const BLOCKS: u64 = 16;

struct Fixture {
    dir: tempfile::TempDir,
    ov: Overlay,
    base: Vec<u8>,
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 7) as u8 ^ seed).collect()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let base = fill(1, (BS * BLOCKS) as usize);
    std::fs::write(&img, &base).unwrap();
    let spare = dir.path().join("img.spare");
    std::fs::write(&spare, fill(2, 10_000)).unwrap();
    let image = Image::open(&OpenOptions {
        path: img,
        size: None,
        default_size: 0,
        readonly: false,
        direct: false,
    })
    .unwrap();
    let path = dir.path().join("ov");
    let copy = SpareCopy::prepare(&spare, &path, image.file()).unwrap();
    let ov = Overlay::open(image, &path, BS as u32, BS * BLOCKS, copy).unwrap();
    Fixture { dir, ov, base }
}

fn read(ov: &Overlay, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    }];
    // SAFETY: `buf` outlives the call.
    unsafe { ov.readv(offset, &iov).unwrap() };
    buf
}

fn write(ov: &Overlay, offset: u64, data: &[u8]) {
    let iov = [libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    }];
    // SAFETY: `data` outlives the call; writev only reads it.
    unsafe { ov.writev(offset, &iov).unwrap() };
}

impl Fixture {
    fn image(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("img")).unwrap()
    }
}

#[test]
fn reads_take_written_blocks_from_the_overlay_and_the_rest_from_the_image() {
    let f = fixture();
    let mut want = f.base.clone();
    for b in [2u64, 5, 6] {
        let data = fill(b as u8 + 10, BS as usize);
        write(&f.ov, b * BS, &data);
        want[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
    }
    assert_eq!(f.ov.map.held(), 3);
    assert!(read(&f.ov, 0, (BS * BLOCKS) as usize) == want);
    // Unaligned, across both kinds of block.
    assert!(
        read(&f.ov, BS + 100, 3 * BS as usize)
            == want[(BS + 100) as usize..(4 * BS + 100) as usize]
    );
    assert!(f.image() == f.base, "the image is not written");
}

#[test]
fn a_write_of_part_of_an_image_block_copies_the_block_up_first() {
    let f = fixture();
    let mut want = f.base.clone();
    // Part of block 1 and part of block 2.
    let data = fill(9, 5000);
    write(&f.ov, BS + 3000, &data);
    want[(BS + 3000) as usize..(BS + 8000) as usize].copy_from_slice(&data);
    assert_eq!(f.ov.map.held(), 2);
    assert!(read(&f.ov, 0, 4 * BS as usize) == want[..4 * BS as usize]);
    // The overlay file holds the whole blocks: the image's bytes around the write.
    let upper = std::fs::read(f.dir.path().join("ov")).unwrap();
    assert!(upper[BS as usize..3 * BS as usize] == want[BS as usize..3 * BS as usize]);
    // A second partial write of a held block copies nothing over the first.
    write(&f.ov, BS, &[7u8; 10]);
    want[BS as usize..BS as usize + 10].fill(7);
    assert!(read(&f.ov, BS, 2 * BS as usize) == want[BS as usize..3 * BS as usize]);
    assert!(f.image() == f.base);
}

#[test]
fn discards_and_write_zeroes_hide_the_image_blocks() {
    let f = fixture();
    f.ov.discard(3 * BS, 2 * BS).unwrap();
    f.ov.write_zeroes(8 * BS + 512, 1024, false).unwrap();
    f.ov.write_zeroes(10 * BS, BS, true).unwrap();
    let mut want = f.base.clone();
    want[(3 * BS) as usize..(5 * BS) as usize].fill(0);
    want[(8 * BS + 512) as usize..(8 * BS + 1536) as usize].fill(0);
    want[(10 * BS) as usize..(11 * BS) as usize].fill(0);
    assert!(read(&f.ov, 0, (BS * BLOCKS) as usize) == want);
    assert_eq!(f.ov.map.held(), 4);
    assert!(f.image() == f.base);
}

/// What engines are told: reads split into runs from the right file; writes mapped only
/// when no copy-up is due, and the blocks are the overlay's once `end_io` says so.
#[test]
fn maps_point_reads_at_the_right_file_and_writes_at_the_overlay() {
    let f = fixture();
    write(&f.ov, 2 * BS, &fill(3, BS as usize));
    let (base_fd, upper_fd) = (f.ov.base.file().as_raw_fd(), f.ov.upper.file().as_raw_fd());
    let mut m = Mapping::default();
    let io = MapIo::new(Dir::Read, BS, 3 * BS, Pass::Queued);
    assert!(f.ov.map(io, &mut m));
    let got: Vec<(u64, u64, i32, u64)> = m
        .extents()
        .iter()
        .map(|e| match e.source {
            Source::File { fd, offset, .. } => (e.at, e.len, fd.as_raw_fd(), offset),
            _ => panic!("a file extent"),
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, BS, base_fd, BS),
            (BS, BS, upper_fd, 2 * BS),
            (2 * BS, BS, base_fd, 3 * BS)
        ]
    );

    let mut m = Mapping::default();
    let partial = MapIo::new(Dir::Write, 5 * BS + 512, 1024, Pass::Queued);
    assert!(
        !f.ov.map(partial, &mut m),
        "a copy-up is due: the blocking path"
    );
    let partial_held = MapIo::new(Dir::Write, 2 * BS + 512, 1024, Pass::Queued);
    assert!(
        f.ov.map(partial_held, &mut m),
        "block 2 is the overlay's already"
    );

    let whole = MapIo::new(Dir::Write, 6 * BS, 2 * BS, Pass::Queued);
    let mut m = Mapping::default();
    assert!(f.ov.map(whole, &mut m));
    let data = fill(4, 2 * BS as usize);
    match m.extents()[0].source {
        Source::File { fd, offset, .. } => {
            assert_eq!(fd.as_raw_fd(), upper_fd);
            f.ov.upper.file().write_all_at(&data, offset).unwrap();
        }
        _ => panic!("a file extent"),
    }
    assert!(
        read(&f.ov, 6 * BS, BS as usize) == f.base[(6 * BS) as usize..(7 * BS) as usize],
        "not the overlay's before end_io"
    );
    assert!(f.ov.end_io(whole, m.per_io()));
    assert!(read(&f.ov, 6 * BS, 2 * BS as usize) == data);
}

#[test]
fn reset_forgets_every_change_and_commit_keeps_them() {
    let f = fixture();
    let spare_path = f.dir.path().join("img.spare");
    let spare = std::fs::read(&spare_path).unwrap();
    write(&f.ov, 0, &fill(5, 2 * BS as usize));
    f.ov.spare.copy.write_all_at(b"remap", 100).unwrap();
    let r = f.ov.reset().unwrap();
    assert_eq!(r.blocks, 2);
    assert!(read(&f.ov, 0, (BS * BLOCKS) as usize) == f.base);
    assert!(
        std::fs::read(f.ov.spare.copy_path()).unwrap() == spare,
        "the spare copy reverts"
    );

    let mut want = f.base.clone();
    let data = fill(6, 3 * BS as usize);
    write(&f.ov, 4 * BS, &data);
    want[(4 * BS) as usize..(7 * BS) as usize].copy_from_slice(&data);
    f.ov.discard(9 * BS, BS).unwrap();
    want[(9 * BS) as usize..(10 * BS) as usize].fill(0);
    f.ov.spare.copy.write_all_at(b"remap", 100).unwrap();
    let r = f.ov.commit().unwrap();
    assert_eq!((r.blocks, r.bytes_written), (4, 3 * BS));
    assert!(f.image() == want);
    assert_eq!(f.ov.map.held(), 0);
    assert!(read(&f.ov, 0, (BS * BLOCKS) as usize) == want);
    let spare_now = std::fs::read(&spare_path).unwrap();
    assert_eq!(&spare_now[100..105], b"remap");
    // A reset after a commit goes back to the commit.
    write(&f.ov, 0, &fill(7, BS as usize));
    f.ov.reset().unwrap();
    assert!(read(&f.ov, 0, (BS * BLOCKS) as usize) == want);
}

#[test]
fn the_overlay_may_not_be_the_image_or_the_spare() {
    let f = fixture();
    let img = f.dir.path().join("img");
    let spare = f.dir.path().join("img.spare");
    let image = Image::open(&OpenOptions {
        path: img.clone(),
        size: None,
        default_size: 0,
        readonly: false,
        direct: false,
    })
    .unwrap();
    for (path, what) in [(&img, "image"), (&spare, "spare file")] {
        let e = SpareCopy::prepare(&spare, path, image.file())
            .err()
            .unwrap();
        assert!(
            matches!(e, OverlayError::SameFile { what: w, .. } if w == what),
            "{e}"
        );
    }
    assert!(f.image() == f.base);
}
