//! The remap table in memory and the spare-block allocator. Readers (the I/O path) take an
//! `ArcSwap` snapshot, which costs nothing measurable and shares no lock between queues;
//! changes are made one at a time under a mutex, made durable in the spare file, and only
//! then published.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use log::{info, warn};

use super::filter::BlockFilter;
use super::gate::{Closed, WriteGate};
use super::metadata::{Cause, Entry};
use super::spare::Spare;

/// What the I/O path needs: where remapped blocks live, and which blocks are pending.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub map: BTreeMap<u64, Entry>,
    /// Blocks whose read failed on the main image; the next write to one remaps it.
    pub pending: BTreeSet<u64>,
    /// Both of the above, for a quick "no".
    filter: BlockFilter,
}

impl Snapshot {
    /// A snapshot of a disk of `disk_blocks` blocks.
    pub fn new(disk_blocks: u64, map: BTreeMap<u64, Entry>, pending: BTreeSet<u64>) -> Snapshot {
        let filter = BlockFilter::new(disk_blocks, map.keys().chain(pending.iter()).copied());
        Snapshot {
            map,
            pending,
            filter,
        }
    }

    /// Whether any of blocks `[first, last]` is remapped or pending.
    pub fn touches(&self, first: u64, last: u64) -> bool {
        self.filter.may_hold(first, last)
            && (self.map.range(first..=last).next().is_some()
                || self.pending.range(first..=last).next().is_some())
    }

    /// The remapped blocks of `[first, last]`, in order.
    pub fn remapped(&self, first: u64, last: u64) -> impl Iterator<Item = (&u64, &Entry)> {
        self.filter
            .may_hold(first, last)
            .then(|| self.map.range(first..=last))
            .into_iter()
            .flatten()
    }
}

struct Inner {
    map: BTreeMap<u64, Entry>,
    pending: BTreeSet<u64>,
    free: BTreeSet<u64>,
    /// One warning per exhaustion, not one per request.
    warned_exhausted: bool,
}

pub struct RemapTable {
    snap: ArcSwap<Snapshot>,
    inner: Mutex<Inner>,
    spare: Spare,
    /// Open while this process may change the spare file (see `gate`).
    gate: WriteGate,
    /// Range locks on spare blocks (block number modulo their count), see
    /// [`RemapTable::with_spare_block`].
    stripes: Vec<RwLock<()>>,
}

const SPARE_STRIPES: u64 = 64;

impl RemapTable {
    /// Builds the table from the entries loaded from `spare`; the free list is every spare
    /// block no entry uses (so a block written but never committed is free again).
    /// The gate is open: this process may change the spare file.
    pub fn new(spare: Spare, entries: Vec<Entry>) -> Result<RemapTable, String> {
        let (map, free) = index(&spare, entries)?;
        let snap = ArcSwap::from_pointee(Snapshot::new(
            spare.header().disk_blocks(),
            map.clone(),
            BTreeSet::new(),
        ));
        Ok(RemapTable {
            snap,
            inner: Mutex::new(Inner {
                map,
                pending: BTreeSet::new(),
                free,
                warned_exhausted: false,
            }),
            spare,
            gate: WriteGate::new(true),
            stripes: (0..SPARE_STRIPES).map(|_| RwLock::new(())).collect(),
        })
    }

    /// Whether this process may change the spare file, and the leave to do so.
    pub fn gate(&self) -> &WriteGate {
        &self.gate
    }

    /// Loads the table, the spare blocks in memory and the pending list again from the spare
    /// file, as another process left them (see `handover`): nothing of what this process had
    /// in memory is kept. Nothing may use the table meanwhile. Returns (remaps, pending).
    pub fn reload(&self) -> Result<(usize, usize), String> {
        let mut inner = self.lock();
        let (entries, repaired) = self.spare.reload().map_err(|e| e.to_string())?;
        if let Some(slot) = repaired {
            warn!(
                "spare file {}: metadata slot {slot} was bad and has been rewritten from the other",
                self.spare.path().display()
            );
        }
        let (map, free) = index(&self.spare, entries)?;
        let pending = self.take_pending_list()?;
        inner.pending = pending
            .into_iter()
            .filter(|b| !map.contains_key(b))
            .collect();
        inner.map = map;
        inner.free = free;
        inner.warned_exhausted = false;
        self.publish(&inner);
        Ok((inner.map.len(), inner.pending.len()))
    }

