//! The live set of faults. The I/O path reads it through an `ArcSwap` snapshot (no lock, and
//! nothing at all to do when it is empty); control commands replace the snapshot under a
//! writers' lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::Value;

use super::spec::{Corruption, FaultMode, FaultOp, FaultSpec, TornReport, MODE_NAMES};
use super::trigger::since;
use crate::events::EventLog;
use crate::latch::Latch;
use crate::storage::Hold;

struct Fault {
    id: u64,
    spec: FaultSpec,
    fired: AtomicU64,
    /// Matching I/Os seen (right op, overlapping blocks, not expired), the count `after` and
    /// `every` read.
    matched: AtomicU64,
    /// When it was added: where its `window` starts.
    added: Instant,
    /// xorshift64* state, for flaky faults and delays with jitter.
    rng: Mutex<u64>,
    /// What a hang fault's requests wait behind now; `fault-release` opens it and puts a
    /// fresh one in its place, so the fault holds later requests again.
    latch: Mutex<Arc<Latch>>,
}

impl Fault {
    /// Whether a request of kind `op` on blocks `[first, last]` is this fault's to judge.
    /// Counts nothing.
    fn matches(&self, op: FaultOp, first: u64, last: u64) -> bool {
        self.spec.applies_to(op) && self.spec.overlaps(first, last) && !self.expired()
    }

    /// Whether the request goes on to the fault's mode: it matches, is counted, and the
    /// trigger (`after`, `every`, `window` at `now`) lets it through. The mode (a flaky draw)
    /// and the `times` claim come after this.
    fn admits(&self, op: FaultOp, first: u64, last: u64, now: Instant) -> bool {
        if !self.matches(op, first, last) {
            return false;
        }
        let n = self.matched.fetch_add(1, Ordering::AcqRel) + 1;
        self.spec.trigger.admits(n, since(self.added, now))
    }

