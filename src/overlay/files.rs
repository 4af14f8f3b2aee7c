//! Whole-file operations of the overlay: a reflink clone (FICLONE) where the filesystem has
//! them, and a copy that writes only what differs (so a sparse file stays sparse and a
//! repeated copy of a barely changed file costs reads, not writes) where it has not.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// `FICLONE`, `_IOW(0x94, 9, int)`: makes `dst` share all of `src`'s extents.
pub const FICLONE: libc::c_ulong = 0x4004_9409;

/// The unit of [`copy_differences`].
const CHUNK: usize = 1 << 20;

/// Makes `dst` a reflinked clone of `src` (all of it; `dst`'s old contents are gone).
pub fn reflink(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument and reads no memory.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a FICLONE error says the filesystem (or the pair of files) cannot share extents,
/// rather than that something went wrong.
pub fn no_reflink(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS)
    )
}

/// Deallocates `len` bytes at `offset` of `file`, keeping its size; reads of them give zeros.
pub fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain system call on a descriptor we own.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `dst` hold what `src` holds: a reflink where possible, else [`copy_differences`].
/// Returns whether it was a reflink.
pub fn sync_contents(dst: &File, src: &File) -> io::Result<bool> {
    match reflink(dst, src) {
        Ok(()) => Ok(true),
        Err(e) if no_reflink(&e) => copy_differences(dst, src).map(|_| false),
        Err(e) => Err(e),
    }
}

/// Makes `dst` byte for byte what `src` is, writing only the chunks that differ (a chunk of
/// zeros as a hole where the filesystem can punch one). Returns the bytes written.
pub fn copy_differences(dst: &File, src: &File) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut written = 0;
    let mut at = 0u64;
    let dst_len = dst.metadata()?.len();
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        src.read_exact_at(&mut a[..n], at)?;
        // What `dst` holds there: zeros past its end.
        let have = dst_len.saturating_sub(at).min(n as u64) as usize;
        b[have..n].fill(0);
        dst.read_exact_at(&mut b[..have], at)?;
        if a[..n] != b[..n] || at + n as u64 > dst_len {
            if a[..n].iter().all(|&x| x == 0) && at + n as u64 <= dst_len {
                if punch(dst, at, n as u64).is_err() {
                    dst.write_all_at(&a[..n], at)?;
                }
            } else {
                dst.write_all_at(&a[..n], at)?;
            }
            written += n as u64;
        }
        at += n as u64;
    }
    if dst.metadata()?.len() != len {
        dst.set_len(len)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_copy_is_identical_and_writes_only_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let (s, d) = (dir.path().join("s"), dir.path().join("d"));
        let mut data = vec![0u8; 3 * CHUNK + 100];
        data[5] = 1;
        data[2 * CHUNK + 7] = 9;
        std::fs::write(&s, &data).unwrap();
        std::fs::write(&d, vec![7u8; 5 * CHUNK]).unwrap();
        let src = File::open(&s).unwrap();
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d)
            .unwrap();
        copy_differences(&dst, &src).unwrap();
        assert_eq!(std::fs::read(&d).unwrap(), data);
        // The chunk of zeros is a hole now (tmpfs and ext4 both punch).
        assert!(dst.metadata().unwrap().blocks() * 512 < data.len() as u64);
        assert_eq!(copy_differences(&dst, &src).unwrap(), 0, "nothing differs");
        dst.write_all_at(&[3], CHUNK as u64 + 1).unwrap();
        assert_eq!(copy_differences(&dst, &src).unwrap(), CHUNK as u64);
        assert_eq!(std::fs::read(&d).unwrap(), data);
        // Longer than the destination: grows it.
        dst.set_len(10).unwrap();
        copy_differences(&dst, &src).unwrap();
        assert_eq!(std::fs::read(&d).unwrap(), data);
    }
}
