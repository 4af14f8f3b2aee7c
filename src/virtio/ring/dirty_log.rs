//! The vhost dirty log (VHOST_F_LOG_ALL with VHOST_USER_PROTOCOL_F_LOG_SHMFD; vhost-user.rst,
//! "Migration"): while the frontend migrates, every page of guest memory the backend writes
//! must be marked here, or the destination keeps the page's old contents.
//!
//! The log is a bitmap over guest *physical* addresses from 0: one bit per [`VHOST_LOG_PAGE`]
//! page, page `p` being bit `p % 8` of byte `p / 8`. SET_LOG_BASE sends its fd, size and
//! offset. The frontend reads and clears bits while we set them, so every bit is set with an
//! atomic OR; a plain store could undo a clear or lose a concurrent mark.
//!
//! The caller's contract: mark a range after the bytes are written (the kernel's writes for an
//! io_uring request included, so after its completion) and before the used entry that hands
//! them to the driver is published. The used ring's own writes are marked too, at
//! `log_guest_addr` of the ring.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};

use super::shm::{MapError, SharedMap};

/// Bytes of guest memory one bit of the log stands for.
pub const VHOST_LOG_PAGE: u64 = 0x1000;
const PAGE_SHIFT: u32 = VHOST_LOG_PAGE.trailing_zeros();

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("dirty log: {0}")]
    Map(#[from] MapError),
}

/// The dirty log the frontend shares, mapped.
pub struct DirtyLog {
    map: SharedMap,
    /// Whether a range past the end of the log has been reported (once is enough to say the
    /// frontend's log is too small; every write would flood the log otherwise).
    warned: AtomicBool,
}

impl DirtyLog {
    /// Maps the log of SET_LOG_BASE: `mmap_size` bytes of `file` from `mmap_offset`. Refused if
    /// the size is 0 or the file does not hold the whole range (a mapping past its end would
    /// fault on access). The file may be closed afterwards.
    pub fn map(file: &File, mmap_size: u64, mmap_offset: u64) -> Result<DirtyLog, LogError> {
        Ok(DirtyLog {
            map: SharedMap::map(file, mmap_offset, mmap_size, 1)?,
            warned: AtomicBool::new(false),
        })
    }

    /// Pages the log covers: guest physical addresses below `pages() * VHOST_LOG_PAGE`.
    pub fn pages(&self) -> u64 {
        (self.map.bytes().len() as u64).saturating_mul(8)
    }

