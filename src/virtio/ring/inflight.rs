//! STUB (replaced by the real module from branch ringmods).
#![allow(dead_code, unused_variables)]
use std::fs::File;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("stub")]
    Stub,
}

pub fn queue_region_size(queue_size: u16) -> u64 {
    (16 * u64::from(queue_size) + 2).div_ceil(64) * 64
}

pub struct InflightRegion {
    file: File,
}

impl InflightRegion {
    pub fn create(num_queues: u16, queue_size: u16) -> Result<InflightRegion, InflightError> {
        Err(InflightError::Stub)
    }
    pub fn open(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        Err(InflightError::Stub)
    }
    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn size(&self) -> u64 {
        0
    }
    pub fn queue(self: &Arc<Self>, q: usize) -> Option<InflightQueue> {
        None
    }
}

pub struct InflightQueue {}

impl InflightQueue {
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        Vec::new()
    }
    pub fn begin(&mut self, head: u16) {}
    pub fn batch_add(&mut self, head: u16) {}
    pub fn batch_done(&mut self, heads: impl IntoIterator<Item = u16>, ring_used_idx: u16) {}
    pub fn reset(&mut self) {}
}
