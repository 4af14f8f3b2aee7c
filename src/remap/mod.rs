//! The remap layer: a logical block lives in the main image or, once remapped, in a block of
//! the spare file. See `metadata` for the spare file's format.

mod filter;
pub mod gate;
pub mod metadata;
mod mirror;
pub mod spare;
pub mod table;
pub mod target;

pub use table::RemapTable;
pub use target::RemapTarget;

use std::path::Path;

use log::{info, warn};

use metadata::Header;
use spare::Spare;

/// Opens the spare file another process serves, for `serve --incoming`: checked like
/// [`open_or_create`]'s, but nothing is written (a bad slot is repaired at the takeover, see
/// `handover`) and the table's gate is closed.
pub fn open_untouched(path: &Path, block_size: u32, capacity: u64) -> Result<RemapTable, String> {
    let o = Spare::open_with(path, block_size, capacity, false).map_err(|e| e.to_string())?;
    let table = RemapTable::new(o.spare, o.entries)?;
    // Nothing holds a permit yet: closes at once.
    table.gate().close(std::time::Duration::ZERO);
    Ok(table)
}

/// Opens the spare file at `path`, checking it was made for this block size and capacity and
/// repairing one bad slot, and loads its table.
pub fn open(
    path: &Path,
    block_size: u32,
    capacity: u64,
    spare_blocks: Option<u64>,
) -> Result<RemapTable, String> {
    let o = Spare::open(path, block_size, capacity).map_err(|e| e.to_string())?;
    if let Some(slot) = o.repaired {
        warn!(
            "spare file {}: metadata slot {slot} was bad and has been rewritten from the other",
            path.display()
        );
    }
    let have = o.spare.header().spare_blocks;
    if let Some(n) = spare_blocks.filter(|n| *n != have) {
        warn!("spare file {} has {have} spare blocks; --spare-blocks {n} only applies to a new spare file", path.display());
    }
    RemapTable::new(o.spare, o.entries)
}

/// Creates the spare file at `path`, which must not exist, with `spare_blocks` blocks
/// (default: 1% of the image's blocks, at least 1024) and an empty table.
pub fn create(
    path: &Path,
    block_size: u32,
    capacity: u64,
    spare_blocks: Option<u64>,
) -> Result<RemapTable, String> {
    let blocks = spare_blocks.unwrap_or_else(|| (capacity / u64::from(block_size) / 100).max(1024));
    let header = Header {
        block_size,
        image_size: capacity,
        spare_blocks: blocks,
    };
    let spare = Spare::create(path, header).map_err(|e| e.to_string())?;
    info!(
        "created spare file {} with {blocks} spare blocks",
        path.display()
    );
    RemapTable::new(spare, Vec::new())
}
