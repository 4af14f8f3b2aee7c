//! `LoggedTarget`: the layer that hands every completed write, discard, write-zeroes and flush
//! to the log. Writes must pass through it (their data goes into the log), so it maps none;
//! reads map through, so they stay as fast as without a log.

use std::io;
use std::sync::Arc;

use super::writer::LogWriter;
use crate::storage::{BlockIo, Dir, Hold, IoKind, MapIo, Mapping, PerIo};

pub struct LoggedTarget {
    inner: Arc<dyn BlockIo>,
    log: Arc<LogWriter>,
}

impl LoggedTarget {
    pub fn new(inner: Arc<dyn BlockIo>, log: Arc<LogWriter>) -> LoggedTarget {
        LoggedTarget { inner, log }
    }
}

/// Each operation is logged once the layer below has completed it, and only then: a failed
/// write changed nothing a replay should reproduce. A log that can no longer be written stops
/// (the writer says why in `query-status`); guest I/O goes on, and the log stays a prefix of
/// what happened.
impl BlockIo for LoggedTarget {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: the caller vouches for `iov`.
        unsafe { self.inner.readv(offset, iov) }
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: the caller vouches for `iov`, for this call and the log's.
        unsafe {
            self.inner.writev(offset, iov)?;
            self.log.write(offset, iov);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()?;
        self.log.flush();
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)?;
        self.log.discard(offset, len, false);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)?;
        self.log.discard(offset, len, true);
        Ok(())
    }

    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        io.dir == Dir::Read && self.inner.map(io, out)
    }

    fn end_io(&self, io: MapIo, per_io: &PerIo) -> bool {
        self.inner.end_io(io, per_io)
    }

    fn hold(&self, kind: IoKind, offset: u64, len: u64) -> Option<Hold> {
        self.inner.hold(kind, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use crate::storage::{NullTarget, Pass};
    use crate::writelog::format::Kind;
    use crate::writelog::reader::LogFile;

    #[test]
    fn writes_take_the_blocking_path_and_reads_map_through() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(
            LogWriter::create(&dir.path().join("log"), &[], Arc::new(EventLog::disabled()))
                .unwrap(),
        );
        let t = LoggedTarget::new(Arc::new(NullTarget), log);
        let mut m = Mapping::default();
        assert!(!t.map(MapIo::new(Dir::Write, 0, 512, Pass::Queued), &mut m));
        assert!(m.is_empty());
        let mut m = Mapping::default();
        assert!(t.map(MapIo::new(Dir::Read, 0, 512, Pass::Queued), &mut m));
        assert_eq!(m.len(), 1, "the null target's zeros");
    }

    /// A layer below that fails every write: nothing may reach the log.
    struct Failing;
    impl BlockIo for Failing {
        unsafe fn readv(&self, _: u64, _: &[libc::iovec]) -> io::Result<()> {
            Ok(())
        }
        unsafe fn writev(&self, _: u64, _: &[libc::iovec]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn flush(&self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_completed_operations_are_logged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = Arc::new(LogWriter::create(&path, &[], Arc::new(EventLog::disabled())).unwrap());
        let t = LoggedTarget::new(Arc::new(Failing), log.clone());
        let buf = [1u8; 512];
        let iov = [libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` outlives the call.
        assert!(unsafe { t.writev(0, &iov) }.is_err());
        assert!(t.flush().is_err());
        assert!(t.discard(0, 512).is_err());
        t.write_zeroes(512, 512, false).unwrap();
        log.commit().unwrap();
        let f = LogFile::open(&path).unwrap();
        let kinds: Vec<_> = f.entries().map(|e| e.unwrap().kind()).collect();
        assert_eq!(kinds, [Kind::WriteZeroes]);
    }
}
