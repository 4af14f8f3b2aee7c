//! remapblk: a vhost-user-blk backend. See DESIGN.md for the layering:
//! `backend` (vhost-user glue) -> `virtio` (wire format) -> `storage` (the image).

pub mod args;
pub mod backend;
pub mod cache;
pub mod control;
pub mod denied;
pub mod events;
pub mod fault;
pub mod fdlimit;
pub mod fields;
pub mod filemode;
pub mod handover;
pub mod inline_vec;
pub mod io;
pub mod latch;
pub mod overlay;
pub mod remap;
pub mod rng;
pub mod sandbox;
pub mod stats;
pub mod storage;
pub mod unix;
pub mod virtio;
pub mod writelog;
