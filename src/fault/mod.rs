//! Fault injection on the main image: chosen blocks fail (media error), are delayed or held
//! (off the queue's worker: see `BlockIo::hold`), fail now and then with a seeded, repeatable
//! pattern, or silently mishandle data (corrupted, lost, misdirected or torn writes,
//! corrupted reads). A lab turns a healthy image into a failing
//! disk with these, from the control socket or a `--faults` file.

pub mod corrupt;
pub mod io;
pub mod latency;
pub mod spec;
pub mod table;
pub mod trigger;

pub use io::FaultyTarget;
pub use latency::{Distribution, Jitter};
pub use spec::{Blocks, Corruption, FaultArgError, FaultMode, FaultOp, FaultSpec, TornReport};
pub use table::{FaultListing, FaultTable};
pub use trigger::{Trigger, Window};
