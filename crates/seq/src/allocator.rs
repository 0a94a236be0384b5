//! The sequence allocator: `cur_seq` per id, durable `max_seq` per section, raise-ahead.
//!
//! # Data flow
//!
//! ```text
//!  next(ns, id) ─► namespace (Vec index via name map) ─► section (Fx map) ─► cur[offset] + 1
//!       │                                                                        │
//!       │   value <= durable_max ──► Served { seqs, raises: pre-raise if headroom low }
//!       └── value >  durable_max ──► Wait { raises }  (nothing allocated)
//!
//!  caller: persist each Raise, then raise_durable(raise) (or raise_failed), then retry
//! ```
//!
//! # State per section
//!
//! - `cur`: dense `cur_seq` array, allocated (zeroed, so untouched pages cost no RSS) on the
//!   first allocation that can be served in the section; in a keyed namespace `keyed` holds
//!   the `cur_seq` of each key seen instead ([`KeyTable`]).
//! - `floor`: the durable `max_seq` at the last load; the effective `cur_seq` of an id is
//!   `max(cur[id], floor)`, so loading a section is O(1) yet skips every id to `max_seq`. The
//!   same rule covers keys: recovery learns no keys (only ceilings are persisted), and every
//!   key of a loaded section, known before the crash or never seen, is at least `floor`, so
//!   its next value is above every value the section could have served.
//! - `durable_max`: the persisted ceiling; `high`: the largest value handed out;
//!   `pending_max`: the highest requested, not yet durable ceiling (0 = no raise pending).
//!
//! # Invariants (checked by [`Allocator::check_invariants`], the first also on the hot path)
//!
//! - `high <= durable_max` and every `cur` value `<= high` (S2: issued <= durable).
//! - `floor <= durable_max`; `pending_max == 0 || pending_max > durable_max`.
//! - Values for one id only grow (S1): the next value is `max(cur, floor) + 1`, and `floor` is
//!   only ever set to a durable ceiling, which is `>=` every value handed out.
//! - A call either serves every id of its batch or changes no `cur_seq` (all-or-nothing).

use rustc_hash::FxHashMap;

use crate::keys::KeyTable;
use crate::minseq::{MinSeqEntries, MinSeqs};
use crate::{
    Ids, KEY_BYTES_MAX, KEYS_PER_SECTION_MAX, NAMESPACES_MAX, NamespaceDef, NsId, SeqError,
};

/// Default limit on the number of ids in one batch call.
pub const BATCH_IDS_MAX_DEFAULT: usize = 10_000;

/// Returns the headroom under which a section raises its ceiling ahead of need: half a step,
/// at least 1. Raising at half a step leaves the background persist half a step of allocations
/// to complete before requests have to wait (Leaf's double buffer).
pub fn headroom_min(step: u64) -> u64 {
    (step / 2).max(1)
}

/// Most values one id may reserve in one range allocation ([`Allocator::next_range_batch`]).
/// A range is served from one section ceiling, so a range far above `step` costs a raise of
/// that many values; a million keeps one call's raise (and the values a crash skips) bounded.
pub const RANGE_COUNT_MAX: u64 = 1_000_000;

/// Default limit on sections in memory, over all namespaces.
pub const SECTIONS_MAX_DEFAULT: usize = 4_194_304;

/// Options of an [`Allocator`].
#[derive(Clone, Debug)]
pub struct AllocatorOptions {
    /// Most ids accepted by one `next_batch` or `current_batch` call (B1).
    pub batch_ids_max: usize,
    /// Most sections in memory, over all namespaces (B1). Each section a request touches
    /// costs its state, a durable raise and a checkpoint entry; with a tiny `section_size`
    /// every new id is a new section. Sections loaded at recovery always load (they are
    /// durable history); requests that would create more get
    /// [`SeqError::SectionsExhausted`].
    pub sections_max: usize,
}

impl Default for AllocatorOptions {
    fn default() -> Self {
        Self {
            batch_ids_max: BATCH_IDS_MAX_DEFAULT,
            sections_max: SECTIONS_MAX_DEFAULT,
        }
    }
}

/// A command to persist a section's new ceiling. The caller persists `max_seq` for
/// `(ns, section)` and then reports back with [`Allocator::raise_durable`] (or
/// [`Allocator::raise_failed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raise {
    /// Namespace of the section.
    pub ns: NsId,
    /// Section index inside the namespace.
    pub section: u64,
    /// The ceiling to persist.
    pub max_seq: u64,
}

