//! A raw vhost-user frontend with several rings, laid out by hand in a memfd of guest memory,
//! that can reconnect to a restarted backend the way QEMU does: same memory, same inflight
//! region, each ring started again at its used index.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 16 << 20;
/// Each ring's area: descriptors, avail, used, headers, statuses.
const AREA: u64 = 0x2_0000;
const AVAIL: u64 = 0x4000;
const USED: u64 = 0x8000;
const HDR: u64 = 0xc000;
const STATUS: u64 = 0x1_0000;
/// Data buffers: one 4 KiB buffer per (ring, slot).
const DATA: u64 = 0x40_0000;
pub const BUF: usize = 4096;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

pub fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"remapblk-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor memfd_create just gave us, owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).unwrap();
    f
}

pub struct Ring {
    pub kick: EventFd,
    pub call: EventFd,
    /// The driver's avail index (free running).
    pub avail: u16,
}

pub struct RawGuest {
    pub mem: GuestMemoryMmap,
    file: File,
    host: u64,
    pub frontend: Frontend,
    pub rings: Vec<Ring>,
    pub qsize: u16,
    /// The INFLIGHT_SHMFD region QEMU would keep across reconnections.
    pub inflight: Option<(VhostUserInflight, File)>,
    /// The virtio features acked.
    pub features: u64,
}

impl RawGuest {
    /// Connects and sets up `queues` rings of `qsize` entries; with `inflight`, negotiates
    /// INFLIGHT_SHMFD and gets a region from the backend.
    pub fn connect(socket: &Path, queues: usize, qsize: u16, inflight: bool) -> RawGuest {
        let mut g = RawGuest::new(socket, queues, qsize);
        g.negotiate(inflight);
        g.set_mem_table();
        if inflight {
            let ask = VhostUserInflight::new(0, 0, queues as u16, qsize);
            let (info, fd) = g.frontend.get_inflight_fd(&ask).unwrap();
            assert_eq!(
                { info.mmap_offset },
                0,
                "the backend's region starts at offset 0"
            );
            g.inflight = Some((info, fd));
        }
        g.start_rings(false);
        g
    }

    /// Connects, and sends nothing yet.
    pub fn new(socket: &Path, queues: usize, qsize: u16) -> RawGuest {
        Self::on_stream(UnixStream::connect(socket).unwrap(), queues, qsize)
    }

    /// As `new`, on a connection the caller made (say, with a read timeout).
    pub fn on_stream(stream: UnixStream, queues: usize, qsize: u16) -> RawGuest {
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let rings = (0..queues)
            .map(|_| Ring {
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                avail: 0,
            })
            .collect();
        let frontend = Frontend::from_stream(stream, queues as u64);
        RawGuest {
            mem,
            file,
            host,
            frontend,
            rings,
            qsize,
            inflight: None,
            features: 0,
        }
    }

    /// What QEMU does when its backend comes back after a crash: a new connection, the same
    /// memory and inflight region, every ring started again at its used index (QEMU rewinds
    /// its avail index to the used one when it lost the backend).
    pub fn reconnect(&mut self, socket: &Path) {
        self.frontend = Frontend::connect(socket, self.rings.len() as u64).unwrap();
        let inflight = self.inflight.is_some();
        self.negotiate(inflight);
        self.set_mem_table();
        self.start_rings(true);
    }

    /// SET_OWNER, features (no event-idx), protocol features (INFLIGHT_SHMFD when asked), and
    /// every later message waits for the backend's acknowledgement.
    pub fn negotiate(&mut self, inflight: bool) {
        let extra = if inflight {
            VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            VhostUserProtocolFeatures::empty()
        };
        self.negotiate_with(extra);
    }

