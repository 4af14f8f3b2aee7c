//! The allow-lists, as data: groups of system calls, each with the reason remapblk makes them
//! and the threads that do. `mod.rs` compiles them into BPF programs.
//!
//! A thread's list is every group tagged with its role; a thread that starts others also gets
//! the groups of the threads it starts (see [`inherits`]), because a new thread runs under its
//! parent's filters until it installs its own, and keeps them after (filters only stack). The
//! process-wide list is every group.
//!
//! To add a system call: put it in the group whose reason it shares (or a new group saying
//! why it is needed), tagged with the threads that make it, with its arguments pinned where
//! the reason allows (`Only::OneOf`, `Only::Masked`); `mod.rs`'s doc says how to find one
//! that is missing.

use crate::storage::image;

/// The main thread: start-up is over when the filter goes on, so what is left is the accept
/// loop, the SIGINT/SIGTERM drain, the final fdatasync and removing the sockets.
pub const MAIN: u8 = 1 << 0;
/// A vhost-user connection's request handler: memory tables, rings, eventfds, sessions.
pub const SESSION: u8 = 1 << 1;
/// A queue's thread (`queueN`): guest I/O, driven by what the guest puts in the rings.
pub const WORKER: u8 = 1 << 2;
/// The control socket's threads (`control`, `control-client`).
pub const CONTROL: u8 = 1 << 3;
pub const ALL: u8 = MAIN | SESSION | WORKER | CONTROL;

/// The groups a thread of role `role` needs: its own and those of the threads it starts (a
/// session starts the queue threads; the drain and teardown helpers only wait, write eventfds
/// and cancel ring I/O, which every role's list holds).
pub fn inherits(role: u8) -> u8 {
    match role {
        SESSION => SESSION | WORKER,
        MAIN => ALL,
        other => other,
    }
}

/// One system call and what its arguments may be.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// `SYS_name`, as libc spells it.
    pub sys: &'static str,
    /// The number on this architecture; [`NONE`] where the architecture has no such call.
    pub nr: i64,
    pub only: Only,
}

impl Call {
    pub fn name(&self) -> &'static str {
        self.sys.trim_start_matches("SYS_")
    }
}