/// Outcome of an allocation.
#[derive(Debug, PartialEq, Eq)]
pub enum Alloc {
    /// Every id was served, in request order. `raises` are pre-raises to persist in the
    /// background (requests keep being served from the current ceiling meanwhile).
    Served {
        /// One value per requested id, in request order.
        seqs: Vec<u64>,
        /// Ceilings to persist ahead of need.
        raises: Vec<Raise>,
    },
    /// Nothing was allocated: some section's durable ceiling is too low. Persist `raises`,
    /// report them with [`Allocator::raise_durable`], then retry. An empty `raises` means raises
    /// already in flight cover the need.
    Wait {
        /// Newly requested ceilings the request waits for.
        raises: Vec<Raise>,
    },
}

/// State of one section (see the module documentation).
#[derive(Debug)]
struct Section {
    /// Section index inside its namespace; kept so `ceilings` can report it.
    index: u64,
    /// Dense `cur_seq` per id; empty until the first served allocation in the section.
    cur: Vec<u64>,
    /// `cur_seq` per key (keyed namespaces only); created by the first request for a key.
    keyed: Option<Box<KeyTable>>,
    /// Durable ceiling at the last load: the effective `cur_seq` of every id is at least this.
    floor: u64,
    /// The persisted ceiling: nothing above it is handed out (S2).
    durable_max: u64,
    /// Largest value handed out (or `floor`); drives the raise-ahead decision.
    high: u64,
    /// Highest requested ceiling not yet durable; 0 when no raise is pending.
    pending_max: u64,
    /// Scratch for `next_batch`: largest value the current batch needs here; 0 between calls.
    batch_need: u64,
}

impl Section {
    fn new(index: u64) -> Self {
        Self {
            index,
            cur: Vec::new(),
            keyed: None,
            floor: 0,
            durable_max: 0,
            high: 0,
            pending_max: 0,
            batch_need: 0,
        }
    }

    /// Returns the effective `cur_seq` of the id at `offset`.
    #[inline]
    fn current(&self, offset: usize) -> u64 {
        self.cur
            .get(offset)
            .map_or(self.floor, |&value| value.max(self.floor))
    }

    /// Returns the effective `cur_seq` of the key entry at `entry` (keyed sections).
    #[inline]
    fn current_key(&self, entry: usize) -> u64 {
        self.keyed
            .as_ref()
            .map_or(self.floor, |table| table.value(entry).max(self.floor))
    }

    /// Undoes a tentative write of a batch: puts `previous` back at `position` (an offset of
    /// `cur`, or a key entry in a keyed section).
    fn restore(&mut self, position: usize, previous: u64) {
        if let Some(table) = self.keyed.as_mut() {
            table.set(position, previous);
        } else if let Some(value) = self.cur.get_mut(position) {
            *value = previous;
        }
    }

    /// Returns the ceiling allocations are served from: the durable one.
    #[cfg(not(feature = "planted-serve-before-durable"))]
    #[inline]
    fn serve_ceiling(&self) -> u64 {
        self.durable_max
    }

    /// PLANTED BUG (negative control): serves from the requested, not yet durable ceiling.
    #[cfg(feature = "planted-serve-before-durable")]
    #[inline]
    fn serve_ceiling(&self) -> u64 {
        self.durable_max.max(self.pending_max)
    }

    /// Returns the highest ceiling requested so far, durable or not.
    fn target(&self) -> u64 {
        self.durable_max.max(self.pending_max)
    }

    /// Writes `value` as the `cur_seq` of the id at `offset`, allocating the array first.
    #[inline]
    fn store(&mut self, offset: usize, value: u64, section_len: usize) {
        if self.cur.is_empty() {
            // Zeroed allocation: the pages of ids never touched are never faulted in.
            self.cur = vec![0; section_len];
        }
        if let Some(slot) = self.cur.get_mut(offset) {
            *slot = value;
        }
    }

    /// Requests a ceiling of at least `need` unless a pending raise already covers it.
    fn raise_for(&mut self, ns: NsId, step: u64, need: u64) -> Option<Raise> {
        if self.pending_max >= need {
            return None;
        }
        let steps = need.saturating_sub(self.durable_max).div_ceil(step);
        let rounded = self.durable_max.saturating_add(steps.saturating_mul(step));
        let max_seq = rounded.max(self.target().saturating_add(step));
        self.pending_max = max_seq;
        Some(Raise {
            ns,
            section: self.index,
            max_seq,
        })
    }

    /// Requests the next ceiling ahead of need when headroom fell under `headroom_min`.
    #[inline]
    fn raise_ahead(&mut self, ns: NsId, step: u64, headroom_min: u64) -> Option<Raise> {
        let headroom = self.durable_max.saturating_sub(self.high);
        if self.pending_max != 0 || headroom >= headroom_min || self.durable_max == u64::MAX {
            return None;
        }
        self.pending_max = self.durable_max.saturating_add(step);
        Some(Raise {
            ns,
            section: self.index,
            max_seq: self.pending_max,
        })
    }

