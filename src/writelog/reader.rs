//! Reading a log: the super block checked, then the entries one by one, each checked against
//! the file before anyone replays it. A log the super block promises more of than the file
//! holds, or whose entry is not one a log-writes writer makes, is refused naming the entry.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{EntryHeader, Kind, Super, ENTRY_LEN, MAGIC, MARK, SECTOR, SUPER_LEN, VERSION};

/// Sector sizes a log may declare: what block devices have.
const SECTOR_SIZES: std::ops::RangeInclusive<u64> = 512..=65536;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open the log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read the log {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a write log: its first {SUPER_LEN} bytes (the super block) are missing; the file holds {len} bytes")]
    NoSuper { path: PathBuf, len: u64 },
    #[error("{path} is not a write log: bad magic {found:#x} (a dm-log-writes log starts with {MAGIC:#x})")]
    Magic { path: PathBuf, found: u64 },
    #[error("{path}: log version {found}; only version {VERSION} is known")]
    Version { path: PathBuf, found: u64 },
    #[error("{path}: the super block's sector size {size} is not a power of two from 512 to 65536; the log is damaged")]
    SectorSize { path: PathBuf, size: u64 },
    #[error("{path}: entry {index} runs past the end of the log (it ends at byte {end}, the file holds {len}): the log is truncated after {index} whole entries")]
    Truncated {
        path: PathBuf,
        index: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: entry {index} is malformed ({why}); the log is damaged from there on")]
    Malformed {
        path: PathBuf,
        index: u64,
        why: String,
    },
}

/// A log opened for reading.
pub struct LogFile {
    file: File,
    path: PathBuf,
    sectorsize: u64,
    nr_entries: u64,
    len: u64,
}

/// One entry, checked against the file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub index: u64,
    pub header: EntryHeader,
    /// A mark's name.
    pub mark: Option<String>,
    /// Where its data starts in the log.
    data_at: u64,
    /// The disk range it covers, in bytes.
    offset: u64,
    len: u64,
}

impl Entry {
    pub fn kind(&self) -> Kind {
        self.header.kind()
    }

    /// The first 512-byte sector of the disk it covers (whatever the log's sector size).
    pub fn lba(&self) -> u64 {
        self.offset / SECTOR
    }

