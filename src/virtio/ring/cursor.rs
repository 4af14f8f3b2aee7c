//! What a queue's worker knows of the avail ring between two pops while it takes a run of
//! entries: see [`Cursor`].

use std::num::Wrapping;

use vm_memory::GuestAddress;

use super::chain::TableMap;
use super::guest::GuestMemView;

/// What `pop_available` knows of the avail ring between two pops: the avail index it read
/// last, and the memory table it loaded after that read, which holds the buffers of every
/// entry before that index. Chains up to it are popped without reading the index or loading
/// the table again: per chain, those showed in profiles of the null engine.
#[derive(Default)]
pub struct Cursor {
    seen: Option<Seen>,
}

struct Seen {
    /// The queue's run (`QueueCtl`) it was seen in: a ring stopped and started again may have
    /// a new memory table, even at the same index.
    run: u64,
    avail: Wrapping<u16>,
    /// The queue's next avail index we expect: anything else (a reset, another popper) and
    /// what was seen no longer applies.
    next: Wrapping<u16>,
    mem: GuestMemView,
    /// The descriptor table found in `mem`, for the chains popped with it.
    table: Option<TableMap>,
}

impl Cursor {
    /// The memory table to pop the entry at `next` with, if that entry was seen already.
    pub fn ahead(&self, run: u64, next: Wrapping<u16>) -> Option<GuestMemView> {
        let seen = self.seen.as_ref()?;
        (seen.run == run && seen.next == next && seen.avail != next).then(|| seen.mem.clone())
    }

    /// The avail index now reads `avail` with the queue at `next` in run `run`, and `mem` was
    /// loaded after that read.
    pub fn saw(
        &mut self,
        run: u64,
        avail: Wrapping<u16>,
        next: Wrapping<u16>,
        mem: GuestMemView,
    ) -> GuestMemView {
        let out = mem.clone();
        self.seen = Some(Seen {
            run,
            avail,
            next,
            mem,
            table: None,
        });
        out
    }

    /// The descriptor table of `size` entries at `addr`, found in the memory table that
    /// `ahead` or `saw` returned last (None if neither did).
    pub fn table(&mut self, addr: GuestAddress, size: u16) -> Option<&TableMap> {
        let seen = self.seen.as_mut()?;
        if !seen.table.as_ref().is_some_and(|t| t.is(addr, size)) {
            seen.table = Some(TableMap::new(seen.mem.clone(), addr, size));
        }
        seen.table.as_ref()
    }

    /// The entry at `at` was popped.
    pub fn took(&mut self, at: Wrapping<u16>) {
        if let Some(seen) = &mut self.seen {
            seen.next = at + Wrapping(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::guest::GuestMem;
    use super::*;
    use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    fn table() -> GuestMemView {
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        GuestMemoryAtomic::new(mem).memory()
    }

    #[test]
    fn entries_before_the_seen_index_need_no_new_look() {
        let mut c = Cursor::default();
        assert!(c.ahead(1, Wrapping(5)).is_none(), "nothing seen yet");
        c.saw(1, Wrapping(8), Wrapping(5), table());
        c.took(Wrapping(5));
        for at in 6..8 {
            assert!(c.ahead(1, Wrapping(at)).is_some(), "entry {at} was seen");
            c.took(Wrapping(at));
        }
        assert!(
            c.ahead(1, Wrapping(8)).is_none(),
            "caught up: read the index again"
        );
    }

    #[test]
    fn the_index_wraps() {
        let mut c = Cursor::default();
        c.saw(1, Wrapping(2), Wrapping(u16::MAX), table());
        c.took(Wrapping(u16::MAX));
        assert!(c.ahead(1, Wrapping(0)).is_some());
        c.took(Wrapping(0));
        assert!(c.ahead(1, Wrapping(1)).is_some());
    }

    #[test]
    fn the_descriptor_table_is_found_in_the_memory_table_seen_last() {
        let mut c = Cursor::default();
        assert!(
            c.table(GuestAddress(0), 16).is_none(),
            "no memory table yet"
        );
        c.saw(1, Wrapping(4), Wrapping(0), table());
        let t = c.table(GuestAddress(0x100), 16).expect("seen");
        assert!(t.is(GuestAddress(0x100), 16));
        // Another table (a queue set up anew) is looked up, not taken from the cache.
        let u = c.table(GuestAddress(0x200), 8).expect("seen");
        assert!(u.is(GuestAddress(0x200), 8) && !u.is(GuestAddress(0x100), 16));
    }

    #[test]
    fn a_moved_queue_or_a_new_run_forgets_what_was_seen() {
        let mut c = Cursor::default();
        c.saw(1, Wrapping(10), Wrapping(0), table());
        c.took(Wrapping(0));
        // Someone else moved the queue, or it was reset to another index.
        assert!(c.ahead(1, Wrapping(3)).is_none());
        // Stopped and started again at the same index: the memory table may be new.
        assert!(c.ahead(2, Wrapping(1)).is_none());
        assert!(c.ahead(1, Wrapping(1)).is_some());
    }
}