    /// Clears the pending marker once the durable ceiling reaches it.
    fn settle_pending(&mut self) {
        if self.pending_max <= self.durable_max {
            self.pending_max = 0;
        }
    }

    /// Asserts the cheap invariant after a transition (debug and test builds only). Under the
    /// planted bug it is left out, so the bug reaches the checkers of the code under test.
    #[inline]
    fn debug_check(&self) {
        #[cfg(not(feature = "planted-serve-before-durable"))]
        debug_assert!(
            self.high <= self.durable_max,
            "S2: section {} issued {} above durable max_seq {}",
            self.index,
            self.high,
            self.durable_max
        );
    }
}

/// One namespace: its definition and its sections in memory.
#[derive(Debug)]
struct Namespace {
    def: NamespaceDef,
    /// `headroom_min(def.step)`, computed once.
    headroom_min: u64,
    /// Sections in memory, in creation order; `slots` maps a section index to its position so
    /// a batch can remember a section by position between its two passes.
    sections: Vec<Section>,
    slots: FxHashMap<u64, usize>,
}

impl Namespace {
    /// Returns the position of `section`, creating its state on first use.
    #[inline]
    fn slot(&mut self, section: u64) -> usize {
        let sections = &mut self.sections;
        *self.slots.entry(section).or_insert_with(|| {
            sections.push(Section::new(section));
            sections.len() - 1
        })
    }

    /// Sections that serving `ids` would create (each counted once).
    fn new_sections(&self, ids: Ids<'_>) -> usize {
        let mut new = rustc_hash::FxHashSet::default();
        for index in 0..ids.len() {
            let section = ids.section_at(&self.def, index);
            if !self.slots.contains_key(&section) {
                new.insert(section);
            }
        }
        new.len()
    }

    fn find(&self, section: u64) -> Option<&Section> {
        self.slots
            .get(&section)
            .and_then(|&slot| self.sections.get(slot))
    }

    /// Returns the state of a section for a storage report, or `None` for a section index
    /// outside the namespace (a report that cannot be ours is ignored).
    fn section_for_report(&mut self, section: u64) -> Option<&mut Section> {
        if section >= self.def.section_count() {
            return None;
        }
        let slot = self.slot(section);
        self.sections.get_mut(slot)
    }

    /// Checks that `ids` are of the namespace's kind and each is valid: numbers in range,
    /// keys of 1 to [`KEY_BYTES_MAX`] bytes.
    fn check_ids(&self, ids: Ids<'_>) -> Result<(), SeqError> {
        match ids {
            Ids::Numeric(ids) => {
                self.check_kind(false)?;
                match ids.iter().find(|&&id| !self.def.contains(id)) {
                    None => Ok(()),
                    Some(&id) => Err(self.out_of_range(id)),
                }
            }
            Ids::Keys(keys) => {
                self.check_kind(true)?;
                match keys
                    .iter()
                    .find(|key| key.is_empty() || key.len() > KEY_BYTES_MAX)
                {
                    None => Ok(()),
                    Some(key) => Err(SeqError::InvalidKey {
                        ns: self.def.name.clone(),
                        len: key.len(),
                        max: KEY_BYTES_MAX,
                    }),
                }
            }
        }
    }

    /// Checks that a request of keys (`keyed`) or numbers fits the namespace's kind.
    fn check_kind(&self, keyed: bool) -> Result<(), SeqError> {
        if keyed == self.def.is_keyed() {
            return Ok(());
        }
        let [expected, got] = if keyed {
            ["numeric ids", "string keys"]
        } else {
            ["string keys", "numeric ids"]
        };
        Err(SeqError::WrongIdKind {
            ns: self.def.name.clone(),
            expected,
            got,
        })
    }

    fn out_of_range(&self, id: u64) -> SeqError {
        SeqError::IdOutOfRange {
            ns: self.def.name.clone(),
            id,
            lo: self.def.id_lo,
            hi: self.def.id_hi,
        }
    }

    fn exhausted(&self, id: String) -> SeqError {
        SeqError::SequenceExhausted {
            ns: self.def.name.clone(),
            id,
        }
    }
}

/// The sequence allocator (see the crate and module documentation).
#[derive(Debug)]
pub struct Allocator {
    options: AllocatorOptions,
    /// Namespaces indexed by `NsId`: a request costs one name lookup and a Vec index.
    namespaces: Vec<Namespace>,
    ids_by_name: FxHashMap<String, NsId>,
    /// Scratch buffers of `next_batch`, kept to avoid allocating per call.
    batch: BatchScratch,
    /// Sections in memory over all namespaces (kept, so a request need not add them up).
    sections_total: usize,
    /// String keys in memory and the bytes their tables hold, over all keyed namespaces
    /// (kept up to date, so a metrics scrape need not walk the sections).
    keys: KeyTotals,
    /// The durable per-id `min_seq` floors.
    min_seqs: MinSeqs,
}

