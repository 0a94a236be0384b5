//! `imstate-cluster`: cluster mode's logic, pure and sans I/O.
//!
//! - [`route`]: the versioned route table (sections of each namespace to owner nodes, as
//!   ranges), stored as JSON under one coordinator key.
//! - [`placement`]: the arbiter's planning: assign new namespaces, move a dead node's ranges,
//!   drain and rebalance a bounded number of sections at a time.
//! - [`lease`]: the timing rules of ownership (window, lock-delay, the clock-skew bound) and
//!   why they give S3.
//! - [`member`]: a node's state machine: lease, registration, the table it serves under,
//!   [`member::Member::access`] (the one ownership check every front door calls), and fenced
//!   raises (S2 across nodes).
//! - [`slots`]: the same for presence slots: primaries, replicas, promotion.
//! - [`arbiter`]: the election and the route-table writer.
//! - [`keys`]: where everything lives in the coordinator.
//!
//! Everything takes time as an input (a node's monotonic milliseconds) and speaks to the
//! coordinator through [`imstate_coord::Request`]s that the driver sends: the node with etcd,
//! the simulation (`imstate-sim`) with a simulated coordinator and a fault schedule.

#![deny(missing_docs)]

// Planted bugs exist only to prove that the simulation catches them; they must never ship.
#[cfg(all(feature = "planted-serve-without-lease", not(debug_assertions)))]
compile_error!("the `planted-serve-without-lease` feature is for test builds only");
#[cfg(all(feature = "planted-no-lock-delay", not(debug_assertions)))]
compile_error!("the `planted-no-lock-delay` feature is for test builds only");
#[cfg(all(feature = "planted-raise-without-fence", not(debug_assertions)))]
compile_error!("the `planted-raise-without-fence` feature is for test builds only");
#[cfg(all(feature = "planted-coalesce-unsettled", not(debug_assertions)))]
compile_error!("the `planted-coalesce-unsettled` feature is for test builds only");
#[cfg(all(feature = "planted-trust-replica-report", not(debug_assertions)))]
compile_error!("the `planted-trust-replica-report` feature is for test builds only");
#[cfg(all(feature = "planted-promote-unsynced", not(debug_assertions)))]
compile_error!("the `planted-promote-unsynced` feature is for test builds only");

pub mod arbiter;
pub mod keys;
pub mod lease;
pub mod member;
pub mod placement;
pub mod route;
pub mod slots;

pub use arbiter::Arbiter;
pub use keys::Keys;
pub use lease::{LeaseRules, RATE_SKEW_MAX};
pub use member::{Access, Effect, Fence, Member, MemberInfo, RaiseOp, RaiseOutcome, Token};
pub use route::{NodeId, PresenceRoute, Range, RouteTable, SlotRange, slot_of};
pub use slots::{
    Counted, CountedRange, InSync, InSyncRange, confirmed, joining_in_sync, replica_in_sync,
};
