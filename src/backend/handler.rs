//! The vhost-user requests of one frontend connection, answered from a [`Session`]: the vhost
//! crate frames the messages and checks their sizes and descriptors; this handler decides.
//!
//! - Every message that changes a ring or guest memory waits for the requests that ring (or
//!   every ring) has in flight first: the drain contract applies to the frontend's own changes
//!   as to every other stop.
//! - A second SET_OWNER (QEMU's `device_add` on a chardev it kept) ends the session, drained,
//!   and starts a fresh one on the same connection; the connection's negotiation stays.
//! - What the frontend sends is checked before it is used: memory regions against the size of
//!   their file (a mapping past the end of a file would kill the process on first touch), ring
//!   sizes (a power of two the device can drive), eventfds (that they are eventfds). A refusal
//!   is logged with its reason and ends the connection; the next frontend is served.
//! - Rings follow vhost-user.rst whatever order the messages come in: see `vring.rs`.
//! - INFLIGHT_SHMFD: the region's per-ring record is kept by the rings (see `inflight.rs` for
//!   the order of its stores) and read back when a ring starts.
//! - Dirty logging: with LOG_ALL acked and a log given (SET_LOG_BASE), every guest page the
//!   device writes is marked.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error as VuError, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap};

use super::device::Device;
use super::inflight::{log_used_ring, Gm, Phase};
use super::live::Live;
use super::session::Session;
use crate::fdlimit::hint;
use crate::virtio::config::WRITEBACK_OFFSET;
use crate::virtio::ring::dirty_log::DirtyLog;
use crate::virtio::ring::inflight::InflightRegion;
use crate::virtio::GuestMem;

type Result<T> = std::result::Result<T, VuError>;

/// As many memory slots as vhost-user-backend offers; QEMU needs one per RAM region.
const MAX_MEM_SLOTS: u64 = 509;

/// A refusal: logged with its reason (the frontend only learns that the request failed).
fn refuse(why: String) -> VuError {
    warn!("vhost-user: {why}");
    VuError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, why))
}

/// Where a region of guest memory sits in the frontend's address space: ring addresses come as
/// the frontend's virtual addresses.
struct Mapping {
    user_addr: u64,
    size: u64,
    gpa: u64,
}

/// A running session and its queue threads.
struct Running {
    s: Arc<Session>,
    threads: Vec<JoinHandle<()>>,
}

pub struct Frontend {
    dev: Arc<Device>,
    live: Arc<Live>,
    run: Option<Running>,
    owned: bool,
    acked_features: u64,
    acked_protocol: u64,
    mappings: Vec<Mapping>,
}

impl Frontend {
    pub fn new(dev: Arc<Device>, live: Arc<Live>) -> io::Result<Frontend> {
        let mut f = Frontend {
            dev,
            live,
            run: None,
            owned: false,
            acked_features: 0,
            acked_protocol: 0,
            mappings: Vec::new(),
        };
        f.start_session()?;
        Ok(f)
    }

    fn start_session(&mut self) -> io::Result<()> {
        let mem: Gm = GuestMemoryAtomic::new(GuestMem::new());
        let s = Arc::new(Session::new(self.dev.clone(), mem)?);
        let threads = s.spawn_threads()?;
        self.mappings.clear();
        self.live.set_current(Some(s.clone()));
        self.run = Some(Running { s, threads });
        Ok(())
    }

    /// Ends the session: every accepted request completes (or is given up on at the drain
    /// timeout) while the frontend still listens, then the threads end and every fd the session
    /// took (rings' eventfds, memory, logs, inflight region) is closed.
    pub fn end_session(&mut self, why: &str) {
        let Some(Running { s, threads }) = self.run.take() else {
            return;
        };
        let report = s.drain_all(Phase::Closed);
        self.live.set_current(None);
        self.live.drain_done(why, &report);
        s.stop_threads();
        if s.abandoned_any() {
            // A worker may still sit in a system call that never returns; joining it would
            // hang the server. Let a detached thread wait for it instead.
            let _ = std::thread::Builder::new()
                .name("teardown".to_string())
                .spawn(move || threads.into_iter().for_each(|t| drop(t.join())));
        } else {
            for t in threads {
                let _ = t.join();
            }
        }
        yield_files(&self.dev, &s);
    }

    fn s(&self) -> Result<&Arc<Session>> {
        self.run
            .as_ref()
            .map(|r| &r.s)
            .ok_or_else(|| refuse("no session (it failed to start)".to_string()))
    }

    fn check_queue(&self, index: u32) -> Result<usize> {
        let n = usize::from(self.dev.cfg.num_queues);
        let q = index as usize;
        if q >= n {
            return Err(refuse(format!(
                "ring {index} does not exist (the device has {n} queues)"
            )));
        }
        Ok(q)
    }

