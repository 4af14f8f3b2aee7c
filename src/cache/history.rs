//! The volatile cache's memory, as a pure model (no I/O): the writes that completed and no
//! completed flush covers yet, in completion order, each with the content its range held just
//! before it (its pre-image), and what a power cut makes of them.
//!
//! One pre-image per write, rather than one per range per flush epoch plus each write's own
//! data: the content before write `i` is, on the sectors it shares with an earlier unflushed
//! write, that write's data, and on the others the flushed state. So the pre-images alone say
//! what every sector held at every point since the last flush, and a cut needs nothing else.
//! The cost is one read of the range before each write, which the first write of a range in
//! an epoch pays in any design; in exchange, no write's data is ever copied out of the guest's
//! buffers. This holds only if overlapping writes reach the layer below in the order they
//! complete here: the target keeps them apart (its range locks) and numbers them in that
//! order.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// The request kinds that change data: all are writes to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteKind {
    Write,
    Discard,
    WriteZeroes,
}

/// Which unflushed writes a cut loses (`power-cut mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutMode {
    /// Every one: the disk holds what the last completed flush covered.
    #[default]
    DropAll,
    /// None: the disk holds everything that completed.
    KeepAll,
    /// Each independently, lost with the cut's probability.
    Random,
}

/// Whether a write the cut keeps may survive only in part (`power-cut torn=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tearing {
    #[default]
    Off,
    /// A kept write of more than one block is torn with the cut's probability: each of its
    /// blocks survives or not, at least one of each.
    Sector,
}

/// What a cut does, fully determined (the seed included), so that it can be run again.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CutPlan {
    pub mode: CutMode,
    pub probability: f64,
    pub seed: u64,
    pub torn: Tearing,
}

/// A write that completed and is not yet covered by a flush.
#[derive(Debug)]
pub struct Unflushed {
    /// Its place in completion order (1 for the first write since the process started).
    pub seq: u64,
    /// Byte offset on the device.
    pub offset: u64,
    pub kind: WriteKind,
    /// What its range held just before it; its length is the write's.
    pub pre: Vec<u8>,
}

impl Unflushed {
    fn len(&self) -> u64 {
        self.pre.len() as u64
    }
}

/// What became of one write in a cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    Lost,
    Kept,
    /// Block `i` of the write survived where `survived[i]`.
    Torn(Vec<bool>),
}

impl Fate {
    fn survives(&self, block: usize) -> bool {
        match self {
            Fate::Lost => false,
            Fate::Kept => true,
            Fate::Torn(s) => s.get(block).copied().unwrap_or(false),
        }
    }
}

/// Bytes to write at `offset` to carry a cut out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revert {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// One write as a cut's reply shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteReport {
    /// Completion order (see [`Unflushed::seq`]).
    pub order: u64,
    pub kind: WriteKind,
    /// First logical block.
    pub lba: u64,
    /// Bytes.
    pub len: u64,
}

/// A torn write: which of its blocks survived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TornReport {
    #[serde(flatten)]
    pub write: WriteReport,
    /// The logical blocks that hold the write's data after the cut; its others do not.
    pub survived: Vec<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CutCounts {
    pub lost: usize,
    pub kept: usize,
    pub torn: usize,
    /// Bytes written back to undo what was lost.
    pub reverted_bytes: u64,
}

/// What a cut did, for the reply and the event log.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CutReport {
    pub lost: Vec<WriteReport>,
    pub kept: Vec<WriteReport>,
    pub torn: Vec<TornReport>,
    pub counts: CutCounts,
}

/// The unflushed writes of a device with `block`-byte logical blocks (the unit a torn write
/// keeps or loses: a drive writes its logical blocks atomically, and a guest never writes
/// less than one).
#[derive(Debug)]
pub struct History {
    block: u64,
    writes: VecDeque<Unflushed>,
    /// The completion order of the last write recorded.
    last_seq: u64,
    /// Bytes of pre-images held.
    held: u64,
    /// Pre-image buffers of covered writes, for the next writes to reuse, and their bytes.
    pool: Vec<Vec<u8>>,
    pooled: usize,
}

