//! The medium itself, beneath the injected faults. The cache model reads what a write is about
//! to overwrite, and a power cut puts that data back: both stand for what the drive's medium
//! holds, not for requests, so no injected fault may corrupt, lose, misdirect or fail them
//! (a lost revert would keep a write the cut lost; a failed pre-image read would put the block
//! on the remap layer's pending list). A scope on the calling thread rather than a flag on the
//! fault layer: guest requests on other threads keep meeting their faults meanwhile, and the
//! layers in between (the write log, the remap layer) still see these requests.

use std::cell::Cell;

thread_local! {
    static UNFAULTED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with injected faults off on this thread.
pub fn unfaulted<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the previous state back, also when `f` unwinds.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNFAULTED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNFAULTED.with(|u| u.replace(true)));
    f()
}

/// Whether this thread is inside [`unfaulted`].
pub fn is_unfaulted() -> bool {
    UNFAULTED.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_nests_and_ends() {
        assert!(!is_unfaulted());
        unfaulted(|| {
            assert!(is_unfaulted());
            unfaulted(|| assert!(is_unfaulted()));
            assert!(is_unfaulted());
        });
        assert!(!is_unfaulted());
        std::thread::spawn(|| assert!(!is_unfaulted()))
            .join()
            .unwrap();
    }
}
