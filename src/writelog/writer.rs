//! The log file as `serve --write-log` writes it: entries appended in completion order, made
//! durable at every flush and mark (and at exit), the super block counting only entries that
//! are whole and durable.
//!
//! Order and durability: an entry is appended under one lock, so the log's order is the order
//! in which the layer's operations finished, whichever queue ran them. Making entries durable
//! takes a second lock: fdatasync the log (the entries, wherever they are), then write the
//! super block's count and fdatasync again. A crash between the two leaves the old count, so
//! a reader never trusts an entry the disk may not hold. The count only grows.
//!
//! Entries are gathered in memory and written out a chunk at a time by a thread of the log's
//! own, with O_DIRECT where the filesystem allows (`spool`), and at every commit: what a crash
//! of this process loses of them is entries no flush covered, which the super block did not
//! count anyway.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use log::warn;
use serde::Serialize;
use serde_json::json;

use super::format::{self, header_sector, super_sector, EntryHeader, Super, MAX_MARK, SECTOR};
use super::spool::Spool;
use crate::events::EventLog;

/// Why `serve --write-log PATH` cannot use PATH.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--write-log {path}: cannot create the log: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("--write-log {path} is the {what} itself; give the log a file of its own")]
    SameFile { path: PathBuf, what: &'static str },
    #[error("--write-log {path} is being written by another process (another remapblk serve, e.g. the source of a migration); give this one a log of its own")]
    InUse { path: PathBuf },
    #[error("--write-log {path}: cannot write the log's super block: {source}")]
    Super { path: PathBuf, source: io::Error },
}

/// `query-status`' `write_log`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub path: String,
    /// Entries appended so far.
    pub entries: u64,
    /// The log's length in bytes (super block, headers and data).
    pub bytes: u64,
    /// Entries the super block counts: durable, what a reader sees after a crash.
    pub durable_entries: u64,
    /// Why the log stopped, if it did (guest I/O goes on without it).
    pub error: Option<String>,
    /// Whether the log is written with O_DIRECT (false where the filesystem refuses it).
    pub direct: bool,
}

/// Where the next entry goes.
struct Tail {
    entries: u64,
    /// The log's bytes, written or on their way.
    spool: Spool,
}

pub struct LogWriter {
    path: PathBuf,
    file: File,
    tail: Mutex<Tail>,
    /// The count the super block holds on disk.
    durable: Mutex<u64>,
    /// Set once, by the first append or sync that failed: the log ends there.
    failed: OnceLock<String>,
    events: Arc<EventLog>,
}

