//! Walks a split-ring descriptor chain with exactly the rules of virtio-queue's
//! `DescriptorChain` (the same descriptors, the same place to stop), but reads the descriptor
//! table through one mapping of it instead of translating each descriptor's guest address
//! through vm-memory's generic path, which was about a tenth of a worker's time at 4 KiB QD 32.
//!
//! Wire format only: what the descriptors mean is `request::parse`'s business.

use std::mem::size_of;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, VolatileSlice};

use super::guest;
use super::guest::{GuestMem, GuestMemView, HostRange};

const DESC_SIZE: u64 = size_of::<Descriptor>() as u64;

/// The descriptors of one chain, in order.
pub struct Chain<'m> {
    mem: &'m GuestMem,
    table_addr: GuestAddress,
    /// The whole current table, when it lies in one memory region; else each descriptor is
    /// read on its own (as `DescriptorChain` always does).
    table: Option<VolatileSlice<'m, ()>>,
    size: u16,
    next: u16,
    ttl: u16,
    yielded_bytes: u32,
    indirect: bool,
}

/// Where a queue's descriptor table lies in the host, found once for many chains (the lookup
/// cost about 50 instructions per chain). It keeps its own view of the memory table it was
/// found in, so the chains it walks ([`TableMap::chain`]) borrow memory that stays mapped.
pub struct TableMap {
    mem: GuestMemView,
    addr: GuestAddress,
    size: u16,
    /// The table's host address and length in `mem`, when it lies in one region.
    host: Option<(*mut u8, usize)>,
}

impl TableMap {
    /// The table of `size` descriptors at `addr` in `mem`.
    pub fn new(mem: GuestMemView, addr: GuestAddress, size: u16) -> TableMap {
        let host = map(&mem, addr, size).map(|r| (r.as_ptr(), r.len()));
        TableMap {
            mem,
            addr,
            size,
            host,
        }
    }

    /// Whether this is the table of `size` descriptors at `addr`.
    pub fn is(&self, addr: GuestAddress, size: u16) -> bool {
        self.addr == addr && self.size == size
    }

    /// The chain starting at `head`, walked in the map's memory table.
    pub fn chain(&self, head: u16) -> Chain<'_> {
        Chain {
            mem: &self.mem,
            table_addr: self.addr,
            // SAFETY: `host` was found in one region of `self.mem`, which this map keeps mapped
            // for as long as it is borrowed.
            table: self
                .host
                .map(|(p, len)| unsafe { VolatileSlice::new(p, len) }),
            size: self.size,
            next: head,
            ttl: self.size,
            yielded_bytes: 0,
            indirect: false,
        }
    }
}