    fn va_to_gpa(&self, va: u64, what: &str) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.user_addr && va - m.user_addr < m.size)
            .map(|m| va - m.user_addr + m.gpa)
            .ok_or_else(|| refuse(format!("{what} address {va:#x} is in no memory region")))
    }

    /// Drains every queue, so that nothing in flight sees the change about to be made; the
    /// queues start again on their next wake-up.
    fn quiet(&self, why: &str) -> Result<()> {
        let s = self.s()?;
        let report = s.drain_all(Phase::Stopped);
        if report.waited_for > 0 || !report.abandoned.is_empty() {
            report.log(why);
        }
        Ok(())
    }

    fn wake_all(&self) {
        if let Ok(s) = self.s() {
            s.poke();
        }
    }

    /// After the memory table changed: each ring checks whether its areas are in memory now.
    fn memory_changed(&self) -> Result<()> {
        let s = self.s()?;
        for v in &s.vrings {
            v.get_mut().memory_changed();
        }
        s.poke();
        Ok(())
    }

    /// A memory region as given, mapped: refused when it does not lie inside its file.
    fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<GuestRegionMmap<()>> {
        let (gpa, size, offset) = (
            region.guest_phys_addr,
            region.memory_size,
            region.mmap_offset,
        );
        let file_len = file
            .metadata()
            .map_err(|e| refuse(format!("cannot stat a memory region's fd: {e}")))?
            .len();
        let end = offset.checked_add(size);
        if size == 0 || end.is_none_or(|e| e > file_len) || gpa.checked_add(size).is_none() {
            return Err(refuse(format!(
                "memory region at guest address {gpa:#x} of {size} bytes from offset {offset} does not fit its file of {file_len} bytes"
            )));
        }
        let mmap = MmapRegion::<()>::from_file(FileOffset::new(file, offset), size as usize)
            .map_err(|e| refuse(format!("cannot map memory region at {gpa:#x}: {e}")))?;
        GuestRegionMmap::new(mmap, GuestAddress(gpa))
            .ok_or_else(|| refuse(format!("memory region at {gpa:#x} overflows")))
    }

    /// Recomputes whether written pages are logged: LOG_ALL acked and a log given.
    fn update_logging(&self) -> Result<()> {
        let s = self.s()?;
        let on = self.acked_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        let was = s.logging();
        s.logging.store(on, Ordering::Release);
        if s.logging() != was {
            info!(
                "dirty page logging {} (a migration {})",
                if s.logging() { "on" } else { "off" },
                if s.logging() { "runs" } else { "ended" }
            );
        }
        Ok(())
    }

    /// The queues and queue size a GET/SET_INFLIGHT_FD asks for, if the device has them.
    fn check_inflight_shape(&self, inflight: &VhostUserInflight) -> Result<(u16, u16)> {
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        let (max_q, max_size) = (self.dev.cfg.num_queues, self.dev.cfg.queue_size);
        if num_queues == 0 || num_queues > max_q || queue_size == 0 || queue_size > max_size {
            return Err(refuse(format!(
                "inflight region for {num_queues} queues of {queue_size} entries refused: the device has up to {max_q} queues of up to {max_size}"
            )));
        }
        Ok((num_queues, queue_size))
    }

    fn attach_inflight(&self, region: InflightRegion) -> Result<()> {
        self.quiet("inflight region change")?;
        let s = self.s()?;
        for (q, v) in s.vrings.iter().enumerate() {
            let mut state = v.get_mut();
            // Queues the region does not cover (the frontend uses fewer) go untracked.
            state.inflight = region.queue(q as u16).ok();
            if state.is_started() {
                // Only a frontend that sends the region after starting its rings gets here.
                state.recover_inflight(q);
            }
        }
        self.wake_all();
        Ok(())
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.end_session("disconnect");
    }
}

/// Every queue of `s` is stopped by its frontend (the last ring stopped, a reset, the end of
/// the session): if an `--incoming` process waits for the image, it may have it now (QEMU
/// starts the destination's rings after the source's stopped). Not while a request a drain
/// gave up on may still be running: it could write after the other process took over (the
/// destination's claim then times out, the safe failure). A quiesce does not yield: the
/// frontend did not stop, and would find its disk gone on resume.
fn yield_files(dev: &Device, s: &Session) {
    if s.abandoned_any() {
        return;
    }
    if dev.yield_writer_if_waited() {
        info!("image and spare handed to the waiting --incoming process");
    }
}

/// Whether `fd` is an eventfd: a kick or call fd must be one (a regular file or a pipe would
/// spin the worker or block it).
fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}

