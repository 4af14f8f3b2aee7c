//! Who may write the image and the spare file: one process at a time, handed from one
//! remapblk to another in a migration (`serve --incoming`), by OFD locks on both files
//! (`storage::lock`), the way QEMU locks its images.
//!
//! # The protocol
//!
//! Three bytes of each file are locked, far past any image's end (advisory locks never touch
//! data, and these stay clear of QEMU's bytes 100 to 299):
//!
//! - [`ATTACHED`]: every `serve` holds a read lock on it for as long as it lives. A plain `serve`
//!   first takes it as a write lock, which the kernel grants only when no other process is
//!   attached: that is the test, atomic, that refuses a second `serve` (naming the holder, from
//!   `/proc`). It then turns it into a read lock, so that an `--incoming` process can attach.
//! - [`WRITER`]: a write lock, held exactly while the process may write the file. A plain
//!   `serve` takes it at start-up. Taken image first, then spare, so that two processes after
//!   it never hold one each.
//! - [`INCOMING`]: a read lock, held by every attached process that is not the writer: an
//!   `--incoming` process from its start, and a writer that yielded (so that it can be handed
//!   the files back: a migration back). The writer only ever tests it.
//!
//! The writer yields ([`Handover::yield_if_waited`]) when every queue is stopped and drained
//! (the frontend stopped the rings: QEMU does so on the source at the end of a migration) and
//! another process holds [`INCOMING`]: it waits for running control commands that change the
//! files, makes both files durable (the table is already; guest data and spare blocks need an
//! fdatasync), leaves its pending list in the spare file, takes [`INCOMING`] and releases
//! [`WRITER`]. Without a waiter it keeps the files: a VM paused or rebooted costs nothing.
//!
//! A process that is not the writer claims it ([`Handover::claim`]) before a queue runs (QEMU
//! starts the destination's rings after the source's have stopped): it takes [`WRITER`],
//! waiting up to [`CLAIM_WAIT`] for the source to let go, then loads the table, the spare
//! blocks it keeps in memory and the pending list from the spare file as the last writer left
//! them (whatever it had in memory may be stale: another process wrote), releases
//! [`INCOMING`] and is the writer. If [`WRITER`] stays taken, a process that yielded has been
//! handed over and writes nothing more ([`HandoverError::HandedOver`], naming the new writer);
//! an `--incoming` process keeps waiting. A migration that fails before the destination
//! claims leaves [`WRITER`] free, and the source's next claim takes it back.
//!
//! Until it claims, an `--incoming` process opens both files without writing them: no image is
//! created or grown, no bad metadata slot repaired (the claim does that), and the remap table's
//! gate (`remap::gate`) is closed, so control commands that would change the files are refused.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use serde::Serialize;
use serde_json::json;
use thiserror::Error;

use crate::denied;
use crate::events::EventLog;
use crate::remap::RemapTable;
use crate::storage::lock::{Holder, Kind, LockFile};

/// Far past the end of any real image, where nothing is ever written (not that it matters to
/// an advisory lock), and far from QEMU's bytes 100 to 299, whose locks must not meet ours.
const BASE: u64 = 0x7265_6d61_7000_0000;
/// Held (read) by every attached process; taken as a write lock to test that none is.
pub const ATTACHED: u64 = BASE;
/// Held (write) by the one process that may write the file.
pub const WRITER: u64 = BASE + 1;
/// Held (read) by attached processes that are not the writer and would take over.
pub const INCOMING: u64 = BASE + 2;

/// How long a claim waits for the writer lock: the source lets go as its rings stop, before
/// QEMU starts the destination's; this is slack, not a protocol step.
pub const CLAIM_WAIT: Duration = Duration::from_secs(10);
/// How long a yield waits for control commands that change the files to finish.
const GATE_WAIT: Duration = Duration::from_secs(10);
/// How long an `--incoming` process retries attaching while a plain `serve` holds
/// [`ATTACHED`] for its start-up test (microseconds, normally).
const ATTACH_WAIT: Duration = Duration::from_secs(1);
/// Between two attempts at a lock another process holds.
const LOCK_POLL: Duration = Duration::from_millis(2);

/// Which of the two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Image,
    Spare,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Image => "image",
            Role::Spare => "spare file",
        })
    }
}

/// How a process attaches to the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A plain `serve`: alone, and the writer from the start.
    Serve,
    /// `serve --incoming`: beside the writer, taking over at its first claim.
    Incoming,
}

/// The processes `/proc` says hold a lock, for messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holders(pub Vec<Holder>);

impl Holders {
    fn of(lock: &LockFile, byte: u64) -> Holders {
        Holders(lock.holders(byte))
    }