/// Keys in memory and the bytes their tables hold.
#[derive(Debug, Default, Clone, Copy)]
struct KeyTotals {
    count: usize,
    bytes: usize,
}

/// Scratch state of one `next_batch` call; empty between calls.
#[derive(Debug, Default)]
struct BatchScratch {
    /// Positions of the sections the batch touches, in first-touch order.
    touched: Vec<usize>,
    /// `(section position, offset, previous cur)` per write, to undo a batch that must wait.
    undo: Vec<(usize, usize, u64)>,
    /// Last value per id for sections whose array is not allocated and cannot serve: repeated
    /// ids there still need increasing values to size the raise.
    unallocated_last: FxHashMap<u64, u64>,
    /// `(section position, offset)` of each id of the batch, from the first pass.
    positions: Vec<(usize, usize)>,
}

impl Allocator {
    /// Creates an allocator with no namespaces (the node adds `default`).
    pub fn new(options: AllocatorOptions) -> Self {
        Self {
            options,
            namespaces: Vec::new(),
            ids_by_name: FxHashMap::default(),
            batch: BatchScratch::default(),
            sections_total: 0,
            keys: KeyTotals::default(),
            min_seqs: MinSeqs::default(),
        }
    }

    /// Validates and adds a namespace, returning its `NsId` (the next dense index).
    pub fn add_namespace(&mut self, def: NamespaceDef) -> Result<NsId, SeqError> {
        def.validate()?;
        if self.ids_by_name.contains_key(&def.name) {
            return Err(SeqError::NamespaceExists(def.name));
        }
        if self.namespaces.len() >= NAMESPACES_MAX {
            return Err(SeqError::InvalidNamespace(format!(
                "cannot add `{}`: already {NAMESPACES_MAX} namespaces (NAMESPACES_MAX)",
                def.name
            )));
        }
        // NAMESPACES_MAX is far below u32::MAX, so the index always fits.
        let ns = self.namespaces.len() as NsId;
        self.ids_by_name.insert(def.name.clone(), ns);
        self.namespaces.push(Namespace {
            headroom_min: headroom_min(def.step),
            def,
            sections: Vec::new(),
            slots: FxHashMap::default(),
        });
        Ok(ns)
    }

    /// Returns the id and definition of the namespace called `name`.
    pub fn namespace(&self, name: &str) -> Option<(NsId, &NamespaceDef)> {
        let &ns = self.ids_by_name.get(name)?;
        self.namespace_by_id(ns).map(|def| (ns, def))
    }

    /// Returns the definition of namespace `ns`.
    pub fn namespace_by_id(&self, ns: NsId) -> Option<&NamespaceDef> {
        self.namespaces
            .get(ns as usize)
            .map(|namespace| &namespace.def)
    }

    /// Returns every namespace in `NsId` order.
    pub fn namespaces(&self) -> impl Iterator<Item = (NsId, &NamespaceDef)> {
        // NAMESPACES_MAX is far below u32::MAX, so the index always fits.
        (0..).zip(self.namespaces.iter().map(|namespace| &namespace.def))
    }

    /// Returns the options the allocator was created with.
    pub fn options(&self) -> &AllocatorOptions {
        &self.options
    }

    #[inline]
    fn lookup(&self, name: &str) -> Result<NsId, SeqError> {
        // A name longer than any namespace can have is refused before it is hashed, and never
        // echoed whole (B1: a 20 KB name once came back inside the error).
        if name.len() > crate::NAME_BYTES_MAX {
            return Err(SeqError::InvalidNamespace(format!(
                "namespace name of {} bytes; names are at most {} bytes (NAME_BYTES_MAX)",
                name.len(),
                crate::NAME_BYTES_MAX
            )));
        }
        self.ids_by_name
            .get(name)
            .copied()
            .ok_or_else(|| SeqError::UnknownNamespace(name.to_owned()))
    }

    /// Checks a read of `ids` in namespace `ns` (batch size, kind, each id); returns the
    /// namespace.
    fn checked(&self, ns: &str, ids: Ids<'_>) -> Result<(NsId, &Namespace), SeqError> {
        self.check_batch_len(ids.len())?;
        let ns_id = self.lookup(ns)?;
        let namespace = &self.namespaces[ns_id as usize];
        namespace.check_ids(ids)?;
        Ok((ns_id, namespace))
    }

    fn check_batch_len(&self, len: usize) -> Result<(), SeqError> {
        if len == 0 {
            return Err(SeqError::EmptyBatch);
        }
        if len > self.options.batch_ids_max {
            return Err(SeqError::BatchTooLarge {
                len,
                max: self.options.batch_ids_max,
            });
        }
        Ok(())
    }

