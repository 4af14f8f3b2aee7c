//! The remap layer: a logical block lives in the main image or, once remapped, in a block of
//! the spare file. See `metadata` for the spare file's format.

pub mod metadata;
pub mod spare;
pub mod table;
pub mod target;

pub use table::RemapTable;
pub use target::RemapTarget;
