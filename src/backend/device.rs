//! What the guest sees of the disk: features, config space, limits. One `Device` lives for the
//! whole process; each frontend connection gets fresh per-connection state on top of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::polling::Polling;
use crate::handover::{Handover, HandoverError, WriterState};
use crate::io::{EngineKind, Target};
use crate::stats::Stats;
use crate::storage::BlockIo;
use crate::virtio::config::BlkConfig;
use crate::virtio::request::Limits;
use crate::virtio::{self, ID_BYTES, SECTOR_SHIFT};

pub const MAX_NUM_QUEUES: u16 = 16;
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest single data descriptor the guest may build (SIZE_MAX).
const SIZE_MAX: u32 = 1 << 22;
/// Largest DISCARD / WRITE_ZEROES range, in sectors (2 GiB; a multiple of every block size).
const MAX_ZERO_SECTORS: u32 = 1 << 22;
const MAX_ZERO_SEGS: u32 = 32;

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The image's path as given, for status reports.
    pub image: std::path::PathBuf,
    /// Bytes the guest sees; a whole number of blocks.
    pub capacity: u64,
    pub block_size: u32,
    pub readonly: bool,
    pub serial: [u8; ID_BYTES],
    pub num_queues: u16,
    pub queue_size: u16,
    pub drain_timeout: Duration,
    /// The engine each queue runs requests with.
    pub engine: EngineKind,
    /// `--poll-us`, `--poll-max-us`: how long a worker keeps polling its ring after work.
    pub poll: Polling,
}

pub struct Device {
    pub cfg: DeviceConfig,
    /// What requests run against: the block stack and the serial.
    pub target: Target,
    pub stats: Stats,
    /// Set by `quiesce`: no queue takes descriptors, whichever frontend is connected.
    quiesced: AtomicBool,
    /// Whether this process may write the image and spare, and their handover to another
    /// process in a migration.
    handover: Arc<Handover>,
}

impl Device {
    pub fn new(cfg: DeviceConfig, stack: Arc<dyn BlockIo>) -> Device {
        let stats = Stats::new(cfg.num_queues as usize);
        let target = Target {
            stack,
            serial: cfg.serial,
        };
        Device {
            cfg,
            target,
            stats,
            quiesced: AtomicBool::new(false),
            handover: Arc::new(Handover::unlocked()),
        }
    }

    /// The device with the image and spare's handover (without one, the process is always
    /// their writer).
    pub fn with_handover(mut self, handover: Arc<Handover>) -> Device {
        self.handover = handover;
        self
    }

    pub fn handover(&self) -> &Arc<Handover> {
        &self.handover
    }

    /// Before a queue starts running: makes this process the writer (see
    /// [`Handover::claim`]); one atomic load when it is.
    pub fn claim_writer(&self) -> Result<(), HandoverError> {
        self.handover.claim()
    }

    /// After a drain left every queue stopped: hands the files to a waiting `--incoming`
    /// process, if there is one (see [`Handover::yield_if_waited`]). Whether it did.
    pub fn yield_writer_if_waited(&self) -> bool {
        self.handover.yield_if_waited()
    }

    pub fn writer_state(&self) -> WriterState {
        self.handover.state()
    }

    pub fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::Acquire)
    }

    pub fn set_quiesced(&self, on: bool) {
        self.quiesced.store(on, Ordering::Release);
    }

    pub fn features(&self) -> u64 {
        let mut blk = [
            virtio::VIRTIO_BLK_F_SIZE_MAX,
            virtio::VIRTIO_BLK_F_SEG_MAX,
            virtio::VIRTIO_BLK_F_BLK_SIZE,
            virtio::VIRTIO_BLK_F_TOPOLOGY,
            virtio::VIRTIO_BLK_F_FLUSH,
            virtio::VIRTIO_BLK_F_CONFIG_WCE,
            virtio::VIRTIO_BLK_F_MQ,
            virtio::VIRTIO_BLK_F_DISCARD,
            virtio::VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if self.cfg.readonly {
            blk |= 1 << virtio::VIRTIO_BLK_F_RO;
        }
        blk | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    pub fn config_space(&self, writeback: bool) -> BlkConfig {
        let sectors_per_block = self.cfg.block_size >> SECTOR_SHIFT;
        BlkConfig {
            capacity: self.cfg.capacity >> SECTOR_SHIFT,
            size_max: SIZE_MAX,
            // Two descriptors of every chain are header and status.
            seg_max: u32::from(self.cfg.queue_size) - 2,
            blk_size: self.cfg.block_size,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: u8::from(writeback),
            num_queues: self.cfg.num_queues,
            max_discard_sectors: MAX_ZERO_SECTORS,
            max_discard_seg: MAX_ZERO_SEGS,
            discard_sector_alignment: sectors_per_block,
            max_write_zeroes_sectors: MAX_ZERO_SECTORS,
            max_write_zeroes_seg: MAX_ZERO_SEGS,
            write_zeroes_may_unmap: 1,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.cfg.capacity >> SECTOR_SHIFT,
            block_size: self.cfg.block_size,
            readonly: self.cfg.readonly,
            max_discard_sectors: MAX_ZERO_SECTORS,
            max_discard_seg: MAX_ZERO_SEGS,
            max_write_zeroes_sectors: MAX_ZERO_SECTORS,
            max_write_zeroes_seg: MAX_ZERO_SEGS,
        }
    }
}

/// The GET_ID serial for an image when `--serial` is not given: stable for a path, distinct
/// between images, and short enough for the 20 bytes virtio allows.
pub fn default_serial(image_path: &std::path::Path) -> String {
    let canonical = std::fs::canonicalize(image_path).unwrap_or_else(|_| image_path.to_path_buf());
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in canonical.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("remapblk-{h:08x}")
}
