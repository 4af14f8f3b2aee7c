//! The history against a byte-array model of the disk: for random histories of writes,
//! discards, write-zeroes and flushes whose submission and completion interleave with them,
//! a cut leaves exactly what the model allows.

use proptest::prelude::*;

use super::*;

const BLOCK: u64 = 16;
const BLOCKS: u64 = 32;

#[derive(Debug, Clone)]
enum Op {
    /// A write of `len` blocks at block `at`; `kind` 0 write, 1 discard, 2 write-zeroes.
    Write { at: u64, len: u64, kind: u8 },
    /// A flush is submitted (it covers what completed so far).
    FlushStart,
    /// The `n`th flush still running (modulo how many run) completes.
    FlushDone(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1..6u64, 0..3u8).prop_map(|(at, len, kind)| Op::Write {
            at,
            len: len.min(BLOCKS - at),
            kind,
        }),
        1 => Just(Op::FlushStart),
        1 => (0..4usize).prop_map(Op::FlushDone),
    ]
}

/// A write as the test remembers it: completion order, offset, the bytes it left.
struct Logged {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
}

/// Plays `ops` on a disk (starting as a pattern no write produces) and on a history, as the
/// cache target does: read the pre-image, write, record. Returns the disk, the history, the
/// writes in completion order and the completion order the last completed flush covered.
fn play(ops: &[Op]) -> (Vec<u8>, History, Vec<Logged>, u64) {
    let mut disk: Vec<u8> = (0..BLOCK * BLOCKS).map(|i| 0x80 | (i % 97) as u8).collect();
    let mut h = History::new(BLOCK);
    let mut log = Vec::new();
    let mut running: Vec<u64> = Vec::new();
    let mut covered = 0;
    for (n, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { at, len, kind } => {
                let (off, bytes) = ((at * BLOCK) as usize, (len * BLOCK) as usize);
                let mut pre = h.buffer(bytes);
                pre.extend_from_slice(&disk[off..off + bytes]);
                // Each write's bytes are its own (1..=0x7f, never the initial pattern).
                let data = match kind {
                    0 => vec![1 + (n % 0x7f) as u8; bytes],
                    _ => vec![0; bytes],
                };
                disk[off..off + bytes].copy_from_slice(&data);
                let kind =
                    [WriteKind::Write, WriteKind::Discard, WriteKind::WriteZeroes][kind as usize];
                let seq = h.record(off as u64, kind, pre);
                log.push(Logged {
                    seq,
                    offset: off as u64,
                    data,
                });
            }
            Op::FlushStart => running.push(h.completed()),
            Op::FlushDone(i) if !running.is_empty() => {
                let upto = running.remove(i % running.len());
                h.cover(upto);
                covered = covered.max(upto);
            }
            Op::FlushDone(_) => {}
        }
    }
    (disk, h, log, covered)
}

/// The disk as it was once the writes up to `covered` were done: the flushed state.
fn flushed_state(log: &[Logged], covered: u64) -> Vec<u8> {
    let mut disk: Vec<u8> = (0..BLOCK * BLOCKS).map(|i| 0x80 | (i % 97) as u8).collect();
    for w in log.iter().filter(|w| w.seq <= covered) {
        let off = w.offset as usize;
        disk[off..off + w.data.len()].copy_from_slice(&w.data);
    }
    disk
}

fn apply(disk: &mut [u8], reverts: &[Revert]) {
    for r in reverts {
        let off = r.offset as usize;
        disk[off..off + r.data.len()].copy_from_slice(&r.data);
    }
}

fn plan(mode: CutMode, seed: u64, probability: f64, torn: Tearing) -> CutPlan {
    CutPlan {
        mode,
        probability,
        seed,
        torn,
    }
}

