//! vhost-user glue: features and config space, one worker per queue, in-flight accounting and
//! the drain on stop, reset, disconnect and exit.

mod cursor;
pub mod device;
pub mod exec;
pub mod inflight;
pub mod live;
pub mod relay;
pub mod server;
pub mod uring;
mod used;
pub mod vhu_blk;

pub use device::{Device, DeviceConfig};
pub use live::Live;
pub use server::{serve, ServeError};

#[cfg(test)]
mod tests;