    /// Allocates the next value of one id; `Served.seqs` has one element.
    pub fn next(&mut self, ns: &str, id: u64) -> Result<Alloc, SeqError> {
        let ns_id = self.lookup(ns)?;
        let Some(namespace) = self.namespaces.get_mut(ns_id as usize) else {
            return Err(SeqError::UnknownNamespace(ns.to_owned()));
        };
        namespace.check_ids(Ids::Numeric(&[id]))?;
        let section = namespace.def.section_of(id);
        let offset = namespace.def.offset_of(id);
        let section_len = namespace.def.section_len(section);
        let (step, headroom_min) = (namespace.def.step, namespace.headroom_min);
        if !namespace.slots.contains_key(&section) {
            if self.sections_total >= self.options.sections_max {
                return Err(SeqError::SectionsExhausted {
                    max: self.options.sections_max,
                });
            }
            self.sections_total += 1;
        }
        let slot = namespace.slot(section);
        let Some(value) = namespace.sections[slot].current(offset).checked_add(1) else {
            return Err(namespace.exhausted(id.to_string()));
        };
        let state = &mut namespace.sections[slot];
        if value > state.serve_ceiling() {
            let raises = state.raise_for(ns_id, step, value).into_iter().collect();
            return Ok(Alloc::Wait { raises });
        }
        state.store(offset, value, section_len);
        state.high = state.high.max(value);
        let raises = state
            .raise_ahead(ns_id, step, headroom_min)
            .into_iter()
            .collect();
        state.debug_check();
        Ok(Alloc::Served {
            seqs: vec![value],
            raises,
        })
    }

    /// Allocates one value per id, in order; a repeated id gets increasing values. Serves all
    /// ids or none: if any section's durable ceiling is too low, nothing is allocated and the
    /// call returns `Wait` with the raises it needs.
    pub fn next_batch<'a>(
        &mut self,
        ns: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Alloc, SeqError> {
        self.next_range_batch(ns, ids, 1)
    }

