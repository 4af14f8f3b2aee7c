//! The log's bytes on their way to the file: gathered in page-aligned chunks, each full chunk
//! written with O_DIRECT by a thread of its own while the queues gather the next.
//!
//! Why: a logged 4 KiB write appends 4.5 KiB to the log. Through the page cache that append
//! cost the queue's thread more than the guest's write itself (a new page for every 4 KiB,
//! delayed allocation, dirty throttling), about half the throughput of an unlogged run. O_DIRECT
//! skips all of that, and a thread of its own waits for the device instead of the queue's.
//! Where the filesystem refuses O_DIRECT (tmpfs), the same chunks go through the page cache.
//!
//! The file's bytes `[base, base + len)` are in `cur`; everything before `base` is written or
//! queued. A chunk leaves `cur` only full, so every queued write is whole pages at a page
//! boundary. A commit writes `cur`'s pages as they are (the last one padded with zeros) and
//! keeps them: the next write of the chunk writes them again, completed. The super block
//! lives in the file's first page, which `first` mirrors: rewriting it writes that page whole
//! (O_DIRECT writes nothing smaller), after every queued chunk is on the file, so a chunk that
//! holds the first page can never bring back an older super block.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// What O_DIRECT needs of buffers, offsets and lengths on any device (512 or 4096-byte
/// logical blocks).
pub const ALIGN: usize = 4096;
/// One write of the log thread. Large enough that a 4 KiB write costs the device little; small
/// enough that four in flight stay a few MiB.
const CHUNK: usize = 1 << 20;
/// Full chunks waiting for the log thread before a queue waits for it in turn.
const QUEUED_MAX: usize = 4;

/// A page-aligned byte buffer of a fixed size.
struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let bytes = vec![0u8; len + ALIGN];
        let start = bytes.as_ptr().align_offset(ALIGN);
        Aligned { bytes, start, len }
    }

    fn get(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// What the log thread and the queues share.
#[derive(Default)]
struct Shared {
    /// Full chunks to write, with their file offsets, oldest first.
    queued: VecDeque<(Aligned, u64)>,
    /// A chunk is being written now.
    writing: bool,
    /// Written chunks, for the queues to fill again.
    free: Vec<Aligned>,
    /// The first write that failed: the log ends there.
    error: Option<io::Error>,
    stop: bool,
}

struct Thread {
    state: Mutex<Shared>,
    /// Signalled when a chunk is queued, written, or the thread must stop.
    changed: Condvar,
}

impl Thread {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Shared>) -> MutexGuard<'a, Shared> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// The log thread: writes queued chunks in order until told to stop.
    fn run(&self, file: &File) {
        let mut g = self.lock();
        loop {
            let Some((chunk, at)) = g.queued.pop_front() else {
                if g.stop {
                    return;
                }
                g = self.wait(g);
                continue;
            };
            g.writing = true;
            drop(g);
            let r = file.write_all_at(chunk.get(), at);
            g = self.lock();
            g.writing = false;
            if let Err(e) = r {
                g.error.get_or_insert(e);
            }
            g.free.push(chunk);
            self.changed.notify_all();
        }
    }
}

pub struct Spool {
    file: Arc<File>,
    direct: bool,
    cur: Aligned,
    base: u64,
    len: usize,
    /// The file's first page as it must read: the super block and what follows it.
    first: Aligned,
    thread: Arc<Thread>,
    handle: Option<JoinHandle<()>>,
}

