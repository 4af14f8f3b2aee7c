//! The seccomp sandbox: `serve --seccomp on|off|log` (default `on`).
//!
//! Once start-up is over (image, spare and event log open, both sockets listening, signal
//! handlers in place), a process that has been fed hostile vhost-user messages or descriptor
//! chains should not be able to do anything remapblk never does: no exec, no new sockets or
//! connections, no file created or opened for writing, no executable memory, no namespaces,
//! no ptrace, no module or mount or BPF calls. The allow-lists in `lists.rs` say what it does
//! do, grouped by why.
//!
//! # Order: one process-wide filter, then narrower ones per thread
//!
//! [`lock_down`] runs on the main thread once the sockets are open, and installs with TSYNC
//! (onto every thread there is) the union of all lists, plus a one-rule filter that answers
//! clone3 with ENOSYS (glibc then falls back to clone, whose flags a filter can read, where
//! clone3's are behind a pointer; the list allows clone only for threads, never for processes
//! or namespaces). TSYNC refuses to run when a thread has filters of its own, so nothing
//! narrows before this point.
//!
//! Then threads narrow themselves with [`enter`], on top of what they inherited (filters
//! stack, and a call must pass every one): a vhost-user connection's handler to the session
//! list, each queue thread (the one that runs what the guest puts in the ring) to the worker
//! list, the control thread to the control list. A thread runs under its parent's filters
//! until it narrows and keeps them after, so a parent's list holds its children's
//! (`lists::inherits`): the session list includes the worker list. The main thread keeps the
//! union (it starts the sessions), as do threads that started before the lock down (the
//! control thread narrows on its next accept, the clients it then starts inherit that).
//! Short-lived helpers (drains, teardown) inherit whatever their parent has.
//!
//! What that buys: a queue thread cannot start threads, map files, create eventfds, epolls or
//! io_uring instances, or take a descriptor from a socket; the control threads cannot map
//! files or handle vhost-user messages; neither can remove a file (only the main thread can,
//! for the sockets at exit).
//!
//! # What a call outside the list does
//!
//! - `on`: the process ends with SIGSYS. A storage daemon that has been made to do something
//!   it never does is not to be trusted with the disk another instant; an error returned
//!   instead (SECCOMP_RET_ERRNO) would run error paths nobody tested, might turn a flush into
//!   a silent failure or stop a queue thread and leave the guest waiting forever, the very
//!   hang this project exists to prevent. Dying is the failure remapblk is built to survive:
//!   every completed write is durable, the remap table is changed with fsyncs, and a restart
//!   (QEMU reconnects) serves again, as after a kill -9. The filter answers SECCOMP_RET_TRAP
//!   rather than SECCOMP_RET_KILL_PROCESS only so that `trap.rs` can write one line to stderr
//!   naming the call and the thread before the process dies by SIGSYS (the kernel's own log
//!   needs privileges to read and may not exist); the call itself never runs. The filters go
//!   on with SECCOMP_FILTER_FLAG_LOG, so the kernel logs a refused call too: a thread that
//!   blocks signals (glibc's pthread_create does, around the clone) dies of the SIGSYS before
//!   the handler can run, and only the kernel log names that call.
//! - `log`: the call is allowed and the kernel logs it (SECCOMP_RET_LOG): `dmesg` or
//!   `journalctl -k` shows `audit: type=1326 ... comm="queue0" ... syscall=N ...
//!   code=0x7ffc0000`, where `comm` is the thread and `N` the call's number on `arch`
//!   (`ausyscall N`, or `grep -w N /usr/include/x86_64-linux-gnu/asm/unistd_64.h`). It is for
//!   finding every missing call in one run: `REMAPBLK_SECCOMP=log cargo test --tests` runs
//!   the integration suite that way.
//! - `off`: no filter.
//!
//! # Adding a call
//!
//! A new feature that makes a call no list holds dies with SIGSYS in the integration tests
//! (they run with the default, `on`) and the line names the call and the thread. Add it to
//! the group of `lists.rs` whose reason it shares (or a new group saying why), tagged with the
//! roles that make it, with its arguments pinned as far as the reason allows; what a new
//! thread does before it calls [`enter`] (its set-up) runs under its parent's list. Then run
//! the suite again, once with `REMAPBLK_SECCOMP=log`, and read the kernel log for anything
//! else.
//!
//! # io_uring
//!
//! io_uring requests are not system calls and pass no filter. The engine's rings accept only
//! the reads, writes and cancels it submits (`io::uring`), the lists allow io_uring only when
//! the engine is io_uring, and queue and control threads may not set up a ring. A thread that
//! may (a session's, the main thread) could set up an unrestricted one if taken over: with
//! the io_uring engine, the filter does not stop a full takeover of those threads from
//! opening files through a ring. `--engine sync` closes that.

mod lists;
mod trap;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use log::{info, warn};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

use lists::{inherits, Call, Only, When, ALL, CONTROL, GROUPS, NONE, SESSION, WORKER};