    /// Claims one firing if `times` allows it.
    fn claim(&self) -> bool {
        match self.spec.times {
            None => {
                self.fired.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(limit) => self
                .fired
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                    (f < limit).then_some(f + 1)
                })
                .is_ok(),
        }
    }

    fn latch(&self) -> Arc<Latch> {
        self.latch.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lets the requests held now go; later ones wait behind a new latch. Returns how many.
    fn release(&self) -> usize {
        let old = std::mem::replace(
            &mut *self.latch.lock().unwrap_or_else(|p| p.into_inner()),
            Latch::new(),
        );
        old.release()
    }

    /// Lets every request it holds go, now and for good (the fault is being removed): the
    /// latch stays open, so a request that met the fault in a snapshot loaded just before the
    /// removal passes it at once rather than wait behind a latch no one would open.
    fn open_for_good(&self) {
        self.latch().release();
    }

    fn expired(&self) -> bool {
        self.spec
            .times
            .is_some_and(|t| self.fired.load(Ordering::Acquire) >= t)
    }

    /// The next draw of a flaky fault's generator, in [0, 1).
    fn draw(&self) -> f64 {
        let mut s = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        let x = s.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One fault as `fault-list` shows it: its `fault-add` arguments, and how it fared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultListing {
    pub id: u64,
    /// Times it decided a request's fate.
    pub fired: u64,
    /// Whether it fired its `times` and no longer applies.
    pub expired: bool,
    /// Matching I/Os it has seen (those before `after` and between `every`s included).
    pub matched: u64,
    /// Whether `after` matching I/Os have passed (always, without `after`).
    pub armed: bool,
    /// With a `window`: whether it is in its up phase now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_up: Option<bool>,
    /// Hang faults: how many requests it holds now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<usize>,
    #[serde(flatten)]
    pub spec: FaultSpec,
}

/// The `fault-fired` event: the fault and the request it decided.
#[derive(Serialize)]
struct Fired {
    id: u64,
    op: FaultOp,
    mode: &'static str,
    /// The request's blocks; a flush has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_block: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_block: Option<u64>,
}

/// What the fault layer does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Fail with a media error: the fault's id and the request's blocks it covers.
    Fail(u64, std::ops::RangeInclusive<u64>),
    /// Hold the request this long first: before it starts ([`FaultTable::hold`], a delay),
    /// or on the worker inside the stack ([`FaultTable::check`], a stall).
    Delay(Duration),
    /// Hold the request until this latch opens ([`FaultTable::hold`] only).
    Hang(Arc<Latch>),
    /// Carry the request out, its data corrupted on these blocks (the fault's id first).
    Corrupt(u64, Corruption, std::ops::RangeInclusive<u64>),
    /// Complete the write OK without writing these blocks (those of the write the fault
    /// covers); the rest of the write lands.
    Lose(u64, std::ops::RangeInclusive<u64>),
    /// Write these blocks (those of the write the fault covers) `shift` blocks away.
    Misdirect(u64, i64, std::ops::RangeInclusive<u64>),
    /// Write only the first `sectors` 512-byte sectors, then report as told.
    Torn(u64, u32, TornReport),
}

pub struct FaultTable {
    faults: ArcSwap<Vec<Arc<Fault>>>,
    /// How many faults `faults` holds, stored after it: with none, the I/O path learns so
    /// from one atomic load instead of an `ArcSwap` load per request.
    count: AtomicUsize,
    writers: Mutex<u64>,
    events: Arc<EventLog>,
    /// Firings per mode (indexed by [`FaultMode::index`]), faults removed since included.
    fired_by_mode: [AtomicU64; MODE_NAMES.len()],
}

impl FaultTable {
    pub fn new(events: Arc<EventLog>) -> FaultTable {
        FaultTable {
            faults: ArcSwap::from_pointee(Vec::new()),
            count: AtomicUsize::new(0),
            writers: Mutex::new(1),
            events,
            fired_by_mode: Default::default(),
        }
    }

    pub fn add(&self, spec: FaultSpec) -> u64 {
        self.add_at(spec, Instant::now())
    }

    /// [`add`](Self::add) with the clock read by the caller: a test fixes the start of the
    /// fault's window with it.
    pub fn add_at(&self, spec: FaultSpec, now: Instant) -> u64 {
        let mut next = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let id = *next;
        *next += 1;
        let seed = match spec.mode {
            // xorshift needs a non-zero state; any seed, 0 included, maps to one.
            FaultMode::Flaky { seed, .. }
            | FaultMode::Delay {
                jitter: Some(super::Jitter { seed, .. }),
                ..
            } => seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            _ => 1,
        };
        let fault = Arc::new(Fault {
            id,
            spec,
            fired: AtomicU64::new(0),
            matched: AtomicU64::new(0),
            added: now,
            rng: Mutex::new(seed),
            latch: Mutex::new(Latch::new()),
        });
        let mut v = Vec::clone(&self.faults.load());
        v.push(fault);
        self.publish(v);
        id
    }

    /// Applies a `--faults` file: a JSON array of fault-add argument objects. Returns how many.
    pub fn load_file(
        &self,
        path: &std::path::Path,
        capacity_blocks: u64,
        block_size: u32,
    ) -> Result<usize, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read faults file {}: {e}", path.display()))?;
        let list: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            format!(
                "faults file {} is not a JSON array of fault-add argument objects: {e}",
                path.display()
            )
        })?;
        for (i, entry) in list.iter().enumerate() {
            let args = entry.as_object().ok_or_else(|| {
                format!("faults file {}: entry {i} is not an object", path.display())
            })?;
            let spec = FaultSpec::from_args(args, capacity_blocks, block_size)
                .map_err(|e| format!("faults file {}: entry {i}: {e}", path.display()))?;
            let id = self.add(spec);
            log::info!("fault {id} from {}: {entry}", path.display());
        }
        Ok(list.len())
    }

    pub fn remove(&self, id: u64) -> bool {
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.faults.load();
        if !cur.iter().any(|f| f.id == id) {
            return false;
        }
        let v: Vec<_> = cur.iter().filter(|f| f.id != id).cloned().collect();
        self.publish(v);
        // After the fault is gone: a request it held goes on and is not held again by it.
        for f in cur.iter().filter(|f| f.id == id) {
            f.open_for_good();
        }
        true
    }

    pub fn clear(&self) -> usize {
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.faults.load_full();
        self.publish(Vec::new());
        for f in cur.iter() {
            f.open_for_good();
        }
        cur.len()
    }

    /// `fault-release`: lets go the requests fault `id` holds now; the fault stays and holds
    /// later ones. Returns how many it let go, or None when there is no such fault.
    pub fn release(&self, id: u64) -> Option<usize> {
        let cur = self.faults.load();
        cur.iter().find(|f| f.id == id).map(|f| f.release())
    }

    /// Makes `v` the live set; the caller holds the writers' lock. The count follows the list,
    /// so a reader that sees a count also sees at least that list.
    fn publish(&self, v: Vec<Arc<Fault>>) {
        let n = v.len();
        self.faults.store(Arc::new(v));
        self.count.store(n, Ordering::SeqCst);
    }

    pub fn list(&self) -> Vec<FaultListing> {
        self.list_at(Instant::now())
    }

    /// [`list`](Self::list) with the windows' phases at `now`.
    pub fn list_at(&self, now: Instant) -> Vec<FaultListing> {
        self.faults
            .load()
            .iter()
            .map(|f| {
                let matched = f.matched.load(Ordering::Acquire);
                FaultListing {
                    id: f.id,
                    fired: f.fired.load(Ordering::Acquire),
                    expired: f.expired(),
                    matched,
                    armed: f.spec.trigger.armed(matched),
                    window_up: f.spec.trigger.window_up(since(f.added, now)),
                    held: (f.spec.mode == FaultMode::Hang).then(|| f.latch().held()),
                    spec: f.spec.clone(),
                }
            })
            .collect()
    }

    /// How often each mode fired since start, by mode name (every mode, 0 included).
    pub fn fired_by_mode(&self) -> BTreeMap<&'static str, u64> {
        MODE_NAMES
            .iter()
            .zip(&self.fired_by_mode)
            .map(|(&name, n)| (name, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Whether some fault could decide the fate of a request of kind `op` on blocks
    /// `[first, last]` (without drawing or counting anything): such a request must go through
    /// [`check`](Self::check).
    pub fn may_apply(&self, op: FaultOp, first: u64, last: u64) -> bool {
        if self.none() {
            return false;
        }
        let faults = self.faults.load();
        faults
            .iter()
            .any(|f| !f.spec.mode.holds() && f.matches(op, first, last))
    }

    /// Decides the fate of a request of kind `op` (never `Any`) on blocks `[first, last]`
    /// (a flush passes any). Faults are asked in the order they were added; the first that
    /// fires decides, and the faults after it do not see the request (nor count it). Delays and
    /// hangs are not decided here but before the request starts ([`hold`](Self::hold)).
    pub fn check(&self, op: FaultOp, first: u64, last: u64) -> Verdict {
        if self.none() {
            return Verdict::Pass;
        }
        self.fire(false, op, first, last, Instant::now())
    }

    /// [`check`](Self::check) at a clock the caller reads: a test fixes it.
    pub fn check_at(&self, op: FaultOp, first: u64, last: u64, now: Instant) -> Verdict {
        self.fire(false, op, first, last, now)
    }

    /// Whether a request of kind `op` on blocks `[first, last]` must wait before it starts,
    /// and for what: the first matching delay or hang fault that fires decides (delays of
    /// several faults do not add up). One atomic load when there is no fault at all.
    pub fn hold(&self, op: FaultOp, first: u64, last: u64) -> Option<Hold> {
        if self.none() {
            return None;
        }
        match self.fire(true, op, first, last, Instant::now()) {
            Verdict::Delay(d) => Some(Hold::Until(Instant::now() + d)),
            Verdict::Hang(latch) => Some(Hold::Released(latch.enter())),
            _ => None,
        }
    }

    /// No fault at all, the usual case: one atomic load, and no clock read or snapshot load
    /// after it. A fault being added meanwhile counts from when its command returns, and a
    /// request that read the count before that may miss it.
    fn none(&self) -> bool {
        self.count.load(Ordering::SeqCst) == 0
    }

    /// The one matching loop, over the faults that hold requests (`holds`: delay, hang) or
    /// over the others, at clock `now`.
    fn fire(&self, holds: bool, op: FaultOp, first: u64, last: u64, now: Instant) -> Verdict {
        let faults = self.faults.load();
        for f in faults.iter() {
            if f.spec.mode.holds() != holds || !f.admits(op, first, last, now) {
                continue;
            }
            let bad = f.spec.covered(first, last);
            let verdict = match f.spec.mode {
                FaultMode::Error => Verdict::Fail(f.id, bad),
                FaultMode::Delay { ms, jitter } => Verdict::Delay(match jitter {
                    None => Duration::from_millis(ms),
                    Some(j) => j.sample(ms, f.draw()),
                }),
                FaultMode::Hang => Verdict::Hang(f.latch()),
                FaultMode::Stall { ms } => Verdict::Delay(Duration::from_millis(ms)),
                FaultMode::Flaky { probability, .. } => {
                    if f.draw() < probability {
                        Verdict::Fail(f.id, bad)
                    } else {
                        continue;
                    }
                }
                FaultMode::Corrupt(how) => Verdict::Corrupt(f.id, how, bad),
                FaultMode::LostWrite => Verdict::Lose(f.id, bad),
                FaultMode::Misdirect { shift } => Verdict::Misdirect(f.id, shift, bad),
                FaultMode::Torn { sectors, report } => Verdict::Torn(f.id, sectors, report),
            };
            if !f.claim() {
                continue;
            }
            self.fired_by_mode[f.spec.mode.index()].fetch_add(1, Ordering::Relaxed);
            let blocks = (op != FaultOp::Flush).then_some((first, last));
            let fired = Fired {
                id: f.id,
                op,
                mode: f.spec.mode.name(),
                first_block: blocks.map(|b| b.0),
                last_block: blocks.map(|b| b.1),
            };
            // Cannot fail: numbers and names.
            self.events.emit(
                "fault-fired",
                serde_json::to_value(fired).unwrap_or(Value::Null),
            );
            return verdict;
        }
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::spec::Blocks;
    use crate::fault::trigger::Trigger;
    use serde_json::json;

    fn spec(op: FaultOp, lba: u64, mode: FaultMode, times: Option<u64>) -> FaultSpec {
        FaultSpec {
            op,
            blocks: Some(Blocks { lba, count: 1 }),
            mode,
            times,
            trigger: Trigger::default(),
        }
    }

    #[test]
    fn error_fault_hits_only_its_block_and_op() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        assert_eq!(t.check(FaultOp::Read, 0, 10), Verdict::Pass);
        let id = t.add(spec(FaultOp::Read, 5, FaultMode::Error, None));
        assert_eq!(t.check(FaultOp::Read, 0, 10), Verdict::Fail(id, 5..=5));
        assert_eq!(t.check(FaultOp::Read, 5, 5), Verdict::Fail(id, 5..=5));
        assert_eq!(t.check(FaultOp::Read, 6, 10), Verdict::Pass);
        assert_eq!(t.check(FaultOp::Write, 5, 5), Verdict::Pass);
        assert!(t.remove(id));
        assert!(!t.remove(id));
        assert_eq!(t.check(FaultOp::Read, 5, 5), Verdict::Pass);
    }

    #[test]
    fn times_expires_the_fault() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        t.add(spec(FaultOp::Any, 1, FaultMode::Error, Some(3)));
        let fired = (0..10)
            .filter(|_| t.check(FaultOp::Write, 1, 1) != Verdict::Pass)
            .count();
        assert_eq!(fired, 3);
        assert_eq!(t.list()[0].fired, 3);
        assert!(t.list()[0].expired);
    }

    #[test]
    fn the_list_shows_each_fault_with_its_arguments() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let id = t.add(spec(
            FaultOp::Read,
            5,
            FaultMode::Delay {
                ms: 20,
                jitter: None,
            },
            None,
        ));
        assert_eq!(
            serde_json::to_value(t.list()).unwrap(),
            json!([{"id": id, "fired": 0, "expired": false, "matched": 0, "armed": true, "op": "read", "lba": 5, "count": 1,
                    "mode": "delay", "delay_ms": 20}])
        );
    }

    #[test]
    fn data_modes_decide_with_the_blocks_they_cover() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let how = Corruption::Bits { bits: 2, seed: 1 };
        let c = t.add(FaultSpec {
            blocks: Some(Blocks { lba: 8, count: 4 }),
            ..spec(FaultOp::Any, 8, FaultMode::Corrupt(how), None)
        });
        assert_eq!(
            t.check(FaultOp::Read, 0, 9),
            Verdict::Corrupt(c, how, 8..=9)
        );
        assert_eq!(
            t.check(FaultOp::Write, 10, 20),
            Verdict::Corrupt(c, how, 10..=11)
        );
        t.clear();
        let l = t.add(spec(FaultOp::Any, 3, FaultMode::LostWrite, Some(1)));
        assert!(!t.may_apply(FaultOp::Read, 3, 3));
        assert_eq!(t.check(FaultOp::Read, 3, 3), Verdict::Pass);
        assert!(t.may_apply(FaultOp::Write, 3, 3));
        assert_eq!(t.check(FaultOp::Write, 3, 3), Verdict::Lose(l, 3..=3));
        assert_eq!(t.check(FaultOp::Write, 3, 3), Verdict::Pass);
        let m = t.add(spec(
            FaultOp::Write,
            5,
            FaultMode::Misdirect { shift: -2 },
            None,
        ));
        assert_eq!(
            t.check(FaultOp::Write, 0, 7),
            Verdict::Misdirect(m, -2, 5..=5)
        );
        let n = t.add(spec(
            FaultOp::Write,
            6,
            FaultMode::Torn {
                sectors: 1,
                report: TornReport::Error,
            },
            None,
        ));
        assert_eq!(
            t.check(FaultOp::Write, 6, 7),
            Verdict::Torn(n, 1, TornReport::Error)
        );
        assert_eq!(
            t.list().iter().map(|f| f.fired).collect::<Vec<_>>(),
            [1, 1, 1]
        );
    }

    #[test]
    fn flaky_is_repeatable_for_a_seed() {
        let run = |seed| {
            let t = FaultTable::new(Arc::new(EventLog::disabled()));
            t.add(spec(
                FaultOp::Read,
                0,
                FaultMode::Flaky {
                    probability: 0.3,
                    seed,
                },
                None,
            ));
            (0..200)
                .map(|_| t.check(FaultOp::Read, 0, 0) != Verdict::Pass)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let hits = run(7).iter().filter(|&&x| x).count();
        assert!((30..90).contains(&hits), "{hits} of 200 at p=0.3");
    }
    fn triggered(trigger: Trigger, times: Option<u64>) -> FaultSpec {
        FaultSpec {
            trigger,
            ..spec(FaultOp::Read, 7, FaultMode::Error, times)
        }
    }

    /// Which of `n` reads of block 7, all at `now`, fail.
    fn failing(t: &FaultTable, n: u64, now: Instant) -> Vec<u64> {
        (1..=n)
            .filter(|_| t.check_at(FaultOp::Read, 7, 7, now) != Verdict::Pass)
            .collect()
    }

    #[test]
    fn after_arms_on_the_nth_match_and_only_matches_count() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let t0 = Instant::now();
        t.add_at(
            triggered(
                Trigger {
                    after: Some(3),
                    ..Trigger::default()
                },
                None,
            ),
            t0,
        );
        // Neither other blocks nor other ops are matches.
        assert_eq!(t.check_at(FaultOp::Read, 8, 9, t0), Verdict::Pass);
        assert_eq!(t.check_at(FaultOp::Write, 7, 7, t0), Verdict::Pass);
        assert_eq!(t.list_at(t0)[0].matched, 0);
        assert_eq!(failing(&t, 2, t0), Vec::<u64>::new());
        let l = &t.list_at(t0)[0];
        assert_eq!((l.matched, l.armed, l.fired), (2, false, 0));
        assert_eq!(t.check_at(FaultOp::Read, 7, 7, t0), Verdict::Pass);
        assert!(t.list_at(t0)[0].armed);
        assert_eq!(failing(&t, 3, t0), [1, 2, 3]);
        let l = &t.list_at(t0)[0];
        assert_eq!((l.matched, l.fired, l.window_up), (6, 3, None));
    }

    #[test]
    fn every_fires_on_every_nth_armed_match_until_times() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let t0 = Instant::now();
        t.add_at(
            triggered(
                Trigger {
                    after: Some(1),
                    every: Some(2),
                    ..Trigger::default()
                },
                Some(3),
            ),
            t0,
        );
        // Match 1 arms it; of the armed ones (2, 3, ...) the 2nd, 4th, 6th fire: matches 3, 5,
        // 7; times=3 expires it, and an expired fault counts no more matches.
        assert_eq!(failing(&t, 12, t0), [3, 5, 7]);
        let l = &t.list_at(t0)[0];
        assert_eq!((l.matched, l.fired, l.expired), (7, 3, true));
    }

    #[test]
    fn a_window_fires_only_in_its_up_phases() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let t0 = Instant::now();
        let window = "300:700".parse().unwrap();
        t.add_at(
            triggered(
                Trigger {
                    window: Some(window),
                    ..Trigger::default()
                },
                None,
            ),
            t0,
        );
        let at = |ms| t0 + Duration::from_millis(ms);
        let fails: Vec<u64> = [0, 150, 299, 300, 500, 999, 1000, 1200, 1300, 2050]
            .into_iter()
            .filter(|&ms| t.check_at(FaultOp::Read, 7, 7, at(ms)) != Verdict::Pass)
            .collect();
        assert_eq!(fails, [0, 150, 299, 1000, 1200, 2050]);
        let l = &t.list_at(at(400))[0];
        assert_eq!((l.matched, l.fired, l.window_up), (10, 6, Some(false)));
        assert_eq!(t.list_at(at(2100))[0].window_up, Some(true));
        // A clock read before the fault was added counts as its first instant: up.
        assert_ne!(
            t.check_at(FaultOp::Read, 7, 7, t0 - Duration::from_millis(5)),
            Verdict::Pass
        );
    }

    #[test]
    fn the_trigger_comes_before_the_flaky_draw() {
        // With after=5 the first five matches draw nothing: the draws after them are the
        // same as a fault without after makes from its first match.
        let draws = |trigger: Trigger, skip: usize| {
            let t = FaultTable::new(Arc::new(EventLog::disabled()));
            let t0 = Instant::now();
            t.add_at(
                FaultSpec {
                    trigger,
                    ..spec(
                        FaultOp::Read,
                        7,
                        FaultMode::Flaky {
                            probability: 0.5,
                            seed: 3,
                        },
                        None,
                    )
                },
                t0,
            );
            (0..40)
                .map(|_| t.check_at(FaultOp::Read, 7, 7, t0) != Verdict::Pass)
                .skip(skip)
                .collect::<Vec<bool>>()
        };
        let plain = draws(Trigger::default(), 0);
        let after = draws(
            Trigger {
                after: Some(5),
                ..Trigger::default()
            },
            5,
        );
        assert_eq!(after, plain[..35]);
        assert!(plain.contains(&true) && plain.contains(&false));
    }

    #[test]
    fn a_flush_fault_sees_flushes_only() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let id = t.add(FaultSpec {
            op: FaultOp::Flush,
            blocks: None,
            mode: FaultMode::Error,
            times: None,
            trigger: Trigger {
                every: Some(2),
                ..Trigger::default()
            },
        });
        for op in [
            FaultOp::Read,
            FaultOp::Write,
            FaultOp::Discard,
            FaultOp::WriteZeroes,
        ] {
            assert!(!t.may_apply(op, 0, 0));
            assert_eq!(t.check(op, 0, 0), Verdict::Pass, "{op:?}");
        }
        assert!(t.may_apply(FaultOp::Flush, 0, 0));
        assert_eq!(t.check(FaultOp::Flush, 0, 0), Verdict::Pass);
        assert_eq!(t.check(FaultOp::Flush, 0, 0), Verdict::Fail(id, 0..=0));
        assert_eq!(
            serde_json::to_value(t.list()).unwrap(),
            json!([{"id": id, "fired": 1, "expired": false, "matched": 2, "armed": true,
                    "op": "flush", "mode": "error", "every": 2}])
        );
    }

    #[test]
    fn discard_and_write_zeroes_faults_name_them_alone() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let d = t.add(spec(FaultOp::Discard, 3, FaultMode::Error, None));
        assert_eq!(t.check(FaultOp::Write, 3, 3), Verdict::Pass);
        assert_eq!(t.check(FaultOp::WriteZeroes, 3, 3), Verdict::Pass);
        assert_eq!(t.check(FaultOp::Discard, 3, 3), Verdict::Fail(d, 3..=3));
        t.clear();
        // op=write covers both, as the kernel's op_is_write does.
        let w = t.add(spec(FaultOp::Write, 3, FaultMode::LostWrite, None));
        assert_eq!(t.check(FaultOp::Discard, 0, 9), Verdict::Lose(w, 3..=3));
        assert_eq!(t.check(FaultOp::WriteZeroes, 3, 3), Verdict::Lose(w, 3..=3));
        assert_eq!(t.check(FaultOp::Flush, 0, 0), Verdict::Pass);
    }

    #[test]
    fn firings_are_logged_with_the_real_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let t = FaultTable::new(Arc::new(EventLog::open(&path).unwrap()));
        t.add(spec(FaultOp::Write, 3, FaultMode::Error, None));
        t.add(FaultSpec {
            op: FaultOp::Flush,
            blocks: None,
            ..spec(FaultOp::Flush, 0, FaultMode::Error, None)
        });
        t.check(FaultOp::WriteZeroes, 2, 4);
        t.check(FaultOp::Discard, 3, 3);
        t.check(FaultOp::Flush, 0, 0);
        let events: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ops: Vec<&Value> = events.iter().map(|e| &e["op"]).collect();
        assert_eq!(
            ops,
            [&json!("write-zeroes"), &json!("discard"), &json!("flush")]
        );
        assert_eq!(
            (&events[0]["first_block"], &events[0]["last_block"]),
            (&json!(2), &json!(4))
        );
        assert!(events[2].get("first_block").is_none(), "{}", events[2]);
    }

    #[test]
    fn delays_and_hangs_hold_and_the_data_path_ignores_them() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let d = t.add(spec(
            FaultOp::Read,
            5,
            FaultMode::Delay {
                ms: 500,
                jitter: None,
            },
            None,
        ));
        let h = t.add(spec(FaultOp::Write, 5, FaultMode::Hang, Some(2)));
        // Neither decides a request's data, nor sends it off the engines' fast path.
        assert_eq!(t.check(FaultOp::Read, 5, 5), Verdict::Pass);
        assert_eq!(t.check(FaultOp::Write, 5, 5), Verdict::Pass);
        assert!(!t.may_apply(FaultOp::Read, 5, 5));
        let before = Instant::now();
        match t.hold(FaultOp::Read, 4, 6) {
            Some(Hold::Until(at)) => {
                let wait = at - before;
                assert!(wait >= Duration::from_millis(500) && wait < Duration::from_millis(600));
            }
            other => panic!("a delay must hold until a deadline, got {other:?}"),
        }
        assert_eq!(t.hold(FaultOp::Read, 6, 9), None);
        let Some(Hold::Released(first)) = t.hold(FaultOp::Write, 5, 5) else {
            panic!("a hang must hold behind a latch");
        };
        let Some(Hold::Released(second)) = t.hold(FaultOp::Write, 5, 5) else {
            panic!("a hang must hold behind a latch");
        };
        assert_eq!(first, second, "held at the same time: the same latch");
        // `times` 2: the third write goes on.
        assert_eq!(t.hold(FaultOp::Write, 5, 5), None);
        let held = |t: &FaultTable| t.list().iter().find(|f| f.id == h).and_then(|f| f.held);
        assert_eq!(held(&t), Some(2));
        assert_eq!(t.list().iter().find(|f| f.id == d).unwrap().held, None);
        assert_eq!(t.release(h), Some(2));
        assert!(first.latch().is_released());
        assert_eq!(t.release(d), Some(0));
        assert_eq!(t.release(99), None);
        drop((first, second));
        assert_eq!(held(&t), Some(0));
        let fired = t.fired_by_mode();
        assert_eq!((fired["delay"], fired["hang"]), (1, 2));
        // A stall is the other way round: served on the data path, never held.
        t.clear();
        t.add(spec(FaultOp::Read, 5, FaultMode::Stall { ms: 7 }, None));
        assert_eq!(t.hold(FaultOp::Read, 5, 5), None);
        assert!(t.may_apply(FaultOp::Read, 5, 5));
        assert_eq!(
            t.check(FaultOp::Read, 5, 5),
            Verdict::Delay(Duration::from_millis(7))
        );
    }

    #[test]
    fn a_flush_fault_holds_flushes_only() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let h = t.add(FaultSpec {
            blocks: None,
            ..spec(FaultOp::Flush, 0, FaultMode::Hang, None)
        });
        for op in [FaultOp::Read, FaultOp::Write, FaultOp::Discard] {
            assert_eq!(t.hold(op, 0, 0), None, "{op:?}");
        }
        let Some(Hold::Released(ticket)) = t.hold(FaultOp::Flush, 0, 0) else {
            panic!("a flush must be held by a flush hang");
        };
        assert_eq!(t.check(FaultOp::Flush, 0, 0), Verdict::Pass);
        assert_eq!(t.release(h), Some(1));
        assert!(ticket.latch().is_released());
    }

    #[test]
    fn a_hang_holds_again_after_a_release_until_removed() {
        let t = FaultTable::new(Arc::new(EventLog::disabled()));
        let h = t.add(spec(FaultOp::Any, 0, FaultMode::Hang, None));
        let Some(Hold::Released(a)) = t.hold(FaultOp::Read, 0, 0) else {
            panic!("held");
        };
        assert_eq!(t.release(h), Some(1));
        let Some(Hold::Released(b)) = t.hold(FaultOp::Read, 0, 0) else {
            panic!("held again after the release");
        };
        assert!(a.latch().is_released() && !b.latch().is_released());
        assert!(t.remove(h));
        assert!(
            b.latch().is_released(),
            "removing the fault lets its requests go"
        );
        let h2 = t.add(spec(FaultOp::Any, 0, FaultMode::Hang, None));
        let Some(Hold::Released(c)) = t.hold(FaultOp::Write, 0, 0) else {
            panic!("held");
        };
        assert_eq!(t.clear(), 1);
        assert!(
            c.latch().is_released(),
            "fault-clear lets them go too ({h2})"
        );
    }

    #[test]
    fn a_jittered_delay_draws_the_same_sequence_for_a_seed() {
        let table = |seed| {
            let t = FaultTable::new(Arc::new(EventLog::disabled()));
            t.add(spec(
                FaultOp::Read,
                0,
                FaultMode::Delay {
                    ms: 100,
                    jitter: Some(crate::fault::Jitter {
                        distribution: crate::fault::Distribution::Exponential,
                        jitter_ms: 1000,
                        seed,
                    }),
                },
                None,
            ));
            t
        };
        let deadline = |t: &FaultTable| match t.hold(FaultOp::Read, 0, 0) {
            Some(Hold::Until(at)) => at,
            other => panic!("{other:?}"),
        };
        let (a, b, c) = (table(3), table(3), table(4));
        let mut apart = 0;
        for _ in 0..50 {
            let start = Instant::now();
            let (x, y, z) = (deadline(&a), deadline(&b), deadline(&c));
            // The same draws, taken a moment apart.
            let skew = x.max(y) - x.min(y);
            assert!(
                skew < Duration::from_millis(20),
                "seed 3 twice: {skew:?} apart"
            );
            assert!(
                x - start >= Duration::from_millis(100),
                "never below the base"
            );
            if x.max(z) - x.min(z) > Duration::from_millis(50) {
                apart += 1;
            }
        }
        assert!(
            apart > 25,
            "seeds 3 and 4 drew alike {} times of 50",
            50 - apart
        );
    }
}
