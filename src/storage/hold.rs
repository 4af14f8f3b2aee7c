//! What a layer may ask of a request before it starts: to wait (a delay fault) or to stay
//! held until a latch opens (a hang fault). The request waits off the queue's worker, in its
//! event loop's parked list, so every other request of the queue goes on meanwhile.

use std::time::Instant;

use crate::latch::Ticket;

/// A request's kind as the block stack's hold step sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    /// Has no range: asked with offset 0, length 0.
    Flush,
    Discard,
    WriteZeroes,
}

/// How long a request must wait before it starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Hold {
    /// Until this moment (a delay).
    Until(Instant),
    /// Until the ticket's latch is released (a hang); the ticket counts the request as held
    /// until it is dropped.
    Released(Ticket),
}