    /// As `negotiate`, with protocol features `extra` besides the basic ones (which the
    /// backend must offer). Features: all offered but event-idx and LOG_ALL (a migration
    /// turns that on later).
    pub fn negotiate_with(&mut self, extra: VhostUserProtocolFeatures) {
        let f = &mut self.frontend;
        f.set_owner().unwrap();
        let features =
            f.get_features().unwrap() & !(1 << VIRTIO_RING_F_EVENT_IDX) & !VHOST_F_LOG_ALL;
        f.set_features(features).unwrap();
        self.features = features;
        let proto = f.get_protocol_features().unwrap();
        assert!(
            proto.contains(extra),
            "the backend does not offer {extra:?}"
        );
        let want = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | extra;
        f.set_protocol_features(proto & want).unwrap();
        f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    pub fn set_mem_table(&mut self) {
        self.frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_SIZE as u64,
                userspace_addr: self.host,
                mmap_offset: 0,
                mmap_handle: self.file.as_raw_fd(),
            }])
            .unwrap();
    }

    fn start_rings(&mut self, at_used: bool) {
        if let Some((info, fd)) = &self.inflight {
            self.frontend.set_inflight_fd(info, fd.as_raw_fd()).unwrap();
        }
        for q in 0..self.rings.len() {
            let base = if at_used { self.used_idx(q) } else { 0 };
            self.start_ring(q, base);
        }
    }

    /// What QEMU does to (re)start a ring: size, base, addresses, kick and call, enable.
    pub fn start_ring(&mut self, q: usize, base: u16) {
        self.set_ring(q, base);
        let f = &mut self.frontend;
        f.set_vring_kick(q, &self.rings[q].kick).unwrap();
        f.set_vring_call(q, &self.rings[q].call).unwrap();
        f.set_vring_enable(q, true).unwrap();
    }

    /// SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR for ring `q` (no kick, call or enable).
    pub fn set_ring(&mut self, q: usize, base: u16) {
        let area = AREA * q as u64;
        let f = &mut self.frontend;
        f.set_vring_num(q, self.qsize).unwrap();
        f.set_vring_base(q, base).unwrap();
        f.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: self.qsize,
                queue_size: self.qsize,
                flags: 0,
                desc_table_addr: self.host + area,
                used_ring_addr: self.host + area + USED,
                avail_ring_addr: self.host + area + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = AREA * q as u64 + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Where ring `q`'s descriptor table, avail ring, used ring, headers and statuses are.
    pub fn ring_layout(q: usize) -> [(&'static str, u64); 5] {
        let area = AREA * q as u64;
        [
            ("descriptor table", area),
            ("avail ring", area + AVAIL),
            ("used ring", area + USED),
            ("headers", area + HDR),
            ("statuses", area + STATUS),
        ]
    }

    /// The data buffer of `slot` on ring `q`.
    pub fn buf(&self, q: usize, slot: u16) -> GuestAddress {
        GuestAddress(DATA + (q as u64 * u64::from(self.qsize) + u64::from(slot)) * BUF as u64)
    }

    /// Puts a 4 KiB read or write at `sector` in ring `q`'s avail ring, as chain `3 * slot`
    /// (header, data, status). A write's data is the buffer's current content.
    pub fn add(&mut self, q: usize, slot: u16, kind: u32, sector: u64) -> u16 {
        let area = AREA * q as u64;
        let hdr = area + HDR + 16 * u64::from(slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let status = area + STATUS + u64::from(slot);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let d = 3 * slot;
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            F_NEXT | F_WRITE
        } else {
            F_NEXT
        };
        self.desc(q, d, hdr, 16, F_NEXT, d + 1);
        self.desc(q, d + 1, self.buf(q, slot).0, BUF as u32, data_flags, d + 2);
        self.desc(q, d + 2, status, 1, F_WRITE, 0);
        let r = &mut self.rings[q];
        let at = area + AVAIL + 4 + 2 * u64::from(r.avail % self.qsize);
        self.mem.write_obj(d, GuestAddress(at)).unwrap();
        r.avail = r.avail.wrapping_add(1);
        d
    }

    /// Publishes ring `q`'s avail index and kicks.
    pub fn publish_and_kick(&self, q: usize) {
        let area = AREA * q as u64;
        self.mem
            .store(
                self.rings[q].avail,
                GuestAddress(area + AVAIL + 2),
                Ordering::Release,
            )
            .unwrap();
        self.rings[q].kick.write(1).unwrap();
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .load(GuestAddress(AREA * q as u64 + USED + 2), Ordering::Acquire)
            .unwrap()
    }

    /// The descriptor head of ring `q`'s used entry `n` (free running).
    pub fn used_id(&self, q: usize, n: u16) -> u16 {
        let at = AREA * q as u64 + USED + 4 + 8 * u64::from(n % self.qsize);
        self.mem.read_obj::<u32>(GuestAddress(at)).unwrap() as u16
    }

    pub fn status(&self, q: usize, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(AREA * q as u64 + STATUS + u64::from(slot)))
            .unwrap()
    }

    pub fn read_buf(&self, q: usize, slot: u16) -> Vec<u8> {
        let mut v = vec![0u8; BUF];
        self.mem.read_slice(&mut v, self.buf(q, slot)).unwrap();
        v
    }

    pub fn write_buf(&self, q: usize, slot: u16, data: &[u8]) {
        self.mem.write_slice(data, self.buf(q, slot)).unwrap();
    }

    /// Polls until `cond` holds, at most `timeout`.
    pub fn wait(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&RawGuest) -> bool) {
        let end = Instant::now() + timeout;
        while !cond(self) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }
}