    /// Reserves `count` consecutive values per id, in order (OpenIM's `Malloc`, Redis's
    /// `INCRBY`): `Served.seqs` holds the **last** value of each id's range, whose first value
    /// is `last - count + 1`; a repeated id gets the next range after its previous one. The same
    /// all-or-nothing rule as [`Allocator::next_batch`] (which is this with `count = 1`).
    /// `count` is 1 to [`RANGE_COUNT_MAX`]; anything else is [`SeqError::InvalidCount`].
    pub fn next_range_batch<'a>(
        &mut self,
        ns: &str,
        ids: impl Into<Ids<'a>>,
        count: u64,
    ) -> Result<Alloc, SeqError> {
        let ids = ids.into();
        if count == 0 || count > RANGE_COUNT_MAX {
            return Err(SeqError::InvalidCount {
                count,
                max: RANGE_COUNT_MAX,
            });
        }
        self.check_batch_len(ids.len())?;
        let ns_id = self.lookup(ns)?;
        let Self {
            namespaces,
            batch,
            sections_total,
            options,
            keys: key_totals,
            ..
        } = self;
        let Some(namespace) = namespaces.get_mut(ns_id as usize) else {
            return Err(SeqError::UnknownNamespace(ns.to_owned()));
        };
        namespace.check_ids(ids)?;
        // Counting the new sections costs a pass; only near the limit is it needed.
        if *sections_total + ids.len() > options.sections_max
            && *sections_total + namespace.new_sections(ids) > options.sections_max
        {
            return Err(SeqError::SectionsExhausted {
                max: options.sections_max,
            });
        }
        let sections_before = namespace.sections.len();
        let mut seqs = Vec::with_capacity(ids.len());
        // Pass 1 writes tentatively (with an undo log) so repeated ids see their own values.
        let assigned = match ids {
            Ids::Numeric(ids) => assign_batch(namespace, ids, count, batch, &mut seqs),
            Ids::Keys(keys) => assign_keys(namespace, keys, count, batch, &mut seqs, key_totals),
        };
        *sections_total += namespace.sections.len() - sections_before;
        let fits = batch.touched.iter().all(|&slot| {
            let state = &namespace.sections[slot];
            state.batch_need <= state.serve_ceiling()
        });
        if assigned.is_err() || !fits {
            for &(slot, position, previous) in batch.undo.iter().rev() {
                namespace.sections[slot].restore(position, previous);
            }
        }
        let step = namespace.def.step;
        let mut raises = Vec::new();
        for &slot in &batch.touched {
            let state = &mut namespace.sections[slot];
            let need = std::mem::take(&mut state.batch_need);
            if assigned.is_err() {
                continue;
            }
            if !fits {
                if need > state.serve_ceiling() {
                    raises.extend(state.raise_for(ns_id, step, need));
                }
                continue;
            }
            state.high = state.high.max(need);
            raises.extend(state.raise_ahead(ns_id, step, namespace.headroom_min));
            state.debug_check();
        }
        batch.touched.clear();
        batch.undo.clear();
        batch.unallocated_last.clear();
        assigned?;
        if fits {
            Ok(Alloc::Served { seqs, raises })
        } else {
            Ok(Alloc::Wait { raises })
        }
    }

    /// Returns the current value of an id (0 if never allocated) without allocating.
    pub fn current(&self, ns: &str, id: u64) -> Result<u64, SeqError> {
        let namespace = &self.namespaces[self.lookup(ns)? as usize];
        namespace.check_ids(Ids::Numeric(&[id]))?;
        Ok(current_of(namespace, id))
    }

    /// Returns the current value of each id (or key), in order; same batch limits as
    /// `next_batch`. A key never seen is at its section's `floor` (0 if never loaded).
    pub fn current_batch<'a>(
        &self,
        ns: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, SeqError> {
        let ids = ids.into();
        let (_, namespace) = self.checked(ns, ids)?;
        Ok(match ids {
            Ids::Numeric(ids) => ids.iter().map(|&id| current_of(namespace, id)).collect(),
            Ids::Keys(keys) => keys
                .iter()
                .map(|key| current_of_key(namespace, key))
                .collect(),
        })
    }

    /// Validates a SetMinSeq of `values` (one per id): the ids as for `current_batch`, and
    /// each value at most the id's current seq. Changes nothing; the caller logs the returned
    /// entries, then stages and commits them in [`Allocator::min_seqs_mut`].
    pub fn prepare_min_seqs<'a>(
        &self,
        ns: &str,
        ids: impl Into<Ids<'a>>,
        values: &[u64],
    ) -> Result<(NsId, MinSeqEntries), SeqError> {
        let ids = ids.into();
        if ids.len() != values.len() {
            return Err(SeqError::MinSeqCount {
                ids: ids.len(),
                values: values.len(),
            });
        }
        let current = self.current_batch(ns, ids)?;
        let ns_id = self.lookup(ns)?;
        if let Some(index) = (0..values.len()).find(|&i| values[i] > current[i]) {
            return Err(SeqError::MinSeqAboveCurrent {
                ns: ns.to_owned(),
                id: ids.describe(index),
                min_seq: values[index],
                current: current[index],
            });
        }
        if !self.min_seqs.has_room(values.len()) {
            return Err(SeqError::MinSeqsExhausted {
                max: crate::MIN_SEQS_MAX,
            });
        }
        let entries = (0..values.len())
            .map(|index| (ids.owned(index), values[index]))
            .collect();
        Ok((ns_id, entries))
    }

    /// Returns the visible `min_seq` of each id (0 where none was set); same limits as
    /// `current_batch`.
    pub fn min_seq_batch<'a>(
        &self,
        ns: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, SeqError> {
        let ids = ids.into();
        let (ns_id, _) = self.checked(ns, ids)?;
        Ok((0..ids.len())
            .map(|index| self.min_seqs.get(ns_id, &ids.owned(index)))
            .collect())
    }

    /// The `min_seq` state, read-only.
    pub fn min_seqs(&self) -> &MinSeqs {
        &self.min_seqs
    }

    /// The `min_seq` state, to stage, commit or recover sets.
    pub fn min_seqs_mut(&mut self) -> &mut MinSeqs {
        &mut self.min_seqs
    }

    /// Returns the number of string keys held in memory over all keyed namespaces, and the
    /// bytes their tables hold (O(1): kept up to date).
    pub fn keys_loaded(&self) -> (usize, usize) {
        (self.keys.count, self.keys.bytes)
    }

    /// Reports that `raise.max_seq` is durable: the section serves up to it from now on, and a
    /// pending marker at or below it is cleared. Reports for unknown sections are ignored.
    pub fn raise_durable(&mut self, raise: Raise) {
        let Some(state) = self.report_target(raise.ns, raise.section) else {
            return;
        };
        state.durable_max = state.durable_max.max(raise.max_seq);
        state.settle_pending();
        state.debug_check();
    }

    /// Reports that persisting `raise` failed: the pending marker is cleared if it is not above
    /// the failed raise, so a later allocation requests a raise again.
    pub fn raise_failed(&mut self, raise: Raise) {
        let Some(state) = self.report_target(raise.ns, raise.section) else {
            return;
        };
        if state.pending_max <= raise.max_seq {
            state.pending_max = 0;
        }
    }

    /// Recovery: a section's durable `max_seq` read from storage. Sets
    /// `durable_max = max(old, max_seq)` and `floor = durable_max`, so every id of the section
    /// continues above it (`cur_seq = max_seq`). Idempotent; O(1).
    pub fn load_section(&mut self, ns: NsId, section: u64, max_seq: u64) {
        let Some(state) = self.report_target(ns, section) else {
            return;
        };
        state.durable_max = state.durable_max.max(max_seq);
        state.floor = state.durable_max;
        state.high = state.high.max(state.floor);
        state.settle_pending();
        state.debug_check();
    }

    /// Forgets a section (cluster mode: it moved to another node). Its values continue only
    /// from a later [`Self::load_section`] of the ceiling the coordinator holds then; reports
    /// about it that arrive meanwhile recreate it with `floor` 0, which a load then raises.
    /// Returns whether the section was in memory.
    pub fn unload_section(&mut self, ns: NsId, section: u64) -> bool {
        let Some(namespace) = self.namespaces.get_mut(ns as usize) else {
            return false;
        };
        let Some(slot) = namespace.slots.remove(&section) else {
            return false;
        };
        let removed = namespace.sections.swap_remove(slot);
        if let Some(table) = removed.keyed {
            self.keys.count -= table.len();
            self.keys.bytes -= table.bytes();
        }
        if let Some(moved) = namespace.sections.get(slot) {
            namespace.slots.insert(moved.index, slot);
        }
        self.sections_total -= 1;
        true
    }

    /// The section a storage report or a recovery load is about, created if needed: those
    /// are durable history, so they are never refused by `sections_max`, but they count.
    fn report_target(&mut self, ns: NsId, section: u64) -> Option<&mut Section> {
        let namespace = self.namespaces.get_mut(ns as usize)?;
        if section < namespace.def.section_count() && !namespace.slots.contains_key(&section) {
            self.sections_total += 1;
        }
        namespace.section_for_report(section)
    }

    /// Returns every section's ceiling to persist in a checkpoint, `max(durable, pending)`, in
    /// `(ns, section)` order; sections with nothing to persist (0) are left out. Persisting a
    /// pending target is safe: after a restart allocation only skips further ahead.
    pub fn ceilings(&self) -> Vec<(NsId, u64, u64)> {
        let mut ceilings = Vec::new();
        for (ns, namespace) in (0..).zip(&self.namespaces) {
            let start = ceilings.len();
            ceilings.extend(
                namespace
                    .sections
                    .iter()
                    .filter(|state| state.target() > 0)
                    .map(|state| (ns, state.index, state.target())),
            );
            ceilings[start..].sort_unstable();
        }
        ceilings
    }

    /// Returns the durable `max_seq` of a section (0 if never raised or loaded).
    pub fn durable_max(&self, ns: NsId, section: u64) -> u64 {
        self.namespaces
            .get(ns as usize)
            .and_then(|namespace| namespace.find(section))
            .map_or(0, |state| state.durable_max)
    }

    /// Returns the number of sections held in memory (touched, raised or loaded).
    pub fn sections_loaded(&self) -> usize {
        debug_assert_eq!(
            self.sections_total,
            self.namespaces
                .iter()
                .map(|namespace| namespace.sections.len())
                .sum::<usize>()
        );
        self.sections_total
    }

    /// Checks every invariant of every section (O(ids in memory)); the error names the first
    /// violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        for namespace in &self.namespaces {
            for state in &namespace.sections {
                check_section(&namespace.def, state)?;
            }
        }
        Ok(())
    }
}

