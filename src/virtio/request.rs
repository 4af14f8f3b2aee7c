//! Walks a descriptor chain and turns it into a typed, validated [`Request`].
//!
//! The chain is not assumed to follow Linux's framing (header, data, status in separate
//! descriptors): virtio 1.x lets a driver split or merge them freely, so the header is the first
//! 16 device-readable bytes, the status is the last byte of the chain, and everything between is
//! data. Parsing never does I/O; every address it hands on has been checked against guest memory.

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::ring::guest::{self, in_memory, GuestMem};
use super::{Status, SECTOR_SHIFT};
use crate::inline_vec::InlineVec;

const HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`.
const RANGE_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

impl RequestType {
    pub fn name(self) -> &'static str {
        match self {
            RequestType::In => "read",
            RequestType::Out => "write",
            RequestType::Flush => "flush",
            RequestType::GetId => "get-id",
            RequestType::Discard => "discard",
            RequestType::WriteZeroes => "write-zeroes",
        }
    }

    pub fn changes_data(self) -> bool {
        matches!(
            self,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    }
}

/// A piece of guest memory, already checked to lie inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataSegment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The data buffers of a request, in chain order (nearly every request has one).
pub type Segments = InlineVec<DataSegment, 2>;

/// One entry of a DISCARD or WRITE_ZEROES payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
    pub unmap: bool,
}

impl SectorRange {
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }
    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) << SECTOR_SHIFT
    }
    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Guest buffers between header and status, in chain order.
    pub data: Segments,
    pub data_len: u64,
    /// Parsed payload of DISCARD and WRITE_ZEROES.
    pub ranges: Vec<SectorRange>,
    pub status_addr: GuestAddress,
}

impl Request {
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }
}

/// What the device is, as far as validating a request goes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub block_size: u32,
    pub readonly: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("descriptor chain ends in a descriptor with NEXT set (a loop, a bad indirect table, or a descriptor table entry outside guest memory)")]
    BrokenChain,
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("descriptor {addr:#x}+{len} lies outside guest memory")]
    BadAddress { addr: u64, len: u64 },
    #[error("request header is {0} device-readable bytes, it needs 16")]
    ShortHeader(usize),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("{0} request carries no data")]
    NoData(&'static str),
    #[error("{kind} data has the wrong direction (device-{found} buffer)")]
    WrongDirection {
        kind: &'static str,
        found: &'static str,
    },
    #[error("{kind} of {len} bytes at sector {sector} is not aligned to the {block_size}-byte block size")]
    Unaligned {
        kind: &'static str,
        sector: u64,
        len: u64,
        block_size: u32,
    },
    #[error("sectors {start}..{end} reach past the capacity of {capacity} sectors")]
    OutOfRange { start: u64, end: u64, capacity: u64 },
    #[error("{0} on a read-only device")]
    ReadOnly(&'static str),
    #[error("{kind} payload of {len} bytes is not a whole number of 16-byte ranges")]
    BadRangePayload { kind: &'static str, len: u64 },
    #[error("{kind} has {count} ranges, the device allows {max}")]
    TooManyRanges {
        kind: &'static str,
        count: usize,
        max: u32,
    },
    #[error("{kind} range of {num} sectors is longer than the device's limit of {max}")]
    RangeTooLong {
        kind: &'static str,
        num: u32,
        max: u32,
    },
    #[error("{kind} range has unsupported flags {flags:#x}")]
    BadFlags { kind: &'static str, flags: u32 },
}

impl RequestError {
    /// The status byte the virtio spec asks for.
    pub fn status(&self) -> Status {
        match self {
            RequestError::Unsupported(_) | RequestError::BadFlags { .. } => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// A chain that could not become a [`Request`]. `status_addr` is where its status byte goes;
/// `None` when the chain has no usable status byte, so it can only be returned with length 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: RequestError,
    pub status_addr: Option<GuestAddress>,
    pub kind: Option<RequestType>,
}

#[derive(Clone, Copy, Default)]
struct Piece {
    addr: GuestAddress,
    len: u64,
    writable: bool,
}

/// Parses one chain. `descs` is the chain's descriptors in order (a `DescriptorChain`, which
/// already follows indirect tables and stops after queue-size descriptors).
pub fn parse(
    descs: impl Iterator<Item = Descriptor>,
    mem: &GuestMem,
    limits: &Limits,
) -> Result<Request, Rejected> {
    // Chains of a few descriptors (nearly all) are gathered without a heap allocation.
    let mut pieces = InlineVec::<Piece, 4>::default();
    let mut last_has_next = false;
    for d in descs {
        last_has_next = d.has_next();
        pieces.push(Piece {
            addr: d.addr(),
            len: u64::from(d.len()),
            writable: d.is_write_only(),
        });
    }
    let reject = |error, status_addr, kind| Rejected {
        error,
        status_addr,
        kind,
    };

    // A chain whose last descriptor still points onwards was cut short by the iterator: its
    // real end, and so its status byte, is unknown.
    if pieces.is_empty() || last_has_next {
        return Err(reject(RequestError::BrokenChain, None, None));
    }
    for p in pieces.iter() {
        if p.len > 0 && !in_memory(mem, p.addr, p.len) {
            // Only trust the status byte if it is itself addressable.
            let status = status_of(&pieces).filter(|a| in_memory(mem, *a, 1));
            return Err(reject(
                RequestError::BadAddress {
                    addr: p.addr.0,
                    len: p.len,
                },
                status,
                None,
            ));
        }
    }
    let Some(status_addr) = status_of(&pieces) else {
        return Err(reject(RequestError::NoStatus, None, None));
    };
    if let Some(last) = pieces.last_mut() {
        last.len -= 1;
    }

    // Header: the first 16 bytes, all of them device-readable.
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0usize;
    let mut rest = pieces.iter_mut().peekable();
    while got < HEADER_LEN {
        let Some(p) = rest.peek_mut() else { break };
        if p.len == 0 {
            rest.next();
            continue;
        }
        if p.writable {
            break;
        }
        let n = (HEADER_LEN - got).min(p.len as usize);
        let read = if n == HEADER_LEN {
            // The usual framing: the whole header in one buffer, two loads.
            guest::read16_at(mem, p.addr)
                .map(|[lo, hi]| {
                    header[..8].copy_from_slice(&lo.to_le_bytes());
                    header[8..].copy_from_slice(&hi.to_le_bytes());
                })
                .is_some()
        } else {
            mem.read_slice(&mut header[got..got + n], p.addr).is_ok()
        };
        if !read {
            return Err(reject(
                RequestError::BadAddress {
                    addr: p.addr.0,
                    len: n as u64,
                },
                Some(status_addr),
                None,
            ));
        }
        got += n;
        p.addr = GuestAddress(p.addr.0 + n as u64);
        p.len -= n as u64;
    }
    if got < HEADER_LEN {
        return Err(reject(
            RequestError::ShortHeader(got),
            Some(status_addr),
            None,
        ));
    }
    let type_ = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));

    let kind = match type_ {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        other => {
            return Err(reject(
                RequestError::Unsupported(other),
                Some(status_addr),
                None,
            ))
        }
    };
    let fail = |error| reject(error, Some(status_addr), Some(kind));

    let mut data = Segments::default();
    let mut data_len = 0u64;
    let mut direction: Option<bool> = None;
    for p in rest.filter(|p| p.len > 0) {
        if *direction.get_or_insert(p.writable) != p.writable {
            // Mixed directions inside the data: no request type allows that.
            return Err(fail(RequestError::WrongDirection {
                kind: kind.name(),
                found: if p.writable { "writable" } else { "readable" },
            }));
        }
        // A chain is at most 4 GiB in total (the iterator enforces it), so u32 segments hold.
        data.push(DataSegment {
            addr: p.addr,
            len: p.len as u32,
        });
        data_len += p.len;
    }
    let wants_writable = matches!(kind, RequestType::In | RequestType::GetId);
    if let Some(writable) = direction {
        if kind != RequestType::Flush && writable != wants_writable {
            return Err(fail(RequestError::WrongDirection {
                kind: kind.name(),
                found: if writable { "writable" } else { "readable" },
            }));
        }
    }
    if limits.readonly && kind.changes_data() {
        return Err(fail(RequestError::ReadOnly(kind.name())));
    }

    let mut ranges = Vec::new();
    match kind {
        RequestType::In | RequestType::Out => {
            if data_len == 0 {
                return Err(fail(RequestError::NoData(kind.name())));
            }
            let bs = u64::from(limits.block_size);
            if !data_len.is_multiple_of(bs) || !sector.is_multiple_of(bs >> SECTOR_SHIFT) {
                return Err(fail(RequestError::Unaligned {
                    kind: kind.name(),
                    sector,
                    len: data_len,
                    block_size: limits.block_size,
                }));
            }
            check_range(sector, data_len >> SECTOR_SHIFT, limits).map_err(fail)?;
        }
        RequestType::Flush => {}
        RequestType::GetId => {
            if data_len == 0 {
                return Err(fail(RequestError::NoData(kind.name())));
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let (max_seg, max_sectors) = if kind == RequestType::Discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            if data_len == 0 {
                return Err(fail(RequestError::NoData(kind.name())));
            }
            if !data_len.is_multiple_of(RANGE_LEN as u64) {
                return Err(fail(RequestError::BadRangePayload {
                    kind: kind.name(),
                    len: data_len,
                }));
            }
            let count = (data_len / RANGE_LEN as u64) as usize;
            if count > max_seg as usize {
                return Err(fail(RequestError::TooManyRanges {
                    kind: kind.name(),
                    count,
                    max: max_seg,
                }));
            }
            let raw = match read_all(mem, &data, data_len as usize) {
                Some(raw) => raw,
                None => {
                    return Err(fail(RequestError::BadAddress {
                        addr: data[0].addr.0,
                        len: data_len,
                    }))
                }
            };
            for chunk in raw.chunks_exact(RANGE_LEN) {
                let r_sector = u64::from_le_bytes(chunk[0..8].try_into().unwrap_or([0; 8]));
                let num = u32::from_le_bytes(chunk[8..12].try_into().unwrap_or([0; 4]));
                let flags = u32::from_le_bytes(chunk[12..16].try_into().unwrap_or([0; 4]));
                // Discard takes no flags at all; write-zeroes only UNMAP (virtio 1.2, 5.2.6.2).
                let allowed = if kind == RequestType::Discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(fail(RequestError::BadFlags {
                        kind: kind.name(),
                        flags,
                    }));
                }
                if num > max_sectors {
                    return Err(fail(RequestError::RangeTooLong {
                        kind: kind.name(),
                        num,
                        max: max_sectors,
                    }));
                }
                check_range(r_sector, u64::from(num), limits).map_err(fail)?;
                ranges.push(SectorRange {
                    sector: r_sector,
                    num_sectors: num,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
        }
    }

    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        ranges,
        status_addr,
    })
}

fn status_of(pieces: &[Piece]) -> Option<GuestAddress> {
    let last = pieces.last()?;
    if !last.writable || last.len == 0 {
        return None;
    }
    Some(GuestAddress(last.addr.0.checked_add(last.len - 1)?))
}

fn check_range(sector: u64, num_sectors: u64, limits: &Limits) -> Result<(), RequestError> {
    match sector.checked_add(num_sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        end => Err(RequestError::OutOfRange {
            start: sector,
            end: end.unwrap_or(u64::MAX),
            capacity: limits.capacity_sectors,
        }),
    }
}

fn read_all(mem: &GuestMem, data: &[DataSegment], len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut at = 0;
    for seg in data {
        let n = seg.len as usize;
        mem.read_slice(&mut out[at..at + n], seg.addr).ok()?;
        at += n;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const MEM_SIZE: u64 = 0x40_0000;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x10_0000;
    const STATUS: u64 = 0x30_0000;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 2048,
            block_size: 512,
            readonly: false,
            max_discard_sectors: 1024,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 4,
        }
    }

    fn header(mem: &GuestMem, type_: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&type_.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Descriptors (addr, len, writable), chained with NEXT as a driver would.
    fn chain(parts: &[(u64, u32, bool)]) -> Vec<Descriptor> {
        parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < parts.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                Descriptor::new(addr, len, flags, i as u16 + 1)
            })
            .collect()
    }

    fn simple(type_: u32, sector: u64, data: Option<(u32, bool)>) -> (GuestMem, Vec<Descriptor>) {
        let m = mem();
        header(&m, type_, sector);
        let mut parts = vec![(HDR, 16, false)];
        if let Some((len, w)) = data {
            parts.push((DATA, len, w));
        }
        parts.push((STATUS, 1, true));
        (m, chain(&parts))
    }

    fn err(r: Result<Request, Rejected>) -> Rejected {
        r.expect_err("request should be rejected")
    }

    #[test]
    fn read_is_parsed() {
        let (m, d) = simple(VIRTIO_BLK_T_IN, 8, Some((4096, true)));
        let r = parse(d.into_iter(), &m, &limits()).unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 8);
        assert_eq!(r.data_len, 4096);
        assert_eq!(r.status_addr, GuestAddress(STATUS));
        assert_eq!(
            r.data[..],
            [DataSegment {
                addr: GuestAddress(DATA),
                len: 4096
            }]
        );
    }

    #[test]
    fn merged_framing_is_accepted() {
        // Header and data in one readable descriptor; data and status in one writable one.
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let d = chain(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
        let r = parse(d.into_iter(), &m, &limits()).unwrap();
        assert_eq!(r.kind, RequestType::Out);
        assert_eq!(
            r.data[..],
            [DataSegment {
                addr: GuestAddress(HDR + 16),
                len: 512
            }]
        );

        header(&m, VIRTIO_BLK_T_IN, 0);
        let d = chain(&[(HDR, 16, false), (DATA, 513, true)]);
        let r = parse(d.into_iter(), &m, &limits()).unwrap();
        assert_eq!(r.data_len, 512);
        assert_eq!(r.status_addr, GuestAddress(DATA + 512));
    }

    #[test]
    fn header_split_over_two_descriptors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 3);
        let d = chain(&[
            (HDR, 10, false),
            (HDR + 10, 6, false),
            (DATA, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(parse(d.into_iter(), &m, &limits()).unwrap().sector, 3);
    }

    #[test]
    fn sector_past_capacity() {
        let (m, d) = simple(VIRTIO_BLK_T_IN, 2048, Some((512, true)));
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert!(matches!(e.error, RequestError::OutOfRange { .. }));
        assert_eq!(e.error.status(), Status::IoErr);
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn request_straddling_the_end() {
        let (m, d) = simple(VIRTIO_BLK_T_OUT, 2047, Some((1024, false)));
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert!(matches!(
            e.error,
            RequestError::OutOfRange {
                start: 2047,
                end: 2049,
                ..
            }
        ));
    }

    #[test]
    fn huge_sector_does_not_overflow() {
        let (m, d) = simple(VIRTIO_BLK_T_IN, u64::MAX - 1, Some((1024, true)));
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert!(matches!(e.error, RequestError::OutOfRange { .. }));
    }

    #[test]
    fn length_not_a_multiple_of_512() {
        let (m, d) = simple(VIRTIO_BLK_T_IN, 0, Some((1000, true)));
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert!(matches!(e.error, RequestError::Unaligned { .. }));
    }

    #[test]
    fn misaligned_to_a_4k_block() {
        let mut l = limits();
        l.block_size = 4096;
        let (m, d) = simple(VIRTIO_BLK_T_IN, 1, Some((4096, true)));
        assert!(matches!(
            err(parse(d.into_iter(), &m, &l)).error,
            RequestError::Unaligned { .. }
        ));
    }

    #[test]
    fn write_on_read_only_device() {
        let mut l = limits();
        l.readonly = true;
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            let (m, d) = simple(t, 0, Some((512, false)));
            let e = err(parse(d.into_iter(), &m, &l));
            assert!(
                matches!(e.error, RequestError::ReadOnly(_)),
                "{t}: {:?}",
                e.error
            );
            assert_eq!(e.error.status(), Status::IoErr);
        }
        let (m, d) = simple(VIRTIO_BLK_T_IN, 0, Some((512, true)));
        assert!(parse(d.into_iter(), &m, &l).is_ok());
    }

    #[test]
    fn header_shorter_than_16_bytes() {
        let m = mem();
        let d = chain(&[(HDR, 8, false), (STATUS, 1, true)]);
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert_eq!(e.error, RequestError::ShortHeader(8));
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn status_not_device_writable() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let d = chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert_eq!(e.error, RequestError::NoStatus);
        assert_eq!(e.status_addr, None);
    }

    #[test]
    fn no_data_where_data_is_needed() {
        for t in [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
        ] {
            let (m, d) = simple(t, 0, None);
            let e = err(parse(d.into_iter(), &m, &limits()));
            assert!(
                matches!(e.error, RequestError::NoData(_)),
                "{t}: {:?}",
                e.error
            );
        }
        // FLUSH needs none.
        let (m, d) = simple(VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(
            parse(d.into_iter(), &m, &limits()).unwrap().kind,
            RequestType::Flush
        );
    }

    #[test]
    fn wrong_data_direction() {
        let (m, d) = simple(VIRTIO_BLK_T_IN, 0, Some((512, false)));
        assert!(matches!(
            err(parse(d.into_iter(), &m, &limits())).error,
            RequestError::WrongDirection { .. }
        ));
        let (m, d) = simple(VIRTIO_BLK_T_OUT, 0, Some((512, true)));
        assert!(matches!(
            err(parse(d.into_iter(), &m, &limits())).error,
            RequestError::WrongDirection { .. }
        ));
    }

    #[test]
    fn data_outside_guest_memory() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let d = chain(&[
            (HDR, 16, false),
            (MEM_SIZE - 256, 512, true),
            (STATUS, 1, true),
        ]);
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert!(matches!(e.error, RequestError::BadAddress { .. }));
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn status_outside_guest_memory() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let d = chain(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (MEM_SIZE + 4096, 1, true),
        ]);
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert!(matches!(e.error, RequestError::BadAddress { .. }));
        assert_eq!(e.status_addr, None);
    }

    #[test]
    fn header_outside_guest_memory() {
        let m = mem();
        let d = chain(&[(u64::MAX - 8, 16, false), (STATUS, 1, true)]);
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert!(matches!(e.error, RequestError::BadAddress { .. }));
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn truncated_chain_is_broken() {
        // What the chain iterator yields for a loop: it stops with NEXT still set.
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let mut d = chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        d[2] = Descriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            0,
        );
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert_eq!(e.error, RequestError::BrokenChain);
        assert_eq!(e.status_addr, None);
        let e = err(parse(std::iter::empty(), &m, &limits()));
        assert_eq!(e.error, RequestError::BrokenChain);
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let (m, d) = simple(0x77, 0, Some((512, true)));
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert_eq!(e.error, RequestError::Unsupported(0x77));
        assert_eq!(e.error.status(), Status::Unsupp);
    }

    fn ranges(m: &GuestMem, rs: &[(u64, u32, u32)]) {
        let mut raw = Vec::new();
        for &(s, n, f) in rs {
            raw.extend_from_slice(&s.to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            raw.extend_from_slice(&f.to_le_bytes());
        }
        m.write_slice(&raw, GuestAddress(DATA)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let (m, d) = simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((32, false)));
        ranges(&m, &[(8, 16, 1), (100, 8, 0)]);
        let r = parse(d.into_iter(), &m, &limits()).unwrap();
        assert_eq!(
            r.ranges,
            vec![
                SectorRange {
                    sector: 8,
                    num_sectors: 16,
                    unmap: true
                },
                SectorRange {
                    sector: 100,
                    num_sectors: 8,
                    unmap: false
                }
            ]
        );
        // Discard takes no flags: UNSUPP.
        let (m, d) = simple(VIRTIO_BLK_T_DISCARD, 0, Some((16, false)));
        ranges(&m, &[(8, 16, 1)]);
        let e = err(parse(d.into_iter(), &m, &limits()));
        assert_eq!(e.error.status(), Status::Unsupp);
        // Past capacity, too long, too many, ragged payload: IOERR.
        let (m, d) = simple(VIRTIO_BLK_T_DISCARD, 0, Some((16, false)));
        ranges(&m, &[(2040, 16, 0)]);
        assert!(matches!(
            err(parse(d.into_iter(), &m, &limits())).error,
            RequestError::OutOfRange { .. }
        ));
        let (m, d) = simple(VIRTIO_BLK_T_DISCARD, 0, Some((16, false)));
        ranges(&m, &[(0, 1025, 0)]);
        assert!(matches!(
            err(parse(d.into_iter(), &m, &limits())).error,
            RequestError::RangeTooLong { .. }
        ));
        let (m, d) = simple(VIRTIO_BLK_T_DISCARD, 0, Some((80, false)));
        assert!(matches!(
            err(parse(d.into_iter(), &m, &limits())).error,
            RequestError::TooManyRanges { .. }
        ));
        let (m, d) = simple(VIRTIO_BLK_T_DISCARD, 0, Some((20, false)));
        assert!(matches!(
            err(parse(d.into_iter(), &m, &limits())).error,
            RequestError::BadRangePayload { .. }
        ));
    }

    proptest! {
        /// Whatever a guest puts in the descriptors, parsing returns (never panics), and an
        /// accepted request lies inside the capacity and inside guest memory.
        #[test]
        fn arbitrary_chains_never_panic(
            parts in proptest::collection::vec((0u64..MEM_SIZE * 2, 0u32..0x2_0000, any::<bool>()), 0..6),
            type_ in 0u32..16,
            sector in any::<u64>(),
        ) {
            let m = mem();
            header(&m, type_, sector);
            let d = chain(&parts);
            if let Ok(r) = parse(d.into_iter(), &m, &limits()) {
                prop_assert!(r.sector.saturating_add(r.data_len >> 9) <= 2048 || r.kind == RequestType::Flush || r.kind == RequestType::GetId);
                for s in &r.data {
                    prop_assert!(s.addr.0 + u64::from(s.len) <= MEM_SIZE);
                }
                prop_assert!(r.status_addr.0 < MEM_SIZE);
            }
        }
    }
}