/// Conditions on a call's arguments. `OneOf` and `Masked` compare the low 32 bits, which
/// every flag and command below fits in (and all the kernel reads of an int argument).
#[derive(Debug, Clone, Copy)]
pub enum Only {
    Any,
    /// Argument `.0` is one of `.1`.
    OneOf(u8, &'static [u64]),
    /// `argument & mask == value` for every `(argument, mask, value)`.
    Masked(&'static [(u8, u64, u64)]),
    /// Argument `.0`, a pointer, is NULL (all 64 bits compared).
    Null(u8),
}

/// A call this architecture lacks (its newer replacement is listed beside it).
pub const NONE: i64 = -1;

pub struct Group {
    /// Documentation kept with the data (the tests check every group has one).
    #[cfg_attr(not(test), allow(dead_code))]
    pub why: &'static str,
    pub roles: u8,
    pub when: When,
    pub calls: &'static [Call],
}

/// Whether a group is needed whatever the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// Only with the io_uring engine: the others never touch io_uring, and a process that can
    /// set up a ring can do through it what the filter refuses as system calls.
    IoUring,
}

macro_rules! call {
    ($sys:ident) => {
        call!($sys, Only::Any)
    };
    ($sys:ident, $only:expr) => {
        Call {
            sys: stringify!($sys),
            nr: libc::$sys as i64,
            only: $only,
        }
    };
}

/// A call only some architectures have: x86_64 keeps the old calls that glibc uses there
/// (`poll`, `epoll_wait`...); aarch64 and riscv64 have only the `*at`/`p*` forms.
macro_rules! legacy {
    ($sys:ident) => {
        Call {
            sys: stringify!($sys),
            #[cfg(target_arch = "x86_64")]
            nr: libc::$sys as i64,
            #[cfg(not(target_arch = "x86_64"))]
            nr: NONE,
            only: Only::Any,
        }
    };
}

const fn u(v: libc::c_int) -> u64 {
    v as u64
}

/// mmap and mprotect never make memory executable: nothing after start-up loads code.
const NOT_EXEC: (u8, u64, u64) = (2, libc::PROT_EXEC as u64, 0);
/// Only anonymous mappings: the allocator, thread stacks, the spare mirror.
const ANONYMOUS: (u8, u64, u64) = (3, libc::MAP_ANONYMOUS as u64, libc::MAP_ANONYMOUS as u64);
/// Namespaces a clone could create; a thread never needs one.
const NEW_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
/// open and openat read only: no file is created or written after start-up (the image, spare
/// and event log are open by then). Reading covers the `/proc` lookups of a lock's holder.
const READ_ONLY: (u8, u64, u64) = (
    2,
    (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64,
    0,
);
/// `PR_SET_VMA`: glibc 2.39 and later may name the anonymous mappings it makes.
const PR_SET_VMA: u64 = 0x5356_4d41;

pub const GROUPS: &[Group] = &[
    Group {
        why: "memory: the allocator, thread stacks and their guard pages, the spare mirror; \
              never executable, and only anonymous (files are mapped by sessions, below)",
        roles: ALL,
        when: When::Always,
        calls: &[
            call!(SYS_brk),
            call!(SYS_mmap, Only::Masked(&[NOT_EXEC, ANONYMOUS])),
            call!(SYS_mprotect, Only::Masked(&[NOT_EXEC])),
            call!(SYS_munmap),
            call!(SYS_mremap),
            call!(SYS_madvise),
            call!(SYS_prctl, Only::OneOf(0, &[PR_SET_VMA])),
        ],
    },
    Group {
        why: "waiting and time: locks and condvars (futex), the drain's deadline, injected \
              delays and the handover's lock polling (sleeps), a sleep a signal interrupted",
        roles: ALL,
        when: When::Always,
        calls: &[
            call!(SYS_futex),
            call!(SYS_clock_gettime),
            call!(SYS_clock_nanosleep),
            call!(SYS_nanosleep),
            call!(SYS_sched_yield),
            call!(SYS_restart_syscall),
        ],
    },
    Group {
        why: "the log (stderr, wherever it points), the event log, eventfd kicks and calls, \
              closing what a session or request is done with",
        roles: ALL,
        when: When::Always,
        calls: &[
            call!(SYS_write),
            call!(SYS_writev),
            call!(SYS_read),
            call!(SYS_close),
            call!(SYS_getrandom),
        ],
    },
    Group {
        why: "signals: signal-hook's SIGINT/SIGTERM handler (it runs on any thread) wakes the \
              accept loop with a send; our SIGSYS handler names the thread and ends the process \
              with SIGSYS; both return through rt_sigreturn",
        roles: ALL,
        when: When::Always,
        calls: &[
            call!(SYS_rt_sigreturn),
            call!(SYS_sendto),
            call!(SYS_getpid),
            call!(SYS_gettid),
            call!(SYS_tgkill, Only::OneOf(2, &[u(libc::SIGSYS)])),
            call!(SYS_prctl, Only::OneOf(0, &[u(libc::PR_GET_NAME)])),
        ],
    },
    Group {
        why: "a thread's end: glibc blocks signals, frees its stack (madvise, munmap) and \
              Rust's alternate signal stack",
        roles: ALL,
        when: When::Always,
        calls: &[
            call!(SYS_exit),
            call!(SYS_exit_group),
            call!(SYS_rt_sigprocmask),
            call!(SYS_sigaltstack),
        ],
    },
    Group {
        why: "descriptor flags: std's try_clone (F_DUPFD_CLOEXEC), non-blocking eventfds and \
              sockets, and the checks of descriptors a frontend sends",
        roles: ALL,
        when: When::Always,
        calls: &[call!(
            SYS_fcntl,
            Only::OneOf(
                1,
                &[
                    u(libc::F_GETFD),
                    u(libc::F_SETFD),
                    u(libc::F_GETFL),
                    u(libc::F_SETFL),
                    u(libc::F_DUPFD_CLOEXEC),
                ]
            )
        )],
    },
    Group {
        why: "who this process is, for the advice a permission error's message gives",
        roles: ALL,
        when: When::Always,
        calls: &[
            call!(SYS_getuid),
            call!(SYS_geteuid),
            call!(SYS_getgid),
            call!(SYS_getegid),
        ],
    },
    Group {
        why: "the descriptor limit, read (never set) for the message of an error that ran out \
              of descriptors",
        roles: ALL,
        when: When::Always,
        calls: &[call!(SYS_prlimit64, Only::Null(2))],
    },
    Group {
        why: "guest I/O and remap moves on the image and spare: positional and vectored I/O \
              (RWF_NOWAIT for inline attempts), flush, discard and write-zeroes by fallocate \
              or, on block devices, ioctl",
        roles: ALL,
        when: When::Always,
        calls: &[
            call!(SYS_pread64),
            call!(SYS_pwrite64),
            call!(SYS_preadv),
            call!(SYS_pwritev),
            call!(SYS_preadv2),
            call!(SYS_pwritev2),
            call!(SYS_readv),
            call!(SYS_fdatasync),
            call!(SYS_fsync),
            call!(SYS_fallocate),
            call!(
                SYS_ioctl,
                Only::OneOf(1, &[image::BLKDISCARD, image::BLKZEROOUT])
            ),
        ],
    },
    Group {
        why: "the io_uring engine: queue threads submit and reap, drains cancel (the rings \
              take only reads, writes and cancels, see io::uring)",
        roles: ALL,
        when: When::IoUring,
        calls: &[call!(SYS_io_uring_enter)],
    },
    Group {
        why: "the io_uring engine: each session sets up a ring per queue, with its eventfd",
        roles: SESSION,
        when: When::IoUring,
        calls: &[call!(SYS_io_uring_setup), call!(SYS_io_uring_register)],
    },
    Group {
        why: "the handover (serve --incoming): OFD locks on image and spare, and naming the \
              process that holds one from /proc/*/fdinfo (read-only opens, directory listings, \
              stat)",
        roles: WORKER | SESSION | CONTROL,
        when: When::Always,
        calls: &[
            call!(
                SYS_fcntl,
                Only::OneOf(
                    1,
                    &[
                        u(libc::F_OFD_GETLK),
                        u(libc::F_OFD_SETLK),
                        u(libc::F_OFD_SETLKW),
                    ]
                )
            ),
            call!(SYS_openat, Only::Masked(&[READ_ONLY])),
            call!(SYS_getdents64),
            call!(SYS_statx),
            call!(SYS_newfstatat),
            call!(SYS_fstat),
            call!(SYS_lseek),
        ],
    },
    Group {
        why: "a queue thread sleeps in its epoll set (kicks, wake-ups, io_uring completions)",
        roles: WORKER,
        when: When::Always,
        calls: &[call!(SYS_epoll_pwait), legacy!(SYS_epoll_wait)],
    },
    Group {
        why: "starting threads (sessions, queue threads, drains, teardown, control clients): \
              glibc's pthread_create (clone3, answered ENOSYS by a filter of its own so that \
              glibc falls back to clone, whose flags a filter can read) and the new thread's \
              own set-up",
        roles: MAIN | SESSION | CONTROL,
        when: When::Always,
        calls: &[
            call!(SYS_clone3),
            call!(
                SYS_clone,
                Only::Masked(&[
                    (0, libc::CLONE_THREAD as u64, libc::CLONE_THREAD as u64),
                    (0, NEW_NAMESPACES, 0),
                ])
            ),
            call!(SYS_set_robust_list),
            call!(SYS_rseq),
            call!(SYS_sched_getaffinity),
            call!(SYS_prctl, Only::OneOf(0, &[u(libc::PR_SET_NAME)])),
        ],
    },
    Group {
        why: "a vhost-user connection: messages with descriptors, guest memory, the dirty log \
              and the inflight region mapped shared (the region a memfd of ours, sealed), \
              rings' eventfds checked by /proc/self/fd, each session's epoll sets and eventfds",
        roles: SESSION,
        when: When::Always,
        calls: &[
            call!(SYS_recvmsg),
            call!(SYS_sendmsg),
            call!(SYS_mmap, Only::Masked(&[NOT_EXEC])),
            call!(SYS_memfd_create),
            call!(SYS_ftruncate),
            call!(
                SYS_fcntl,
                Only::OneOf(1, &[u(libc::F_ADD_SEALS), u(libc::F_GET_SEALS)])
            ),
            call!(SYS_readlinkat),
            legacy!(SYS_readlink),
            call!(SYS_epoll_create1),
            call!(SYS_epoll_ctl),
            call!(SYS_eventfd2),
        ],
    },
    Group {
        why: "narrowing the filter of a thread just started (a queue thread's, a control \
              thread's): no new privileges, and a filter that only adds to those in place \
              (FLAG_LOG allowed; TSYNC and a user-space listener not)",
        roles: SESSION,
        when: When::Always,
        calls: &[
            call!(SYS_prctl, Only::OneOf(0, &[u(libc::PR_SET_NO_NEW_PRIVS)])),
            call!(
                SYS_seccomp,
                Only::Masked(&[
                    (0, u32::MAX as u64, libc::SECCOMP_SET_MODE_FILTER as u64),
                    (1, !(libc::SECCOMP_FILTER_FLAG_LOG as u32) as u64, 0),
                ])
            ),
        ],
    },
    Group {
        why: "serve --overlay: overlay-reset and overlay-commit clone the image and spare \
              (FICLONE) where the filesystem shares extents, and size a spare's copy to match \
              (ftruncate); the files were opened for writing at start-up",
        roles: CONTROL,
        when: When::Always,
        calls: &[
            call!(SYS_ioctl, Only::OneOf(1, &[crate::overlay::files::FICLONE])),
            call!(SYS_ftruncate),
        ],
    },
    Group {
        why: "the control socket: accepting clients, reading their lines (std's recv)",
        roles: CONTROL,
        when: When::Always,
        calls: &[call!(SYS_accept4), call!(SYS_recvfrom)],
    },
    Group {
        why: "the accept loop: waiting for a frontend or a signal (poll), a socket pair per \
              connection to learn when its handler ends, shutting a connection down on \
              SIGTERM, removing the socket files at exit",
        roles: MAIN,
        when: When::Always,
        calls: &[
            call!(SYS_accept4),
            call!(SYS_ppoll),
            legacy!(SYS_poll),
            call!(SYS_socketpair),
            call!(SYS_shutdown),
            call!(SYS_unlinkat),
            legacy!(SYS_unlink),
        ],
    },
];