/// `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A call outside the allow-list ends the process with SIGSYS, naming the call on stderr.
    On,
    /// No filter.
    Off,
    /// Calls outside the allow-list are allowed and the kernel logs them (dmesg: audit
    /// type=1326).
    Log,
}

/// The threads that narrow the process-wide filter to a list of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A vhost-user connection's request handler (and the queue threads it starts).
    Session,
    /// A queue's thread.
    Worker,
    /// The control socket's accept thread (and the client threads it starts).
    Control,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Session => "session",
            Role::Worker => "worker",
            Role::Control => "control",
        }
    }

    fn mask(self) -> u8 {
        match self {
            Role::Session => SESSION,
            Role::Worker => WORKER,
            Role::Control => CONTROL,
        }
    }
}

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error(
        "--seccomp {mode}: remapblk has no system call lists for {arch}; run with --seccomp off"
    )]
    Arch {
        mode: &'static str,
        arch: &'static str,
    },
    #[error("--seccomp log: this kernel cannot log system calls from a filter (no \"log\" in /proc/sys/kernel/seccomp/actions_avail; Linux 4.14 added it); use --seccomp on or off")]
    NoLogAction,
    #[error("cannot build the {list} system call filter: {source}")]
    Build {
        list: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("the kernel refused the system call filter ({0}); it needs seccomp filters (CONFIG_SECCOMP_FILTER); run with --seccomp off to serve without them")]
    Install(io::Error),
    #[error("the system call filter is already installed")]
    Twice,
}

/// The compiled per-thread lists, kept for [`enter`] once the process-wide filter is on.
struct Installed {
    session: BpfProgram,
    worker: BpfProgram,
    control: BpfProgram,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();
static LOCKED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread installed its own list already.
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Off => "off",
            Mode::Log => "log",
        }
    }
}

/// Installs the process-wide filter on every thread (see the module doc). Called once, by
/// the main thread, when start-up is over: after this, nothing opens a file for writing or
/// creates a socket.
/// `io_uring`: whether the engine is io_uring (the lists allow io_uring only then).
pub fn lock_down(mode: Mode, io_uring: bool) -> Result<(), SandboxError> {
    let miss = match mode {
        Mode::Off => {
            info!("seccomp: off; the process runs without a system call filter");
            return Ok(());
        }
        Mode::On => SeccompAction::Trap,
        Mode::Log => {
            let avail = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail")
                .unwrap_or_default();
            if !avail.split_whitespace().any(|a| a == "log") {
                return Err(SandboxError::NoLogAction);
            }
            SeccompAction::Log
        }
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|_| SandboxError::Arch {
        mode: mode.name(),
        arch: std::env::consts::ARCH,
    })?;
    let lists = Lists { io_uring };
    let process = lists.program("process-wide", ALL, miss.clone(), arch)?;
    let installed = Installed {
        session: lists.program("session", inherits(SESSION), miss.clone(), arch)?,
        worker: lists.program("worker", inherits(WORKER), miss.clone(), arch)?,
        control: lists.program("control", inherits(CONTROL), miss, arch)?,
    };
    let clone3 = clone3_enosys(arch)?;
    if INSTALLED.set(installed).is_err() {
        return Err(SandboxError::Twice);
    }
    if mode == Mode::On {
        trap::install().map_err(SandboxError::Handler)?;
    }
    // clone3's filter first: once the process-wide one is on, seccomp itself is allowed
    // only without TSYNC. That filter's ENOSYS is not worth a log line per thread started.
    apply(&clone3, libc::SECCOMP_FILTER_FLAG_TSYNC).map_err(SandboxError::Install)?;
    apply(&process, libc::SECCOMP_FILTER_FLAG_TSYNC | FLAGS).map_err(SandboxError::Install)?;
    LOCKED.store(true, Ordering::Release);
    match mode {
        Mode::On => info!("seccomp: on; a system call outside the allow-list ends the process"),
        _ => warn!(
            "seccomp: log; system calls outside the allow-list are allowed and the kernel logs \
             them (dmesg: audit type=1326)"
        ),
    }
    Ok(())
}

/// Narrows the calling thread's filter to `role`'s list, once the process-wide filter is on
/// (before that, and with `--seccomp off`, it does nothing). A thread that has its list
/// already keeps it. Should the kernel refuse, the thread keeps the process-wide filter and
/// the log says so.
pub fn enter(role: Role) {
    if !LOCKED.load(Ordering::Acquire) || ENTERED.with(Cell::get) {
        return;
    }
    let Some(installed) = INSTALLED.get() else {
        return;
    };
    let prog = match role {
        Role::Session => &installed.session,
        Role::Worker => &installed.worker,
        Role::Control => &installed.control,
    };
    match apply(prog, FLAGS) {
        Ok(()) => {
            ENTERED.with(|e| e.set(true));
            trap::LIST.with(|l| l.set(Some(role.name())));
        }
        Err(e) => warn!(
            "seccomp: cannot narrow this thread to the {} list ({e}); it keeps the \
             process-wide one",
            role.name()
        ),
    }
}

