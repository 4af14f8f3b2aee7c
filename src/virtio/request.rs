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
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Status, SECTOR_SHIFT};

/// Guest memory as the vhost-user frontend shares it (no dirty-page bitmap: we do not offer
/// LOG_ALL, so migration logging never applies).
pub type GuestMem = GuestMemoryMmap<()>;

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

    fn changes_data(self) -> bool {
        matches!(
            self,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    }
}

/// A piece of guest memory, already checked to lie inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSegment {
    pub addr: GuestAddress,
    pub len: u32,
}

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
    pub data: Vec<DataSegment>,
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

#[derive(Clone, Copy)]
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
    let mut pieces: Vec<Piece> = Vec::with_capacity(4);
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
    for p in &pieces {
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
    let mut rest = pieces.into_iter().peekable();
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
        if mem.read_slice(&mut header[got..got + n], p.addr).is_err() {
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

    let mut data = Vec::with_capacity(2);
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
            if data_len % bs != 0 || (sector << SECTOR_SHIFT) % bs != 0 {
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
            if data_len % RANGE_LEN as u64 != 0 {
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

fn in_memory(mem: &GuestMem, addr: GuestAddress, len: u64) -> bool {
    usize::try_from(len).is_ok_and(|len| GuestMemoryBackend::check_range(mem, addr, len))
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