    /// The first holder's pid, when `/proc` named one.
    pub fn pid(&self) -> Option<u32> {
        self.0.first().map(|h| h.pid)
    }
}

impl fmt::Display for Holders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [] => f.write_str(
                "another process (/proc does not say which: it may belong to another user, or \
                 run on another host that shares this storage)",
            ),
            [one] => write!(f, "{one}"),
            many => {
                let all: Vec<String> = many.iter().map(ToString::to_string).collect();
                write!(f, "{}", all.join(" and "))
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("{role} {} does not exist. serve --incoming takes over the files of a running remapblk and creates neither: give it the source's --image and --spare (the spare defaults to <image>.spare), on storage both hosts share", path.display())]
    Missing { role: Role, path: PathBuf },
    #[error("cannot open {role} {} to lock it: {source}{}", path.display(), denied::advice(.source, .path, denied::READ_WRITE))]
    Open {
        role: Role,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot lock {role} {}: {source}", path.display())]
    Lock {
        role: Role,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{role} {} is in use by {holders}. {}", path.display(), advice(*role))]
    InUse {
        role: Role,
        path: PathBuf,
        holders: Holders,
    },
    #[error("{role} {} was replaced while it was being opened (its name now leads to another file); start again", path.display())]
    Replaced { role: Role, path: PathBuf },
    #[error("{holders} still holds the writer lock of {role} {} after {}s: its frontend has not stopped the rings (QEMU stops them on the source as a migration completes). This process waits to take over and writes nothing until then", path.display(), CLAIM_WAIT.as_secs())]
    StillHeld {
        role: Role,
        path: PathBuf,
        holders: Holders,
    },
    #[error("this process handed the image and spare file over to {holders} (a migration) and writes neither any more; stop it, or migrate back to it")]
    HandedOver { holders: Holders },
    #[error("this process yielded the image and spare file to {holders} for a migration and writes neither until its frontend starts the rings again (as QEMU does when a migration fails); try again then")]
    Yielded { holders: Holders },
    #[error("this process waits to take over the image and spare file (serve --incoming) and writes neither until its frontend starts the rings, after the migration; try again then")]
    NotYet,
    #[error("{0}; the files stay with whoever holds them, and this process writes neither")]
    Reload(String),
    #[error("{0}")]
    Spare(String),
}

fn advice(role: Role) -> &'static str {
    match role {
        Role::Image => "Two processes must not serve one image: stop that one first, or start this one with --incoming to take over from it in a migration",
        Role::Spare => "Two processes must not share a spare file: give this image its own --spare, stop that process first, or start this one with --incoming to take over from it in a migration",
    }
}

/// One file's locks, as a process attached to it holds them.
#[derive(Debug)]
pub struct Attachment {
    role: Role,
    lock: LockFile,
}