/// Pass 1 of `next_range_batch`: assigns each id its range of `count` values in order, writing
/// the last value tentatively and recording undo entries and per-section needs in `batch`.
fn assign_batch(
    namespace: &mut Namespace,
    ids: &[u64],
    count: u64,
    batch: &mut BatchScratch,
    seqs: &mut Vec<u64>,
) -> Result<(), SeqError> {
    // Pass 1: where each id lives, and a prefetch of its value. Prefetches do not hold up the
    // pipeline, so the cache misses of the whole batch overlap; pass 2 then finds the values in
    // cache instead of missing once per id in turn (a batch of random ids is mostly misses).
    batch.positions.clear();
    for &id in ids {
        let slot = namespace.slot(namespace.def.section_of(id));
        let offset = namespace.def.offset_of(id);
        prefetch(namespace.sections[slot].cur.as_ptr().wrapping_add(offset));
        batch.positions.push((slot, offset));
    }
    for (index, &id) in ids.iter().enumerate() {
        let (slot, offset) = batch.positions[index];
        let state = &mut namespace.sections[slot];
        let section_len = namespace.def.section_len(state.index);
        if state.batch_need == 0 {
            batch.touched.push(slot);
        }
        let unallocated = state.cur.is_empty() && state.floor >= state.serve_ceiling();
        let previous = if unallocated {
            // Nothing fits here (every id is at `floor`): keep values aside, allocate nothing.
            batch
                .unallocated_last
                .get(&id)
                .copied()
                .unwrap_or(state.floor)
        } else {
            state.current(offset)
        };
        let Some(value) = previous.checked_add(count) else {
            return Err(namespace.exhausted(id.to_string()));
        };
        if unallocated {
            batch.unallocated_last.insert(id, value);
        } else {
            let raw = state.cur.get(offset).copied().unwrap_or(0);
            batch.undo.push((slot, offset, raw));
            state.store(offset, value, section_len);
        }
        state.batch_need = state.batch_need.max(value);
        seqs.push(value);
    }
    Ok(())
}

