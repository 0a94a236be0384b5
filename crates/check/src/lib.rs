//! History checkers: each invariant of DESIGN.md as a function over a recorded client history.
//!
//! Tests record what clients saw (which ids, which values, when each call started and ended by
//! CLOCK_MONOTONIC) and hand the history to a checker, which returns every violation it finds.
//! One property per checker, so that a failure names the property. Checkers are pure and are
//! themselves tested against histories that must fail: a checker that never fires proves nothing.

#![deny(missing_docs)]

pub mod seq;
