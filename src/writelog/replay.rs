//! Replaying entries onto a copy of the disk, and where a replay stops. A replayer goes
//! forward only: each call continues from where the last one stopped, which is what makes a
//! crash-point check incremental.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::format::Kind;
use super::reader::{Entry, LogError, LogFile};
use crate::storage::image::BLKZEROOUT;

/// Zeros written at once where a file cannot punch holes.
const ZERO_CHUNK: usize = 1 << 20;
/// A write's data is moved in pieces of at most this much: a log may hold (or claim) writes
/// larger than memory.
const DATA_CHUNK: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot open {path} to replay onto: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entry {index} covers bytes {start}..{end}, past the end of {path} ({size} bytes): is it a copy of the disk the log was recorded on?")]
    PastEnd {
        index: u64,
        start: u64,
        end: u64,
        path: PathBuf,
        size: u64,
    },
    #[error("replaying entry {index} onto {path}: {source}")]
    Write {
        index: u64,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    NotFound(String),
}

/// Where a replay stops (inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// The first mark of this name.
    Mark(String),
    /// The Nth flush, counting from 1.
    Flush(u64),
    /// The entry of this index.
    Entry(u64),
}

/// The index of the last entry a replay `until` applies, in `entries`.
pub fn stop_index(entries: &[Entry], until: &Until) -> Result<usize, ReplayError> {
    let found = match until {
        Until::Mark(name) => entries
            .iter()
            .position(|e| e.kind() == Kind::Mark && e.mark.as_deref() == Some(name.as_str())),
        Until::Flush(n) => entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.header.is_flush())
            .nth((*n as usize).wrapping_sub(1))
            .map(|(i, _)| i),
        Until::Entry(n) => usize::try_from(*n).ok().filter(|&i| i < entries.len()),
    };
    found.ok_or_else(|| {
        let marks: Vec<&str> = entries.iter().filter_map(|e| e.mark.as_deref()).collect();
        let flushes = entries.iter().filter(|e| e.header.is_flush()).count();
        ReplayError::NotFound(match until {
            Until::Mark(name) => format!(
                "the log has no mark named \"{name}\"; its marks: {}",
                if marks.is_empty() {
                    "none".to_string()
                } else {
                    marks.join(", ")
                }
            ),
            Until::Flush(n) => {
                format!("the log has {flushes} flushes, not {n}; --to-flush counts from 1")
            }
            Until::Entry(n) => format!(
                "the log has {} entries (0 to {}), not entry {n}",
                entries.len(),
                entries.len().saturating_sub(1)
            ),
        })
    })
}

/// A copy of the disk being brought forward entry by entry.
pub struct Replayer {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    buf: Vec<u8>,
    /// Bytes of written data replayed so far.
    pub bytes: u64,
}

