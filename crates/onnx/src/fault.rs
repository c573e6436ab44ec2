//! A test hook for fault injection: with `DAGR_INJECT_FAULT=NAME` (or `NAME@K`, the K-th time,
//! counting from 1) in the environment, the process kills itself with SIGKILL the moment it
//! reaches the point `NAME`, exactly as a `kill -9` there would. The fault-injection tests use
//! it to stop a run at each write boundary of a checkpoint and a log line; without the variable
//! a point costs one relaxed load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

fn target() -> &'static Option<(String, usize)> {
    static T: OnceLock<Option<(String, usize)>> = OnceLock::new();
    T.get_or_init(|| {
        let v = std::env::var("DAGR_INJECT_FAULT").ok()?;
        Some(match v.split_once('@') {
            Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
            None => (v, 1),
        })
    })
}

/// Mark the point `name`; see the module documentation.
pub fn point(name: &str) {
    static HITS: AtomicUsize = AtomicUsize::new(0);
    if let Some((n, k)) = target() {
        if n == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k {
            kill_self();
        }
    }
}

#[cfg(unix)]
fn kill_self() {
    // SAFETY: raise has no memory-safety preconditions.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
}

#[cfg(not(unix))]
fn kill_self() {
    std::process::abort();
}
