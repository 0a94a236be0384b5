//! Pure sequence allocator core of imstate: the WeChat seqsvr algorithm as a plain data
//! structure, with no I/O, no clock, no runtime and no threads.
//!
//! # Layout
//!
//! ```text
//!   next / next_batch(ns, ids)
//!   next_range_batch(ns, ids, n) ──► Allocator ──► Alloc::Served { seqs, raises }
//!                                      │      └─► Alloc::Wait { raises }
//!                                      │
//!   caller persists each Raise ────────┘  raise_durable(raise) / raise_failed(raise)
//!   recovery: load_section(ns, section, max_seq); checkpoint: ceilings()
//! ```
//!
//! - [`NamespaceDef`] describes an independent sequence space: an id range cut into sections of
//!   `section_size` ids that share one persisted `max_seq`, raised `step` at a time.
//! - A namespace's ids are numbers or, for a keyed namespace ([`KeyKind::String`]), byte
//!   strings hashed onto the id range ([`key_hash`]); a request names them with [`Ids`].
//! - [`MinSeqs`] keeps the durable per-id `min_seq` (the floor that hides history) that the
//!   caller's log makes durable; [`Allocator::prepare_min_seqs`] validates a set.
//! - [`Allocator`] keeps `cur_seq` per id (a dense array per touched section, or a compact key
//!   table in a keyed namespace) and the durable
//!   `max_seq` per section. It never touches storage: it returns [`Raise`] commands that the
//!   caller persists before reporting them back.
//!
//! # Invariants
//!
//! - **S1 monotonic**: for any id, every value handed out is greater than every value handed out
//!   before, including across restarts (loading a section skips every id to its `max_seq`).
//! - **S2 persist before serve**: no value above a section's durable `max_seq` is ever returned.
//! - **B1 bounded**: batches are limited by `batch_ids_max`, section sizes by
//!   [`SECTION_SIZE_MAX`], namespaces by [`NAMESPACES_MAX`]; exceeding a limit is an error.
//!
//! The feature `planted-serve-before-durable` plants an S2 bug for negative-control tests; it
//! compiles away entirely when off.
#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]

// Planted bugs exist only to prove that the tests catch them; they must never ship.
#[cfg(all(feature = "planted-serve-before-durable", not(debug_assertions)))]
compile_error!(
    "the `planted-serve-before-durable` feature is a negative control for test builds only"
);

mod allocator;
mod error;
mod keys;
mod minseq;
mod namespace;

pub use allocator::{
    Alloc, Allocator, AllocatorOptions, BATCH_IDS_MAX_DEFAULT, RANGE_COUNT_MAX, Raise,
    SECTIONS_MAX_DEFAULT, headroom_min,
};
pub use error::SeqError;
pub use keys::{Ids, KEYS_PER_SECTION_MAX, describe_key};
pub use minseq::{MIN_SEQS_MAX, MinSeqEntries, MinSeqs, OwnedId};
pub use namespace::{
    KEY_BYTES_MAX, KeyKind, NAME_BYTES_MAX, NAMESPACES_MAX, NamespaceDef, NsId,
    SECTION_SIZE_DEFAULT, SECTION_SIZE_MAX, STEP_DEFAULT, STEP_MAX, key_hash,
};