proptest! {
    #[test]
    fn drop_all_leaves_exactly_the_state_at_the_last_completed_flush(
        ops in prop::collection::vec(op(), 0..60)
    ) {
        let (mut disk, mut h, log, covered) = play(&ops);
        let unflushed = log.iter().filter(|w| w.seq > covered).count();
        let held: u64 = log.iter().filter(|w| w.seq > covered).map(|w| w.data.len() as u64).sum();
        prop_assert_eq!(h.held(), held);
        let (reverts, report) = h.cut(&plan(CutMode::DropAll, 1, 0.5, Tearing::Sector));
        apply(&mut disk, &reverts);
        prop_assert_eq!(disk, flushed_state(&log, covered));
        prop_assert_eq!(report.counts.lost, unflushed);
        prop_assert_eq!(report.counts.kept + report.counts.torn, 0);
        prop_assert_eq!(h.held(), 0);
        prop_assert_eq!(h.writes().count(), 0);
    }

    #[test]
    fn keep_all_keeps_everything(ops in prop::collection::vec(op(), 0..60)) {
        let (mut disk, mut h, log, covered) = play(&ops);
        let before = disk.clone();
        let (reverts, report) = h.cut(&plan(CutMode::KeepAll, 1, 0.5, Tearing::Off));
        prop_assert!(reverts.is_empty());
        apply(&mut disk, &reverts);
        prop_assert_eq!(disk, before);
        prop_assert_eq!(report.counts.kept, log.iter().filter(|w| w.seq > covered).count());
    }

    /// Every random or torn outcome is the flushed state with the kept writes, and the
    /// surviving blocks of the torn ones, laid over it in completion order: no byte that was
    /// never written, nothing flushed lost, torn writes whole blocks only.
    #[test]
    fn random_and_torn_outcomes_are_ones_the_model_allows(
        ops in prop::collection::vec(op(), 0..60),
        seed in any::<u64>(),
        probability in 0.0..=1.0f64,
        torn in prop_oneof![Just(Tearing::Off), Just(Tearing::Sector)],
        keep_all in any::<bool>(),
    ) {
        let (mut disk, mut h, log, covered) = play(&ops);
        let mode = if keep_all { CutMode::KeepAll } else { CutMode::Random };
        let p = plan(mode, seed, probability, torn);
        let again = h.fates(&p);
        let (reverts, report) = h.cut(&p);
        apply(&mut disk, &reverts);

        // The report names each unflushed write once, and the same seed gives the same cut.
        let mut orders: Vec<u64> = report.lost.iter().chain(&report.kept).map(|w| w.order)
            .chain(report.torn.iter().map(|t| t.write.order)).collect();
        orders.sort_unstable();
        let unflushed: Vec<u64> = log.iter().filter(|w| w.seq > covered).map(|w| w.seq).collect();
        prop_assert_eq!(&orders, &unflushed);
        prop_assert_eq!(again.iter().filter(|f| matches!(f, Fate::Torn(_))).count(), report.torn.len());
        if torn == Tearing::Off {
            prop_assert!(report.torn.is_empty());
        }

        let mut expect = flushed_state(&log, covered);
        for w in log.iter().filter(|w| w.seq > covered) {
            let off = w.offset as usize;
            if report.kept.iter().any(|k| k.order == w.seq) {
                expect[off..off + w.data.len()].copy_from_slice(&w.data);
            } else if let Some(t) = report.torn.iter().find(|t| t.write.order == w.seq) {
                let blocks = w.data.len() as u64 / BLOCK;
                prop_assert!(!t.survived.is_empty() && (t.survived.len() as u64) < blocks,
                    "a torn write keeps some blocks and loses some: {:?}", t);
                for lba in &t.survived {
                    let b = (lba * BLOCK) as usize;
                    prop_assert!(b >= off && b < off + w.data.len());
                    expect[b..b + BLOCK as usize]
                        .copy_from_slice(&w.data[b - off..b - off + BLOCK as usize]);
                }
            }
        }
        prop_assert_eq!(disk, expect);
    }
}

#[test]
fn a_flush_covers_only_what_completed_before_it_started() {
    let mut h = History::new(BLOCK);
    h.record(0, WriteKind::Write, vec![1; 16]);
    let flush = h.completed();
    h.record(16, WriteKind::Write, vec![2; 16]);
    h.cover(flush);
    let left: Vec<u64> = h.writes().map(|w| w.seq).collect();
    assert_eq!(left, [2]);
    assert_eq!(h.held(), 16);
}

#[test]
fn a_seed_repeats_its_cut_and_another_differs() {
    let mut h = History::new(BLOCK);
    for i in 0..64 {
        h.record(i * 16, WriteKind::Write, vec![0; 32]);
    }
    let p = plan(CutMode::Random, 7, 0.5, Tearing::Sector);
    assert_eq!(h.fates(&p), h.fates(&p));
    assert_ne!(h.fates(&p), h.fates(&CutPlan { seed: 8, ..p }));
    let torn = h
        .fates(&p)
        .iter()
        .filter(|f| matches!(f, Fate::Torn(_)))
        .count();
    assert!(torn > 0, "with p=0.5 over 64 two-block writes some tear");
}
