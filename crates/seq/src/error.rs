//! Errors of the sequence allocator.
//!
//! Every error is detected before any state changes: a call that returns an error has allocated
//! nothing and requested no raise. Messages name the offending value and the limit or range, so
//! an API layer can pass them on verbatim as the reason of an INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED status.

/// Errors returned by [`crate::Allocator`] and [`crate::NamespaceDef::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeqError {
    /// The request named a namespace that was never added.
    #[error("unknown namespace `{0}`")]
    UnknownNamespace(String),
    /// An id lies outside the namespace's half-open id range `[lo, hi)`.
    #[error("id {id} is out of range [{lo}, {hi}) of namespace `{ns}`")]
    IdOutOfRange {
        /// Name of the namespace.
        ns: String,
        /// The offending id.
        id: u64,
        /// First id of the namespace (inclusive).
        lo: u64,
        /// End of the namespace's id range (exclusive).
        hi: u64,
    },
    /// A numeric id was sent to a keyed namespace, or a string key to a numeric one.
    #[error(
        "namespace `{ns}` takes {expected}; this request sent {got} (a namespace's kind is set \
         when it is created: `imstate seq create-namespace NAME --keys string|numeric`)"
    )]
    WrongIdKind {
        /// Name of the namespace.
        ns: String,
        /// What the namespace takes: `numeric ids` or `string keys`.
        expected: &'static str,
        /// What the request sent.
        got: &'static str,
    },
    /// A string key is empty or longer than [`crate::KEY_BYTES_MAX`].
    #[error("a key of {len} bytes in namespace `{ns}`; keys are 1 to {max} bytes (KEY_BYTES_MAX)")]
    InvalidKey {
        /// Name of the namespace.
        ns: String,
        /// Length of the offending key.
        len: usize,
        /// The limit, [`crate::KEY_BYTES_MAX`].
        max: usize,
    },
    /// A section of a keyed namespace already holds [`crate::KEYS_PER_SECTION_MAX`] keys;
    /// nothing was allocated.
    #[error(
        "section {section} of namespace `{ns}` holds {max} keys (KEYS_PER_SECTION_MAX); a new key \
         there is refused: spread the namespace over more sections"
    )]
    SectionKeysExhausted {
        /// Name of the namespace.
        ns: String,
        /// The full section.
        section: u64,
        /// The limit.
        max: usize,
    },
    /// A `min_seq` above the id's current seq: history that was never written cannot be
    /// hidden. Nothing was set.
    #[error(
        "min_seq {min_seq} of id {id} in namespace `{ns}` is above its current seq {current}; \
         a min_seq is at most the current seq"
    )]
    MinSeqAboveCurrent {
        /// Name of the namespace.
        ns: String,
        /// The id (or quoted key).
        id: String,
        /// The requested `min_seq`.
        min_seq: u64,
        /// The id's current seq.
        current: u64,
    },
    /// A SetMinSeq call whose ids and values differ in number.
    #[error("{ids} ids and {values} min_seq values; a SetMinSeq call has one value per id")]
    MinSeqCount {
        /// Number of ids.
        ids: usize,
        /// Number of values.
        values: usize,
    },
    /// The node already holds [`crate::MIN_SEQS_MAX`] ids with a `min_seq`; nothing was set.
    #[error("{max} ids have a min_seq (MIN_SEQS_MAX); this set would hold more")]
    MinSeqsExhausted {
        /// The limit.
        max: usize,
    },
    /// A batch call was made with no ids.
    #[error("empty batch: at least one id is required")]
    EmptyBatch,
    /// A batch call was made with more ids than `batch_ids_max` allows.
    #[error("batch of {len} ids exceeds batch_ids_max = {max}")]
    BatchTooLarge {
        /// Number of ids in the rejected batch.
        len: usize,
        /// The configured `batch_ids_max`.
        max: usize,
    },
    /// A range allocation asked for no values, or for more than its limit.
    #[error("a range of {count} values; a range is 1 to {max} values (RANGE_COUNT_MAX)")]
    InvalidCount {
        /// The requested number of values.
        count: u64,
        /// The limit, [`crate::RANGE_COUNT_MAX`].
        max: u64,
    },
    /// `add_namespace` was called with a name that already exists.
    #[error("namespace `{0}` already exists")]
    NamespaceExists(String),
    /// A namespace definition failed validation; the string says why.
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    /// Serving the request would create a section beyond `sections_max`; nothing was
    /// allocated.
    #[error(
        "{max} sections are in memory (limit seq.sections_max); this request would create more"
    )]
    SectionsExhausted {
        /// The configured `sections_max`.
        max: usize,
    },
    /// The id's sequence reached `u64::MAX`: no larger value exists to hand out. Unreachable by
    /// allocation alone (2^64 values); only a corrupt loaded `max_seq` can get here.
    #[error("sequence space exhausted for id {id} of namespace `{ns}`")]
    SequenceExhausted {
        /// Name of the namespace.
        ns: String,
        /// The id (or quoted key) whose sequence is exhausted.
        id: String,
    },
}