    /// Leaves the pending list in the spare file for whoever takes the files over next
    /// (durably).
    pub fn save_pending(&self) -> io::Result<()> {
        let inner = self.lock();
        let blocks: Vec<u64> = inner.pending.iter().copied().collect();
        self.spare.write_pending(&blocks)
    }

    /// Wipes a pending list a handover left, unused: a process that starts afresh begins
    /// with an empty list, as ever, and a later takeover must not find a stale one.
    pub fn discard_saved_pending(&self) -> Result<(), String> {
        self.take_pending_list().map(drop)
    }

    fn take_pending_list(&self) -> Result<Vec<u64>, String> {
        self.spare.take_pending().map_err(|e| {
            format!(
                "spare file {}: cannot read or wipe the pending list a handover left: {e}",
                self.spare.path().display()
            )
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// The current snapshot for one request: cheaper than [`snapshot`](Self::snapshot) (no
    /// reference count shared by every queue is touched), to be dropped soon.
    pub fn view(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snap.load()
    }

    pub fn spare(&self) -> &Spare {
        &self.spare
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, inner: &Inner) {
        self.snap.store(Arc::new(Snapshot::new(
            self.spare.header().disk_blocks(),
            inner.map.clone(),
            inner.pending.clone(),
        )));
    }

    /// Marks blocks whose read failed on the main image (a block remapped meanwhile is not).
    pub fn add_pending(&self, blocks: impl IntoIterator<Item = u64>) {
        let mut inner = self.lock();
        let before = inner.pending.len();
        for b in blocks {
            if !inner.map.contains_key(&b) {
                inner.pending.insert(b);
            }
        }
        if inner.pending.len() != before {
            self.publish(&inner);
        }
    }

    /// Gives `lba` a spare block holding `data` (one logical block): the data is durable in
    /// the spare, then the table entry is, before this returns. Clears `lba` from pending.
    pub fn remap_with_data(&self, lba: u64, data: &[u8], cause: Cause) -> io::Result<Entry> {
        let _permit = self.gate.permit().map_err(io::Error::other)?;
        let mut inner = self.lock();
        self.remap_locked(&mut inner, lba, data, cause)
    }

    /// Gives every block of `blocks` (a block and its data) a spare block, with one table
    /// commit for all of them: the data is made durable first (one fdatasync), then the
    /// table. Refuses up front, changing nothing, when the spare has too few free blocks.
    /// Blocks already remapped are skipped. Returns the new entries.
    pub fn remap_batch(&self, blocks: &[(u64, Vec<u8>)], cause: Cause) -> io::Result<Vec<Entry>> {
        let _permit = self.gate.permit().map_err(io::Error::other)?;
        let mut inner = self.lock();
        let todo: Vec<&(u64, Vec<u8>)> = blocks
            .iter()
            .filter(|(lba, _)| !inner.map.contains_key(lba))
            .collect();
        if todo.len() > inner.free.len() {
            return Err(io::Error::other(format!(
                "the spare file has {} free blocks, {} are needed; nothing was remapped",
                inner.free.len(),
                todo.len()
            )));
        }
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut new = Vec::with_capacity(todo.len());
        let mut taken = Vec::with_capacity(todo.len());
        let written = todo.iter().try_for_each(|(lba, data)| {
            let block = inner
                .free
                .pop_first()
                .ok_or_else(|| io::Error::other("spare file exhausted"))?;
            taken.push(block);
            new.push(Entry {
                lba: *lba,
                spare_block: block,
                cause,
                since,
            });
            self.spare.write_block(block, data)
        });
        let durable = written.and_then(|()| self.spare.sync()).and_then(|()| {
            let mut all = inner.map.clone();
            all.extend(new.iter().map(|e| (e.lba, *e)));
            self.spare
                .commit(&all.values().copied().collect::<Vec<_>>())
        });
        if let Err(e) = durable {
            inner.free.extend(taken);
            return Err(e);
        }
        for e in &new {
            inner.map.insert(e.lba, *e);
            inner.pending.remove(&e.lba);
        }
        self.publish(&inner);
        info!(
            "{} blocks remapped in one table change ({})",
            new.len(),
            cause.name()
        );
        Ok(new)
    }

    /// Drops the entry of `lba` after `copy_back` has put the block's data where it belongs;
    /// the spare block is free once the smaller table is durable and no request that found
    /// it in an older snapshot is still running.
    pub fn unmap(
        &self,
        lba: u64,
        copy_back: impl FnOnce(&Entry) -> io::Result<()>,
    ) -> io::Result<Option<Entry>> {
        // Held through the copy back to the image, too: that writes the image.
        let _permit = self.gate.permit().map_err(io::Error::other)?;
        let entry = {
            let mut inner = self.lock();
            let Some(entry) = inner.map.get(&lba).copied() else {
                return Ok(None);
            };
            copy_back(&entry)?;
            inner.map.remove(&lba);
            let all: Vec<Entry> = inner.map.values().copied().collect();
            if let Err(e) = self.spare.commit(&all) {
                inner.map.insert(lba, entry);
                return Err(e);
            }
            self.publish(&inner);
            entry
        };
        // Waits for requests that are using the block (with_spare_block); later ones see the
        // snapshot just published and leave it alone.
        drop(
            self.stripe(entry.spare_block)
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut inner = self.lock();
        inner.free.insert(entry.spare_block);
        inner.warned_exhausted = false;
        info!(
            "block {lba} moved back from spare block {}",
            entry.spare_block
        );
        Ok(Some(entry))
    }

    fn remap_locked(
        &self,
        inner: &mut Inner,
        lba: u64,
        data: &[u8],
        cause: Cause,
    ) -> io::Result<Entry> {
        if let Some(e) = inner.map.get(&lba).copied() {
            self.spare.write_block(e.spare_block, data)?;
            return Ok(e);
        }
        let Some(block) = inner.free.pop_first() else {
            if !inner.warned_exhausted {
                warn!(
                    "spare file {} is exhausted: write errors now reach the guest",
                    self.spare.path().display()
                );
                inner.warned_exhausted = true;
            }
            return Err(io::Error::other("spare file exhausted"));
        };
        let entry = Entry {
            lba,
            spare_block: block,
            cause,
            since: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        // Data first, then the table: a crash in between leaves a spare block that no entry
        // uses, which the next start-up frees again.
        let durable = self
            .spare
            .write_block(block, data)
            .and_then(|_| self.spare.sync())
            .and_then(|_| {
                inner.map.insert(lba, entry);
                let all: Vec<Entry> = inner.map.values().copied().collect();
                self.spare.commit(&all)
            });
        if let Err(e) = durable {
            inner.map.remove(&lba);
            inner.free.insert(block);
            return Err(e);
        }
        inner.pending.remove(&lba);
        self.publish(inner);
        info!(
            "block {lba} remapped to spare block {block} ({})",
            cause.name()
        );
        Ok(entry)
    }

    /// The range lock of the spare blocks that share `spare_block`'s stripe.
    fn stripe(&self, spare_block: u64) -> &RwLock<()> {
        &self.stripes[(spare_block % SPARE_STRIPES) as usize]
    }

    /// Runs `io` on spare block `spare_block` only while it still holds `lba`: a request that
    /// looked the mapping up before a remap-remove freed the block must not touch it once
    /// another block may have been given it. The block's stripe is held shared for the I/O and
    /// [`unmap`](Self::unmap) takes it exclusively before it frees a block, so the block
    /// cannot change hands during `io`; no lock shared by every request is taken. False when
    /// the mapping changed (the caller's view is stale).
    fn with_spare_block(
        &self,
        lba: u64,
        spare_block: u64,
        io: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<bool> {
        let _stripe = self
            .stripe(spare_block)
            .read()
            .unwrap_or_else(|p| p.into_inner());
        // Loaded under the stripe lock: if unmap freed the block before we took it, its
        // snapshot without the entry was published before then and is the one seen here.
        if self.snap.load().map.get(&lba).map(|e| e.spare_block) != Some(spare_block) {
            return Ok(false);
        }
        io()?;
        Ok(true)
    }

    /// Writes `data` to spare block `spare_block` only while it still holds `lba` (see
    /// [`with_spare_block`](Self::with_spare_block)). False when the mapping changed.
    pub fn write_spare_if_mapped(
        &self,
        lba: u64,
        spare_block: u64,
        data: &[u8],
    ) -> io::Result<bool> {
        // Guest I/O: the handover keeps it from running unless this process is the writer
        // (no permit needed); this is the check that it did.
        if !self.gate.is_open() {
            return Err(io::Error::other(Closed));
        }
        self.with_spare_block(lba, spare_block, || {
            self.spare.write_block(spare_block, data)
        })
    }

    /// Reads spare block `spare_block` only while it still holds `lba`. False when the
    /// mapping changed.
    pub fn read_spare_if_mapped(
        &self,
        lba: u64,
        spare_block: u64,
        out: &mut [u8],
    ) -> io::Result<bool> {
        self.with_spare_block(lba, spare_block, || self.spare.read_block(spare_block, out))
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.snapshot().map.values().copied().collect()
    }

    pub fn pending(&self) -> Vec<u64> {
        self.snapshot().pending.iter().copied().collect()
    }

    pub fn spare_total(&self) -> u64 {
        self.spare.header().spare_blocks
    }

    pub fn spare_free(&self) -> u64 {
        self.lock().free.len() as u64
    }
}

/// The table by block, and the free spare blocks, from a spare's entries; an error when two
/// entries share a block or a spare block.
fn index(
    spare: &Spare,
    entries: Vec<Entry>,
) -> Result<(BTreeMap<u64, Entry>, BTreeSet<u64>), String> {
    let total = spare.header().spare_blocks;
    let mut map = BTreeMap::new();
    let mut used = BTreeSet::new();
    for e in entries {
        if !used.insert(e.spare_block) {
            return Err(format!(
                "spare file {}: spare block {} is used twice; the table is inconsistent",
                spare.path().display(),
                e.spare_block
            ));
        }
        if map.insert(e.lba, e).is_some() {
            return Err(format!(
                "spare file {}: block {} is remapped twice; the table is inconsistent",
                spare.path().display(),
                e.lba
            ));
        }
    }
    let free = (0..total).filter(|b| !used.contains(b)).collect();
    Ok((map, free))
}

#[cfg(test)]
mod tests {
    use super::super::metadata::Header;
    use super::super::spare::Spare;
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Remap(u64),
        Unmap(u64),
        Pending(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..32).prop_map(Op::Remap),
            (0u64..32).prop_map(Op::Unmap),
            (0u64..32).prop_map(Op::Pending),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever the sequence of remaps, unmaps and read errors: no spare block is used
        /// twice, used + free = total, a remapped block is never pending, and reopening the
        /// spare file gives the same table.
        #[test]
        fn table_invariants_hold_and_survive_reopen(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("spare");
            let header = Header { block_size: 512, image_size: 1 << 20, spare_blocks: 8 };
            let t = RemapTable::new(Spare::create(&path, header).unwrap(), Vec::new()).unwrap();
            for op in ops {
                match op {
                    Op::Remap(b) => { let _ = t.remap_with_data(b, &[b as u8; 512], Cause::Manual); }
                    Op::Unmap(b) => { t.unmap(b, |_| Ok(())).unwrap(); }
                    Op::Pending(b) => t.add_pending([b]),
                }
                let entries = t.entries();
                let spares: BTreeSet<u64> = entries.iter().map(|e| e.spare_block).collect();
                prop_assert_eq!(spares.len(), entries.len());
                prop_assert_eq!(entries.len() as u64 + t.spare_free(), 8);
                let snap = t.snapshot();
                prop_assert!(snap.map.keys().all(|b| !snap.pending.contains(b)));
            }
            let before = t.entries();
            drop(t);
            let reopened = Spare::open(&path, 512, 1 << 20).unwrap();
            prop_assert_eq!(reopened.entries, before);
        }
    }

    /// An empty table over a new spare file of `spare_blocks` blocks (512-byte blocks, 1 MiB
    /// image), and the directory that holds it.
    fn empty_table(spare_blocks: u64) -> (tempfile::TempDir, RemapTable) {
        let dir = tempfile::tempdir().unwrap();
        let header = Header {
            block_size: 512,
            image_size: 1 << 20,
            spare_blocks,
        };
        let spare = Spare::create(&dir.path().join("s"), header).unwrap();
        (dir, RemapTable::new(spare, Vec::new()).unwrap())
    }

    #[test]
    fn remapped_data_is_in_the_spare_and_exhaustion_is_an_error() {
        let (_dir, t) = empty_table(2);
        t.add_pending([5]);
        let e = t
            .remap_with_data(5, &[9u8; 512], Cause::WriteError)
            .unwrap();
        assert!(t.pending().is_empty(), "remapping clears pending");
        let mut buf = [0u8; 512];
        t.spare().read_block(e.spare_block, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 512]);
        t.remap_with_data(6, &[1u8; 512], Cause::WriteError)
            .unwrap();
        assert!(t
            .remap_with_data(7, &[1u8; 512], Cause::WriteError)
            .is_err());
        assert_eq!(t.spare_free(), 0);
        t.unmap(5, |_| Ok(())).unwrap();
        assert_eq!(t.spare_free(), 1);
    }

    /// A spare block in use by a request (its mapping checked, its I/O running) is not freed
    /// by a concurrent unmap until that I/O is over; the unmap publishes the smaller table at
    /// once, so requests that start later leave the block alone.
    #[test]
    fn unmap_frees_a_spare_block_only_after_the_io_using_it() {
        let (_dir, t) = empty_table(4);
        let t = Arc::new(t);
        let e = t.remap_with_data(5, &[1u8; 512], Cause::Manual).unwrap();
        let free = t.spare_free();
        let deadline = |ms| std::time::Instant::now() + std::time::Duration::from_millis(ms);
        let mut unmapper = None;
        let ran = t
            .with_spare_block(5, e.spare_block, || {
                let t2 = Arc::clone(&t);
                unmapper = Some(std::thread::spawn(move || t2.unmap(5, |_| Ok(()))));
                let until = deadline(10_000);
                while t.snapshot().map.contains_key(&5) {
                    assert!(std::time::Instant::now() < until, "unmap never published");
                    std::thread::yield_now();
                }
                // Published; the free must wait for this I/O however long it takes.
                let until = deadline(200);
                while std::time::Instant::now() < until {
                    assert_eq!(t.spare_free(), free, "block freed under running I/O");
                    std::thread::yield_now();
                }
                Ok(())
            })
            .unwrap();
        assert!(ran);
        let removed = unmapper.unwrap().join().unwrap().unwrap();
        assert_eq!(removed.map(|r| r.spare_block), Some(e.spare_block));
        assert_eq!(t.spare_free(), free + 1);
        // A request that starts now finds the mapping gone and does nothing.
        assert!(!t.with_spare_block(5, e.spare_block, || Ok(())).unwrap());
    }
}
