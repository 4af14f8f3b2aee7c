//! The vhost-user handler against a frontend that sends its messages in unusual orders or
//! breaks the protocol, through a raw frontend: rings start whatever the order of kick, call,
//! enable and memory; an interrupt due before the call fd arrives is delivered on it; a
//! re-sent kick fd keeps the ring alive; what a frontend may not send is refused, its
//! connection closed, and the next frontend served; no session leaves an fd behind.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 64;

/// One 4 KiB write on ring 0 as chain `3 * slot`, published and kicked; waits for its used
/// entry and checks its status.
fn write_one(g: &mut RawGuest, slot: u16) {
    let before = g.used_idx(0);
    g.write_buf(0, slot, &pattern(u64::from(slot), 0, BUF));
    g.add(0, slot, VIRTIO_BLK_T_OUT, u64::from(slot) * 8);
    g.publish_and_kick(0);
    g.wait("the write to complete", Duration::from_secs(10), |g| {
        g.used_idx(0) != before
    });
    assert_eq!(g.status(0, slot), 0);
}

fn wait_readable(fd: &EventFd, what: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    while fd.read().is_err() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_kick_before_the_memory_table_does_not_kill_the_ring() {
    let s = Server::start(4 * MIB, &[]);
    let mut g = RawGuest::new(&s.socket, 1, QSIZE);
    g.negotiate(false);
    g.frontend.set_vring_kick(0, &g.rings[0].kick).unwrap();
    g.rings[0].kick.write(1).unwrap();
    g.set_mem_table();
    g.set_ring(0, 0);
    g.frontend.set_vring_call(0, &g.rings[0].call).unwrap();
    g.frontend.set_vring_enable(0, true).unwrap();
    write_one(&mut g, 0);
}

#[test]
fn a_resent_kick_fd_keeps_a_running_ring_alive() {
    let s = Server::start(4 * MIB, &[]);
    let mut g = RawGuest::connect(&s.socket, 1, QSIZE, false);
    write_one(&mut g, 0);
    // A new eventfd on the running ring: kicks on it are heard, none on the old one matter.
    let fresh = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g.frontend.set_vring_kick(0, &fresh).unwrap();
    g.rings[0].kick = fresh;
    write_one(&mut g, 1);
    // The same eventfd again, then enable again: still one watch, still alive.
    g.frontend.set_vring_kick(0, &g.rings[0].kick).unwrap();
    g.frontend.set_vring_enable(0, true).unwrap();
    for slot in 2..10 {
        write_one(&mut g, slot);
    }
}

#[test]
fn a_completion_before_the_call_fd_is_signalled_on_the_new_one() {
    let s = Server::start(4 * MIB, &[]);
    let mut g = RawGuest::connect(&s.socket, 1, QSIZE, false);
    write_one(&mut g, 0);
    let base = g.frontend.get_vring_base(0).unwrap() as u16;
    // A request waits in the ring across the stop.
    g.write_buf(0, 1, &pattern(1, 0, BUF));
    g.add(0, 1, VIRTIO_BLK_T_OUT, 8);
    g.publish_and_kick(0);
    // QEMU's order: kick (the ring starts and completes the request), then call.
    g.set_ring(0, base);
    g.frontend.set_vring_kick(0, &g.rings[0].kick).unwrap();
    g.wait("the waiting request", Duration::from_secs(10), |g| {
        g.used_idx(0) == base.wrapping_add(1)
    });
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g.frontend.set_vring_call(0, &call).unwrap();
    wait_readable(&call, "the interrupt on the new call fd");
}

#[test]
fn a_ring_size_that_is_not_a_power_of_two_is_refused_and_the_next_frontend_served() {
    let mut s = Server::start(4 * MIB, &[]);
    let mut g = RawGuest::new(&s.socket, 1, QSIZE);
    g.negotiate(false);
    g.set_mem_table();
    assert!(g.frontend.set_vring_num(0, 100).is_err());
    drop(g);
    assert!(s.log().contains("size 100 refused"), "{}", s.log());
    let mut g = RawGuest::connect(&s.socket, 1, QSIZE, false);
    write_one(&mut g, 0);
    assert!(s.is_alive());
}

#[test]
fn a_memory_region_larger_than_its_file_is_refused_and_the_server_lives() {
    let mut s = Server::start(4 * MIB, &[]);
    for (size, offset) in [(MEM_SIZE as u64 * 2, 0), (MEM_SIZE as u64, 4096)] {
        let mut g = RawGuest::new(&s.socket, 1, QSIZE);
        g.negotiate(false);
        let small = memfd(MEM_SIZE);
        let r = g.frontend.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: 0x7000_0000_0000,
            mmap_offset: offset,
            mmap_handle: small.as_raw_fd(),
        }]);
        assert!(r.is_err(), "a region past its file's end was accepted");
    }
    assert!(s.log().contains("does not fit its file"), "{}", s.log());
    let mut g = RawGuest::connect(&s.socket, 1, QSIZE, false);
    write_one(&mut g, 0);
    assert!(s.is_alive());
}

#[test]
fn sessions_leave_no_fd_behind() {
    let s = Server::start(4 * MIB, &["--num-queues", "2"]);
    let pid = s.pid();
    {
        let mut g = RawGuest::connect(&s.socket, 2, QSIZE, false);
        write_one(&mut g, 0);
    }
    wait_until("the first session to end", Duration::from_secs(10), || {
        !std::fs::read_to_string(&s.log)
            .unwrap_or_default()
            .is_empty()
            && s.ctl_ok("query-status", &[])["connected"] == false
    });
    let baseline = fd_count(pid);
    for n in 0..30 {
        let mut g = RawGuest::connect(&s.socket, 2, QSIZE, false);
        write_one(&mut g, (n % 8) as u16);
    }
    // Many SET_OWNERs on one connection, each a fresh session.
    {
        let mut g = RawGuest::new(&s.socket, 2, QSIZE);
        for _ in 0..50 {
            g.frontend.set_owner().unwrap();
        }
        g.negotiate(false);
        g.set_mem_table();
        g.set_ring(0, 0);
        g.frontend.set_vring_kick(0, &g.rings[0].kick).unwrap();
        g.frontend.set_vring_call(0, &g.rings[0].call).unwrap();
        g.frontend.set_vring_enable(0, true).unwrap();
        write_one(&mut g, 0);
    }
    wait_until(
        "the fd count to come back to where it was",
        Duration::from_secs(10),
        || fd_count(pid) <= baseline,
    );
}
