//! The vhost-user side: the request handler, sessions and rings, one worker thread per queue,
//! in-flight accounting and the drain on stop, reset, disconnect and exit.
//!
//! The public API is what this file exports; the rest is the module's own.

mod device;
mod handler;
mod inflight;
mod live;
mod parked;
mod polling;
mod server;
mod session;
mod vring;
mod worker;

pub use device::{default_serial, Device, DeviceConfig, MAX_NUM_QUEUES, MAX_QUEUE_SIZE};
pub use live::{Live, QuiesceReport};
pub use polling::{Polling, DEFAULT_MAX_US as DEFAULT_POLL_MAX_US};
pub use server::{serve, ServeError};

/// One frontend connection served as `serve` serves each: for the vhost-user fuzz target
/// (fuzz/), which feeds it message streams over a socket pair. Not an API.
#[doc(hidden)]
pub use server::handle_requests;

#[cfg(test)]
mod tests;