fn check_eventfd(file: &Option<File>, what: &str, index: u8) -> Result<()> {
    match file {
        Some(f) if !is_eventfd(std::os::fd::AsFd::as_fd(f)) => Err(refuse(format!(
            "ring {index}: the {what} fd is not an eventfd"
        ))),
        _ => Ok(()),
    }
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl VhostUserBackendReqHandlerMut for Frontend {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            info!("frontend re-initialised the device on its connection (SET_OWNER again, as QEMU does on device_add); starting a fresh session");
            self.end_session("SET_OWNER again");
            self.start_session()
                .map_err(|e| refuse(format!("cannot start a fresh session: {e}{}", hint(&e))))?;
            // The connection's negotiation stays: apply it to the fresh rings.
            self.set_features(self.acked_features)?;
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.end_session("RESET_OWNER");
        self.owned = false;
        self.start_session()
            .map_err(|e| refuse(format!("cannot start a fresh session: {e}{}", hint(&e))))
    }

    fn reset_device(&mut self) -> Result<()> {
        let s = self.s()?.clone();
        s.drain_all(Phase::Stopped).log("device reset");
        let enabled = self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for (q, v) in s.vrings.iter().enumerate() {
            let kick = v.get_mut().reset(enabled);
            s.rewatch_kick(q, kick.as_ref().map(AsRawFd::as_raw_fd), None);
        }
        s.writeback.store(true, Ordering::Relaxed);
        yield_files(&self.dev, &s);
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.dev.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let offered = self.dev.features();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "the frontend acked features {:#x} the device did not offer",
                features & !offered
            )));
        }
        // Only LOG_ALL may change under running rings (QEMU turns logging on and off during
        // a migration); anything else waits for what is in flight.
        let changed = (self.acked_features ^ features) & !VhostUserVirtioFeatures::LOG_ALL.bits();
        if changed != 0 {
            self.quiet("feature change")?;
        }
        self.acked_features = features;
        let s = self.s()?.clone();
        s.wce_acked.store(
            features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0,
            Ordering::Relaxed,
        );
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // Without protocol features a ring is enabled from the start; with them, once
        // SET_VRING_ENABLE says so. A ring already started keeps its state (QEMU sets features
        // again to turn logging on and off during a migration).
        let enabled = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for v in &s.vrings {
            let mut state = v.get_mut();
            state.get_queue_mut().set_event_idx(event_idx);
            if state.get_kick().is_none() {
                state.set_enabled(enabled);
            }
        }
        self.update_logging()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            regions.push(Arc::new(Self::map_region(region, file)?));
            mappings.push(Mapping {
                user_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
        }
        let mem = GuestMem::from_arc_regions(regions)
            .map_err(|e| refuse(format!("memory table refused: {e}")))?;
        self.quiet("memory table change")?;
        let s = self.s()?;
        // Requests keep the view of memory they were parsed against; the old regions stay
        // mapped until the last of them is done.
        s.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(mem);
        self.mappings = mappings;
        self.memory_changed()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let q = self.check_queue(index)?;
        let max = u32::from(self.dev.cfg.queue_size);
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(refuse(format!(
                "ring {index}: size {num} refused: it must be a power of two from 1 to {max}"
            )));
        }
        let s = self.s()?;
        s.drain_queue(q);
        s.vrings[q]
            .get_mut()
            .set_size(num as u16)
            .map_err(|e| refuse(format!("ring {index}: size {num}: {e}")))?;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> Result<()> {
        let q = self.check_queue(index)?;
        let desc = self.va_to_gpa(descriptor, "descriptor table")?;
        let avail = self.va_to_gpa(available, "avail ring")?;
        let used = self.va_to_gpa(used, "used ring")?;
        let s = self.s()?;
        s.drain_queue(q);
        let mut state = s.vrings[q].get_mut();
        state
            .set_addresses(desc, avail, used)
            .map_err(|e| refuse(format!("ring {index}: addresses refused: {e}")))?;
        state.log_addr = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        drop(state);
        s.wake(q);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let q = self.check_queue(index)?;
        let s = self.s()?;
        s.drain_queue(q);
        s.vrings[q]
            .get_mut()
            .get_queue_mut()
            .set_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let q = self.check_queue(index)?;
        let s = self.s()?.clone();
        // Not ready first, so the worker stops taking chains; then every accepted one
        // completes and is signalled through the call fd the frontend still listens to.
        s.vrings[q].get_mut().halt();
        if let Some(report) = s.drain_queue(q) {
            report.log(&format!("queue {index} stopped by the frontend"));
        }
        let mut state = s.vrings[q].get_mut();
        if let Some(log) = s.dirty_log() {
            log_used_ring(&state, &log);
        }
        let next_avail = state.get_queue().next_avail();
        let kick = state.release_fds();
        drop(state);
        s.rewatch_kick(q, kick.as_ref().map(AsRawFd::as_raw_fd), None);
        if s.all_stopped() {
            yield_files(&self.dev, &s);
        }
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = self.check_queue(u32::from(index))?;
        check_eventfd(&fd, "kick", index)?;
        if let Some(f) = &fd {
            set_nonblocking(f).map_err(|e| refuse(format!("ring {index}: kick fd: {e}")))?;
        }
        let s = self.s()?;
        let new = fd.as_ref().map(AsRawFd::as_raw_fd);
        let mut state = s.vrings[q].get_mut();
        let starting = !state.is_started();
        let old = state.set_kick(fd);
        s.rewatch_kick(q, old.as_ref().map(AsRawFd::as_raw_fd), new);
        if starting {
            state.recover_inflight(q);
        }
        drop(state);
        drop(old);
        // The ring may have entries already (a restart): look without waiting for a kick.
        s.wake(q);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = self.check_queue(u32::from(index))?;
        check_eventfd(&fd, "call", index)?;
        self.s()?.vrings[q].get_mut().set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = self.check_queue(u32::from(index))?;
        check_eventfd(&fd, "error", index)?;
        self.s()?.vrings[q].get_mut().set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.dev.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let offered = self.dev.protocol_features().bits();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "the frontend acked protocol features {:#x} the device did not offer",
                features & !offered
            )));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.dev.cfg.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let q = self.check_queue(index)?;
        let s = self.s()?;
        if !enable {
            s.drain_queue(q);
        }
        s.vrings[q].get_mut().set_enabled(enable);
        s.wake(q);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let writeback = self.s()?.writeback.load(Ordering::Relaxed);
        Ok(self.dev.config_space(writeback).read(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // Only `writeback` is writable, and only with CONFIG_WCE negotiated.
        if offset as usize != WRITEBACK_OFFSET || buf.len() != 1 {
            return Err(refuse(format!(
                "config write at offset {offset} of {} bytes: only the writeback byte is writable",
                buf.len()
            )));
        }
        let s = self.s()?;
        if !s.wce_acked.load(Ordering::Relaxed) {
            return Err(refuse(
                "config write to writeback without CONFIG_WCE negotiated".to_string(),
            ));
        }
        let writeback = buf[0] != 0;
        debug!(
            "guest set the cache to {}",
            if writeback {
                "writeback"
            } else {
                "writethrough"
            }
        );
        s.writeback.store(writeback, Ordering::Relaxed);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // Not offered (BACKEND_REQ); a frontend that sends one anyway gets it closed.
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = self.check_inflight_shape(inflight)?;
        let region = InflightRegion::create(num_queues, queue_size)
            .map_err(|e| refuse(format!("cannot create the inflight region: {e}")))?;
        let file = region
            .file()
            .try_clone()
            .map_err(|e| refuse(format!("cannot share the inflight region: {e}{}", hint(&e))))?;
        let reply = VhostUserInflight::new(region.mmap_size(), 0, num_queues, queue_size);
        info!("inflight tracking: a region for {num_queues} queues of {queue_size} entries");
        self.attach_inflight(region)?;
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let (num_queues, queue_size) = self.check_inflight_shape(inflight)?;
        let region = InflightRegion::open(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            num_queues,
            queue_size,
        )
        .map_err(|e| refuse(format!("inflight region refused: {e}")))?;
        self.attach_inflight(region)
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        let mapped = Arc::new(Self::map_region(region, fd)?);
        let s = self.s()?.clone();
        let mem = s
            .mem
            .memory()
            .insert_region(mapped)
            .map_err(|e| refuse(format!("memory region refused: {e}")))?;
        self.quiet("memory region added")?;
        s.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(mem);
        self.mappings.push(Mapping {
            user_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        self.memory_changed()?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let s = self.s()?.clone();
        let (mem, _) = s
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| refuse(format!("memory region removal refused: {e}")))?;
        self.quiet("memory region removed")?;
        s.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(mem);
        let gpa = region.guest_phys_addr;
        self.mappings.retain(|m| m.gpa != gpa);
        self.memory_changed()?;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(VuError::InvalidOperation("no device state to transfer"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(VuError::InvalidOperation("no device state to transfer"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let map = DirtyLog::map(&file, log.mmap_size, log.mmap_offset)
            .map_err(|e| refuse(format!("dirty log refused: {e}")))?;
        // QEMU reads and frees the log it replaces once this returns: nothing may still be
        // marking it.
        self.quiet("dirty log change")?;
        let s = self.s()?;
        s.log.store(Some(Arc::new(map)));
        self.update_logging()?;
        self.wake_all();
        Ok(())
    }
}
