//! `--engine null`: every job the stack lets it move is done at once, on the worker; the rest
//! takes the blocking path. It queues nothing and needs no kernel support. Over the null
//! target (reads give zeros, writes are dropped) it measures what the ring handling costs on
//! its own; faults and remaps still apply, since jobs still go through the stack.

use super::inline::{Inline, Inlined};
use super::{Engine, Job, Started, Target};

pub struct NullEngine {
    target: Target,
    inline: Inline,
}

impl NullEngine {
    pub fn new(target: Target) -> NullEngine {
        NullEngine {
            target,
            inline: Inline::default(),
        }
    }
}

impl Engine for NullEngine {
    fn start(&mut self, job: Job) -> Started {
        match self.inline.start(&*self.target.stack, job) {
            Inlined::Started(started) => started,
            Inlined::WouldWait(job, _) => Started::Blocking(job),
        }
    }
}