impl LogWriter {
    /// Creates `path` (0600), or truncates it: a log is a record of one run of the server.
    /// `not` are files the log must not be (the image, the spare file): truncating one of
    /// them would destroy the disk. The log is locked (flock) for as long as this process
    /// lives, and a log another process holds is refused before anything is truncated: a
    /// migration's destination started with the source's command line must not wipe the
    /// source's log.
    pub fn create(
        path: &Path,
        not: &[(&'static str, &Path)],
        events: Arc<EventLog>,
    ) -> Result<LogWriter, OpenError> {
        for &(what, other) in not {
            if same_file(path, other) {
                return Err(OpenError::SameFile {
                    path: path.to_path_buf(),
                    what,
                });
            }
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::filemode::PRIVATE_FILE)
            .open(path)
            .map_err(|source| OpenError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => OpenError::InUse {
                    path: path.to_path_buf(),
                },
                _ => OpenError::Create {
                    path: path.to_path_buf(),
                    source: e,
                },
            });
        }
        file.set_len(0).map_err(|source| OpenError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let spool = Spool::new(path, &file, &super_sector(&Super::new(0))).map_err(|source| {
            OpenError::Create {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let w = LogWriter {
            path: path.to_path_buf(),
            file,
            tail: Mutex::new(Tail { entries: 0, spool }),
            durable: Mutex::new(0),
            failed: OnceLock::new(),
            events,
        };
        w.write_super(0)
            .and_then(|()| w.file.sync_data())
            .map_err(|source| OpenError::Super {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A completed write of `iov` at byte `offset` of the disk.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length for the duration of the
    /// call.
    pub unsafe fn write(&self, offset: u64, iov: &[libc::iovec]) {
        let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        if len == 0 {
            return;
        }
        let sectors = len.div_ceil(SECTOR);
        let header = header_sector(
            &EntryHeader {
                sector: offset / SECTOR,
                nr_sectors: sectors,
                flags: 0,
                data_len: 0,
            },
            &[],
        );
        // Virtio requests are whole sectors; pad anything else so the next header stays
        // sector-aligned.
        let pad = [0u8; SECTOR as usize];
        let pad_len = (sectors * SECTOR - len) as usize;
        let mut all = Vec::with_capacity(iov.len() + 2);
        all.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        });
        all.extend_from_slice(iov);
        if pad_len > 0 {
            all.push(libc::iovec {
                iov_base: pad.as_ptr() as *mut libc::c_void,
                iov_len: pad_len,
            });
        }
        // SAFETY: `header` and `pad` live to the end of this function; the caller vouches for
        // `iov`.
        let _ = unsafe { self.append(&all) };
    }

    /// A completed discard (`zeroes`: a write-zeroes) of `len` bytes at `offset`.
    pub fn discard(&self, offset: u64, len: u64, zeroes: bool) {
        if len == 0 {
            return;
        }
        let flags = format::DISCARD | if zeroes { format::ZEROES } else { 0 };
        let header = EntryHeader {
            sector: offset / SECTOR,
            nr_sectors: len.div_ceil(SECTOR),
            flags,
            data_len: 0,
        };
        let _ = self.append_sector(&header_sector(&header, &[]));
    }

    /// A completed flush: logged, then made durable with everything before it.
    pub fn flush(&self) {
        let header = EntryHeader {
            sector: 0,
            nr_sectors: 0,
            flags: format::FLUSH,
            data_len: 0,
        };
        if self.append_sector(&header_sector(&header, &[])).is_ok() {
            let _ = self.commit();
        }
    }

    /// Appends a mark named `name` and makes the log durable up to it; returns the mark's
    /// entry index. `ctl log-mark` and a power cut call this.
    pub fn mark(&self, name: &str) -> io::Result<u64> {
        check_mark_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let header = EntryHeader {
            sector: 0,
            nr_sectors: 0,
            flags: format::MARK,
            data_len: name.len() as u64,
        };
        let index = self.append_sector(&header_sector(&header, name.as_bytes()))?;
        self.commit()?;
        self.events
            .emit("log-mark", json!({ "name": name, "entry": index }));
        Ok(index)
    }

    /// Makes every entry appended so far durable and counted by the super block.
    pub fn commit(&self) -> io::Result<()> {
        self.check_failed()?;
        let appended = {
            let mut tail = self.lock_tail();
            self.write_gathered(&mut tail)?;
            tail.entries
        };
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        if *durable >= appended {
            return Ok(());
        }
        let result = self
            .file
            .sync_data()
            .and_then(|()| self.write_super(appended))
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                *durable = appended;
                Ok(())
            }
            Err(e) => Err(self.fail("make the log durable", e)),
        }
    }

    pub fn status(&self) -> Status {
        let (entries, bytes, direct) = {
            let t = self.lock_tail();
            (t.entries, t.spool.end(), t.spool.direct())
        };
        Status {
            path: self.path.display().to_string(),
            entries,
            bytes,
            durable_entries: *self.durable.lock().unwrap_or_else(|p| p.into_inner()),
            error: self.failed.get().cloned(),
            direct,
        }
    }

    fn append_sector(&self, sector: &[u8; SECTOR as usize]) -> io::Result<u64> {
        let iov = [libc::iovec {
            iov_base: sector.as_ptr() as *mut libc::c_void,
            iov_len: sector.len(),
        }];
        // SAFETY: `sector` lives to the end of this function.
        unsafe { self.append(&iov) }
    }

    /// Writes one entry (`iov`, whole sectors) at the tail; returns its index.
    ///
    /// # Safety
    /// As [`write`](Self::write).
    unsafe fn append(&self, iov: &[libc::iovec]) -> io::Result<u64> {
        self.check_failed()?;
        let mut tail = self.lock_tail();
        // SAFETY: the caller vouches for `iov`.
        if let Err(e) = unsafe { tail.spool.push_iov(iov) } {
            drop(tail);
            return Err(self.fail("append to the log", e));
        }
        let index = tail.entries;
        tail.entries += 1;
        Ok(index)
    }

    /// Puts every entry appended so far on the file.
    fn write_gathered(&self, tail: &mut Tail) -> io::Result<()> {
        tail.spool
            .write_out()
            .map_err(|e| self.fail("append to the log", e))
    }

    fn write_super(&self, nr_entries: u64) -> io::Result<()> {
        self.lock_tail()
            .spool
            .rewrite_head(&super_sector(&Super::new(nr_entries)))
    }

    /// Records why the log stopped, once, and hands the error back.
    fn fail(&self, what: &str, e: io::Error) -> io::Error {
        let msg = format!("cannot {what} {}: {e}", self.path.display());
        if self.failed.set(msg.clone()).is_ok() {
            warn!("write log stopped (guest I/O goes on without it): {msg}");
            self.events
                .emit("write-log-failed", json!({ "error": msg.clone() }));
        }
        io::Error::new(e.kind(), msg)
    }

    fn check_failed(&self) -> io::Result<()> {
        match self.failed.get() {
            Some(msg) => Err(io::Error::other(format!("the write log stopped: {msg}"))),
            None => Ok(()),
        }
    }

    fn lock_tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for LogWriter {
    /// A clean exit leaves every entry counted.
    fn drop(&mut self) {
        let _ = self.commit();
    }
}

/// Why `name` cannot be a mark's name, if it cannot: the text `name: ...` errors start with.
pub fn check_mark_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty; give the mark a name, e.g. name=after-mkfs".to_string());
    }
    if name.len() > MAX_MARK {
        return Err(format!(
            "{} bytes; a mark's name holds at most {MAX_MARK} (it shares a 512-byte log sector \
             with its header)",
            name.len()
        ));
    }
    if name.contains('\0') {
        return Err("contains a NUL byte, which would cut it short for replay-log".to_string());
    }
    Ok(())
}

/// Whether `a` and `b` name the same file (both exist and share device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writelog::reader::LogFile;

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    #[test]
    fn only_durable_entries_are_counted_and_each_kind_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let w = LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap();
        let a = vec![0xa5u8; 4096];
        let (b1, b2) = (vec![1u8; 512], vec![2u8; 1024]);
        // SAFETY: the buffers outlive the calls.
        unsafe {
            w.write(8192, &[iov(&a)]);
            w.write(512, &[iov(&b1), iov(&b2)]);
        }
        assert_eq!(
            LogFile::open(&path).unwrap().nr_entries(),
            0,
            "no flush yet"
        );
        w.flush();
        w.discard(4096, 1024, false);
        w.discard(0, 512, true);
        assert_eq!(w.mark("m1").unwrap(), 5);
        assert_eq!(w.status().entries, 6);
        assert_eq!(w.status().durable_entries, 6);
        let log = LogFile::open(&path).unwrap();
        let entries: Vec<_> = log.entries().map(Result::unwrap).collect();
        let kinds: Vec<_> = entries.iter().map(|e| e.kind()).collect();
        use format::Kind::*;
        assert_eq!(kinds, [Write, Write, Flush, Discard, WriteZeroes, Mark]);
        assert_eq!((entries[0].lba(), entries[0].len()), (16, 4096));
        assert_eq!((entries[1].lba(), entries[1].len()), (1, 1536));
        assert_eq!(log.data(&entries[0]).unwrap(), a);
        assert_eq!(log.data(&entries[1]).unwrap(), [b1, b2].concat());
        assert_eq!((entries[3].lba(), entries[3].len()), (8, 1024));
        assert_eq!(entries[5].mark.as_deref(), Some("m1"));
        // The file ends on a page: O_DIRECT writes whole ones, and the last is padded.
        let (bytes, file) = (w.status().bytes, std::fs::metadata(&path).unwrap().len());
        assert!(file >= bytes && file - bytes < 4096, "{bytes} {file}");
    }

