//! STUB (replaced by the real module from branch ringmods).
#![allow(dead_code, unused_variables)]
use std::fs::File;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("stub")]
    Stub,
}

pub struct DirtyLog {}

impl DirtyLog {
    pub fn map(file: File, mmap_size: u64, mmap_offset: u64) -> Result<DirtyLog, LogError> {
        Err(LogError::Stub)
    }
    pub fn mark(&self, gpa: u64, len: u64) {}
}
