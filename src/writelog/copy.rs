//! The scratch copy of `log check`: a reflink where the filesystem shares blocks, else a copy
//! of the base's data only (its holes stay holes, so a sparse 20 GiB image does not become 20
//! GiB of zeros), else a plain copy (a block device, a filesystem without SEEK_DATA).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// `FICLONE`, `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;
/// Bytes moved per copy_file_range or read/write.
const CHUNK: u64 = 8 << 20;

/// Copies `base` to `copy`, a new file (0600: it holds guest data). A copy that fails is
/// removed.
pub fn clone_or_copy(base: &Path, copy: &Path) -> io::Result<()> {
    let mut src = File::open(base)?;
    let mut dst = File::options()
        .write(true)
        .create_new(true)
        .mode(crate::filemode::PRIVATE_FILE)
        .open(copy)?;
    // SAFETY: FICLONE reads the source descriptor from its argument.
    let cloned = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) } == 0;
    let copied = if cloned {
        Ok(())
    } else {
        match copy_data(&src, &dst) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // No SEEK_DATA here (a block device): every byte.
                dst.set_len(0)
                    .and_then(|()| io::copy(&mut src, &mut dst).map(drop))
            }
            r => r,
        }
    };
    if copied.is_err() {
        let _ = std::fs::remove_file(copy);
    }
    copied
}

/// Copies the data segments of `src` (SEEK_DATA / SEEK_HOLE) and gives `dst` its size.
fn copy_data(src: &File, dst: &File) -> io::Result<()> {
    let size = src.metadata()?.len();
    dst.set_len(size)?;
    let mut pos = 0u64;
    while pos < size {
        let Some(start) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(src, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        copy_range(src, dst, start, end)?;
        pos = end;
    }
    Ok(())
}

/// lseek with `whence`; None when nothing (no more data) lies past `pos` (ENXIO).
fn seek(f: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Copies bytes `start..end`: copy_file_range (which may share blocks or copy in the
/// kernel), or reads and writes where it cannot.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut at = start;
    while at < end {
        let n = (end - at).min(CHUNK);
        let mut off_in = at as libc::off_t;
        let mut off_out = at as libc::off_t;
        // SAFETY: copy_file_range between descriptors we own, with offsets of our own.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                n as usize,
                0,
            )
        };
        if r > 0 {
            at += r as u64;
            continue;
        }
        if r == 0 {
            // The source ended early (it shrank): nothing more to copy.
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                let mut buf = vec![0u8; n as usize];
                src.read_exact_at(&mut buf, at)?;
                dst.write_all_at(&buf, at)?;
                at += n;
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_sparse_base_is_copied_byte_for_byte_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let f = File::create(&base).unwrap();
        let size = 64u64 << 20;
        f.set_len(size).unwrap();
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 239) as u8 + 1).collect();
        f.write_all_at(&data, 8 << 20).unwrap();
        f.write_all_at(&data[..4096], size - 4096).unwrap();
        drop(f);
        let copy = dir.path().join("copy");
        clone_or_copy(&base, &copy).unwrap();
        assert!(std::fs::read(&copy).unwrap() == std::fs::read(&base).unwrap());
        let (b, c) = (
            std::fs::metadata(&base).unwrap(),
            std::fs::metadata(&copy).unwrap(),
        );
        assert_eq!(c.len(), size);
        assert_eq!(c.mode() & 0o777, 0o600);
        if b.blocks() * 512 < size / 2 {
            assert!(c.blocks() * 512 < size / 2, "the copy filled its holes");
        }
        // A copy never overwrites a file that is there.
        assert!(clone_or_copy(&base, &copy).is_err());
        assert!(std::fs::read(&copy).unwrap() == std::fs::read(&base).unwrap());
    }
}
