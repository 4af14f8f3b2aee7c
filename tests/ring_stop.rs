//! Ring stop under load, at the protocol level: a raw vhost-user frontend (the `vhost` crate's
//! `Frontend`) with its guest memory in a memfd and a split virtqueue laid out here by hand
//! puts 64 virtio-blk writes in the avail ring (some of them slowed by a `delay` fault), kicks,
//! and sends GET_VRING_BASE at a seeded random point. The reply must come only after every
//! request the backend took has its status byte and used entry written: right after the
//! reply, used.idx equals the returned base, exactly the first `base` requests are complete
//! with status OK, the rest untouched, nothing is in flight, and nothing completes afterwards.
//! The ring is then started again (SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK) and the rest
//! completes. 200 cycles on one connection.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::load::*;
use common::*;
use serde_json::json;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const MEM_SIZE: usize = 4 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
/// Requests per cycle; request `i` uses descriptors 3i..3i+2 and writes 4 KiB at sector 8i.
const REQS: u16 = 64;
const DELAY_MS: u64 = 2;
const CYCLES: u64 = 200;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;

struct Guest {
    mem: GuestMemoryMmap,
    _file: File,
    host: u64,
    frontend: Frontend,
    kick: EventFd,
    call: EventFd,
    /// The driver's avail index (free running).
    avail: u16,
}

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"remapblk-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor memfd_create just gave us, owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).unwrap();
    f
}

impl Guest {
    fn connect(socket: &std::path::Path) -> Guest {
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let mut frontend = Frontend::connect(socket, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend
            .set_features(features & !(1 << VIRTIO_RING_F_EVENT_IDX))
            .unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::REPLY_ACK));
        frontend
            .set_protocol_features(
                proto
                    & (VhostUserProtocolFeatures::REPLY_ACK
                        | VhostUserProtocolFeatures::CONFIG
                        | VhostUserProtocolFeatures::MQ
                        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
            )
            .unwrap();
        // Every message waits for the backend's acknowledgement.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_SIZE as u64,
                userspace_addr: host,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }])
            .unwrap();
        frontend.set_vring_num(0, QSIZE).unwrap();
        let mut g = Guest {
            mem,
            _file: file,
            host,
            frontend,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            avail: 0,
        };
        g.start_ring(0);
        g
    }

    /// What QEMU does to (re)start a ring: base, addresses, kick and call, enable.
    fn start_ring(&mut self, base: u16) {
        let f = &mut self.frontend;
        f.set_vring_base(0, base).unwrap();
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: self.host + DESC,
                used_ring_addr: self.host + USED,
                avail_ring_addr: self.host + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_kick(0, &self.kick).unwrap();
        f.set_vring_call(0, &self.call).unwrap();
        f.set_vring_enable(0, true).unwrap();
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Puts request `i` (a 4 KiB write of `data` at sector 8i) in the avail ring.
    fn add_write(&mut self, i: u16, data: &[u8]) {
        let hdr = HDR + 16 * u64::from(i);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&(8 * u64::from(i)).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let buf = DATA + CHUNK as u64 * u64::from(i);
        self.mem.write_slice(data, GuestAddress(buf)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(i)))
            .unwrap();
        let d = 3 * i;
        self.desc(d, hdr, 16, F_NEXT, d + 1);
        self.desc(d + 1, buf, CHUNK as u32, F_NEXT, d + 2);
        self.desc(d + 2, STATUS + u64::from(i), 1, F_WRITE, 0);
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % QSIZE);
        self.mem.write_obj(d, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
    }

    /// Publishes the avail index and kicks.
    fn publish_and_kick(&self) {
        self.mem
            .store(self.avail, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(USED + 2), Ordering::Acquire)
            .unwrap()
    }

    /// The descriptor head of used entry `n` (free running).
    fn used_id(&self, n: u16) -> u32 {
        self.mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(n % QSIZE)))
            .unwrap()
    }

    fn status(&self, i: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(i)))
            .unwrap()
    }

    fn wait_used(&self, at_least: u16, what: &str) {
        let end = Instant::now() + Duration::from_secs(20);
        while self.used_idx().wrapping_sub(at_least) > QSIZE {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }
}

