//! Bounds checked before work that could exhaust the machine: an allocation that cannot fit in
//! the memory available, thread counts, and the sizes DAGR's pairwise terms grow with.

use crate::error::{Error, Result};

/// Memory the system can still give (`MemAvailable` of `/proc/meminfo`), in bytes; `None`
/// where the platform does not say.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Refuse to allocate `bytes` for `what` when they exceed the available memory.
pub fn check_alloc(bytes: u64, what: &str) -> Result<()> {
    check_alloc_hint(bytes, what, "check the file: its header or dims may be damaged")
}

/// `check_alloc` with a hint of the caller's.
pub fn check_alloc_hint(bytes: u64, what: &str, hint: &str) -> Result<()> {
    match available_memory() {
        Some(avail) if bytes > avail => Err(Error::TooLarge {
            what: what.to_string(),
            needed_mb: bytes.div_ceil(1 << 20),
            available_mb: avail / (1 << 20),
            hint: hint.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The most intra-op threads a session may ask for: far more than any machine's cores would
/// use, far fewer than would exhaust memory on thread stacks.
pub const MAX_THREADS: usize = 1024;

/// The most modalities a DAGR block takes: its anchoring term has one node group per pair.
pub const MAX_MODALITIES: usize = 64;

/// An estimate of the bytes DAGR's pairwise terms hold for a batch of `batch` over
/// `modalities` modalities: the forward and backward graphs keep about sixteen `[B, B]` float32
/// matrices per modality alive (Gram matrix, distances, kernel, log-mean-exp terms and their
/// gradients); runtimes reuse some, so this errs on the side of refusing only what cannot fit.
pub fn dagr_pairwise_bytes(batch: u64, modalities: u64) -> u64 {
    batch
        .saturating_mul(batch)
        .saturating_mul(4)
        .saturating_mul(16)
        .saturating_mul(modalities.max(1))
}