impl Spool {
    /// A spool for the log at `path` (already created, empty, locked: `buffered` is its
    /// descriptor), its first bytes `head` (the super block). O_DIRECT where the filesystem
    /// takes it.
    pub fn new(path: &Path, buffered: &File, head: &[u8]) -> io::Result<Spool> {
        let direct = File::options()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            // tmpfs and some network filesystems: the page cache it is.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (buffered.try_clone()?, false),
            Err(e) => return Err(e),
        };
        Self::with_file(file, direct, head)
    }

    fn with_file(file: File, direct: bool, head: &[u8]) -> io::Result<Spool> {
        let file = Arc::new(file);
        let thread = Arc::new(Thread {
            state: Mutex::new(Shared::default()),
            changed: Condvar::new(),
        });
        let handle = {
            let (thread, file) = (thread.clone(), file.clone());
            std::thread::Builder::new()
                .name("write-log".into())
                .spawn(move || thread.run(&file))?
        };
        let mut s = Spool {
            file,
            direct,
            cur: Aligned::new(CHUNK),
            base: 0,
            len: 0,
            first: Aligned::new(ALIGN),
            thread,
            handle: Some(handle),
        };
        s.push(head)?;
        Ok(s)
    }

    /// Whether the log bypasses the page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The file's length as the entries count it: where the next byte goes.
    pub fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Appends `bytes`.
    pub fn push(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let at = self.end();
            if at < ALIGN as u64 {
                let n = bytes.len().min(ALIGN - at as usize);
                self.first.get_mut()[at as usize..at as usize + n].copy_from_slice(&bytes[..n]);
            }
            let n = bytes.len().min(CHUNK - self.len);
            self.cur.get_mut()[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.len == CHUNK {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    /// Appends what `iov` points to.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length for the duration of the
    /// call.
    pub unsafe fn push_iov(&mut self, iov: &[libc::iovec]) -> io::Result<()> {
        for v in iov.iter().filter(|v| v.iov_len > 0) {
            // SAFETY: the caller vouches for the iovec.
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            self.push(bytes)?;
        }
        Ok(())
    }

    /// Queues the full chunk for the log thread and starts the next one.
    fn hand_over(&mut self) -> io::Result<()> {
        let t = &*self.thread;
        let mut g = t.lock();
        while g.queued.len() >= QUEUED_MAX && g.error.is_none() {
            g = t.wait(g);
        }
        if let Some(e) = &g.error {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        let next = g.free.pop().unwrap_or_else(|| Aligned::new(CHUNK));
        let full = std::mem::replace(&mut self.cur, next);
        g.queued.push_back((full, self.base));
        t.changed.notify_all();
        drop(g);
        self.base += CHUNK as u64;
        self.len = 0;
        Ok(())
    }

    /// Waits until every queued chunk is on the file.
    fn drain(&self) -> io::Result<()> {
        let t = &*self.thread;
        let mut g = t.lock();
        while (!g.queued.is_empty() || g.writing) && g.error.is_none() {
            g = t.wait(g);
        }
        match &g.error {
            Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }

    /// Puts every byte pushed so far on the file (not yet durable: the caller syncs).
    pub fn write_out(&mut self) -> io::Result<()> {
        self.drain()?;
        if self.len == 0 {
            return Ok(());
        }
        let pages = self.len.next_multiple_of(ALIGN);
        self.cur.get_mut()[self.len..pages].fill(0);
        self.file.write_all_at(&self.cur.get()[..pages], self.base)
    }

    /// Rewrites the file's first `head.len()` bytes (the super block), after every queued
    /// chunk (one may hold the first page with the super block it replaces).
    pub fn rewrite_head(&mut self, head: &[u8]) -> io::Result<()> {
        self.drain()?;
        self.first.get_mut()[..head.len()].copy_from_slice(head);
        if self.base == 0 {
            self.cur.get_mut()[..head.len()].copy_from_slice(head);
        }
        self.file.write_all_at(self.first.get(), 0)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.thread.lock().stop = true;
        self.thread.changed.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool(direct: bool) -> (tempfile::TempDir, std::path::PathBuf, Spool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let s = if direct {
            Spool::new(&path, &f, &[7u8; 512]).unwrap()
        } else {
            Spool::with_file(f, false, &[7u8; 512]).unwrap()
        };
        (dir, path, s)
    }

    /// The file holds exactly what was pushed (and zeros past it, up to a page), across
    /// chunk boundaries, commits in the middle of a page and head rewrites.
    #[test]
    fn the_file_reads_as_pushed_whatever_the_chunking() {
        for direct in [true, false] {
            let (_dir, path, mut s) = spool(direct);
            let mut want = vec![7u8; 512];
            for round in 0..40usize {
                let len = [512, 4096, 4608, 1 << 20, 3 * 512][round % 5];
                let data: Vec<u8> = (0..len).map(|i| (i + round) as u8).collect();
                s.push(&data).unwrap();
                want.extend_from_slice(&data);
                if round % 7 == 3 {
                    s.write_out().unwrap();
                    let head = [round as u8; 512];
                    s.rewrite_head(&head).unwrap();
                    want[..512].copy_from_slice(&head);
                }
            }
            s.write_out().unwrap();
            assert_eq!(s.end(), want.len() as u64);
            drop(s);
            let got = std::fs::read(&path).unwrap();
            assert!(got.len() >= want.len() && got.len() - want.len() < ALIGN);
            assert!(got[..want.len()] == want[..], "direct: {direct}");
            assert!(got[want.len()..].iter().all(|&b| b == 0));
        }
    }
}
