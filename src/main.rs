//! The `dagr-inject` command line (`dagr_inject::cli`; the Python package's `dagr-inject`
//! command runs the same function).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

/// jemalloc, keeping what the process frees for its next allocations instead of returning it to
/// the system: tract allocates every tensor of a step anew, and glibc's malloc maps each block
/// past 32 MB fresh and unmaps it when freed, so each step paid the kernel for mapping its
/// gigabytes of pages again (500M parameters, AdamW on tract: two steps 40.1 s with glibc or
/// jemalloc's default decay, 14.3 s with this, the same peak RSS). ONNX Runtime has its own
/// arena and its own allocator; the Python binding keeps its interpreter's.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read when it starts: freed pages are never purged (dirty and muzzy
/// decay off), so the peak of the process is what its peak use needs, held to its end.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

fn main() {
    // Output piped into a reader that stops early (`dagr-inject train --help | head`) ends the
    // process quietly, as for other command-line tools, instead of a panic on the failed write.
    // (Only the executable does this; the Python binding leaves its interpreter's handling.)
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(dagr_inject::cli::main_with(std::env::args_os().collect()));
}