/// Bytes of buffers kept for reuse: a default cache's worth, so that a cache that fills and
/// flushes by itself over and over (a long run of writes without a flush) allocates nothing
/// after its first fill.
const POOL_BYTES: usize = 64 << 20;

impl History {
    pub fn new(block: u64) -> History {
        History {
            block: block.max(1),
            writes: VecDeque::new(),
            last_seq: 0,
            held: 0,
            pool: Vec::new(),
            pooled: 0,
        }
    }

    /// An empty buffer with room for a pre-image of `len` bytes (from the pool when one is
    /// large enough). Not zeroed: the pre-image is read straight into its spare capacity.
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        // The last one given back: writes of one size (a guest's usual) always fit; a buffer
        // too small is dropped rather than searched past.
        let mut buf = match self.pool.pop() {
            Some(b) => {
                self.pooled -= b.capacity();
                if b.capacity() >= len {
                    b
                } else {
                    Vec::with_capacity(len)
                }
            }
            None => Vec::with_capacity(len),
        };
        buf.clear();
        buf
    }

    /// Gives back a buffer that [`buffer`](Self::buffer) handed out and no write kept.
    pub fn give_back(&mut self, buf: Vec<u8>) {
        if self.pooled + buf.capacity() <= POOL_BYTES {
            self.pooled += buf.capacity();
            self.pool.push(buf);
        }
    }

    /// Records a write that just completed, after what it changed was read into `pre`;
    /// returns its place in completion order.
    pub fn record(&mut self, offset: u64, kind: WriteKind, pre: Vec<u8>) -> u64 {
        self.last_seq += 1;
        self.held += pre.len() as u64;
        self.writes.push_back(Unflushed {
            seq: self.last_seq,
            offset,
            kind,
            pre,
        });
        self.last_seq
    }

    /// Counts a write that completed without a pre-image (the caller covered everything
    /// before it): it takes a place in completion order, so a flush that started after it
    /// covers what comes before.
    pub fn record_durable(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// The completion order of the last write recorded: what a flush submitted now covers.
    pub fn completed(&self) -> u64 {
        self.last_seq
    }

    /// A flush that started when [`completed`](Self::completed) was `upto` succeeded: the
    /// writes up to it are durable.
    pub fn cover(&mut self, upto: u64) {
        while self.writes.front().is_some_and(|w| w.seq <= upto) {
            if let Some(w) = self.writes.pop_front() {
                self.held -= w.len();
                self.give_back(w.pre);
            }
        }
    }

    /// Everything recorded is durable (an automatic flush, or a cut that is over).
    pub fn cover_all(&mut self) {
        self.cover(self.last_seq);
    }

    /// Bytes of pre-images held: the unflushed bytes.
    pub fn held(&self) -> u64 {
        self.held
    }

    pub fn writes(&self) -> impl Iterator<Item = &Unflushed> {
        self.writes.iter()
    }

    /// What `plan` does to each unflushed write, in completion order.
    pub fn fates(&self, plan: &CutPlan) -> Vec<Fate> {
        let mut rng = SplitMix64::new(plan.seed);
        self.writes
            .iter()
            .map(|w| {
                let lost = match plan.mode {
                    CutMode::DropAll => true,
                    CutMode::KeepAll => false,
                    CutMode::Random => rng.chance(plan.probability),
                };
                let blocks = (w.len() / self.block) as usize;
                if lost {
                    Fate::Lost
                } else if plan.torn == Tearing::Sector && blocks > 1 && rng.chance(plan.probability)
                {
                    Fate::Torn(tear(&mut rng, blocks))
                } else {
                    Fate::Kept
                }
            })
            .collect()
    }

    /// What to write so that every block holds the data of the latest write in completion
    /// order that covers it and survived (`fates`, one per unflushed write), or the flushed
    /// state where none did. Only blocks that change are written.
    ///
    /// Walks the writes from the latest back: a block the latest write covering it survived
    /// is already right; otherwise it needs what the block held just before the latest lost
    /// write seen so far (that write's pre-image), unless an earlier write survived, whose
    /// data that pre-image is.
    pub fn outcome(&self, fates: &[Fate]) -> Vec<Revert> {
        #[derive(Clone, Copy)]
        enum Slot {
            /// The latest write covering the block survived: it holds the right data.
            Done,
            /// Every write seen so far here was lost: the block needs byte `at` of write
            /// `write`'s pre-image, unless an earlier write settles it otherwise.
            Pending { write: usize, at: usize },
            /// An earlier write survived under lost ones: the block needs that source.
            Final { write: usize, at: usize },
        }
        let bs = self.block as usize;
        let mut slots: HashMap<u64, Slot> = HashMap::new();
        for (i, w) in self.writes.iter().enumerate().rev() {
            let fate = fates.get(i).unwrap_or(&Fate::Kept);
            let first = w.offset / self.block;
            for b in 0..(w.len() / self.block) {
                let survives = fate.survives(b as usize);
                let lost_here = Slot::Pending {
                    write: i,
                    at: b as usize * bs,
                };
                let slot = slots.entry(first + b);
                match slot {
                    Entry::Vacant(v) => {
                        v.insert(if survives { Slot::Done } else { lost_here });
                    }
                    Entry::Occupied(mut o) => {
                        if let Slot::Pending { write, at } = *o.get() {
                            // The pending source is the pre-image of the next write after this
                            // one here, so it is this write's data when this one survived.
                            o.insert(if survives {
                                Slot::Final { write, at }
                            } else {
                                lost_here
                            });
                        }
                    }
                }
            }
        }
        let mut blocks: Vec<(u64, usize, usize)> = slots
            .into_iter()
            .filter_map(|(b, s)| match s {
                Slot::Pending { write, at } | Slot::Final { write, at } => Some((b, write, at)),
                Slot::Done => None,
            })
            .collect();
        blocks.sort_unstable_by_key(|&(b, _, _)| b);
        let mut out: Vec<Revert> = Vec::new();
        for (b, write, at) in blocks {
            let Some(src) = self.writes.get(write).and_then(|w| w.pre.get(at..at + bs)) else {
                continue;
            };
            match out.last_mut() {
                Some(r) if r.offset + r.data.len() as u64 == b * self.block => {
                    r.data.extend_from_slice(src)
                }
                _ => out.push(Revert {
                    offset: b * self.block,
                    data: src.to_vec(),
                }),
            }
        }
        out
    }

    /// Carries `plan` out on the model: what to write, and what became of each write. The
    /// history is emptied (after a cut, nothing is unflushed).
    pub fn cut(&mut self, plan: &CutPlan) -> (Vec<Revert>, CutReport) {
        let fates = self.fates(plan);
        let reverts = self.outcome(&fates);
        let mut report = CutReport::default();
        for (w, fate) in self.writes.iter().zip(&fates) {
            let r = WriteReport {
                order: w.seq,
                kind: w.kind,
                lba: w.offset / self.block,
                len: w.len(),
            };
            match fate {
                Fate::Lost => report.lost.push(r),
                Fate::Kept => report.kept.push(r),
                Fate::Torn(survived) => {
                    let survived = survived
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| **s)
                        .map(|(i, _)| r.lba + i as u64)
                        .collect();
                    report.torn.push(TornReport { write: r, survived })
                }
            }
        }
        report.counts = CutCounts {
            lost: report.lost.len(),
            kept: report.kept.len(),
            torn: report.torn.len(),
            reverted_bytes: reverts.iter().map(|r| r.data.len() as u64).sum(),
        };
        self.cover_all();
        (reverts, report)
    }
}

/// Which of a torn write's `blocks` (at least two) survive: each with even odds, but at
/// least one does and one does not (otherwise it was kept or lost, not torn). Any subset, not
/// a prefix: a drive's cache writes back in its own order, and flash spreads one write over
/// several dies, so nothing makes the first blocks of a write safer than its last.
fn tear(rng: &mut SplitMix64, blocks: usize) -> Vec<bool> {
    let mut survived: Vec<bool> = (0..blocks).map(|_| rng.chance(0.5)).collect();
    let pick = rng.below(blocks);
    if survived.iter().all(|s| *s) {
        survived[pick] = false;
    } else if survived.iter().all(|s| !*s) {
        survived[pick] = true;
    }
    survived
}

#[cfg(test)]
mod tests;
