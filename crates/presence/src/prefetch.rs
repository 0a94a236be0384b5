//! A cache prefetch hint, for batch lookups that would otherwise miss the cache once per uid in
//! turn: the uid index bucket, then the record. Issuing the hints of a whole group first lets
//! the misses overlap.

/// Asks the CPU to bring the cache line of `address` in. A hint: it never faults, whatever the
/// address, and does nothing on targets without one.
#[inline(always)]
pub(crate) fn prefetch<T>(address: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 only hints the cache; it does not dereference architecturally and
    // cannot fault, so any address is sound.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}