/// Asks the CPU to bring the cache line of `address` in; a hint that never faults, whatever
/// the address (a dangling or past-the-end one included).
#[inline(always)]
fn prefetch(address: *const u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 only hints the cache; it never dereferences architecturally and
    // cannot fault, so any address is sound.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// Pass 1 of `next_range_batch` for a keyed namespace: like [`assign_batch`], with each key's
/// `cur_seq` in its section's [`KeyTable`] (a key seen for the first time is inserted at 0,
/// which reads as the section's `floor`, so an undone insert is as if it never happened).
fn assign_keys(
    namespace: &mut Namespace,
    keys: &[Vec<u8>],
    count: u64,
    batch: &mut BatchScratch,
    seqs: &mut Vec<u64>,
    totals: &mut KeyTotals,
) -> Result<(), SeqError> {
    for key in keys {
        let hash = crate::key_hash(key);
        let section = namespace.def.section_of_hash(hash);
        let slot = namespace.slot(section);
        let state = &mut namespace.sections[slot];
        if state.batch_need == 0 {
            batch.touched.push(slot);
        }
        let table = state.keyed.get_or_insert_with(Box::default);
        let (len, bytes) = (table.len(), table.bytes());
        let found = table.find_or_insert(key, hash);
        totals.count += table.len() - len;
        totals.bytes = totals.bytes + table.bytes() - bytes;
        let Some(entry) = found else {
            return Err(SeqError::SectionKeysExhausted {
                ns: namespace.def.name.clone(),
                section,
                max: KEYS_PER_SECTION_MAX,
            });
        };
        let raw = table.value(entry);
        let Some(value) = raw.max(state.floor).checked_add(count) else {
            return Err(namespace.exhausted(crate::describe_key(key)));
        };
        table.set(entry, value);
        batch.undo.push((slot, entry, raw));
        state.batch_need = state.batch_need.max(value);
        seqs.push(value);
    }
    Ok(())
}

fn current_of_key(namespace: &Namespace, key: &[u8]) -> u64 {
    let hash = crate::key_hash(key);
    let section = namespace.def.section_of_hash(hash);
    namespace.find(section).map_or(0, |state| {
        let entry = state.keyed.as_ref().and_then(|table| table.find(key, hash));
        entry.map_or(state.floor, |entry| state.current_key(entry))
    })
}

fn current_of(namespace: &Namespace, id: u64) -> u64 {
    namespace
        .find(namespace.def.section_of(id))
        .map_or(0, |state| state.current(namespace.def.offset_of(id)))
}

fn check_section(def: &NamespaceDef, state: &Section) -> Result<(), String> {
    let at = || format!("namespace `{}` section {}", def.name, state.index);
    if state.high > state.durable_max {
        return Err(format!(
            "S2 violated in {}: issued {} above durable max_seq {}",
            at(),
            state.high,
            state.durable_max
        ));
    }
    if state.floor > state.durable_max {
        return Err(format!(
            "{}: floor {} above durable max_seq {}",
            at(),
            state.floor,
            state.durable_max
        ));
    }
    if state.pending_max != 0 && state.pending_max <= state.durable_max {
        return Err(format!(
            "{}: stale pending raise {} at or below durable max_seq {}",
            at(),
            state.pending_max,
            state.durable_max
        ));
    }
    if state.batch_need != 0 {
        return Err(format!("{}: batch scratch left set", at()));
    }
    if !state.cur.is_empty() && state.cur.len() != def.section_len(state.index) {
        return Err(format!(
            "{}: cur_seq array has {} ids, section has {}",
            at(),
            state.cur.len(),
            def.section_len(state.index)
        ));
    }
    let keyed = state.keyed.iter().flat_map(|table| table.values());
    if let Some(value) = state
        .cur
        .iter()
        .copied()
        .chain(keyed)
        .find(|&value| value > state.high)
    {
        return Err(format!(
            "{}: cur_seq {} above the highest value handed out {}",
            at(),
            value,
            state.high
        ));
    }
    if state.keyed.is_some() && (!def.is_keyed() || !state.cur.is_empty()) {
        return Err(format!("{}: key table in a numeric section", at()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
