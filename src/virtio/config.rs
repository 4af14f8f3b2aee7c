//! `struct virtio_blk_config` as the guest reads it (virtio 1.2, 5.2.4), little endian.

/// Size of the part of the config space this device fills (up to and including
/// `write_zeroes_may_unmap` and its padding). Later fields (secure erase, zoned) read as zero.
pub const CONFIG_LEN: usize = 60;

/// Offset of the `writeback` byte, the only field a driver may write (CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        // 25: alignment_offset = 0.
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[WRITEBACK_OFFSET] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// The `size` bytes at `offset` as a frontend asks for them with GET_CONFIG. Bytes past the
    /// fields this device fills read as zero, so a frontend that knows a longer struct (QEMU
    /// asks for its own `sizeof`) still gets an answer of the length it expects.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        for (i, o) in out.iter_mut().enumerate() {
            if let Some(v) = start.checked_add(i).and_then(|p| bytes.get(p)) {
                *o = *v;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_offsets() {
        let c = BlkConfig {
            capacity: 0x1122_3344_5566_7788,
            blk_size: 4096,
            writeback: 1,
            num_queues: 4,
            max_discard_seg: 32,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), c.capacity);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 32);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn read_pads_past_the_end_with_zeros() {
        let c = BlkConfig {
            capacity: 8,
            ..Default::default()
        };
        assert_eq!(c.read(0, 96).len(), 96);
        assert_eq!(c.read(0, 8), 8u64.to_le_bytes().to_vec());
        assert_eq!(c.read(1000, 4), vec![0; 4]);
        assert_eq!(c.read(u32::MAX, 4), vec![0; 4]);
    }
}
