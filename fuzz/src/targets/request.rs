//! The request path of a queue's worker, without the worker: guest memory of one to three
//! regions (with holes between them), a descriptor table and indirect tables, request
//! headers, payloads and raw bytes placed in it from the input; the chain at `head` walked by
//! `virtio::ring::chain` (both ways the worker walks it) and parsed by
//! `virtio::request::parse`; and, for some inputs, used entries written by
//! `virtio::ring::used`.
//!
//! What must hold, beyond no panic:
//! - both walks yield the same descriptors, and those virtio-queue's `DescriptorChain` yields
//!   for the same ring;
//! - `parse` accepts exactly the chains a model of the virtio-blk framing written per byte
//!   (header: the first 16 bytes, device-readable; status: the last byte, device-writable;
//!   data: what lies between, one direction) accepts, with the same type, sector, length and
//!   ranges;
//! - every guest address a parsed request hands on (data segments, the status byte, a
//!   refused chain's status byte) lies inside guest memory and inside a descriptor of the
//!   chain, device-writable wherever the device writes;
//! - writing used entries changes no guest byte outside the used ring.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use arbitrary::{Arbitrary, Unstructured};
use remapblk::virtio::request::{self, Limits, Rejected, Request, RequestType};
use remapblk::virtio::ring::chain::{Chain, TableMap};
use remapblk::virtio::ring::guest::{in_memory, GuestMem};
use remapblk::virtio::ring::used::{needs_notification, UsedBatch};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion,
};

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Where the avail and used rings of the comparison with virtio-queue live: a region of its
/// own, far above the fuzzed ones (descriptors may still point into it).
const RINGS: u64 = 0x40_0000_0000;
const RINGS_LEN: usize = 0x4000;
/// Where the descriptor table lives unless the input places it: a region of its own, so that
/// requests placed at the start of a region do not land on it.
const TABLE: u64 = 0x20_0000_0000;
const TABLE_LEN: usize = 0x4000;
/// The largest queue compared with virtio-queue (the device offers 1024 at most).
const MAX_COMPARED_QUEUE: u16 = 1024;
/// Chains longer than this are walked and parsed but not modelled byte by byte.
const MODEL_MAX: u64 = 1 << 20;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Gap {
    None,
    Page,
    Far,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    Page,
    TwoPages,
    Big,
    Odd(u8),
}

#[derive(Arbitrary, Debug)]
struct Region {
    gap: Gap,
    size: Size,
}

/// A guest address, mostly in or at the edge of a region.
#[derive(Debug, Clone, Copy)]
enum Addr {
    In { region: u8, offset: u16 },
    EndMinus { region: u8, back: u8 },
    Abs(u64),
}

/// Choices are weighted (derive's are uniform): with random bytes, most addresses must lie in
/// memory and most lengths fit a request, or hardly any chain gets past its first check.
impl<'a> Arbitrary<'a> for Addr {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Addr> {
        Ok(match u8::arbitrary(u)? {
            0..=219 => Addr::In {
                region: u.arbitrary()?,
                offset: u.arbitrary()?,
            },
            220..=247 => Addr::EndMinus {
                region: u.arbitrary()?,
                back: u.arbitrary()?,
            },
            _ => Addr::Abs(u.arbitrary()?),
        })
    }
}

impl<'a> Arbitrary<'a> for Len {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Len> {
        Ok(match u8::arbitrary(u)? {
            0..=99 => Len::Sectors(u.arbitrary()?),
            100..=139 => Len::Header,
            140..=159 => Len::One,
            160..=199 => Len::Ranges(u.arbitrary()?),
            200..=239 => Len::Small(u.arbitrary()?),
            _ => Len::Raw(u.arbitrary()?),
        })
    }
}

impl<'a> Arbitrary<'a> for Type {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Type> {
        Ok(match u8::arbitrary(u)? {
            0..=239 => Type::Known(u.arbitrary()?),
            _ => Type::Raw(u.arbitrary()?),
        })
    }
}

/// A descriptor's length, mostly one a request uses.
#[derive(Debug, Clone, Copy)]
enum Len {
    Header,
    One,
    Sectors(u8),
    Ranges(u8),
    Small(u8),
    Raw(u32),
}

