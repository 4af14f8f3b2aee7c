//! vhost-user glue: features and config space, sessions, one worker per queue, in-flight
//! accounting and the drain on stop, reset, disconnect and exit.
//!
//! The public API is what this file exports; the rest is the module's own.

mod device;
mod inflight;
mod live;
mod relay;
mod server;
mod session;
mod vhu_blk;
mod worker;

pub use device::{default_serial, Device, DeviceConfig, MAX_NUM_QUEUES, MAX_QUEUE_SIZE};
pub use live::{Live, QuiesceReport};
pub use server::{serve, ServeError};

#[cfg(test)]
mod tests;