#[test]
fn get_vring_base_returns_only_after_every_accepted_request_is_used() {
    let seed = seed(6002);
    let _guard = SeedGuard(seed);
    let mut rng = Rng::new(seed);
    let s = Server::start(4 * MIB, &["--queue-size", "256"]);
    let mut ctl = Ctl::connect(&s.control());
    // Every fourth request is slow, so a drain usually has one to wait for.
    for i in (0..REQS).step_by(4) {
        ctl.ok(
            "fault-add",
            json!({"op": "write", "lba": 8 * i, "count": 8, "mode": "delay", "delay_ms": DELAY_MS}),
        );
    }
    let mut g = Guest::connect(&s.socket);
    let (mut waited, mut left_behind) = (0, 0);
    let t0 = Instant::now();
    for cycle in 1..=CYCLES {
        let start = g.avail;
        assert_eq!(g.used_idx(), start, "cycle {cycle}: completions left over");
        for i in 0..REQS {
            g.add_write(i, &pattern(cycle, u64::from(i) * CHUNK as u64, CHUNK));
        }
        g.publish_and_kick();
        // Stop the ring after a seeded number of completions (0: at once).
        let k = rng.range(0, u64::from(REQS)) as u16;
        g.wait_used(start.wrapping_add(k), "completions before the stop");
        let used_before = g.used_idx();
        let base = g.frontend.get_vring_base(0).unwrap() as u16;
        let used_at_reply = g.used_idx();
        let done = base.wrapping_sub(start);
        assert_eq!(
            used_at_reply, base,
            "cycle {cycle}: GET_VRING_BASE answered {base} with used.idx {used_at_reply}"
        );
        assert!(
            done <= REQS,
            "cycle {cycle}: base {base} past what was offered"
        );
        // Requests are taken in ring order: the first `done` are complete, the rest untouched.
        let mut heads: Vec<u32> = (0..done)
            .map(|n| g.used_id(start.wrapping_add(n)))
            .collect();
        heads.sort_unstable();
        let want: Vec<u32> = (0..u32::from(done)).map(|i| 3 * i).collect();
        assert_eq!(heads, want, "cycle {cycle}: used entries");
        for i in 0..REQS {
            let st = g.status(i);
            if i < done {
                assert_eq!(st, 0, "cycle {cycle}: request {i} used but status {st}");
            } else {
                assert_eq!(
                    st, 0xff,
                    "cycle {cycle}: request {i} not used but status written"
                );
            }
        }
        assert_eq!(
            ctl.ok("query-status", json!({}))["inflight"],
            0,
            "cycle {cycle}: in flight after the ring stopped"
        );
        // Nothing completes once the ring is stopped, not even after the slow requests' delay.
        let quiet_until = Instant::now() + Duration::from_millis(3 * DELAY_MS);
        while Instant::now() < quiet_until {
            assert_eq!(
                g.used_idx(),
                base,
                "cycle {cycle}: completion after the stop"
            );
            std::thread::yield_now();
        }
        waited += usize::from(used_at_reply != used_before);
        left_behind += usize::from(done < REQS);

        // Start the ring again where it stopped; the rest completes.
        g.start_ring(base);
        g.kick.write(1).unwrap();
        g.wait_used(start.wrapping_add(REQS), "the rest after the restart");
        assert!(
            (0..REQS).all(|i| g.status(i) == 0),
            "cycle {cycle}: statuses"
        );
    }
    let took = t0.elapsed();
    eprintln!(
        "{CYCLES} cycles in {took:?}: the reply waited for a completion in {waited}, requests were left in the ring in {left_behind}"
    );
    assert!(
        waited >= 20,
        "the stop rarely caught a request in flight ({waited})"
    );
    assert!(
        left_behind >= 20,
        "the stop rarely left requests behind ({left_behind})"
    );
    let stats = ctl.ok("query-stats", json!({}));
    assert_eq!(stats["totals"]["abandoned"], 0);
    assert_eq!(stats["totals"]["writes"], CYCLES * u64::from(REQS));
    // The last cycle's data is in the image.
    for i in 0..u64::from(REQS) {
        assert!(
            read_file_at(&s.image, i * CHUNK as u64, CHUNK)
                == pattern(CYCLES, i * CHUNK as u64, CHUNK),
            "request {i}'s data is not in the image"
        );
    }
}
