//! Small reads and range checks of guest memory on the request path, cheaper than vm-memory's
//! generic ones: every request reads a 16-byte descriptor or two and a 16-byte header, and
//! checks each of its buffers, and the generic path (a slice iterator per call, a `memcpy` call
//! per copy) was about a tenth of a worker's time under the null engine. Same answers as the
//! generic path; it stays the fallback for what the fast path does not cover.

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileSlice,
};

/// Guest memory as the vhost-user frontend shares it (no dirty-page bitmap: we do not offer
/// LOG_ALL, so migration logging never applies).
pub type GuestMem = GuestMemoryMmap<()>;

/// A view of guest memory as it was when loaded: keeps every region of that memory table mapped
/// while it lives, whatever the frontend changes meanwhile.
pub type GuestMemView = vm_memory::GuestMemoryLoadGuard<GuestMem>;

/// The 16 bytes at `offset` of `slice`, as two little-endian 64-bit words.
pub fn read16(slice: &VolatileSlice<'_, ()>, offset: usize) -> Option<[u64; 2]> {
    let sub = slice.subslice(offset, 16).ok()?;
    let guard = sub.ptr_guard();
    // SAFETY: `subslice` checked that the 16 bytes lie inside `slice`, which maps guest memory
    // for its lifetime.
    Some(unsafe { read16_raw(guard.as_ptr()) })
}

/// The 16 bytes at `p` as two little-endian 64-bit words, each read once.
///
/// # Safety
/// The 16 bytes at `p` are mapped guest memory for the duration of the call.
unsafe fn read16_raw(p: *const u8) -> [u64; 2] {
    if (p as usize).is_multiple_of(8) {
        // SAFETY: per the contract; the pointer is 8-aligned. Volatile: the guest may write
        // them at any time, and we read each word once.
        let (lo, hi) = unsafe {
            (
                ptr::read_volatile(p.cast::<u64>()),
                ptr::read_volatile(p.add(8).cast::<u64>()),
            )
        };
        [u64::from_le(lo), u64::from_le(hi)]
    } else {
        // A misaligned header: libblkio packs its request headers 33 bytes apart, so most of
        // its headers are. vm-memory copies such a read with a `memcpy` call; a fixed-size
        // copy is the same copy, inlined as two unaligned loads.
        let mut raw = [0u8; 16];
        // SAFETY: per the contract; `raw` is a local of 16 bytes.
        unsafe { ptr::copy_nonoverlapping(p, raw.as_mut_ptr(), 16) };
        words(raw)
    }
}

/// 16 bytes as two little-endian 64-bit words.
fn words(raw: [u8; 16]) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&raw[..8]);
    hi.copy_from_slice(&raw[8..]);
    [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
}

/// The 16 bytes of guest memory at `addr` (see [`read16`]); `None` if any lies outside it.
pub fn read16_at(mem: &GuestMem, addr: GuestAddress) -> Option<[u64; 2]> {
    match host_range(mem, addr, 16) {
        // SAFETY: `host_range` checked that the 16 bytes lie in one region, which stays mapped
        // while `mem` is borrowed.
        Some(r) => Some(unsafe { read16_raw(r.as_ptr()) }),
        // Across two regions, or outside memory: the generic copy tells which.
        None => {
            let mut raw = [0u8; 16];
            mem.read_slice(&mut raw, addr).ok()?;
            Some(words(raw))
        }
    }
}

/// Stores the byte `v` at `addr` (a request's status byte, once per request): one region
/// lookup, where vm-memory's `write_obj` walks its slice iterator. Relaxed: the used index is
/// stored with release ordering after it. False outside memory.
pub fn store_u8(mem: &GuestMem, addr: GuestAddress, v: u8) -> bool {
    let Some(p) = host_range(mem, addr, 1).map(|r| r.as_ptr()) else {
        return false;
    };
    // SAFETY: `host_range` checked that the byte lies in a region, which stays mapped while `mem`
    // is borrowed. Atomic, as vm-memory's `store`: the driver may touch it at any time.
    unsafe { AtomicU8::from_ptr(p) }.store(v, Ordering::Relaxed);
    true
}