/// SECCOMP_FILTER_FLAG_LOG: the kernel logs every call a filter refuses, not only those it
/// lets through in `log` mode. The SIGSYS handler's line is the first place to look, but a
/// thread that blocks signals (glibc's pthread_create does, around the clone) dies of the
/// SIGSYS before any handler runs; the kernel log still names the call.
const FLAGS: libc::c_ulong = libc::SECCOMP_FILTER_FLAG_LOG;

/// Installs `prog` on the calling thread (with TSYNC: on every thread of the process).
/// seccompiler's own installers take no flags, and the kernel log needs FLAG_LOG.
fn apply(prog: &[seccompiler::sock_filter], flags: libc::c_ulong) -> io::Result<()> {
    // seccompiler refuses programs past BPF_MAXINSNS (4096) when it compiles them.
    let len = u16::try_from(prog.len()).map_err(io::Error::other)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes no pointers. The kernel requires it (or
    // CAP_SYS_ADMIN) for a filter, and it only takes privileges away.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccompiler's sock_filter is #[repr(C)] with the kernel's fields (as libc's
    // is), `fprog` points at `len` of them, and the kernel copies the program, keeping no
    // pointer to our memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    match r {
        0 => Ok(()),
        // TSYNC names a thread that could not take the filter.
        tid if tid > 0 => Err(io::Error::other(format!(
            "thread {tid} has a filter of its own"
        ))),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The names of the calls `role`'s list allows (None: the process-wide list) with the
/// io_uring engine, in number order, each once, for tests and the docs.
pub fn allowed(role: Option<Role>) -> Vec<&'static str> {
    let mask = role.map_or(ALL, |r| inherits(r.mask()));
    let mut calls: Vec<&Call> = Lists { io_uring: true }.calls(mask).collect();
    calls.sort_by_key(|c| c.nr);
    calls.dedup_by_key(|c| c.nr);
    calls.into_iter().map(Call::name).collect()
}

/// The lists for one configuration.
struct Lists {
    io_uring: bool,
}

impl Lists {
    /// The calls of the groups tagged with any role in `mask` (a call may come more than once,
    /// with different conditions).
    fn calls(&self, mask: u8) -> impl Iterator<Item = &'static Call> + '_ {
        GROUPS
            .iter()
            .filter(move |g| g.roles & mask != 0)
            .filter(|g| match g.when {
                When::Always => true,
                When::IoUring => self.io_uring,
            })
            .flat_map(|g| g.calls)
            .filter(|c| c.nr != NONE)
    }

    /// The filter of the groups tagged with any role in `mask`: their calls allowed (with
    /// their argument conditions), everything else `miss`.
    fn program(
        &self,
        list: &'static str,
        mask: u8,
        miss: SeccompAction,
        arch: TargetArch,
    ) -> Result<BpfProgram, SandboxError> {
        let build = |source| SandboxError::Build { list, source };
        // One entry per call; None allows the call whatever its arguments, which a group
        // allowing it unconditionally wins over another's conditions.
        let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
        for call in self.calls(mask) {
            let entry = rules.entry(call.nr).or_insert_with(|| Some(Vec::new()));
            match (call.only, entry.as_mut()) {
                (_, None) => {}
                (Only::Any, Some(_)) => *entry = None,
                (only, Some(list)) => list.extend(conditions(only).map_err(build)?),
            }
        }
        // seccompiler's empty rule list is "any arguments".
        let rules = rules
            .into_iter()
            .map(|(nr, r)| (nr, r.unwrap_or_default()))
            .collect();
        SeccompFilter::new(rules, miss, SeccompAction::Allow, arch)
            .and_then(BpfProgram::try_from)
            .map_err(build)
    }
}

/// The rules (any one of which allows the call) for `only`.
fn conditions(only: Only) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let dword = |arg: u8, op, value| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value);
    match only {
        Only::Any => Ok(Vec::new()),
        Only::OneOf(arg, values) => values
            .iter()
            .map(|&v| SeccompRule::new(vec![dword(arg, SeccompCmpOp::Eq, v)?]))
            .collect(),
        Only::Masked(checks) => {
            let conds = checks
                .iter()
                .map(|&(arg, mask, value)| dword(arg, SeccompCmpOp::MaskedEq(mask), value))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(vec![SeccompRule::new(conds)?])
        }
        Only::Null(arg) => Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::Eq,
            0,
        )?])?]),
    }
}

/// clone3 fails with ENOSYS, everything else passes (the process-wide filter decides).
fn clone3_enosys(arch: TargetArch) -> Result<BpfProgram, SandboxError> {
    let build = |source| SandboxError::Build {
        list: "clone3",
        source,
    };
    SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(build)
}

#[cfg(test)]
mod tests;