impl Len {
    fn get(self) -> u32 {
        match self {
            Len::Header => 16,
            Len::One => 1,
            Len::Sectors(n) => (u32::from(n % 16) + 1) * 512,
            Len::Ranges(n) => u32::from(n % 5) * 16,
            Len::Small(n) => u32::from(n),
            Len::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Desc {
    addr: Addr,
    len: Len,
    /// NEXT, WRITE, INDIRECT and whatever else.
    flags: u16,
    next: u16,
}

/// A request as a driver frames it: header, data, status, each split or merged as the input
/// says, in the table at `start` or in an indirect table.
#[derive(Arbitrary, Debug)]
struct Framed {
    start: u16,
    header_at: Addr,
    type_: Type,
    sector: Sector,
    /// Data buffers (device-writable for reads); `no_data` from 240 leaves them out (an
    /// input that ran out reads as zeros: zero is the usual case in every choice).
    data_first: (Addr, Len),
    data: Vec<(Addr, Len)>,
    no_data: u8,
    /// From 240: data the other way round than the type wants.
    wrong_way: u8,
    status_at: Addr,
    /// The header in two descriptors, split at this byte.
    split_header: Option<u8>,
    /// The status byte merged into the last data buffer.
    merge_status: bool,
    indirect: Option<Addr>,
    /// DISCARD and WRITE_ZEROES ranges written into the first data buffer.
    ranges: Vec<(Sector, u32, u8)>,
}

#[derive(Debug, Clone, Copy)]
enum Type {
    Known(u8),
    Raw(u32),
}

impl Type {
    fn get(self) -> u32 {
        const KNOWN: [u32; 6] = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ];
        match self {
            Type::Known(i) => KNOWN[usize::from(i) % KNOWN.len()],
            Type::Raw(t) => t,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Sector {
    Small(u8),
    NearEnd(u8),
    Raw(u64),
}

impl<'a> Arbitrary<'a> for Sector {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Sector> {
        Ok(match u8::arbitrary(u)? {
            0..=179 => Sector::Small(u.arbitrary()?),
            180..=229 => Sector::NearEnd(u.arbitrary()?),
            _ => Sector::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Arbitrary, Debug)]
struct ArbLimits {
    capacity_sectors: Sector,
    big_blocks: bool,
    readonly: bool,
    max_sectors: u8,
    max_seg: u8,
}

#[derive(Debug, Clone, Copy)]
enum QueueSize {
    Pow(u8),
    Raw(u16),
}

impl<'a> Arbitrary<'a> for QueueSize {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<QueueSize> {
        Ok(match u8::arbitrary(u)? {
            0..=229 => QueueSize::Pow(u.arbitrary()?),
            _ => QueueSize::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Arbitrary, Debug)]
struct UsedSpec {
    at: Addr,
    next_used: u16,
    entries: Vec<(u16, u32)>,
    event_idx: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    regions: Vec<Region>,
    first_at: u8,
    /// The descriptor table: in a region of its own, or from 200 at `table`.
    table_at: u8,
    table: Addr,
    size: QueueSize,
    /// The request at the head of the chain walked (unless `head` says otherwise), laid out
    /// after everything else but `damage`.
    main: Framed,
    /// From 232: the chain at `other_head` instead of `main`'s.
    head: u8,
    other_head: u16,
    framed: Vec<Framed>,
    descs: Vec<(u16, Desc)>,
    /// From 224: `damage` overwrites descriptors after `main` is laid out.
    damage_gate: u8,
    damage: Vec<(u16, Desc)>,
    indirect: Vec<(Addr, Vec<Desc>)>,
    bytes: Vec<(Addr, Vec<u8>)>,
    limits: ArbLimits,
    used: Option<UsedSpec>,
}

/// Guest memory as laid out, and what resolves input addresses in it.
struct Layout {
    mem: GuestMem,
    /// (start, len) of the fuzzed regions.
    regions: Vec<(u64, u64)>,
    capacity: u64,
}

impl Layout {
    fn addr(&self, a: Addr) -> u64 {
        let pick = |r: u8| self.regions[usize::from(r) % self.regions.len()];
        match a {
            Addr::In { region, offset } => {
                let (start, len) = pick(region);
                // Mostly inside, sometimes just past the end.
                start + u64::from(offset) % (len + 64)
            }
            Addr::EndMinus { region, back } => {
                let (start, len) = pick(region);
                (start + len).wrapping_sub(u64::from(back))
            }
            Addr::Abs(a) => a,
        }
    }

    fn sector(&self, s: Sector) -> u64 {
        match s {
            Sector::Small(n) => u64::from(n),
            Sector::NearEnd(n) => self.capacity.wrapping_sub(u64::from(n % 16)),
            Sector::Raw(n) => n,
        }
    }

    fn desc(&self, d: &Desc) -> Descriptor {
        Descriptor::new(self.addr(d.addr), d.len.get(), d.flags, d.next)
    }

    fn store(&self, d: Descriptor, at: u64) {
        let _ = self.mem.write_obj(d, GuestAddress(at));
    }
}

fn build(regions: &[Region], first_at: u8) -> Option<(GuestMem, Vec<(u64, u64)>)> {
    let mut at = [0u64, 0x1000, 0x1_0000_0000][usize::from(first_at) % 3];
    let mut ranges = Vec::new();
    for r in regions.iter().take(3) {
        at += match r.gap {
            Gap::None => 0,
            Gap::Page => 0x1000,
            Gap::Far => 0x10_0000,
        };
        let len = match r.size {
            Size::Page => 0x1000,
            Size::TwoPages => 0x2000,
            Size::Big => 0x1_0000,
            Size::Odd(n) => (u64::from(n) % 64 + 1) * 0x100,
        };
        ranges.push((at, len));
        at += len;
    }
    if ranges.is_empty() {
        ranges.push((0, 0x2000));
    }
    let mut all: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    all.push((GuestAddress(TABLE), TABLE_LEN));
    all.push((GuestAddress(RINGS), RINGS_LEN));
    let mem = GuestMem::from_ranges(&all).ok()?;
    Some((mem, ranges))
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let Some((mem, regions)) = build(&input.regions, input.first_at) else {
        return;
    };
    let l = &input.limits;
    let block_size = if l.big_blocks { 4096 } else { 512 };
    let mut layout = Layout {
        mem,
        regions,
        capacity: 0,
    };
    let capacity = match l.capacity_sectors {
        Sector::Small(n) => (u64::from(n) + 16) * 64,
        Sector::NearEnd(n) => u64::MAX - u64::from(n),
        Sector::Raw(n) => n,
    };
    layout.capacity = capacity;
    let limits = Limits {
        capacity_sectors: capacity,
        block_size,
        readonly: l.readonly,
        max_discard_sectors: (u32::from(l.max_sectors) + 1) * 8,
        max_discard_seg: u32::from(l.max_seg % 8) + 1,
        max_write_zeroes_sectors: (u32::from(l.max_sectors) + 1) * 16,
        max_write_zeroes_seg: u32::from(l.max_seg / 32) + 1,
    };
    let size = match input.size {
        // 128 when the input ran out (its bytes read as zeros).
        QueueSize::Pow(p) => 1u16 << (p.wrapping_add(7) % 11),
        QueueSize::Raw(n) => n,
    };
    let table = if input.table_at >= 200 {
        layout.addr(input.table)
    } else {
        TABLE
    };

    for (at, bytes) in &input.bytes {
        let _ = layout
            .mem
            .write_slice(bytes, GuestAddress(layout.addr(*at)));
    }
    for (i, d) in &input.descs {
        let at = table.wrapping_add(u64::from(*i % size.max(1)) * 16);
        layout.store(layout.desc(d), at);
    }
    for (at, descs) in &input.indirect {
        let base = layout.addr(*at);
        for (i, d) in descs.iter().enumerate() {
            layout.store(layout.desc(d), base.wrapping_add(i as u64 * 16));
        }
    }
    for f in &input.framed {
        frame(&layout, f, table, size);
    }
    frame(&layout, &input.main, table, size);
    if input.damage_gate >= 224 {
        for (i, d) in &input.damage {
            let at = table.wrapping_add(u64::from(*i % size.max(1)) * 16);
            layout.store(layout.desc(d), at);
        }
    }
    let head = if input.head >= 232 {
        input.other_head
    } else {
        input.main.start % size.max(1)
    };

    // The avail ring virtio-queue's walk takes the head from (flags, idx = 1, ring[0]), put
    // there before either walk: the input may have placed descriptors where it lies.
    let _ = layout.mem.write_obj(0u16, GuestAddress(RINGS));
    let _ = layout.mem.write_obj(1u16.to_le(), GuestAddress(RINGS + 2));
    let _ = layout.mem.write_obj(head.to_le(), GuestAddress(RINGS + 4));
    let descs = walk(&layout.mem, table, size, head);
    let parsed = request::parse(descs.iter().copied(), &layout.mem, &limits);
    check(&layout.mem, &descs, &parsed, &limits);
    if let Some(u) = &input.used {
        used(&layout, u, size, head);
    }
}

/// Lays out a request as `f` says: its header and ranges written, its descriptors chained.
fn frame(l: &Layout, f: &Framed, table: u64, size: u16) {
    let header_at = l.addr(f.header_at);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&f.type_.get().to_le_bytes());
    header[8..].copy_from_slice(&l.sector(f.sector).to_le_bytes());
    let _ = l.mem.write_slice(&header, GuestAddress(header_at));

    let mut parts: Vec<(u64, u32, bool)> = Vec::new();
    match f.split_header {
        Some(at) => {
            let at = u32::from(at % 17);
            parts.push((header_at, at, false));
            parts.push((header_at + u64::from(at), 16 - at, false));
        }
        None => parts.push((header_at, 16, false)),
    }
    let wants = matches!(f.type_.get(), VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let writable = wants != (f.wrong_way >= 240);
    if f.no_data < 240 {
        for (a, len) in std::iter::once(&f.data_first).chain(&f.data) {
            parts.push((l.addr(*a), len.get(), writable));
        }
    }
    if let Some(&(first, _, _)) = parts.get(1 + usize::from(f.split_header.is_some())) {
        let mut raw = Vec::new();
        for (s, n, flags) in &f.ranges {
            raw.extend_from_slice(&l.sector(*s).to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            let flags = if *flags < 200 {
                u32::from(*flags) & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                u32::from(*flags)
            };
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        let _ = l.mem.write_slice(&raw, GuestAddress(first));
    }
    let status_at = l.addr(f.status_at);
    match parts.last_mut() {
        Some(last) if f.merge_status && last.2 => last.1 = last.1.saturating_add(1),
        _ => parts.push((status_at, 1, true)),
    }

    let n = parts.len() as u16;
    let chained = |i: usize, &(a, len, w): &(u64, u32, bool), base: u16| {
        let mut flags = if w { F_WRITE } else { 0 };
        if i + 1 < parts.len() {
            flags |= F_NEXT;
        }
        Descriptor::new(a, len, flags, base.wrapping_add(i as u16 + 1))
    };
    let start = f.start % size.max(1);
    match f.indirect {
        Some(at) => {
            let base = l.addr(at);
            for (i, p) in parts.iter().enumerate() {
                let d = chained(i, p, 0);
                l.store(d, base.wrapping_add(i as u64 * 16));
            }
            let head = Descriptor::new(base, u32::from(n) * 16, F_INDIRECT, 0);
            l.store(head, table.wrapping_add(u64::from(start) * 16));
        }
        None => {
            for (i, p) in parts.iter().enumerate() {
                let index = (start as usize + i) % usize::from(size.max(1));
                let d = chained(i, p, start);
                l.store(d, table.wrapping_add(index as u64 * 16));
            }
        }
    }
}

/// The chain at `head`, walked as the worker walks it (through a `TableMap`) and as
/// `Chain::new` does, which must agree with each other and with virtio-queue.
fn walk(mem: &GuestMem, table: u64, size: u16, head: u16) -> Vec<Descriptor> {
    let raw = |d: &Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
    let ours: Vec<Descriptor> = Chain::new(mem, GuestAddress(table), size, head).collect();
    let view = GuestMemoryAtomic::new(mem.clone()).memory();
    let mapped: Vec<Descriptor> = TableMap::new(view, GuestAddress(table), size)
        .chain(head)
        .collect();
    assert_eq!(
        ours.iter().map(raw).collect::<Vec<_>>(),
        mapped.iter().map(raw).collect::<Vec<_>>(),
        "the mapped walk differs from the plain one"
    );
    if let Some(theirs) = virtio_queue_chain(mem, table, size, head) {
        assert_eq!(
            ours.iter().map(raw).collect::<Vec<_>>(),
            theirs.iter().map(raw).collect::<Vec<_>>(),
            "the walk differs from virtio-queue's DescriptorChain"
        );
    }
    ours
}

/// The chain virtio-queue's iterator yields for `head`, when it accepts the ring at all.
fn virtio_queue_chain(mem: &GuestMem, table: u64, size: u16, head: u16) -> Option<Vec<Descriptor>> {
    if size > MAX_COMPARED_QUEUE || head >= size {
        return None;
    }
    let mut q = Queue::new(MAX_COMPARED_QUEUE).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(table)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(RINGS)).ok()?;
    q.try_set_used_ring_address(GuestAddress(RINGS + 0x1000))
        .ok()?;
    q.set_ready(true);
    let chain = q.iter(mem).ok()?.next()?;
    Some(chain.collect())
}

/// Whether the device writes the data of `kind` (into the guest's buffers).
fn device_writes(kind: RequestType) -> bool {
    matches!(kind, RequestType::In | RequestType::GetId)
}

/// Whether `[addr, addr + len)` lies inside one descriptor of `descs` with write permission
/// `writable` (any, when None).
fn inside(descs: &[Descriptor], addr: u64, len: u64, writable: Option<bool>) -> bool {
    descs.iter().any(|d| {
        let (start, end) = (d.addr().0, d.addr().0.saturating_add(u64::from(d.len())));
        addr >= start
            && addr.checked_add(len).is_some_and(|e| e <= end)
            && writable.is_none_or(|w| w == d.is_write_only())
    })
}

/// What the model of the framing makes of a chain.
#[derive(Debug, PartialEq)]
struct Model {
    kind: RequestType,
    sector: u64,
    data_len: u64,
    ranges: Vec<(u64, u32, bool)>,
}

/// The virtio-blk framing, byte by byte: the chain's bytes (each with whether the device may
/// write it), the first 16 device-readable, the last device-writable, the rest one
/// direction. None when the chain is too long to model; Err when it is malformed.
fn model(mem: &GuestMem, descs: &[Descriptor], limits: &Limits) -> Option<Result<Model, ()>> {
    let Some(last) = descs.last() else {
        return Some(Err(()));
    };
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return Some(Err(()));
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total > MODEL_MAX {
        return None;
    }
    let mut bytes: Vec<(u8, bool)> = Vec::with_capacity(total as usize);
    for d in descs {
        let mut b = vec![0u8; d.len() as usize];
        if !b.is_empty() && mem.read_slice(&mut b, d.addr()).is_err() {
            return Some(Err(()));
        }
        bytes.extend(b.into_iter().map(|x| (x, d.is_write_only())));
    }
    let body = &bytes[..bytes.len() - 1];
    if body.len() < 16 || body[..16].iter().any(|&(_, w)| w) {
        return Some(Err(()));
    }
    let word = |b: &[(u8, bool)]| {
        b.iter()
            .rev()
            .fold(0u64, |acc, &(x, _)| acc << 8 | u64::from(x))
    };
    let type_ = word(&body[..4]) as u32;
    let sector = word(&body[8..16]);
    let kind = match type_ {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        _ => return Some(Err(())),
    };
    let data = &body[16..];
    if let Some(&(_, dir)) = data.first() {
        if data.iter().any(|&(_, w)| w != dir) {
            return Some(Err(()));
        }
        if kind != RequestType::Flush && dir != device_writes(kind) {
            return Some(Err(()));
        }
    }
    if limits.readonly && kind.changes_data() {
        return Some(Err(()));
    }
    let len = data.len() as u64;
    let fits = |s: u64, n: u64| {
        s.checked_add(n)
            .is_some_and(|e| e <= limits.capacity_sectors)
    };
    let mut ranges = Vec::new();
    let ok = match kind {
        RequestType::In | RequestType::Out => {
            let bs = u64::from(limits.block_size);
            len > 0
                && len.is_multiple_of(bs)
                && sector.is_multiple_of(bs / 512)
                && fits(sector, len / 512)
        }
        RequestType::Flush => true,
        RequestType::GetId => len > 0,
        RequestType::Discard | RequestType::WriteZeroes => {
            let discard = kind == RequestType::Discard;
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let mut ok = len > 0 && len.is_multiple_of(16) && len / 16 <= u64::from(max_seg);
            if ok {
                for r in data.chunks(16) {
                    let (s, n, flags) =
                        (word(&r[..8]), word(&r[8..12]) as u32, word(&r[12..]) as u32);
                    let allowed = if discard {
                        0
                    } else {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    };
                    if flags & !allowed != 0 || n > max_sectors || !fits(s, u64::from(n)) {
                        ok = false;
                        break;
                    }
                    ranges.push((s, n, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
                }
            }
            ok
        }
    };
    Some(if ok {
        Ok(Model {
            kind,
            sector,
            data_len: len,
            ranges,
        })
    } else {
        Err(())
    })
}

fn check(
    mem: &GuestMem,
    descs: &[Descriptor],
    parsed: &Result<Request, Rejected>,
    limits: &Limits,
) {
    // Where the status byte is, if the chain has one the device may write.
    let status = descs.last().and_then(|d| {
        if d.has_next() || !d.is_write_only() || d.len() == 0 {
            return None;
        }
        let at = d.addr().0.checked_add(u64::from(d.len()) - 1)?;
        in_memory(mem, GuestAddress(at), 1).then_some(at)
    });
    match parsed {
        Ok(r) => {
            assert_eq!(Some(r.status_addr.0), status, "the status byte of {r:?}");
            let mut sum = 0u64;
            for s in r.data.iter() {
                let (a, n) = (s.addr.0, u64::from(s.len));
                assert!(n > 0, "an empty data segment in {r:?}");
                assert!(
                    in_memory(mem, s.addr, n),
                    "segment {a:#x}+{n} outside guest memory"
                );
                let w = (r.kind != RequestType::Flush).then(|| device_writes(r.kind));
                assert!(
                    inside(descs, a, n, w),
                    "segment {a:#x}+{n} of {:?} is in no descriptor of the chain that allows it",
                    r.kind
                );
                sum += n;
            }
            assert_eq!(sum, r.data_len);
            match model(mem, descs, limits) {
                Some(Ok(m)) => {
                    let ranges: Vec<(u64, u32, bool)> = r
                        .ranges
                        .iter()
                        .map(|x| (x.sector, x.num_sectors, x.unmap))
                        .collect();
                    assert_eq!(
                        (m.kind, m.sector, m.data_len, &m.ranges),
                        (r.kind, r.sector, r.data_len, &ranges),
                        "the parse differs from the model"
                    );
                }
                Some(Err(())) => panic!("parse accepted {r:?}, which the model refuses"),
                None => {}
            }
        }
        Err(rej) => {
            assert_eq!(
                rej.status_addr.map(|a| a.0),
                status,
                "the status byte of a refused chain ({})",
                rej.error
            );
            if let Some(Ok(m)) = model(mem, descs, limits) {
                panic!(
                    "parse refused ({}) what the model accepts: {m:?}",
                    rej.error
                );
            }
        }
    }
    if let Some(at) = status {
        assert!(inside(descs, at, 1, Some(true)));
    }
}

/// Used entries written for chain `head` and others: no guest byte outside the used ring
/// changes, and the notification decision does not panic.
fn used(l: &Layout, u: &UsedSpec, size: u16, head: u16) {
    if !size.is_power_of_two() || size > MAX_COMPARED_QUEUE {
        return;
    }
    let Ok(mut q) = Queue::new(MAX_COMPARED_QUEUE) else {
        return;
    };
    let ring = l.addr(u.at);
    if q.try_set_size(size).is_err() || q.try_set_used_ring_address(GuestAddress(ring)).is_err() {
        return;
    }
    let _ = q.try_set_avail_ring_address(GuestAddress(RINGS));
    q.set_ready(true);
    q.set_event_idx(u.event_idx);
    q.set_next_used(u.next_used);
    let before = snapshot(&l.mem);
    let old = Wrapping(q.next_used());
    if let Some(mut batch) = UsedBatch::new(&q, &l.mem) {
        let _ = batch.push(head, 1);
        for &(h, len) in u.entries.iter().take(64) {
            let _ = batch.push(h, len);
        }
        batch.publish(&mut q);
    }
    let ring_len = 4 + 8 * u64::from(size);
    for ((start, old_bytes), (_, new_bytes)) in before.iter().zip(snapshot(&l.mem).iter()) {
        for (i, (a, b)) in old_bytes.iter().zip(new_bytes).enumerate() {
            let at = start + i as u64;
            assert!(
                a == b || (at >= ring && at < ring + ring_len),
                "used entries changed guest byte {at:#x}, outside the used ring {ring:#x}+{ring_len}"
            );
        }
    }
    let _ = needs_notification(&q, &l.mem, old, Wrapping(q.next_used()));
    let _ = q.avail_idx(&l.mem, Ordering::Acquire);
}

fn snapshot(mem: &GuestMem) -> Vec<(u64, Vec<u8>)> {
    mem.iter()
        .map(|r| {
            let mut b = vec![0u8; r.len() as usize];
            let _ = mem.read_slice(&mut b, r.start_addr());
            (r.start_addr().0, b)
        })
        .collect()
}

/// An input that runs out reads as zeros, and zero is the usual choice everywhere: zeros make
/// a well-formed read (header, one 512-byte buffer, status) in a 128-entry ring; longer runs of
/// them give the mutator room to change one field at a time.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    [16usize, 256, 2048]
        .iter()
        .map(|&n| (format!("read-{n}"), vec![0u8; n]))
        .collect()
}