    /// Marks every page that `len` bytes from guest physical address `gpa` touch. Nothing for
    /// `len` 0. Pages past the end of the log cannot be marked: they are skipped, and the
    /// first time that happens it is logged.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        // Saturating: a range that wraps past the top of the address space ends at its top.
        let mut last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        let pages = self.pages();
        if last >= pages {
            self.warn_past_end(gpa, len, pages);
            if first >= pages {
                return;
            }
            last = pages - 1;
        }
        let bytes = self.map.bytes();
        // Both are < pages / 8 <= bytes.len(), so they index the log.
        let (b0, b1) = ((first / 8) as usize, (last / 8) as usize);
        let head = 0xffu8 << (first % 8);
        let tail = 0xffu8 >> (7 - last % 8);
        // Release: the frontend, which takes bits with an atomic exchange, must see the data
        // written before the bit that sends it to copy the page.
        if b0 == b1 {
            bytes[b0].fetch_or(head & tail, Ordering::Release);
            return;
        }
        bytes[b0].fetch_or(head, Ordering::Release);
        for byte in &bytes[b0 + 1..b1] {
            byte.fetch_or(0xff, Ordering::Release);
        }
        bytes[b1].fetch_or(tail, Ordering::Release);
    }

    fn warn_past_end(&self, gpa: u64, len: u64, pages: u64) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "dirty log: guest range {gpa:#x}+{len:#x} reaches past the log's {pages} pages \
                 ({:#x} bytes of guest addresses); pages beyond it are not logged, so a \
                 migration may copy stale data there (reported once per log)",
                pages.saturating_mul(VHOST_LOG_PAGE)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use proptest::prelude::*;

    const P: u64 = VHOST_LOG_PAGE;

    fn file_of(size: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
    }

    fn log_of(size: u64) -> (File, DirtyLog) {
        let f = file_of(size);
        let log = DirtyLog::map(&f, size, 0).unwrap();
        (f, log)
    }

    /// The log as the frontend reads it: through the file, not our mapping.
    fn contents(f: &File, off: u64, size: u64) -> Vec<u8> {
        let mut buf = vec![0; size as usize];
        f.read_exact_at(&mut buf, off).unwrap();
        buf
    }

    /// The spec's pseudo-code, one page at a time: the reference `mark` must match.
    fn reference(log: &mut [u8], gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let pages = log.len() as u64 * 8;
        let last = gpa.saturating_add(len - 1) / P;
        for page in gpa / P..=last.min(pages.saturating_sub(1)) {
            log[(page / 8) as usize] |= 1 << (page % 8);
        }
    }

    #[test]
    fn one_page() {
        let (f, log) = log_of(16);
        assert_eq!(log.pages(), 128);
        log.mark(5 * P, 1);
        assert_eq!(contents(&f, 0, 2), [0b0010_0000, 0]);
        log.mark(5 * P + 4095, 1);
        log.mark(5 * P + 100, 200);
        assert_eq!(contents(&f, 0, 2), [0b0010_0000, 0]);
        // Page 9: bit 1 of byte 1.
        log.mark(9 * P, P);
        assert_eq!(contents(&f, 0, 2), [0b0010_0000, 0b10]);
    }

    #[test]
    fn zero_length_marks_nothing() {
        let (f, log) = log_of(16);
        log.mark(3 * P, 0);
        log.mark(0, 0);
        assert!(contents(&f, 0, 16).iter().all(|&b| b == 0));
    }

    #[test]
    fn ranges_crossing_page_and_byte_boundaries() {
        let (f, log) = log_of(16);
        // Two bytes straddling pages 5 and 6.
        log.mark(6 * P - 1, 2);
        assert_eq!(contents(&f, 0, 1), [0b0110_0000]);
        // Pages 7 and 8: the last bit of byte 0, the first of byte 1.
        log.mark(7 * P + 10, P);
        assert_eq!(contents(&f, 0, 2), [0b1110_0000, 0b0000_0001]);
        // Pages 20..=52: part of byte 2, bytes 3..=5 whole, part of byte 6.
        log.mark(20 * P, 33 * P);
        assert_eq!(
            contents(&f, 2, 6),
            [0b1111_0000, 0xff, 0xff, 0xff, 0b0001_1111, 0]
        );
    }

    #[test]
    fn the_last_page_and_past_the_end() {
        let (f, log) = log_of(4);
        let last = log.pages() - 1;
        log.mark(last * P + P - 1, 1);
        assert_eq!(contents(&f, 0, 4), [0, 0, 0, 0x80]);
        assert!(!log.warned.load(Ordering::Relaxed));
        // Starting on the last page and running past it: the last page only.
        log.mark((last - 1) * P, 10 * P);
        assert_eq!(contents(&f, 0, 4), [0, 0, 0, 0xc0]);
        assert!(log.warned.load(Ordering::Relaxed));
        // Wholly past the end, or running off the address space: nothing, no panic.
        log.mark(log.pages() * P, 1);
        log.mark(u64::MAX - 10, 100);
        log.mark(u64::MAX, u64::MAX);
        assert_eq!(contents(&f, 0, 4), [0, 0, 0, 0xc0]);
        // Nor does it write past the log into the rest of the file.
        let f = file_of(8);
        let log = DirtyLog::map(&f, 4, 0).unwrap();
        log.mark(0, u64::MAX);
        assert_eq!(contents(&f, 0, 8), [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }

    #[test]
    fn map_checks_the_range_against_the_file() {
        let f = file_of(4096);
        assert!(matches!(
            DirtyLog::map(&f, 0, 0),
            Err(LogError::Map(MapError::Empty))
        ));
        let e = DirtyLog::map(&f, 4097, 0).err().unwrap();
        assert!(
            matches!(
                e,
                LogError::Map(MapError::PastEnd {
                    file_size: 4096,
                    ..
                })
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("dirty log: "), "{e}");
        let e = DirtyLog::map(&f, 10, 4090).err().unwrap();
        assert!(matches!(e, LogError::Map(MapError::PastEnd { .. })), "{e}");
        let devnull = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        assert!(matches!(
            DirtyLog::map(&devnull, 8, 0),
            Err(LogError::Map(MapError::NotRegular))
        ));
        // An offset inside a page: the log starts there.
        let log = DirtyLog::map(&f, 8, 100).unwrap();
        assert_eq!(log.pages(), 64);
        log.mark(0, 1);
        log.mark(63 * P, 1);
        let all = contents(&f, 0, 4096);
        assert_eq!((all[100], all[107]), (1, 0x80));
        assert_eq!(all.iter().filter(|&&b| b != 0).count(), 2);
    }

    #[test]
    fn concurrent_marks_lose_no_bit_while_the_frontend_clears() {
        const SIZE: u64 = 64 << 10;
        let f = file_of(SIZE);
        let ours = Arc::new(DirtyLog::map(&f, SIZE, 0).unwrap());
        // The frontend's own mapping of the same file.
        let theirs = DirtyLog::map(&f, SIZE, 0).unwrap();
        let pages = ours.pages();
        // A lost update needs the two threads on one byte at once: give it several chances.
        for round in 0..10 {
            let start = Arc::new(std::sync::Barrier::new(3));
            let markers: Vec<_> = (0..2)
                .map(|parity| {
                    let (log, start) = (Arc::clone(&ours), Arc::clone(&start));
                    std::thread::spawn(move || {
                        start.wait();
                        // Side by side, the two threads' pages share every byte.
                        for page in (parity..pages).step_by(2) {
                            log.mark(page * P, 1);
                        }
                    })
                })
                .collect();
            // The frontend takes bits as they come, like QEMU's log sync (atomic exchange).
            let mut taken = vec![0u8; SIZE as usize];
            start.wait();
            while !markers.iter().all(|m| m.is_finished()) {
                for (t, b) in taken.iter_mut().zip(theirs.map.bytes()).step_by(61) {
                    *t |= b.swap(0, Ordering::AcqRel);
                }
            }
            for m in markers {
                m.join().unwrap();
            }
            for (t, b) in taken.iter_mut().zip(theirs.map.bytes()) {
                *t |= b.swap(0, Ordering::AcqRel);
            }
            let lost = taken.iter().map(|b| b.count_zeros()).sum::<u32>();
            assert_eq!(lost, 0, "round {round}: {lost} pages lost their mark");
        }
    }

    proptest! {
        /// Whole bytes at a time marks the same bits as the spec's page-by-page loop.
        #[test]
        fn marks_what_the_spec_loop_marks(
            ranges in proptest::collection::vec((0u64..140 * P, 0u64..40 * P), 1..8),
        ) {
            let (f, log) = log_of(16);
            let mut expect = vec![0u8; 16];
            for &(gpa, len) in &ranges {
                log.mark(gpa, len);
                reference(&mut expect, gpa, len);
            }
            prop_assert_eq!(contents(&f, 0, 16), expect);
        }
    }
}
