//! The split virtqueue as the device sees it (VIRTIO 1.2, 2.7): guest memory ranges, the
//! descriptor chain walk, the avail ring cursor a worker pops with, and the used ring it
//! completes into. Wire format only: what a chain means is `request`'s business, and when to
//! pop or complete is the backend's. Two memory areas the frontend shares besides the rings
//! have their wire format here too: the inflight region (`inflight`) and the dirty log
//! (`dirty_log`), both mapped through `shm`.

pub mod chain;
pub mod cursor;
pub mod dirty_log;
pub mod guest;
pub mod inflight;
mod shm;
pub mod used;

pub use shm::MapError;