impl<'m> Chain<'m> {
    /// The chain starting at `head` in the descriptor table at `table` of a queue of `size`.
    pub fn new(mem: &'m GuestMem, table: GuestAddress, size: u16, head: u16) -> Chain<'m> {
        Chain {
            mem,
            table_addr: table,
            table: map(mem, table, size).map(|r| r.slice()),
            size,
            next: head,
            ttl: size,
            yielded_bytes: 0,
            indirect: false,
        }
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        let offset = u64::from(index) * DESC_SIZE;
        let [addr, rest] = match &self.table {
            Some(t) => guest::read16(t, offset as usize)?,
            None => guest::read16_at(
                self.mem,
                self.table_addr.0.checked_add(offset).map(GuestAddress)?,
            )?,
        };
        // struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next.
        Some(Descriptor::new(
            addr,
            rest as u32,
            (rest >> 32) as u16,
            (rest >> 48) as u16,
        ))
    }

    /// Follows an indirect descriptor: once per chain, a table of whole descriptors of at
    /// most 2^16 entries (VIRTIO 1.2, 2.7.5.3.1), or the walk ends.
    fn enter_indirect(&mut self, d: &Descriptor) -> Option<()> {
        if self.indirect || u64::from(d.len()) % DESC_SIZE != 0 {
            return None;
        }
        let size = u16::try_from(u64::from(d.len()) / DESC_SIZE).ok()?;
        self.table_addr = d.addr();
        self.table = map(self.mem, self.table_addr, size).map(|r| r.slice());
        self.size = size;
        self.next = 0;
        self.ttl = size;
        self.indirect = true;
        Some(())
    }
}

/// The table of `size` descriptors at `addr`, when it is in one region.
fn map(mem: &GuestMem, addr: GuestAddress, size: u16) -> Option<HostRange<'_>> {
    let len = u64::from(size) * DESC_SIZE;
    if len == 0 {
        return None;
    }
    guest::host_range(mem, addr, len)
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let d = self.read(self.next)?;
            if u32::from(d.flags()) & VRING_DESC_F_INDIRECT != 0 {
                self.enter_indirect(&d)?;
                continue;
            }
            // A chain longer than 2^32 bytes is illegal (VIRTIO 1.2, 2.7.5.2): stop there.
            self.yielded_bytes = self.yielded_bytes.checked_add(d.len())?;
            if u32::from(d.flags()) & VRING_DESC_F_NEXT != 0 {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    const QSIZE: u16 = 16;
    /// Where indirect tables go in the tests' guest memory.
    const INDIRECT: u64 = 0x8000;

    fn raw(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// Descriptors of any shape: loops, chains running off the table, indirect tables that
    /// are nested, ragged, empty or partly outside guest memory.
    fn desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        let flags = prop_oneof![
            Just(0u16),
            Just(1),
            Just(2),
            Just(3),
            Just(4),
            Just(5),
            0u16..8
        ];
        let addr = prop_oneof![
            Just(INDIRECT),
            Just(INDIRECT + 0x100),
            Just(0xfff0u64),
            0u64..0x11000
        ];
        let len = prop_oneof![
            Just(16u32),
            Just(48),
            Just(64),
            Just(0),
            Just(0x8000_0000),
            Just(u32::MAX),
            0u32..0x200
        ];
        (addr, len, flags, 0u16..20)
    }

    /// An indirect table whose first entry is the last 16 bytes of guest memory and whose
    /// chain goes on past them: the walk yields that entry and stops where memory ends, as
    /// virtio-queue's does, instead of reading what lies beyond the region.
    #[test]
    fn stops_at_an_indirect_table_running_off_memory() {
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
        let head = Descriptor::new(0xfff0, 48, VRING_DESC_F_INDIRECT as u16, 0);
        mock.desc_table().store(0, head.into()).unwrap();
        let first = Descriptor::new(0x100, 512, VRING_DESC_F_NEXT as u16, 1);
        mem.write_obj(first, GuestAddress(0xfff0)).unwrap();
        mock.avail().ring().ref_at(0).unwrap().store(0);
        mock.avail().idx().store(u16::to_le(1));
        let mut q = mock.create_queue::<virtio_queue::Queue>().unwrap();
        let theirs: Vec<_> = q
            .iter(&mem)
            .unwrap()
            .next()
            .unwrap()
            .map(|d| raw(&d))
            .collect();
        let ours: Vec<_> = Chain::new(&mem, GuestAddress(q.desc_table()), q.size(), 0)
            .map(|d| raw(&d))
            .collect();
        assert_eq!(ours, theirs);
        assert_eq!(ours, vec![(0x100, 512, VRING_DESC_F_NEXT as u16, 1)]);
    }

    proptest! {
        /// The walk yields exactly what virtio-queue's DescriptorChain yields.
        #[test]
        fn walks_like_descriptor_chain(
            table in proptest::collection::vec(desc(), QSIZE as usize),
            indirect in proptest::collection::vec(desc(), 8),
            head in 0u16..QSIZE,
        ) {
            let mem: GuestMem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let mock = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
            for (i, &(a, l, f, n)) in table.iter().enumerate() {
                mock.desc_table()
                    .store(i as u16, Descriptor::new(a, l, f, n).into())
                    .unwrap();
            }
            for (i, &(a, l, f, n)) in indirect.iter().enumerate() {
                let d = Descriptor::new(a, l, f, n);
                mem.write_obj(d, GuestAddress(INDIRECT + i as u64 * DESC_SIZE)).unwrap();
            }
            mock.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
            mock.avail().idx().store(u16::to_le(1));
            let mut q = mock.create_queue::<virtio_queue::Queue>().unwrap();
            let theirs: Vec<_> = q.iter(&mem).unwrap().next().unwrap().map(|d| raw(&d)).collect();
            let ours: Vec<_> = Chain::new(&mem, GuestAddress(q.desc_table()), q.size(), head)
                .map(|d| raw(&d))
                .collect();
            let view = GuestMemoryAtomic::new(mem.clone()).memory();
            let map = TableMap::new(view, GuestAddress(q.desc_table()), q.size());
            let mapped: Vec<_> = map.chain(head).map(|d| raw(&d)).collect();
            prop_assert_eq!(&ours, &theirs);
            prop_assert_eq!(mapped, theirs);
        }
    }
}