    /// Bytes of the disk it covers (0 for flushes and marks).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Byte offset of the disk it covers.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl LogFile {
    pub fn open(path: &Path) -> Result<LogFile, LogError> {
        let file = File::open(path).map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let read_err = |source| LogError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = file.metadata().map_err(read_err)?.len();
        let mut b = [0u8; SUPER_LEN];
        if len < SUPER_LEN as u64 {
            return Err(LogError::NoSuper {
                path: path.to_path_buf(),
                len,
            });
        }
        file.read_exact_at(&mut b, 0).map_err(read_err)?;
        let s = Super::decode(&b);
        if s.magic != MAGIC {
            return Err(LogError::Magic {
                path: path.to_path_buf(),
                found: s.magic,
            });
        }
        if s.version != VERSION {
            return Err(LogError::Version {
                path: path.to_path_buf(),
                found: s.version,
            });
        }
        let sectorsize = u64::from(s.sectorsize);
        if !SECTOR_SIZES.contains(&sectorsize) || !sectorsize.is_power_of_two() {
            return Err(LogError::SectorSize {
                path: path.to_path_buf(),
                size: sectorsize,
            });
        }
        // Reading goes front to back: let the kernel read ahead generously.
        // SAFETY: posix_fadvise only advises about a descriptor we own.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::POSIX_FADV_SEQUENTIAL,
            )
        };
        Ok(LogFile {
            file,
            path: path.to_path_buf(),
            sectorsize,
            nr_entries: s.nr_entries,
            len,
        })
    }

    /// The entries the super block counts (durable ones).
    pub fn nr_entries(&self) -> u64 {
        self.nr_entries
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entries in order; the first error ends them.
    pub fn entries(&self) -> Entries<'_> {
        Entries {
            log: self,
            index: 0,
            pos: self.sectorsize,
            done: false,
        }
    }

    /// Every entry, or the first error.
    pub fn scan(&self) -> Result<Vec<Entry>, LogError> {
        self.entries().collect()
    }

    /// `buf.len()` bytes of a write's data from byte `at` of it (the caller keeps within
    /// [`Entry::len`]).
    pub fn read_data_at(&self, e: &Entry, at: u64, buf: &mut [u8]) -> Result<(), LogError> {
        self.file
            .read_exact_at(buf, e.data_at + at)
            .map_err(|source| LogError::Read {
                path: self.path.clone(),
                source,
            })
    }

    /// A write's data, whole (for tests and small entries: a replay reads it in pieces).
    pub fn data(&self, e: &Entry) -> Result<Vec<u8>, LogError> {
        let n = if e.kind() == Kind::Write { e.len } else { 0 };
        let mut buf = vec![0u8; n as usize];
        self.read_data_at(e, 0, &mut buf)?;
        Ok(buf)
    }

    fn entry_at(&self, index: u64, pos: u64) -> Result<(Entry, u64), LogError> {
        let ss = self.sectorsize;
        let truncated = |end| LogError::Truncated {
            path: self.path.clone(),
            index,
            end,
            len: self.len,
        };
        let malformed = |why: String| LogError::Malformed {
            path: self.path.clone(),
            index,
            why,
        };
        let header_end = pos.saturating_add(ss);
        if header_end > self.len {
            return Err(truncated(header_end));
        }
        let mut sector = vec![0u8; ss as usize];
        self.file
            .read_exact_at(&mut sector, pos)
            .map_err(|source| LogError::Read {
                path: self.path.clone(),
                source,
            })?;
        let mut hb = [0u8; ENTRY_LEN];
        hb.copy_from_slice(&sector[..ENTRY_LEN]);
        let h = EntryHeader::decode(&hb);
        // replay-log's checks: an all-zero header is where a log ends, and only a mark may
        // have bytes after the header in its sector.
        if h.flags == 0 && h.nr_sectors == 0 {
            return Err(malformed(
                "all zeros: the log ends before the count its super block holds".to_string(),
            ));
        }
        let mut mark = None;
        if h.flags & MARK != 0 {
            let room = ss - ENTRY_LEN as u64;
            if h.data_len > room {
                return Err(malformed(format!(
                    "a mark of {} bytes in a {ss}-byte sector",
                    h.data_len
                )));
            }
            let name = &sector[ENTRY_LEN..ENTRY_LEN + h.data_len as usize];
            mark = Some(String::from_utf8_lossy(name).into_owned());
        } else if sector[ENTRY_LEN] != 0 {
            return Err(malformed(
                "its header sector is not zero-padded".to_string(),
            ));
        }
        let bytes = |sectors: u64| {
            sectors
                .checked_mul(ss)
                .ok_or_else(|| malformed(format!("{sectors} sectors overflow a byte count")))
        };
        let offset = bytes(h.sector)?;
        let len = if h.kind() == Kind::Mark {
            0
        } else {
            bytes(h.nr_sectors)?
        };
        if offset.checked_add(len).is_none() {
            return Err(malformed("its range ends past 2^64 bytes".to_string()));
        }
        let data = bytes(h.data_sectors())?;
        let end = header_end
            .checked_add(data)
            .ok_or_else(|| malformed("its data ends past 2^64 bytes".to_string()))?;
        if end > self.len {
            return Err(truncated(end));
        }
        Ok((
            Entry {
                index,
                header: h,
                mark,
                data_at: header_end,
                offset,
                len,
            },
            end,
        ))
    }
}

pub struct Entries<'a> {
    log: &'a LogFile,
    index: u64,
    pos: u64,
    done: bool,
}