    #[test]
    fn gathered_and_direct_entries_keep_their_order_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let w = LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap();
        // Small ones past a gathering's size, big ones between them.
        let sizes = [4096usize, 512, 300 << 10, 4096, 1 << 20, 8192];
        let datas: Vec<Vec<u8>> = (0..200)
            .map(|i| vec![i as u8; sizes[i % sizes.len()]])
            .collect();
        for (i, d) in datas.iter().enumerate() {
            // SAFETY: `d` outlives the call.
            unsafe { w.write(i as u64 * 4096, &[iov(d)]) };
        }
        w.commit().unwrap();
        // The file ends on a page: O_DIRECT writes whole ones, and the last is padded.
        let (bytes, file) = (w.status().bytes, std::fs::metadata(&path).unwrap().len());
        assert!(file >= bytes && file - bytes < 4096, "{bytes} {file}");
        let log = LogFile::open(&path).unwrap();
        let entries = log.scan().unwrap();
        assert_eq!(entries.len(), datas.len());
        for (e, d) in entries.iter().zip(&datas) {
            assert_eq!(e.offset(), e.index * 4096);
            assert!(log.data(e).unwrap() == *d, "entry {}", e.index);
        }
    }

    #[test]
    fn mark_names_are_checked() {
        assert!(check_mark_name("").unwrap_err().starts_with("empty"));
        assert!(check_mark_name(&"x".repeat(MAX_MARK)).is_ok());
        assert!(check_mark_name(&"x".repeat(MAX_MARK + 1))
            .unwrap_err()
            .contains("at most 479"));
        assert!(check_mark_name("a\0b").is_err());
    }

    #[test]
    fn the_log_refuses_to_be_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        std::fs::write(&image, b"data").unwrap();
        let e = LogWriter::create(&image, &[("image", &image)], Arc::new(EventLog::disabled()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("is the image itself"), "{e}");
        assert_eq!(std::fs::read(&image).unwrap(), b"data");
    }

    #[test]
    fn a_log_another_writer_holds_is_refused_and_left_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let w = LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap();
        w.mark("kept").unwrap();
        // flock locks belong to the open file description: a second open conflicts as a
        // second process's would.
        let e = LogWriter::create(&path, &[], Arc::new(EventLog::disabled()))
            .err()
            .unwrap();
        assert!(matches!(e, OpenError::InUse { .. }), "{e}");
        assert_eq!(LogFile::open(&path).unwrap().nr_entries(), 1);
        drop(w);
        let w = LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap();
        assert_eq!(w.status().entries, 0, "a new run truncates");
        assert_eq!(LogFile::open(&path).unwrap().nr_entries(), 0);
    }

    #[test]
    fn a_drop_counts_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let w = LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap();
        w.discard(0, 512, false);
        drop(w);
        assert_eq!(LogFile::open(&path).unwrap().nr_entries(), 1);
    }
}