/// The 16-bit little-endian field at `addr`, loaded atomically with `order` (the rings'
/// indexes and event fields, read once or twice per request): one region lookup, where
/// vm-memory's `load` walks its slice iterator. `None` where vm-memory's `load` fails too
/// (outside memory, misaligned).
pub fn load_u16(mem: &GuestMem, addr: GuestAddress, order: Ordering) -> Option<u16> {
    let p = host_range(mem, addr, 2)?.as_ptr();
    if !(p as usize).is_multiple_of(2) {
        return None;
    }
    // SAFETY: `host_range` checked that both bytes lie in one region, which stays mapped while
    // `mem` is borrowed; the pointer is 2-aligned. Atomic: the driver writes the field at any
    // time.
    let v = unsafe { AtomicU16::from_ptr(p.cast()) }.load(order);
    Some(u16::from_le(v))
}

/// `len` bytes of guest memory that lie in one region, mapped at `ptr` for as long as the
/// memory table `'m` borrows is.
#[derive(Debug, Clone, Copy)]
pub struct HostRange<'m> {
    ptr: *mut u8,
    len: usize,
    _mem: PhantomData<&'m GuestMem>,
}

impl<'m> HostRange<'m> {
    /// The first byte's host address; the range's bytes stay mapped for `'m`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The range as a volatile slice (the guest may write it at any time).
    pub fn slice(&self) -> VolatileSlice<'m, ()> {
        // SAFETY: `host_range` found the `len` bytes at `ptr` in one region of the memory table
        // borrowed for `'m`, which keeps them mapped that long.
        unsafe { VolatileSlice::new(self.ptr, self.len) }
    }
}

/// The `len` bytes at `addr`, when they lie in one region: one region lookup and a bounds
/// check, where vm-memory's `Bytes` methods build a slice and check it again (about a hundred
/// instructions per call, several calls per request). The one lookup the request path uses to
/// turn a guest range into a host pointer (headers, ring fields, the descriptor table, the used
/// ring).
pub fn host_range(mem: &GuestMem, addr: GuestAddress, len: u64) -> Option<HostRange<'_>> {
    let region = mem.find_region(addr)?;
    let at = addr.0 - region.start_addr().0;
    if at.checked_add(len)? > region.len() {
        return None;
    }
    let ptr = region.get_host_address(MemoryRegionAddress(at)).ok()?;
    Some(HostRange {
        ptr,
        len: usize::try_from(len).ok()?,
        _mem: PhantomData,
    })
}

