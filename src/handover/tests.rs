//! The handover between two processes, played by two `Handover`s in this one: OFD locks of two
//! open file descriptions conflict as those of two processes do, so each side locks, yields and
//! claims for real. `/proc` then names this process as the other side.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::remap::metadata::{Cause, Header, HEADER_LEN};
use crate::remap::spare::Spare;
use crate::storage::Source;

const BS: usize = 512;
const IMAGE: u64 = 1 << 20;

struct Files {
    _dir: tempfile::TempDir,
    image: PathBuf,
    spare: PathBuf,
}

/// A 1 MiB image and its spare file of 16 blocks.
fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE)
        .unwrap();
    let spare = dir.path().join("disk.img.spare");
    let header = Header {
        block_size: BS as u32,
        image_size: IMAGE,
        spare_blocks: 16,
    };
    drop(Spare::create(&spare, header).unwrap());
    Files {
        _dir: dir,
        image,
        spare,
    }
}

/// One side: its handover and its table.
struct Side {
    h: Handover,
    table: Arc<RemapTable>,
}

/// A plain `serve` on `f`.
fn serve(f: &Files) -> Result<Side, HandoverError> {
    let image = Attachment::attach(Role::Image, &f.image, Mode::Serve)?;
    let spare = Attachment::attach(Role::Spare, &f.spare, Mode::Serve)?;
    let o = Spare::open(&f.spare, BS as u32, IMAGE).unwrap();
    let table = Arc::new(RemapTable::new(o.spare, o.entries).unwrap());
    let h = Handover::new(Mode::Serve, image, spare, table.clone())?;
    Ok(Side {
        h: h.with_claim_wait(Duration::from_millis(100)),
        table,
    })
}

/// `serve --incoming` on `f`.
fn incoming(f: &Files) -> Side {
    let image = Attachment::attach(Role::Image, &f.image, Mode::Incoming).unwrap();
    let spare = Attachment::attach(Role::Spare, &f.spare, Mode::Incoming).unwrap();
    let table = Arc::new(crate::remap::open_untouched(&f.spare, BS as u32, IMAGE).unwrap());
    let h = Handover::new(Mode::Incoming, image, spare, table.clone()).unwrap();
    Side {
        h: h.with_claim_wait(Duration::from_millis(100)),
        table,
    }
}

/// Block `lba`'s data as the I/O path reads it: from the spare blocks in memory where the
/// table's spare holds them, else from the file.
fn remapped_data(t: &RemapTable, lba: u64) -> Vec<u8> {
    let e = *t.snapshot().map.get(&lba).expect("remapped");
    let x = t.spare().extent(e.spare_block, 0, BS as u64, 0);
    let mut buf = vec![0u8; BS];
    match x.source {
        Source::Memory { from, offset } => {
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: `buf` outlives the call and is as long as the iovec says.
            assert!(unsafe { from.copy_to(offset, &iov) });
        }
        _ => t.spare().read_block(e.spare_block, &mut buf).unwrap(),
    }
    buf
}

