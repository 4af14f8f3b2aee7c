//! When a matching fault fires: `after` (the first N matching I/Os pass), `every` (of the
//! armed ones, every Nth), and `window` (on for UP ms, off for DOWN ms, repeating from when the
//! fault was added, like dm-flakey's up and down intervals). `times` stays with the fault's
//! firing count (`table.rs`), since it counts firings rather than matches.
//!
//! The order is part of the contract (README, "Faults"): a matching I/O is counted; before
//! `after` it passes; if it is not an `every`-th armed one it passes; in a down phase of the
//! window it passes; then the mode decides (flaky draws), and `times` is claimed last.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fields::ArgError;

/// The longest phase of a window: a day. Bounds `UP + DOWN` far below overflow.
const MAX_PHASE_MS: u64 = 86_400_000;

/// The trigger arguments as `fault-add` takes them and `fault-list` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Trigger {
    /// The first `after` matching I/Os pass; the fault arms after the `after`-th.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Of the armed matching I/Os, the `every`-th, 2×`every`-th, ... go on to the mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// On for `up_ms`, off for `down_ms`, repeating. Written `"UP:DOWN"`, as `fault-add` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Window {
    pub up_ms: u64,
    pub down_ms: u64,
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.up_ms, self.down_ms)
    }
}

impl FromStr for Window {
    type Err = ArgError;

    fn from_str(s: &str) -> Result<Window, ArgError> {
        let bad = |why: &str| {
            ArgError::new(
                "window",
                format!("{why}; write it UP_MS:DOWN_MS, e.g. \"300:700\", got {s:?}"),
            )
        };
        let (up, down) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let phase = |p: &str, name: &str| -> Result<u64, ArgError> {
            let ms: u64 = p
                .trim()
                .parse()
                .map_err(|_| bad(&format!("{name} is not a whole number of milliseconds")))?;
            if !(1..=MAX_PHASE_MS).contains(&ms) {
                return Err(bad(&format!(
                    "{name} must be 1 to {MAX_PHASE_MS} ms (a day)"
                )));
            }
            Ok(ms)
        };
        Ok(Window {
            up_ms: phase(up, "UP")?,
            down_ms: phase(down, "DOWN")?,
        })
    }
}

impl Window {
    /// Whether the window is in its up phase `since` the fault was added.
    pub fn up(&self, since: Duration) -> bool {
        let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
        ms % (self.up_ms + self.down_ms) < self.up_ms
    }
}

/// The trigger arguments before their ranges are checked.
pub struct TriggerArgs {
    pub after: Option<u64>,
    pub every: Option<u64>,
    pub window: Option<String>,
}

impl TriggerArgs {
    pub fn check(self) -> Result<Trigger, ArgError> {
        if self.after == Some(0) {
            return Err(ArgError::new(
                "after",
                "must be at least 1 (omit it to arm the fault at once)",
            ));
        }
        if self.every == Some(0) {
            return Err(ArgError::new(
                "every",
                "must be at least 1 (every=1 fires on each armed I/O, as omitting it does)",
            ));
        }
        Ok(Trigger {
            after: self.after,
            every: self.every,
            window: self.window.as_deref().map(str::parse).transpose()?,
        })
    }
}

impl Trigger {
    /// Whether the `n`-th matching I/O (counting from 1) since the fault was added, seen `since`
    /// the fault was added, goes on to the mode.
    pub fn admits(&self, n: u64, since: Duration) -> bool {
        let after = self.after.unwrap_or(0);
        if n <= after {
            return false;
        }
        if self
            .every
            .is_some_and(|every| !(n - after).is_multiple_of(every))
        {
            return false;
        }
        self.window.is_none_or(|w| w.up(since))
    }

    /// Whether `matched` matching I/Os have armed the fault (`after` reached).
    pub fn armed(&self, matched: u64) -> bool {
        matched >= self.after.unwrap_or(0)
    }

    /// The window's phase `since` the fault was added; None without a window.
    pub fn window_up(&self, since: Duration) -> Option<bool> {
        self.window.map(|w| w.up(since))
    }
}

/// `Instant` arithmetic that cannot panic: a clock read before the fault was added (a racing
/// reader) counts as its first instant.
pub fn since(added: Instant, now: Instant) -> Duration {
    now.saturating_duration_since(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn after_passes_the_first_n() {
        let t = Trigger {
            after: Some(3),
            ..Trigger::default()
        };
        let fired: Vec<u64> = (1..=6).filter(|&n| t.admits(n, ms(0))).collect();
        assert_eq!(fired, [4, 5, 6]);
        assert!(!t.armed(2) && t.armed(3));
        assert!(Trigger::default().armed(0));
    }

    #[test]
    fn every_counts_from_the_armed_ones() {
        let t = Trigger {
            every: Some(2),
            ..Trigger::default()
        };
        let fired: Vec<u64> = (1..=7).filter(|&n| t.admits(n, ms(0))).collect();
        assert_eq!(fired, [2, 4, 6]);
        let t = Trigger {
            after: Some(2),
            every: Some(3),
            ..Trigger::default()
        };
        let fired: Vec<u64> = (1..=12).filter(|&n| t.admits(n, ms(0))).collect();
        assert_eq!(fired, [5, 8, 11]);
    }

    #[test]
    fn a_window_is_up_then_down_repeating() {
        let w = Window {
            up_ms: 300,
            down_ms: 700,
        };
        for (at, up) in [
            (0, true),
            (299, true),
            (300, false),
            (999, false),
            (1000, true),
            (1299, true),
            (1300, false),
        ] {
            assert_eq!(w.up(ms(at)), up, "at {at} ms");
        }
        let t = Trigger {
            window: Some(w),
            ..Trigger::default()
        };
        assert!(t.admits(1, ms(10)) && !t.admits(2, ms(310)));
        assert_eq!(t.window_up(ms(310)), Some(false));
        assert_eq!(Trigger::default().window_up(ms(310)), None);
        // The longest uptime a clock can show does not overflow the phase arithmetic.
        let _ = w.up(Duration::MAX);
    }

    #[test]
    fn windows_parse_and_print_as_given() {
        let w: Window = "300:700".parse().unwrap();
        assert_eq!(
            w,
            Window {
                up_ms: 300,
                down_ms: 700
            }
        );
        assert_eq!(serde_json::to_value(w).unwrap(), "300:700");
        for bad in [
            "300",
            "0:5",
            "5:0",
            "a:5",
            "5:b",
            "-1:5",
            ":",
            "",
            "1:2:3",
            "86400001:1",
        ] {
            let e = bad.parse::<Window>().unwrap_err();
            assert_eq!(e.field, "window", "{bad}");
        }
    }

    #[test]
    fn zero_counts_are_refused_by_name() {
        let args = |after, every| TriggerArgs {
            after,
            every,
            window: None,
        };
        assert_eq!(args(Some(0), None).check().unwrap_err().field, "after");
        assert_eq!(args(None, Some(0)).check().unwrap_err().field, "every");
        assert_eq!(
            args(Some(1), Some(1)).check().unwrap(),
            Trigger {
                after: Some(1),
                every: Some(1),
                window: None
            }
        );
    }
}
