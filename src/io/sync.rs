//! The blocking path: a job carried out on the calling thread through the layers' own `readv` /
//! `writev` (so their error policy applies: remaps, the pending list, per-block retries), and
//! the engine that takes no other path.

use vm_memory::Bytes;

use super::iovec::guest_iovecs;
use super::{Done, Engine, ExecError, Job, Started, Target};
use crate::virtio::request::RequestType;
use crate::virtio::ID_BYTES;

/// `--engine sync`: every job runs on the blocking path, on the queue's worker.
pub struct SyncEngine;

impl Engine for SyncEngine {
    fn start(&mut self, job: Job) -> Started {
        Started::Blocking(job)
    }
}

impl Target {
    /// Runs `job` to its end, blocking as long as the storage takes: moves the data directly
    /// between guest memory and the stack (no bounce copy here), and in writethrough mode makes
    /// what the job changed durable before it completes.
    pub fn run(&self, job: Job) -> Done {
        let result = self.execute(&job);
        Done { job, result }
    }

    fn execute(&self, job: &Job) -> Result<u32, ExecError> {
        let (req, mem, stack) = (&job.req, &*job.mem, &*self.stack);
        let mut iov = Vec::new();
        let read = match req.kind {
            RequestType::In => {
                guest_iovecs(req, mem, &mut iov)?;
                // SAFETY: the iovecs point into guest memory that the job's view keeps mapped
                // until it is dropped; the parser checked every range lies inside it.
                unsafe { stack.readv(req.offset(), &iov)? };
                req.data_len as u32
            }
            RequestType::Out => {
                guest_iovecs(req, mem, &mut iov)?;
                // SAFETY: as above.
                unsafe { stack.writev(req.offset(), &iov)? };
                0
            }
            RequestType::Flush => {
                stack.flush()?;
                0
            }
            RequestType::GetId => self.get_id(job)?,
            RequestType::Discard => {
                for r in &req.ranges {
                    stack.discard(r.offset(), r.len())?;
                }
                0
            }
            RequestType::WriteZeroes => {
                for r in &req.ranges {
                    stack.write_zeroes(r.offset(), r.len(), r.unmap)?;
                }
                0
            }
        };
        if job.writethrough && req.kind.changes_data() {
            stack.flush()?;
        }
        Ok(read)
    }

    /// GET_ID: the serial into the guest's buffers, as much as they hold.
    fn get_id(&self, job: &Job) -> Result<u32, ExecError> {
        let mut left = ID_BYTES;
        let mut written = 0u32;
        for seg in &job.req.data {
            if left == 0 {
                break;
            }
            let n = left.min(seg.len as usize);
            let from = ID_BYTES - left;
            job.mem
                .write_slice(&self.serial[from..from + n], seg.addr)
                .map_err(|_| ExecError::Memory {
                    addr: seg.addr.0,
                    len: seg.len,
                })?;
            left -= n;
            written += n as u32;
        }
        Ok(written)
    }
}