impl Iterator for Entries<'_> {
    type Item = Result<Entry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.index >= self.log.nr_entries {
            return None;
        }
        match self.log.entry_at(self.index, self.pos) {
            Ok((e, end)) => {
                self.index += 1;
                self.pos = end;
                Some(Ok(e))
            }
            Err(err) => {
                self.done = true;
                Some(Err(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writelog::format::{header_sector, super_sector, DISCARD, FLUSH};

    /// A log of `entries` (header, name, data) with a super block counting `count`.
    fn log_of(
        count: u64,
        entries: &[(EntryHeader, &[u8], Vec<u8>)],
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut bytes = super_sector(&Super::new(count)).to_vec();
        for (h, name, data) in entries {
            bytes.extend_from_slice(&header_sector(h, name));
            bytes.extend_from_slice(data);
        }
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    fn h(sector: u64, nr_sectors: u64, flags: u64) -> EntryHeader {
        EntryHeader {
            sector,
            nr_sectors,
            flags,
            data_len: 0,
        }
    }

    #[test]
    fn entries_read_back_with_ranges_in_bytes_and_sectors() {
        let (_d, path) = log_of(
            3,
            &[
                (h(4, 2, 0), b"", vec![7; 1024]),
                (h(0, 0, FLUSH), b"", vec![]),
                (h(100, 8, DISCARD), b"", vec![]),
            ],
        );
        let log = LogFile::open(&path).unwrap();
        let es = log.scan().unwrap();
        assert_eq!(es.len(), 3);
        assert_eq!((es[0].lba(), es[0].len(), es[0].offset()), (4, 1024, 2048));
        assert_eq!(log.data(&es[0]).unwrap(), vec![7; 1024]);
        assert_eq!(es[1].kind(), Kind::Flush);
        assert_eq!((es[2].lba(), es[2].len()), (100, 4096));
    }

    #[test]
    fn only_the_counted_entries_are_read() {
        let (_d, path) = log_of(
            1,
            &[
                (h(0, 1, 0), b"", vec![1; 512]),
                (h(0, 1, 0), b"", vec![2; 512]),
            ],
        );
        assert_eq!(LogFile::open(&path).unwrap().scan().unwrap().len(), 1);
    }

    #[test]
    fn a_truncated_log_names_the_entry() {
        let (_d, path) = log_of(
            2,
            &[
                (h(0, 1, 0), b"", vec![1; 512]),
                (h(0, 2, 0), b"", vec![2; 512]),
            ],
        );
        let e = LogFile::open(&path).unwrap().scan().unwrap_err();
        assert!(matches!(e, LogError::Truncated { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("entry 1 runs past the end"), "{e}");
        // The super block promises an entry that is not there at all.
        let (_d, path) = log_of(2, &[(h(0, 1, 0), b"", vec![1; 512])]);
        let e = LogFile::open(&path).unwrap().scan().unwrap_err();
        assert!(matches!(e, LogError::Truncated { index: 1, .. }), "{e}");
    }

    #[test]
    fn damaged_logs_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            LogFile::open(&path),
            Err(LogError::NoSuper { len: 5, .. })
        ));
        std::fs::write(&path, [0u8; 512]).unwrap();
        let e = LogFile::open(&path).err().unwrap();
        assert!(e.to_string().contains("bad magic 0x0"), "{e}");
        let mut s = Super::new(0);
        s.version = 2;
        std::fs::write(&path, super_sector(&s)).unwrap();
        assert!(matches!(
            LogFile::open(&path),
            Err(LogError::Version { found: 2, .. })
        ));
        let mut s = Super::new(0);
        s.sectorsize = 1000;
        std::fs::write(&path, super_sector(&s)).unwrap();
        assert!(matches!(
            LogFile::open(&path),
            Err(LogError::SectorSize { size: 1000, .. })
        ));
        // An all-zero entry where the super block counts one.
        let (_d, path) = log_of(1, &[(h(0, 0, 0), b"", vec![])]);
        let e = LogFile::open(&path).unwrap().scan().unwrap_err();
        assert!(matches!(e, LogError::Malformed { index: 0, .. }), "{e}");
        // A mark longer than its sector.
        let mut m = h(0, 0, MARK);
        m.data_len = 600;
        let (_d, path) = log_of(1, &[(m, b"x", vec![])]);
        assert!(LogFile::open(&path).unwrap().scan().is_err());
        // A range past 2^64 bytes.
        let (_d, path) = log_of(1, &[(h(u64::MAX / 512, 4, DISCARD), b"", vec![])]);
        assert!(matches!(
            LogFile::open(&path).unwrap().scan(),
            Err(LogError::Malformed { .. })
        ));
    }

    #[test]
    fn a_log_of_4k_sectors_counts_lba_in_512_byte_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut s = Super::new(1);
        s.sectorsize = 4096;
        let mut bytes = vec![0u8; 4096];
        bytes[..SUPER_LEN].copy_from_slice(&s.encode());
        let mut hs = vec![0u8; 4096];
        hs[..ENTRY_LEN].copy_from_slice(&h(3, 1, 0).encode());
        bytes.extend_from_slice(&hs);
        bytes.extend_from_slice(&[9u8; 4096]);
        std::fs::write(&path, bytes).unwrap();
        let log = LogFile::open(&path).unwrap();
        let es = log.scan().unwrap();
        assert_eq!((es[0].lba(), es[0].len()), (24, 4096));
        assert_eq!(log.data(&es[0]).unwrap(), vec![9u8; 4096]);
    }
}
