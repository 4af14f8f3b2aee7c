//! Execution: carrying a parsed request out against the block stack. One [`Engine`] per queue
//! takes each request as a [`Job`]; it finishes it at once (data in the page cache or in
//! memory), queues it (io_uring), or hands it back to be run on the blocking path
//! ([`Target::run`]), which every engine shares and which owns the error policy of the layers
//! (retries, remaps, the pending list) because it goes through their own `readv` / `writev`.
//!
//! The backend only sees the trait. To add an engine: a file in this folder with a type that
//! implements [`Engine`], and a variant of [`EngineKind`] that builds it.

mod inline;
mod iovec;
mod null;
mod sync;
mod uring;
mod uring_refused;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use log::warn;

use crate::storage::BlockIo;
use crate::virtio::request::Request;
use crate::virtio::{GuestMemView, ID_BYTES};

/// What a device's engines run requests against: the block stack, and the serial GET_ID
/// returns.
#[derive(Clone)]
pub struct Target {
    pub stack: Arc<dyn BlockIo>,
    pub serial: [u8; ID_BYTES],
}

/// A request on its way through an engine.
pub struct Job {
    /// The head of its descriptor chain: how the backend knows it again.
    pub head: u16,
    pub req: Request,
    /// The view of guest memory its buffers were checked in; the job keeps it mapped as long as
    /// any I/O may touch the buffers.
    pub mem: GuestMemView,
    /// When it was taken from the ring.
    pub since: Instant,
    /// The guest's cache is in writethrough mode: a write is durable before it completes.
    pub writethrough: bool,
}

/// A job that is over.
pub struct Done {
    pub job: Job,
    /// Bytes written into guest buffers (for the used length), or why it failed.
    pub result: Result<u32, ExecError>,
}

impl Done {
    /// A read or write an engine moved itself: the used length counts what a read put in the
    /// guest's buffers.
    pub fn ok(job: Job) -> Done {
        let read = if job.req.kind == crate::virtio::request::RequestType::In {
            job.req.data_len as u32
        } else {
            0
        };
        Done {
            job,
            result: Ok(read),
        }
    }
}

/// What became of a job an engine was given.
pub enum Started {
    /// Finished at once.
    Done(Done),
    /// In flight: [`Engine::reap`] hands it back.
    Queued,
    /// Not the kind this engine moves itself: run it with [`Target::run`].
    Blocking(Job),
    /// Tried, but the layers said the place it went was no longer right (`end_io`): run it
    /// with [`Target::run`].
    Redo(Job),
}

/// A job whose queued I/O is over.
pub enum Reaped {
    Done(Done),
    /// The I/O failed, came up short, or went to a place that was no longer right: run it
    /// again with [`Target::run`], which owns the error policy.
    Redo(Job),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("guest buffer at {addr:#x}+{len} is no longer mapped")]
    Memory { addr: u64, len: u32 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One queue's engine. Only the queue's worker calls it, under a lock that a drain also takes
/// to cancel what it gave up on: no method blocks for long.
pub trait Engine: Send {
    /// Takes a job.
    fn start(&mut self, job: Job) -> Started;

    /// Hands what is queued to the kernel (one system call for a batch).
    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Bytes queued and not yet submitted: past a bound, the worker submits early.
    fn unsubmitted_bytes(&self) -> u64 {
        0
    }

    /// Collects the jobs whose I/O is over into `out`.
    fn reap(&mut self, _out: &mut Vec<Reaped>) {}

    /// The eventfd that becomes readable when [`reap`](Self::reap) has something (open as long
    /// as the engine lives); None for an engine that never queues.
    fn notifier(&self) -> Option<RawFd> {
        None
    }

    /// Resets the notifier after it fired (reaping follows).
    fn clear_notifier(&self) {}

    /// Asks for everything in flight to be cancelled (a drain gave up on it); cancelled jobs
    /// come back from `reap` as failed.
    fn cancel_all(&mut self) {}
}

/// The engines `--engine` picks from (the variants' comments are its help).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum EngineKind {
    /// Blocking preadv/pwritev on the queue's worker.
    #[value(name = "sync")]
    #[serde(rename = "sync")]
    Sync,
    /// Page-cache hits done at once, the rest on one io_uring per queue, a batch per kick.
    #[value(name = "io_uring")]
    #[serde(rename = "io_uring")]
    IoUring,
    /// A disk that stores nothing: reads return zeros, writes are dropped; measures the ring
    /// handling alone (requests done at once on the worker, faults and remaps still apply).
    #[value(name = "null")]
    #[serde(rename = "null")]
    Null,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Sync => "sync",
            EngineKind::IoUring => "io_uring",
            EngineKind::Null => "null",
        }
    }

    /// Whether this kernel lets the engine run; the error says why not.
    pub fn probe(self) -> io::Result<()> {
        match self {
            EngineKind::IoUring => uring::probe(),
            EngineKind::Sync | EngineKind::Null => Ok(()),
        }
    }

    /// The engine of queue `queue` (at most `queue_size` jobs in flight). One that cannot be
    /// set up (the kernel refuses a ring) falls back to the sync engine, with a warning.
    pub fn build(self, target: &Target, queue: usize, queue_size: u16) -> Box<dyn Engine> {
        let built: io::Result<Box<dyn Engine>> = match self {
            EngineKind::Sync => Ok(Box::new(sync::SyncEngine)),
            EngineKind::IoUring => uring::UringEngine::new(target.clone(), queue, queue_size)
                .map(|e| Box::new(e) as Box<dyn Engine>),
            EngineKind::Null => Ok(Box::new(null::NullEngine::new(target.clone()))),
        };
        built.unwrap_or_else(|e| {
            warn!(
                "queue {queue}: cannot set up the {} engine ({e}); using synchronous I/O",
                self.name()
            );
            Box::new(sync::SyncEngine)
        })
    }
}

#[cfg(test)]
mod tests;
