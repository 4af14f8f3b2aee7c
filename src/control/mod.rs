//! The control socket: QMP-shaped JSON, one object per line, for labs to query and steer a
//! running server (`remapblk ctl` is its client).

pub mod client;
pub mod commands;
pub mod lines;
mod power;
pub mod protocol;
pub mod server;

pub use server::ControlServer;
