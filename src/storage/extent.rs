//! Where a request's bytes live, as the block stack describes it to an engine: a list of
//! typed extents, and the per-I/O data the layers keep until `end_io`.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::inline_vec::InlineVec;

/// Bytes a layer keeps in memory (a copy of what it stores elsewhere, say), handed out as
/// [`Source::Memory`] extents of read mappings.
pub trait MemoryExtent: Sync {
    /// Copies the bytes from `offset` on (the extent's own offset) into `iov`, as many as the
    /// iovecs hold. False, with part of them perhaps copied, when they are no longer all held:
    /// the engine then carries the request out through `readv`.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes of its length.
    unsafe fn copy_to(&self, offset: u64, iov: &[libc::iovec]) -> bool;
}

/// Where the bytes of an [`Extent`] are.
#[derive(Clone, Copy, Default)]
pub enum Source<'a> {
    /// At `offset` in a file or block device. O_DIRECT files need buffers, offsets and
    /// lengths aligned to `align` (1 for none).
    File {
        fd: BorrowedFd<'a>,
        offset: u64,
        align: u64,
    },
    /// Nowhere (the null target): reads give zeros, writes are dropped, nothing ever waits.
    #[default]
    Zeros,
    /// In memory a layer keeps, read with [`MemoryExtent::copy_to`] at `offset`; only in read
    /// mappings.
    Memory {
        from: &'a dyn MemoryExtent,
        offset: u64,
    },
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { fd, offset, align } => f
                .debug_struct("File")
                .field("fd", &fd.as_raw_fd())
                .field("offset", offset)
                .field("align", align)
                .finish(),
            Source::Zeros => f.write_str("Zeros"),
            Source::Memory { offset, .. } => {
                f.debug_struct("Memory").field("offset", offset).finish()
            }
        }
    }
}

impl PartialEq for Source<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Source::File { fd, offset, align },
                Source::File {
                    fd: fd2,
                    offset: offset2,
                    align: align2,
                },
            ) => fd.as_raw_fd() == fd2.as_raw_fd() && offset == offset2 && align == align2,
            (Source::Zeros, Source::Zeros) => true,
            (
                Source::Memory { from, offset },
                Source::Memory {
                    from: from2,
                    offset: offset2,
                },
            ) => same_object(*from, *from2) && offset == offset2,
            _ => false,
        }
    }
}

fn same_object(a: &dyn MemoryExtent, b: &dyn MemoryExtent) -> bool {
    std::ptr::addr_eq(a as *const dyn MemoryExtent, b as *const dyn MemoryExtent)
}

/// `len` bytes of a request, from its byte `at`, live at `source`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Extent<'a> {
    pub at: u64,
    pub len: u64,
    pub source: Source<'a>,
}

impl<'a> Extent<'a> {
    /// Takes `next` into this extent when it continues it, both in the request and in its
    /// source (neighbouring blocks in neighbouring places: one run instead of two).
    pub fn absorb(&mut self, next: &Extent<'a>) -> bool {
        if self.at + self.len != next.at {
            return false;
        }
        let continues = match (&self.source, &next.source) {
            (
                Source::File { fd, offset, align },
                Source::File {
                    fd: fd2,
                    offset: offset2,
                    align: align2,
                },
            ) => {
                fd.as_raw_fd() == fd2.as_raw_fd()
                    && offset + self.len == *offset2
                    && align == align2
            }
            (Source::Zeros, Source::Zeros) => true,
            (
                Source::Memory { from, offset },
                Source::Memory {
                    from: from2,
                    offset: offset2,
                },
            ) => same_object(*from, *from2) && offset + self.len == *offset2,
            _ => false,
        };
        if continues {
            self.len += next.len;
        }
        continues
    }
}

/// What the layers keep of one mapping until its `end_io`: device-mapper's per-bio data. Each
/// layer that asks gets one word, found again by the layer itself (its address is the key),
/// so layers need not agree on anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerIo {
    kept: [(usize, u64); 2],
    len: usize,
}

impl PerIo {
    fn key<L: ?Sized>(layer: &L) -> usize {
        (layer as *const L).cast::<()>() as usize
    }

    /// Keeps `word` for `layer`; a layer mapped several times for one request keeps the word
    /// it kept first. False when there is no room left (the layer must then refuse the map).
    pub fn keep<L: ?Sized>(&mut self, layer: &L, word: u64) -> bool {
        let key = Self::key(layer);
        if self.get(layer).is_some() {
            return true;
        }
        match self.kept.get_mut(self.len) {
            Some(slot) => {
                *slot = (key, word);
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// The word `layer` kept.
    pub fn get<L: ?Sized>(&self, layer: &L) -> Option<u64> {
        let key = Self::key(layer);
        self.kept[..self.len]
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, w)| *w)
    }
}

/// A request's extents, in the order the engine runs them, and the layers' per-I/O data.
/// Nearly every request is one extent: a few are kept without allocating.
#[derive(Default)]
pub struct Mapping<'a> {
    extents: InlineVec<Extent<'a>, 4>,
    per_io: PerIo,
}

impl<'a> Mapping<'a> {
    pub fn push(&mut self, e: Extent<'a>) {
        self.extents.push(e);
    }

    pub fn extents(&self) -> &[Extent<'a>] {
        &self.extents
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Drops the extents from the `len`th on (a layer taking back what it started).
    pub fn truncate(&mut self, len: usize) {
        self.extents.truncate(len);
    }

    /// Empties the mapping for another pass.
    pub fn clear(&mut self) {
        self.extents.clear();
        self.per_io = PerIo::default();
    }

    pub fn per_io(&self) -> &PerIo {
        &self.per_io
    }

    pub fn per_io_mut(&mut self) -> &mut PerIo {
        &mut self.per_io
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not zero-sized: two of them must have two addresses.
    struct Held(#[allow(dead_code)] u8);
    impl MemoryExtent for Held {
        unsafe fn copy_to(&self, _offset: u64, _iov: &[libc::iovec]) -> bool {
            true
        }
    }

    #[test]
    fn neighbouring_runs_merge_others_do_not() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&f);
        let file = |at, offset| Extent {
            at,
            len: 512,
            source: Source::File {
                fd,
                offset,
                align: 1,
            },
        };
        let mut a = file(0, 4096);
        assert!(a.absorb(&file(512, 4608)));
        assert_eq!(a.len, 1024);
        assert!(!a.absorb(&file(1024, 8192)), "not next in the file");
        assert!(!a.absorb(&file(2048, 5120)), "not next in the request");
        let (h1, h2) = (Held(1), Held(2));
        let mem = |from: &'static Held, at, offset| Extent {
            at,
            len: 512,
            source: Source::Memory { from, offset },
        };
        let h1: &'static Held = Box::leak(Box::new(h1));
        let h2: &'static Held = Box::leak(Box::new(h2));
        let mut m = mem(h1, 0, 0);
        assert!(!m.absorb(&file(512, 512)), "another kind of source");
        assert!(!m.absorb(&mem(h2, 512, 512)), "another holder");
        assert!(m.absorb(&mem(h1, 512, 512)));
    }

    #[test]
    fn each_layer_finds_its_own_word() {
        let (a, b, c) = (1u8, 2u16, 3u32);
        let mut p = PerIo::default();
        assert!(p.keep(&a, 10));
        assert!(p.keep(&b, 20));
        assert!(p.keep(&a, 11), "a layer mapped twice keeps its first word");
        assert_eq!(
            (p.get(&a), p.get(&b), p.get(&c)),
            (Some(10), Some(20), None)
        );
        assert!(!p.keep(&c, 30), "full");
    }
}
