//! Ctrl-C and SIGTERM stop a training run cleanly: the first one sets the flag that `train`
//! checks between steps (the run stops with its last checkpoint intact); a second one exits at
//! once.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic operations and _exit here: both are async-signal-safe.
    if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(128 + sig) };
    }
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::SeqCst);
    }
}

/// Install the handlers for SIGINT and SIGTERM; returns the flag they set.
pub fn install() -> Arc<AtomicBool> {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches atomics and calls _exit.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
    flag
}

/// The signal that stopped the run, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