impl Attachment {
    /// Attaches to the file at `path`, which must exist: in [`Mode::Serve`] alone (refused,
    /// naming the holder, while another process is attached) and as its writer; in
    /// [`Mode::Incoming`] beside the writer, waiting.
    ///
    /// A file that cannot be opened for writing (a read-only image for `--readonly`) takes no
    /// write locks: the test that no other process is attached is then not atomic, and the
    /// writer lock rests on the spare file.
    pub fn attach(role: Role, path: &Path, mode: Mode) -> Result<Attachment, HandoverError> {
        let lock = LockFile::open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound && mode == Mode::Incoming {
                HandoverError::Missing {
                    role,
                    path: path.to_path_buf(),
                }
            } else {
                HandoverError::Open {
                    role,
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let a = Attachment { role, lock };
        match mode {
            Mode::Serve => a.attach_alone()?,
            Mode::Incoming => a.attach_beside()?,
        }
        Ok(a)
    }

    fn attach_alone(&self) -> Result<(), HandoverError> {
        let l = &self.lock;
        if !l.writable() {
            if self.io(l.conflicts(ATTACHED, Kind::Write))?
                || !self.io(l.try_lock(ATTACHED, Kind::Read))?
            {
                return Err(self.in_use(ATTACHED));
            }
            return Ok(());
        }
        if !self.io(l.try_lock(ATTACHED, Kind::Write))? {
            return Err(self.in_use(ATTACHED));
        }
        if !self.io(l.try_lock(WRITER, Kind::Write))? {
            // Someone writes without being attached: not a remapblk of this protocol.
            let _ = l.unlock(ATTACHED);
            return Err(self.in_use(WRITER));
        }
        // A conversion of our own lock: nothing can conflict.
        if !self.io(l.try_lock(ATTACHED, Kind::Read))? {
            return Err(self.in_use(ATTACHED));
        }
        Ok(())
    }

    fn attach_beside(&self) -> Result<(), HandoverError> {
        let l = &self.lock;
        let deadline = Instant::now() + ATTACH_WAIT;
        while !self.io(l.try_lock(ATTACHED, Kind::Read))? {
            if Instant::now() >= deadline {
                return Err(self.in_use(ATTACHED));
            }
            std::thread::sleep(LOCK_POLL);
        }
        if !self.io(l.try_lock(INCOMING, Kind::Read))? {
            return Err(self.in_use(INCOMING));
        }
        Ok(())
    }

    /// Checks that `file`, opened by the same path, is the file locked.
    pub fn check_file(&self, file: &std::fs::File) -> Result<(), HandoverError> {
        if self.io(self.lock.is_same_file(file))? {
            Ok(())
        } else {
            Err(HandoverError::Replaced {
                role: self.role,
                path: self.lock.path().to_path_buf(),
            })
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn path(&self) -> &Path {
        self.lock.path()
    }

    fn io<T>(&self, r: io::Result<T>) -> Result<T, HandoverError> {
        r.map_err(|source| HandoverError::Lock {
            role: self.role,
            path: self.lock.path().to_path_buf(),
            source,
        })
    }

    fn in_use(&self, byte: u64) -> HandoverError {
        HandoverError::InUse {
            role: self.role,
            path: self.lock.path().to_path_buf(),
            holders: Holders::of(&self.lock, byte),
        }
    }

    /// Takes the writer lock, retrying until `deadline`. False when another process still
    /// holds it then.
    fn take_writer(&self, deadline: Instant) -> Result<bool, HandoverError> {
        if !self.lock.writable() {
            return Ok(true);
        }
        loop {
            if self.io(self.lock.try_lock(WRITER, Kind::Write))? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(LOCK_POLL);
        }
    }

    fn release_writer(&self) {
        if let Err(e) = self.lock.unlock(WRITER) {
            // Closing the file at exit releases it anyway.
            error!(
                "{} {}: cannot release the writer lock: {e}",
                self.role,
                self.path().display()
            );
        }
    }

    /// Whether another process waits to take over.
    fn waited(&self) -> Result<bool, HandoverError> {
        self.io(self.lock.conflicts(INCOMING, Kind::Write))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Holds the writer lock.
    Writer,
    /// `--incoming`, not yet taken over.
    Incoming,
    /// Gave the writer lock up to a waiting process, which may not have taken it (yet).
    Yielded,
    /// A claim found the writer lock taken by another process after a yield.
    HandedOver,
}

struct Inner {
    phase: Phase,
    /// Whom the files were yielded or handed over to; None until someone asks after a yield
    /// (looking through `/proc` then would delay the frontend's ring stop, which waits for
    /// the yield: the migration's downtime).
    other: Option<Holders>,
}

struct Files {
    image: Attachment,
    spare: Attachment,
    table: Arc<RemapTable>,
}

/// What `query-status` says of the handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriterState {
    /// `writer`; `incoming` (waiting to take over); `yielded` (gave the files up to a waiting
    /// process, takes them back when its rings start unless that process took over);
    /// `handed-over` (another process took them).
    pub state: &'static str,
    /// The process yielded or handed over to, when `/proc` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// The writer lock of one process's image and spare file, and the handover of it.
pub struct Handover {
    /// None for a process that locks nothing (tests of the layers above): always the writer.
    files: Option<Files>,
    /// The fast path of [`Handover::claim`]: set only while the phase is `Writer`.
    writer: AtomicBool,
    /// Taken by a claim or a yield for all it does (a claim may wait seconds for the lock),
    /// so one runs at a time.
    turn: Mutex<()>,
    /// What the phase is, for moments only: `query-status` must not wait for a claim.
    inner: Mutex<Inner>,
    claim_wait: Duration,
    events: Arc<EventLog>,
    /// Never yield (`serve --overlay`: the guest's data is in an overlay that a process
    /// taking over the image would not see).
    keep: bool,
}

impl Handover {
    /// A handover of nothing: the process is the writer and never yields.
    pub fn unlocked() -> Handover {
        Handover {
            files: None,
            writer: AtomicBool::new(true),
            turn: Mutex::new(()),
            inner: Mutex::new(Inner {
                phase: Phase::Writer,
                other: None,
            }),
            claim_wait: CLAIM_WAIT,
            events: Arc::new(EventLog::disabled()),
            keep: false,
        }
    }

    /// The handover of the files `image` and `spare` attached to in `mode`, whose table is
    /// `table` (opened with `remap::open_untouched` for [`Mode::Incoming`]). A plain serve
    /// wipes a pending list a handover left unused: it starts afresh.
    pub fn new(
        mode: Mode,
        image: Attachment,
        spare: Attachment,
        table: Arc<RemapTable>,
    ) -> Result<Handover, HandoverError> {
        let phase = match mode {
            Mode::Serve => {
                table
                    .discard_saved_pending()
                    .map_err(HandoverError::Spare)?;
                Phase::Writer
            }
            Mode::Incoming => {
                table.gate().close(Duration::ZERO);
                Phase::Incoming
            }
        };
        Ok(Handover {
            files: Some(Files {
                image,
                spare,
                table,
            }),
            writer: AtomicBool::new(phase == Phase::Writer),
            turn: Mutex::new(()),
            inner: Mutex::new(Inner { phase, other: None }),
            claim_wait: CLAIM_WAIT,
            events: Arc::new(EventLog::disabled()),
            keep: false,
        })
    }

    /// How long a claim waits for another process to let the writer lock go (default
    /// [`CLAIM_WAIT`]).
    pub fn with_claim_wait(mut self, wait: Duration) -> Handover {
        self.claim_wait = wait;
        self
    }

    /// A writer that never yields, whoever waits: the files do not hold the guest's data
    /// (`serve --overlay`), so a process taking them over would serve a stale disk.
    pub fn never_yield(mut self) -> Handover {
        self.keep = true;
        self
    }

    /// Where yields and takeovers are reported (`--event-log`).
    pub fn with_events(mut self, events: Arc<EventLog>) -> Handover {
        self.events = events;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Makes this process the writer, if it is not: before a queue runs. One atomic load when
    /// it is; otherwise takes the writer lock (waiting for a source to let go), loads the remap
    /// state from the spare file and is the writer from then on. Any number of threads may
    /// call it at once; one does the work, the others wait for it.
    pub fn claim(&self) -> Result<(), HandoverError> {
        if self.writer.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(files) = &self.files else {
            return Ok(());
        };
        let _turn = self.turn();
        let was = self.phase();
        if was == Phase::Writer {
            return Ok(());
        }
        // Once a claim found another writer, the next ones do not wait for it again: it does
        // not let go unless it yields, and then the lock is free already.
        let wait = if was == Phase::HandedOver {
            Duration::ZERO
        } else {
            self.claim_wait
        };
        let deadline = Instant::now() + wait;
        if !files.image.take_writer(deadline)? {
            return Err(self.not_taken(was, &files.image));
        }
        if !files.spare.take_writer(deadline)? {
            files.image.release_writer();
            return Err(self.not_taken(was, &files.spare));
        }
        let (remaps, pending) = match files.table.reload() {
            Ok(n) => n,
            Err(e) => {
                files.spare.release_writer();
                files.image.release_writer();
                return Err(HandoverError::Reload(e));
            }
        };
        for a in [&files.image, &files.spare] {
            if let Err(e) = a.lock.unlock(INCOMING) {
                // Only makes the new writer yield when its rings stop, to no one.
                warn!(
                    "{} {}: cannot drop the incoming lock: {e}",
                    a.role,
                    a.path().display()
                );
            }
        }
        files.table.gate().open();
        *self.lock() = Inner {
            phase: Phase::Writer,
            other: None,
        };
        self.writer.store(true, Ordering::Release);
        info!(
            "took over {} and {} as their writer ({}): {remaps} remaps and {pending} pending blocks loaded from the spare file",
            files.image.path().display(),
            files.spare.path().display(),
            match was {
                Phase::Incoming => "serve --incoming",
                _ => "after yielding them",
            }
        );
        self.events
            .emit("takeover", json!({ "remaps": remaps, "pending": pending }));
        Ok(())
    }

    /// The error of a claim that found the writer lock of `a` held past its wait.
    fn not_taken(&self, was: Phase, a: &Attachment) -> HandoverError {
        let holders = Holders::of(&a.lock, WRITER);
        if was == Phase::Incoming {
            return HandoverError::StillHeld {
                role: a.role,
                path: a.path().to_path_buf(),
                holders,
            };
        }
        if was != Phase::HandedOver {
            warn!("the image and spare file were handed over to {holders}; this process writes neither any more");
            self.events
                .emit("handed-over", json!({ "pid": holders.pid() }));
        }
        *self.lock() = Inner {
            phase: Phase::HandedOver,
            other: Some(holders.clone()),
        };
        HandoverError::HandedOver { holders }
    }

    /// Gives the writer lock up when another process waits to take over: to be called when a
    /// drain has left every queue stopped. Cheap when no one waits (a lock test per file).
    /// Returns whether it yielded.
    ///
    /// The caller must keep queues from starting until this returns (vhost-user's message
    /// handler, which starts and stops rings, serialises the two), and must not call it while
    /// a request a drain gave up on may still be running in the block stack: that request
    /// could write after another process took over.
    pub fn yield_if_waited(&self) -> bool {
        let Some(files) = &self.files else {
            return false;
        };
        if !self.writer.load(Ordering::Acquire) {
            return false;
        }
        let _turn = self.turn();
        if self.phase() != Phase::Writer {
            return false;
        }
        let waited = files
            .image
            .waited()
            .and_then(|w| Ok(w || files.spare.waited()?));
        match waited {
            Ok(true) if self.keep => {
                warn!("a process waits to take over the image and spare file, but this one serves them with --overlay, whose changes it would not see; keeping them (overlay-commit, then stop this process, to hand them over)");
                return false;
            }
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                error!("cannot tell whether a process waits to take over: {e}; keeping the files");
                return false;
            }
        }
        if let Err(e) = self.give_up(files) {
            error!("cannot hand the image and spare file over: {e}; keeping them, so the process waiting to take over cannot");
            return false;
        }
        info!("yielded the image and spare file to the process waiting to take over; they come back if it does not take them before this process's rings start again");
        self.events.emit("yield", json!({}));
        *self.lock() = Inner {
            phase: Phase::Yielded,
            other: None,
        };
        true
    }

    /// Makes both files durable and gives their writer lock up, or changes nothing.
    fn give_up(&self, files: &Files) -> Result<(), String> {
        let table = &files.table;
        if !table.gate().close(GATE_WAIT) {
            return Err(format!(
                "a remap-add, remap-remove or auto-remap still runs after {}s",
                GATE_WAIT.as_secs()
            ));
        }
        self.writer.store(false, Ordering::Release);
        let durable = files
            .image
            .lock
            .sync()
            .map_err(|e| format!("fdatasync of the image: {e}"))
            .and_then(|()| {
                table
                    .spare()
                    .sync()
                    .map_err(|e| format!("fdatasync of the spare file: {e}"))
            })
            .and_then(|()| {
                table
                    .save_pending()
                    .map_err(|e| format!("saving the pending list in the spare file: {e}"))
            })
            .and_then(|()| {
                // Waiting from now on, so that the files can be handed back.
                for a in [&files.image, &files.spare] {
                    if !a
                        .io(a.lock.try_lock(INCOMING, Kind::Read))
                        .map_err(|e| e.to_string())?
                    {
                        return Err(format!(
                            "{} {}: cannot take the incoming lock",
                            a.role,
                            a.path().display()
                        ));
                    }
                }
                Ok(())
            });
        if let Err(e) = durable {
            for a in [&files.image, &files.spare] {
                let _ = a.lock.unlock(INCOMING);
            }
            table.gate().open();
            self.writer.store(true, Ordering::Release);
            return Err(e);
        }
        files.spare.release_writer();
        files.image.release_writer();
        Ok(())
    }

    /// Whether this process may change the files now (for control commands, which never take
    /// the writer lock themselves: only a running frontend decides where the guest runs).
    pub fn check_writer(&self) -> Result<(), HandoverError> {
        if self.writer.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut inner = self.lock();
        match inner.phase {
            Phase::Writer => Ok(()),
            Phase::Incoming => Err(HandoverError::NotYet),
            Phase::Yielded => Err(HandoverError::Yielded {
                holders: self.other(&mut inner),
            }),
            Phase::HandedOver => Err(HandoverError::HandedOver {
                holders: self.other(&mut inner),
            }),
        }
    }

    /// Whether this process is the writer.
    pub fn is_writer(&self) -> bool {
        self.writer.load(Ordering::Acquire)
    }

    pub fn state(&self) -> WriterState {
        let mut inner = self.lock();
        let (state, pid) = match inner.phase {
            Phase::Writer => ("writer", None),
            Phase::Incoming => ("incoming", None),
            Phase::Yielded => ("yielded", self.other(&mut inner).pid()),
            Phase::HandedOver => ("handed-over", self.other(&mut inner).pid()),
        };
        WriterState { state, pid }
    }

    /// Whom the files were yielded or handed over to: after a yield, the processes waiting
    /// to take over, looked up the first time someone asks.
    fn other(&self, inner: &mut Inner) -> Holders {
        let files = self.files.as_ref();
        inner
            .other
            .get_or_insert_with(|| {
                files.map_or_else(Holders::default, |f| Holders::of(&f.image.lock, INCOMING))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests;
