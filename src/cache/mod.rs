//! The lab's volatile write cache and its power switch (`serve --cache-model`, `ctl
//! power-cut`, `ctl power-on`): the top layer of the block stack.
//!
//! With `--cache-model none` the layer passes everything through and only keeps the power
//! state (a powered-off disk fails every request). With `volatile` it keeps what it needs to
//! undo each write no completed flush covers yet, so that a power cut loses exactly what a
//! drive's volatile cache would: `history` is that memory as a pure model, `target` the layer
//! that fills it and carries a cut out on the layers below.

pub mod history;
mod target;

pub use history::{CutMode, CutPlan, CutReport, Tearing};
pub use target::{is_powered_off, CacheTarget, PowerError, PowerOn, PoweredOff};

/// `--cache-model`: what the disk keeps in a volatile cache (the variants' comments are its
/// help).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheModel {
    /// Nothing: every completed write is on the image at once (a power cut loses nothing).
    #[default]
    None,
    /// A drive's write-back cache: a completed write that no completed flush covers yet is
    /// lost (or kept, or torn) by a power cut.
    Volatile,
}
