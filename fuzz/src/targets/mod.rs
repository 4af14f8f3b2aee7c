//! The fuzz targets, one module each. The write-log decoder (issue "crash lab") does not exist
//! yet; it gets a target here when it does.

pub mod control;
pub mod metadata;
pub mod request;
pub mod scratch;
pub mod vhost_user;