impl Replayer {
    /// Opens `path` (a file or block device) for writing in place.
    pub fn open(path: &Path) -> Result<Replayer, ReplayError> {
        let err = |source| ReplayError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let block_device = file.metadata().map_err(err)?.file_type().is_block_device();
        let size = io::Seek::seek(&mut file, io::SeekFrom::End(0)).map_err(err)?;
        Ok(Replayer {
            file,
            path: path.to_path_buf(),
            size,
            block_device,
            buf: Vec::new(),
            bytes: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies one entry: a write's data, a discard's or write-zeroes' zeros; flushes and
    /// marks change nothing (no fsync per entry: whoever reads the copy next reads it through
    /// the same page cache).
    pub fn apply(&mut self, log: &LogFile, e: &Entry) -> Result<(), ReplayError> {
        let kind = e.kind();
        if !matches!(kind, Kind::Write | Kind::Discard | Kind::WriteZeroes) || e.is_empty() {
            return Ok(());
        }
        let end = e.offset() + e.len();
        if end > self.size {
            return Err(ReplayError::PastEnd {
                index: e.index,
                start: e.offset(),
                end,
                path: self.path.clone(),
                size: self.size,
            });
        }
        let werr = |source| ReplayError::Write {
            index: e.index,
            path: self.path.clone(),
            source,
        };
        if kind == Kind::Write {
            let mut at = 0;
            while at < e.len() {
                let n = (e.len() - at).min(DATA_CHUNK) as usize;
                self.buf.resize(n, 0);
                log.read_data_at(e, at, &mut self.buf)?;
                self.file
                    .write_all_at(&self.buf, e.offset() + at)
                    .map_err(werr)?;
                at += n as u64;
            }
            self.bytes += e.len();
        } else {
            self.zero(e.offset(), e.len()).map_err(werr)?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros, as the device did after the discard.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let done = if self.block_device {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64s from the pointer.
            unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) == 0 }
        } else {
            // SAFETY: fallocate on a descriptor we own.
            unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                ) == 0
            }
        };
        if done {
            return Ok(());
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use crate::writelog::LogWriter;
    use std::sync::Arc;

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    /// A log of: write A at 0, flush, mark "one", write B at 4096, zeroes over A's second
    /// half, flush, discard of B, mark "two"; and the disk as it was after each entry.
    fn history(dir: &Path) -> (PathBuf, Vec<Vec<u8>>) {
        let path = dir.join("log");
        let w = LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap();
        let (a, b) = (vec![0xaau8; 4096], vec![0xbbu8; 4096]);
        let mut disk = vec![0u8; 16384];
        let mut states = Vec::new();
        // SAFETY: the buffers outlive the calls.
        unsafe { w.write(0, &[iov(&a)]) };
        disk[..4096].copy_from_slice(&a);
        states.push(disk.clone());
        w.flush();
        states.push(disk.clone());
        w.mark("one").unwrap();
        states.push(disk.clone());
        // SAFETY: as above.
        unsafe { w.write(4096, &[iov(&b)]) };
        disk[4096..8192].copy_from_slice(&b);
        states.push(disk.clone());
        w.discard(2048, 2048, true);
        disk[2048..4096].fill(0);
        states.push(disk.clone());
        w.flush();
        states.push(disk.clone());
        w.discard(4096, 4096, false);
        disk[4096..8192].fill(0);
        states.push(disk.clone());
        w.mark("two").unwrap();
        states.push(disk.clone());
        (path, states)
    }

    fn replay_to(log: &Path, base: &Path, until: Until) -> Result<Vec<u8>, ReplayError> {
        let copy = base.with_extension("copy");
        std::fs::copy(base, &copy).unwrap();
        let log = LogFile::open(log)?;
        let entries = log.scan()?;
        let stop = stop_index(&entries, &until)?;
        let mut r = Replayer::open(&copy)?;
        for e in &entries[..=stop] {
            r.apply(&log, e)?;
        }
        Ok(std::fs::read(&copy).unwrap())
    }

    #[test]
    fn replay_to_each_kind_of_point_gives_the_disk_at_that_point() {
        let dir = tempfile::tempdir().unwrap();
        let (log, states) = history(dir.path());
        let base = dir.path().join("base");
        std::fs::write(&base, vec![0u8; 16384]).unwrap();
        for (i, want) in states.iter().enumerate() {
            assert_eq!(
                &replay_to(&log, &base, Until::Entry(i as u64)).unwrap(),
                want,
                "entry {i}"
            );
        }
        assert_eq!(replay_to(&log, &base, Until::Flush(1)).unwrap(), states[1]);
        assert_eq!(replay_to(&log, &base, Until::Flush(2)).unwrap(), states[5]);
        assert_eq!(
            replay_to(&log, &base, Until::Mark("one".into())).unwrap(),
            states[2]
        );
        assert_eq!(
            replay_to(&log, &base, Until::Mark("two".into())).unwrap(),
            states[7]
        );
        for (until, msg) in [
            (Until::Mark("three".into()), "its marks: one, two"),
            (Until::Flush(3), "has 2 flushes, not 3"),
            (Until::Flush(0), "counts from 1"),
            (Until::Entry(8), "8 entries (0 to 7), not entry 8"),
        ] {
            let e = replay_to(&log, &base, until).unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
    }

    #[test]
    fn a_write_larger_than_a_piece_replays_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let w = LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap();
        let data: Vec<u8> = (0..DATA_CHUNK as usize + 1536)
            .map(|i| (i % 251) as u8)
            .collect();
        // SAFETY: `data` outlives the call.
        unsafe { w.write(512, &[iov(&data)]) };
        w.commit().unwrap();
        let base = dir.path().join("base");
        std::fs::write(&base, vec![0u8; data.len() + 4096]).unwrap();
        let got = replay_to(&path, &base, Until::Entry(0)).unwrap();
        assert!(got[512..512 + data.len()] == data[..]);
        assert!(got[..512]
            .iter()
            .chain(&got[512 + data.len()..])
            .all(|&b| b == 0));
    }

    #[test]
    fn a_copy_too_small_for_the_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = history(dir.path());
        let base = dir.path().join("base");
        std::fs::write(&base, vec![0u8; 4096]).unwrap();
        let e = replay_to(&log, &base, Until::Entry(7)).unwrap_err();
        assert!(matches!(e, ReplayError::PastEnd { index: 3, .. }), "{e}");
    }
}