fn me() -> String {
    format!("process {} (", std::process::id())
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn a_second_serve_on_the_image_or_the_spare_is_refused_naming_the_first() {
    let f = files();
    let _first = serve(&f).unwrap();
    for role in [Role::Image, Role::Spare] {
        let path = if role == Role::Image {
            &f.image
        } else {
            &f.spare
        };
        let e = Attachment::attach(role, path, Mode::Serve).unwrap_err();
        assert!(matches!(e, HandoverError::InUse { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&me()), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("--incoming"), "{msg}");
    }
    // A refused attach leaves the first one's locks as they were.
    let e = Attachment::attach(Role::Image, &f.image, Mode::Serve).unwrap_err();
    assert!(matches!(e, HandoverError::InUse { .. }), "{e}");
}

/// An `--incoming` process attaches beside the writer, writes nothing (not even the repair of
/// a bad metadata slot), refuses changes, and keeps a plain serve out as the writer does.
#[test]
fn incoming_waits_beside_the_writer_and_writes_nothing() {
    let f = files();
    // Slot A bad: a plain start would rewrite it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.spare)
        .unwrap()
        .write_all_at(&[0xee; 8], HEADER_LEN + 20)
        .unwrap();
    let before = (bytes(&f.image), bytes(&f.spare));
    let dest = incoming(&f);
    assert_eq!((bytes(&f.image), bytes(&f.spare)), before);
    assert_eq!(dest.h.state().state, "incoming");
    assert!(!dest.h.is_writer());
    assert!(matches!(dest.h.check_writer(), Err(HandoverError::NotYet)));
    let refused = dest.table.remap_with_data(3, &[1; BS], Cause::Manual);
    assert!(refused.unwrap_err().to_string().contains("not the writer"));
    assert!(!dest.h.yield_if_waited(), "nothing to yield");
    assert_eq!((bytes(&f.image), bytes(&f.spare)), before);

    // Alone, it still keeps a plain serve out, naming itself.
    let e = serve(&f).err().expect("refused");
    assert!(e.to_string().contains(&me()), "{e}");

    // With no source at all, its claim takes the files at once and repairs the slot.
    dest.h.claim().unwrap();
    assert!(dest.h.is_writer());
    let slots = crate::remap::spare::inspect(&f.spare).unwrap().slots;
    assert!(
        slots[0].is_ok() && slots[1].is_ok(),
        "repaired at the takeover"
    );
}

#[test]
fn the_writer_yields_only_when_a_process_waits() {
    let f = files();
    let src = serve(&f).unwrap();
    assert!(!src.h.yield_if_waited(), "no one waits");
    assert_eq!(
        src.h.state(),
        WriterState {
            state: "writer",
            pid: None
        }
    );
    src.table
        .remap_with_data(1, &[1; BS], Cause::Manual)
        .unwrap();
    let _dest = incoming(&f);
    assert!(src.h.yield_if_waited());
    assert_eq!(
        src.h.state(),
        WriterState {
            state: "yielded",
            pid: Some(std::process::id())
        }
    );
    assert!(!src.h.is_writer());
    let e = src.h.check_writer().unwrap_err();
    assert!(matches!(e, HandoverError::Yielded { .. }), "{e}");
    assert!(e.to_string().contains(&me()), "{e}");
    assert!(src
        .table
        .remap_with_data(2, &[2; BS], Cause::Manual)
        .is_err());
    assert!(!src.h.yield_if_waited(), "yields once");
}

/// `serve --overlay`: the files do not hold the guest's data, so the writer keeps them however
/// long a process waits, and the waiting one cannot claim them.
#[test]
fn a_writer_that_never_yields_keeps_the_files_from_a_waiting_process() {
    let f = files();
    let mut src = serve(&f).unwrap();
    src.h = src.h.never_yield();
    let dest = incoming(&f);
    assert!(!src.h.yield_if_waited());
    assert!(src.h.is_writer());
    assert!(src
        .table
        .remap_with_data(1, &[1; BS], Cause::Manual)
        .is_ok());
    assert!(dest.h.claim().is_err(), "the writer lock stays taken");
}

/// The destination, started before the source changed anything, takes over the table, the
/// spare blocks' data and the pending list as the source left them; the source's later claim
/// fails and names the destination.
#[test]
fn the_destination_takes_over_what_the_source_left() {
    let f = files();
    let src = serve(&f).unwrap();
    let dest = incoming(&f);
    assert!(dest.table.entries().is_empty());
    src.table
        .remap_with_data(5, &[5; BS], Cause::Manual)
        .unwrap();
    src.table.add_pending([9, 5, 11]);
    assert_eq!(src.table.pending(), [9, 11]);
    assert!(src.h.yield_if_waited());

    dest.h.claim().unwrap();
    assert_eq!(dest.h.state().state, "writer");
    assert_eq!(
        dest.table
            .entries()
            .iter()
            .map(|e| e.lba)
            .collect::<Vec<_>>(),
        [5]
    );
    assert_eq!(remapped_data(&dest.table, 5), [5; BS]);
    assert_eq!(dest.table.pending(), [9, 11]);
    assert_eq!(dest.table.spare_free(), 15);
    // It writes now, and the pending list it was left is used up.
    dest.table
        .remap_with_data(9, &[9; BS], Cause::WriteError)
        .unwrap();
    assert!(dest.table.spare().take_pending().unwrap().is_empty());

    let e = src.h.claim().unwrap_err();
    assert!(matches!(e, HandoverError::HandedOver { .. }), "{e}");
    assert!(e.to_string().contains(&me()), "{e}");
    assert_eq!(
        src.h.state(),
        WriterState {
            state: "handed-over",
            pid: Some(std::process::id())
        }
    );
    assert!(matches!(
        src.h.check_writer(),
        Err(HandoverError::HandedOver { .. })
    ));
    assert!(src
        .table
        .remap_with_data(6, &[6; BS], Cause::Manual)
        .is_err());
    assert!(dest.h.claim().is_ok(), "the writer's claim is a no-op");
}

/// A migration that fails (the destination goes away before it claims) leaves the source
/// able to claim again, with its table as it was.
#[test]
fn a_failed_migration_leaves_the_source_writing() {
    let f = files();
    let src = serve(&f).unwrap();
    src.table
        .remap_with_data(4, &[4; BS], Cause::Manual)
        .unwrap();
    src.table.add_pending([8]);
    let dest = incoming(&f);
    assert!(src.h.yield_if_waited());
    drop(dest);
    src.h.claim().unwrap();
    assert_eq!(src.h.state().state, "writer");
    assert!(src.h.check_writer().is_ok());
    assert_eq!(remapped_data(&src.table, 4), [4; BS]);
    assert_eq!(src.table.pending(), [8]);
    src.table
        .remap_with_data(8, &[8; BS], Cause::WriteError)
        .unwrap();
    assert!(!src.h.yield_if_waited(), "no one waits any more");
}

/// Handed over and back: the source, waiting since it yielded, gets the files back when the
/// destination's rings stop, and finds what the destination wrote (a new remap, new data in a
/// spare block it held in memory).
#[test]
fn a_migration_back_reloads_what_the_other_process_wrote() {
    let f = files();
    let src = serve(&f).unwrap();
    src.table
        .remap_with_data(5, &[1; BS], Cause::Manual)
        .unwrap();
    let dest = incoming(&f);
    assert!(src.h.yield_if_waited());
    dest.h.claim().unwrap();
    let e5 = dest.table.snapshot().map[&5];
    assert!(dest
        .table
        .write_spare_if_mapped(5, e5.spare_block, &[2; BS])
        .unwrap());
    dest.table
        .remap_with_data(7, &[7; BS], Cause::Manual)
        .unwrap();
    assert!(
        dest.h.yield_if_waited(),
        "the source waits to take them back"
    );
    src.h.claim().unwrap();
    assert_eq!(src.h.state().state, "writer");
    assert_eq!(remapped_data(&src.table, 5), [2; BS]);
    assert_eq!(remapped_data(&src.table, 7), [7; BS]);
    assert!(matches!(
        dest.h.claim(),
        Err(HandoverError::HandedOver { .. })
    ));
}

#[test]
fn a_destination_waits_for_a_source_that_keeps_the_files() {
    let f = files();
    let _src = serve(&f).unwrap();
    let dest = incoming(&f);
    let e = dest.h.claim().unwrap_err();
    assert!(matches!(e, HandoverError::StillHeld { .. }), "{e}");
    assert!(e.to_string().contains(&me()), "{e}");
    assert_eq!(dest.h.state().state, "incoming", "still waiting");
}

#[test]
fn claims_from_many_queues_at_once_take_over_once() {
    let f = files();
    let src = serve(&f).unwrap();
    src.table
        .remap_with_data(2, &[2; BS], Cause::Manual)
        .unwrap();
    let dest = incoming(&f);
    assert!(src.h.yield_if_waited());
    std::thread::scope(|s| {
        let claims: Vec<_> = (0..4).map(|_| s.spawn(|| dest.h.claim())).collect();
        for c in claims {
            c.join().unwrap().unwrap();
        }
    });
    assert_eq!(dest.h.state().state, "writer");
    assert_eq!(remapped_data(&dest.table, 2), [2; BS]);
}

#[test]
fn incoming_refuses_missing_files_and_a_plain_serve_wipes_a_stale_pending_list() {
    let f = files();
    let e = Attachment::attach(Role::Image, &f.image.with_extension("none"), Mode::Incoming)
        .unwrap_err();
    assert!(matches!(e, HandoverError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("--spare"), "{e}");

    // A source that yielded and died leaves its pending list; a plain start drops it.
    let src = serve(&f).unwrap();
    src.table.add_pending([3]);
    let dest = incoming(&f);
    assert!(src.h.yield_if_waited());
    drop((src, dest));
    let again = serve(&f).unwrap();
    assert!(again.table.pending().is_empty());
    assert!(again.table.spare().take_pending().unwrap().is_empty());
}