/// Whether the `len` bytes at `addr` are all guest memory. One region lookup for a range
/// inside one region (nearly every buffer); ranges across regions go the generic way.
pub fn in_memory(mem: &GuestMem, addr: GuestAddress, len: u64) -> bool {
    len == 0
        || host_range(mem, addr, len).is_some()
        || usize::try_from(len).is_ok_and(|len| GuestMemoryBackend::check_range(mem, addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::GuestMemoryMmap;

    /// Two regions with a hole between them, so ranges can cross a boundary or fall in a gap.
    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x2000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap()
    }

    fn generic16(mem: &GuestMem, addr: u64) -> Option<[u64; 2]> {
        let raw: [u8; 16] = mem.read_obj(GuestAddress(addr)).ok()?;
        Some([
            u64::from_le_bytes(raw[..8].try_into().unwrap()),
            u64::from_le_bytes(raw[8..].try_into().unwrap()),
        ])
    }

    proptest! {
        /// Aligned or not, inside a region, across two, or partly outside memory: the fast read
        /// returns what vm-memory's copy returns.
        #[test]
        fn read16_at_reads_like_read_obj(addr in 0u64..0x5010, seed in any::<u64>()) {
            let mem = mem();
            for a in (0..0x5000u64).step_by(8) {
                let _ = mem.write_obj(seed.wrapping_mul(a | 1), GuestAddress(a));
            }
            prop_assert_eq!(read16_at(&mem, GuestAddress(addr)), generic16(&mem, addr));
        }

        /// The fast load reads what vm-memory's does, and fails where it fails.
        #[test]
        fn load_u16_loads_like_vm_memory(addr in 0u64..0x5010, seed in any::<u64>()) {
            let mem = mem();
            for a in (0..0x5000u64).step_by(8) {
                let _ = mem.write_obj(seed.wrapping_mul(a | 1), GuestAddress(a));
            }
            let generic = mem.load::<u16>(GuestAddress(addr), Ordering::Acquire).ok().map(u16::from_le);
            prop_assert_eq!(load_u16(&mem, GuestAddress(addr), Ordering::Acquire), generic);
        }

        /// A range's host address is the one vm-memory's `get_slice` maps, for exactly the
        /// ranges inside one region.
        #[test]
        fn host_range_maps_like_get_slice(addr in 0u64..0x5100, len in 1u64..0x3000) {
            let mem = mem();
            let theirs = mem
                .get_slice(GuestAddress(addr), len as usize)
                .ok()
                .map(|s| s.ptr_guard_mut().as_ptr());
            prop_assert_eq!(host_range(&mem, GuestAddress(addr), len).map(|r| r.as_ptr()), theirs);
        }

        /// The fast store writes where vm-memory's `write_obj` writes, and fails where it fails.
        #[test]
        fn store_u8_stores_like_write_obj(addr in 0u64..0x5010, v in any::<u8>()) {
            let (ours, theirs) = (mem(), mem());
            let stored = store_u8(&ours, GuestAddress(addr), v);
            prop_assert_eq!(stored, theirs.write_obj(v, GuestAddress(addr)).is_ok());
            let at = GuestAddress(addr);
            prop_assert_eq!(ours.read_obj::<u8>(at).ok(), theirs.read_obj::<u8>(at).ok());
        }

        /// The fast range check agrees with vm-memory's, at every boundary.
        #[test]
        fn in_memory_agrees_with_check_range(addr in 0u64..0x5100, len in 0u64..0x3000) {
            let mem = mem();
            let generic = len == 0
                || GuestMemoryBackend::check_range(&mem, GuestAddress(addr), len as usize);
            prop_assert_eq!(in_memory(&mem, GuestAddress(addr), len), generic);
        }
    }

    /// The reads that end at or cross a region's end, every one of them (the property test
    /// draws few): into the next region, into a hole, past the end of memory.
    #[test]
    fn read16_at_reads_like_read_obj_at_every_region_end() {
        let mem = mem();
        for a in (0..0x5000u64).step_by(8) {
            // The hole at 0x3000..0x4000 refuses the write; it stays unmapped.
            let _ = mem.write_obj(
                0x0123_4567_89ab_cdefu64.wrapping_mul(a | 1),
                GuestAddress(a),
            );
        }
        for end in [0x2000u64, 0x3000, 0x5000] {
            for addr in end - 16..end + 1 {
                assert_eq!(
                    read16_at(&mem, GuestAddress(addr)),
                    generic16(&mem, addr),
                    "at {addr:#x}"
                );
            }
        }
    }

    #[test]
    fn host_range_ends_at_the_last_byte_of_its_region() {
        let mem = mem();
        for (start, end) in [(0u64, 0x2000u64), (0x2000, 0x3000), (0x4000, 0x5000)] {
            for addr in [start, end - 0x10, end - 1] {
                assert!(host_range(&mem, GuestAddress(addr), end - addr).is_some());
                assert!(host_range(&mem, GuestAddress(addr), end - addr + 1).is_none());
            }
        }
    }

    #[test]
    fn in_memory_ends_at_the_last_byte_of_memory() {
        let mem = mem();
        // Up to the last byte before the hole and before the end of memory, and one past.
        assert!(in_memory(&mem, GuestAddress(0x2800), 0x800));
        assert!(!in_memory(&mem, GuestAddress(0x2800), 0x801));
        assert!(in_memory(&mem, GuestAddress(0x4000), 0x1000));
        assert!(!in_memory(&mem, GuestAddress(0x4fff), 2));
        // Across the boundary of two adjacent regions.
        assert!(in_memory(&mem, GuestAddress(0x1ff8), 0x10));
    }

    #[test]
    fn in_memory_survives_huge_ranges() {
        let mem = mem();
        assert!(!in_memory(&mem, GuestAddress(0x1000), u64::MAX));
        assert!(!in_memory(&mem, GuestAddress(u64::MAX), 2));
    }

    #[test]
    fn read16_reads_within_a_slice_only() {
        let mem = mem();
        mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x10))
            .unwrap();
        let s = mem.get_slice(GuestAddress(0), 0x20).unwrap();
        assert_eq!(read16(&s, 0x10).map(|w| w[0]), Some(0x1122_3344_5566_7788));
        assert_eq!(read16(&s, 0x11), None);
        assert_eq!(read16(&s, usize::MAX), None);
    }
}
